"""LLaMA-Adapter against HF PEFT's `adaption_prompt`: a PEFT adapter with random prompts and
non-zero gates, saved by PEFT and imported into our format, gives PEFT's greedy tokens and
per-token log-probs (fp32, within 1e-4); a zero-gate adapter gives the base model exactly."""

from __future__ import annotations

import pytest
import torch

from adapters.importers import import_peft
from model.adapter import AdapterBatch, compute_adapter_kv
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


def _peft_greedy(peft_model, prompt_ids, n, stop_ids=()):
    """PEFT's greedy tokens (its own generate) and their log-probs from one teacher-forced pass."""
    prompt = torch.tensor([prompt_ids])
    with torch.no_grad():
        generated = peft_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=n, do_sample=False, pad_token_id=0,
                                        eos_token_id=list(stop_ids) or None)[0, len(prompt_ids):].tolist()
        full = torch.tensor([prompt_ids + generated])
        logprobs = peft_model(input_ids=full).logits[0, len(prompt_ids) - 1:-1].float().log_softmax(-1)
    return generated, logprobs.gather(-1, torch.tensor(generated)[:, None])[:, 0].tolist()


def _assert_same_generation(ours_out, peft_out):
    assert ours_out[0] == peft_out[0]
    torch.testing.assert_close(torch.tensor(ours_out[1]), torch.tensor(peft_out[1]), atol=1e-4, rtol=0)


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
    _assert_same_generation(ours_out, _peft_greedy(peft_model, prompt, 16))
    # The adapter matters: without it the model says something else.
    assert greedy(ours, prompt, 16)[0] != ours_out[0]


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
    _assert_same_generation(ours_out, _peft_greedy(peft_model, prompt, 20, stop_ids=stop))
    assert greedy(lm.model, prompt, 20, stop_ids=stop)[0] != ours_out[0]
