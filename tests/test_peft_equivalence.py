"""LLaMA-Adapter against HF PEFT's `adaption_prompt`: a PEFT adapter with random prompts and
non-zero gates, saved by PEFT and imported into our format, gives PEFT's greedy tokens and
per-token log-probs (fp32, within 1e-4); a zero-gate adapter gives the base model exactly."""

from __future__ import annotations

import pytest
import torch

from adapters.format import metadata_for
from adapters.importers import export_peft, import_peft
from model.adapter import AdapterBatch, AdapterWeights, compute_adapter_kv
from model.loaders import build_model, read_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _peft_model(base, adapter_len: int, adapter_layers: int, prompt_std: float, seed: int,
                gates: tuple[float, float] | None):
    """PEFT adaption-prompt model with random prompts; gates uniform in `gates` (None: PEFT's zeros)."""
    model = peft.get_peft_model(base, peft.AdaptionPromptConfig(
        adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM")).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=gen) * prompt_std)
            elif name.endswith("adaption_gate") and gates is not None:
                p.copy_(torch.empty(p.shape).uniform_(*gates, generator=gen))
    return model


def _ours_adapter(peft_model, ours, tmp_path):
    """Through the files, as a user would: PEFT save_pretrained → our importer → adapter K/V."""
    peft_model.save_pretrained(tmp_path / "peft")
    (imported,) = import_peft(tmp_path / "peft", ours.config)
    return imported.weights, AdapterBatch.build([compute_adapter_kv(ours, imported.weights)],
                                                ours.config.n_layers)


def _assert_peft_agrees(peft_model, prompt_ids, ours_out):
    """PEFT, teacher-forced over our greedy continuation, picks the same token at every step (so its
    greedy decoding would produce the same sequence) with the same log-probs."""
    tokens, logprobs = ours_out
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1]
    peft_logprobs = logits.float().log_softmax(-1)
    assert peft_logprobs.argmax(-1).tolist() == tokens
    chosen = peft_logprobs.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs), chosen, atol=1e-4, rtol=0)


def _assert_base_differs(model, prompt_ids, tokens):
    """The adapter matters: the base model, teacher-forced on the same text, would pick other tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens]))[0, len(prompt_ids) - 1:-1]
    assert logits.argmax(-1).tolist() != tokens


@pytest.fixture
def tiny_hf(tmp_path, tiny_config_factory):
    """A tiny random transformers LLaMA and our model loaded from its save_pretrained directory."""
    cfg = tiny_config_factory(n_layers=4)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items()
                                         if k not in ("architectures", "model_type", "torch_dtype")},
                                      initializer_range=0.1)
    base = transformers.LlamaForCausalLM(hf_cfg).eval()
    base.save_pretrained(tmp_path / "base")
    return base, build_model(read_checkpoint(tmp_path / "base"))


def test_tiny_model_matches_peft(tiny_hf, tmp_path, greedy):
    base, ours = tiny_hf
    peft_model = _peft_model(base, adapter_len=6, adapter_layers=3, prompt_std=1.0, seed=1, gates=(0.3, 1.0))
    weights, adapters = _ours_adapter(peft_model, ours, tmp_path)
    assert weights.layers == [1, 2, 3] and weights.adapter_len == 6 and weights.gate_kind == "scalar"
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, ours.config.vocab_size, (9,), generator=gen).tolist()
    ours_out = greedy(ours, prompt, 16, adapters)
    _assert_peft_agrees(peft_model, prompt, ours_out)
    _assert_base_differs(ours, prompt, ours_out[0])


def test_zero_gate_adapter_equals_base_exactly(tiny_hf, tmp_path, greedy):
    base, ours = tiny_hf
    peft_model = _peft_model(base, adapter_len=4, adapter_layers=2, prompt_std=1.0, seed=3, gates=None)
    weights, adapters = _ours_adapter(peft_model, ours, tmp_path)
    assert torch.count_nonzero(weights.gates) == 0 and torch.count_nonzero(weights.prompts) > 0
    tokens = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    kv = compute_adapter_kv(ours, weights)
    with torch.no_grad():
        adapted = ours(tokens, adapters=AdapterBatch.build([kv, kv], ours.config.n_layers))
        assert torch.equal(adapted, ours(tokens))
    prompt = tokens[0].tolist()
    assert greedy(ours, prompt, 8, adapters) == greedy(ours, prompt, 8)


@pytest.mark.slow
def test_default_model_matches_peft(default_model, tmp_path, greedy):
    lm = default_model
    base = transformers.AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    # Prompts on the scale of the token embeddings (std ≈ 0.14); PEFT's documented shape K=10, L=28.
    peft_model = _peft_model(base, adapter_len=10, adapter_layers=28, prompt_std=0.15, seed=5,
                             gates=(0.2, 0.6))
    _, adapters = _ours_adapter(peft_model, lm.model, tmp_path)
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "Write one sentence about the sea."}])
    stop = lm.tokenizer.stop_ids
    ours_out = greedy(lm.model, prompt, 20, adapters, stop_ids=stop)
    _assert_peft_agrees(peft_model, prompt, ours_out)
    _assert_base_differs(lm.model, prompt, ours_out[0])


# ---- LoRA and prefix tuning ------------------------------------------------------------------
def _randomize(model, names: tuple[str, ...], std: float, seed: int):
    """PEFT zero-initialises lora_B: give every adapter tensor random values so the delta shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def _imported(peft_model, ours, tmp_path, label="peft"):
    peft_model.save_pretrained(tmp_path / label)
    (imported,) = import_peft(tmp_path / label, ours.config)
    return imported


def _greedy_with(ours, greedy, prompt, weights, n=12, stop_ids=()):
    from model.batch_adapters import BatchAdapters

    resident = compute_adapter_kv(ours, weights) if isinstance(weights, AdapterWeights) else weights
    return greedy(ours, prompt, n, BatchAdapters.build([((resident, 1.0),)], ours.config.n_layers), stop_ids)


@pytest.mark.parametrize("targets,rank,alpha,rslora,layers", [
    (["q_proj", "v_proj"], 8, 16, False, None),
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 8, False, None),
    (["k_proj", "down_proj"], 16, 4, True, [1, 3]),
])
def test_lora_matches_peft(tiny_hf, tmp_path, greedy, targets, rank, alpha, rslora, layers):
    base, ours = tiny_hf
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                             layers_to_transform=layers, task_type="CAUSAL_LM", lora_dropout=0.0)
    peft_model = _randomize(peft.get_peft_model(base, config).eval(), ("lora_A", "lora_B"), 0.3, 7)
    imported = _imported(peft_model, ours, tmp_path)
    w = imported.weights
    assert w.targets == tuple(t.removesuffix("_proj") for t in targets) and w.rank == rank
    assert w.layers == (layers or list(range(ours.config.n_layers)))
    prompt = torch.randint(0, ours.config.vocab_size, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    out = _greedy_with(ours, greedy, prompt, w)
    _assert_peft_agrees(peft_model, prompt, out)
    _assert_base_differs(ours, prompt, out[0])
    # Export → PEFT loads it → the same logits as the original PEFT model.
    meta = metadata_for(w, ours, "imported:peft")
    exported = export_peft(w, meta, tmp_path / "exported")
    base_again = peft_model.unload() if hasattr(peft_model, "unload") else base
    reloaded = peft.PeftModel.from_pretrained(base_again, exported).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits[0], _ours_logits(ours, ids, w),
                                   atol=1e-4, rtol=0)


def _ours_logits(ours, ids, weights):
    from model.batch_adapters import BatchAdapters

    resident = compute_adapter_kv(ours, weights) if isinstance(weights, AdapterWeights) else weights
    with torch.no_grad():
        return ours(ids, adapters=BatchAdapters.build([((resident, 1.0),)], ours.config.n_layers))[0]


def test_prefix_tuning_matches_peft(tiny_hf, tmp_path, greedy):
    base, ours = tiny_hf
    config = peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")
    peft_model = _randomize(peft.get_peft_model(base, config).eval(), ("prompt_encoder",), 1.0, 9)
    w = _imported(peft_model, ours, tmp_path).weights
    assert w.prefix_len == 5 and tuple(w.keys.shape) == (4, ours.config.n_kv_heads, 5, ours.config.head_dim)
    prompt = torch.randint(0, ours.config.vocab_size, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    out = _greedy_with(ours, greedy, prompt, w)
    _assert_peft_agrees(peft_model, prompt, out)
    _assert_base_differs(ours, prompt, out[0])
    exported = export_peft(w, metadata_for(w, ours, "imported:peft"), tmp_path / "exported")
    reloaded = peft.PeftModel.from_pretrained(peft_model.get_base_model(), exported).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits[0], _ours_logits(ours, ids, w), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_default_model_lora_and_prefix_tuning_match_peft(default_model, tmp_path, greedy):
    lm = default_model
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "Write one sentence about the sea."}])
    stop = lm.tokenizer.stop_ids
    for label, config, names, std in (
            ("lora", peft.LoraConfig(r=16, lora_alpha=16, use_rslora=True, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"]), ("lora_A", "lora_B"), 0.05),
            ("prefix", peft.PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"), ("prompt_encoder",), 0.5)):
        base = transformers.AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
        peft_model = _randomize(peft.get_peft_model(base, config).eval(), names, std, 13)
        w = _imported(peft_model, lm.model, tmp_path, label).weights
        ours_out = _greedy_with(lm.model, greedy, prompt, w, 20, stop)
        _assert_peft_agrees(peft_model, prompt, ours_out)
        _assert_base_differs(lm.model, prompt, ours_out[0])
