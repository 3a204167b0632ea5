"""LoRA and prefix-tuning adapters next to LLaMA-Adapters: the store, the pool, a mixed engine
batch, composition, and hostile uploads, on a tiny random model."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_helpers import adapter_bytes, random_lora, random_prefix, tree_snapshot
from conftest import greedy_generate
from test_engine import greedy, prompt_of, random_adapter, run_until_done, tiny_loaded_model

from adapters.format import load_adapter, metadata_for, save_adapter
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from adapters.validation import AdapterValidationError
from model.adapter import compute_adapter_kv
from model.batch_adapters import BatchAdapters
from model.lora import LORA_TARGETS
from server.engine import Engine
from server.types import EngineConfig, GenerationRequest, InvalidRequestError

ALL = LORA_TARGETS


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


@pytest.fixture(scope="module")
def dense():
    """The same random model, never packed: reference outputs and merged-weight checks."""
    return tiny_loaded_model().model


@pytest.fixture
def registry(loaded, tmp_path):
    return AdapterRegistry(AdapterStore(tmp_path / "store"), loaded.model, loaded.fingerprint)


def _adapters(model):
    return {"llama1": random_adapter(model, 1), "llama2": random_adapter(model, 2, layers=(0, 2), k_len=6, per_head=True),
            "lora8": random_lora(model, 8, ("q", "v"), seed=3),
            "lora64": random_lora(model, 64, ALL, alpha=32, use_rslora=True, seed=4, std=0.08),
            "prefix": random_prefix(model, 5, seed=5)}


def _upload_all(registry, loaded, adapters):
    for name, w in adapters.items():
        registry.upload(name, adapter_bytes(loaded.model, w, loaded.fingerprint))


def _resident(model, w):
    return compute_adapter_kv(model, w) if hasattr(w, "prompts") else w


def reference(model, prompt, parts, n):
    """Greedy with the plainest KV-cache loop (conftest), batch of one, with the row's adapters."""
    adapters = BatchAdapters.build([tuple((_resident(model, w), x) for w, x in parts)], model.config.n_layers)
    return greedy_generate(model, prompt, n, adapters)


def test_every_kind_round_trips_through_the_store(loaded, registry):
    adapters = _adapters(loaded.model)
    _upload_all(registry, loaded, adapters)
    kinds = {a.name: a.latest.kind for a in registry.list()}
    assert kinds == {"llama1": "llama-adapter", "llama2": "llama-adapter", "lora8": "lora", "lora64": "lora",
                     "prefix": "prefix-tuning"}
    lora = registry.resolve("lora64")
    assert lora.param_count == adapters["lora64"].param_count()
    weights, meta = load_adapter(registry.store.path(lora))
    assert meta.lora_rank == 64 and meta.lora_rslora and meta.lora_targets == ALL
    assert all(torch.equal(weights.a[t], adapters["lora64"].a[t]) for t in ALL)
    with registry.acquire("prefix") as lease:
        assert torch.equal(lease.kv.keys, adapters["prefix"].keys)
    stats = registry.stats()   # LoRA weights are in the pool's budget like prefix K/V
    assert stats.resident_count == 5 and stats.resident_bytes >= adapters["lora64"].nbytes()


def test_mixed_batch_gives_every_row_its_solo_output(loaded, dense, registry):
    adapters = _adapters(loaded.model)
    _upload_all(registry, loaded, adapters)
    engine = Engine(loaded, registry, EngineConfig(max_batch=8, max_tokens_per_step=24, max_seq_len=96))
    jobs = [(None, 9, 6), ("llama1", 6, 7), ("llama2", 12, 5), ("lora8", 7, 8), ("lora64", 10, 6),
            ("prefix", 8, 7), ("lora8:0.5+lora64:0.7+llama1:0.6", 11, 6), ("lora8", 5, 4)]
    requests = [GenerationRequest(prompt_of(loaded, n, 40 + i), greedy(new), adapter=ref)
                for i, (ref, n, new) in enumerate(jobs)]
    batched = run_until_done(engine, [engine.submit(r) for r in requests])
    for req, res in zip(requests, batched):
        (solo,) = run_until_done(engine, [engine.submit(req)])
        assert res.token_ids == solo.token_ids, req.adapter
        assert res.logprobs == pytest.approx(solo.logprobs, abs=1e-5), req.adapter
        parts = [(adapters[r.split(":")[0]], float(r.split(":")[1]) if ":" in r else 1.0)
                 for r in (req.adapter.split("+") if req.adapter else [])]
        ref_tokens, ref_logprobs = reference(dense, req.prompt_ids, parts, req.params.max_new_tokens)
        assert res.token_ids == ref_tokens, req.adapter
        assert res.logprobs == pytest.approx(ref_logprobs, abs=1e-4), req.adapter
    assert batched[6].adapter_ref == "lora8@1:0.5+lora64@1:0.7+llama1@1:0.6"
    assert registry.stats().pinned_count == 0
    base_tokens = reference(dense, requests[3].prompt_ids, [], 8)[0]
    assert batched[3].token_ids != base_tokens    # the LoRA matters


def test_lora_rows_leave_base_rows_bit_identical(dense):
    lora = random_lora(dense, 8, ALL, seed=9)
    tokens = torch.randint(0, dense.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = dense(tokens)
        mixed = dense(tokens, adapters=BatchAdapters.build([(), ((lora, 1.0),), ()], dense.config.n_layers))
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    assert not torch.allclose(mixed[1], base[1])


def test_composed_loras_equal_their_merged_weights(dense):
    """Σ w_i s_i B_i A_i merged into a copy of the dense weights gives the same logits."""
    cfg = dense.config
    a = random_lora(dense, 4, ("q", "v", "down"), seed=11)
    b = random_lora(dense, 16, ("v", "o", "up"), layers=[1, 2], alpha=8, use_rslora=True, seed=12)
    merged = copy.deepcopy(dense)
    modules = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
               "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}
    with torch.no_grad():
        for w, weight in ((a, 0.7), (b, -0.4)):
            for i, layer in enumerate(w.layers):
                for t in w.targets:
                    lin = merged.layers[layer].get_submodule(modules[t])
                    lin.weight += weight * w.scaling * (w.b[t][i] @ w.a[t][i])
        tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
        ours = dense(tokens, adapters=BatchAdapters.build([((a, 0.7), (b, -0.4))] * 2, cfg.n_layers))
        torch.testing.assert_close(ours, merged(tokens), atol=1e-4, rtol=0)


def test_incompatible_compositions_are_refused(loaded, registry):
    adapters = _adapters(loaded.model)
    _upload_all(registry, loaded, adapters)
    for ref, reason in (("prefix+lora8", "prefix-tuning adapter .* cannot be composed"),
                        ("lora8:0+llama1", "non-zero"), ("lora8:11+llama1", "within"),
                        ("lora8+lora8@1", "twice")):
        with pytest.raises(AdapterValidationError, match=reason):
            registry.acquire(ref)
    assert registry.stats().pinned_count == 0
    with pytest.raises(LookupError):
        registry.acquire("lora8+missing")
    assert registry.stats().pinned_count == 0


def test_prefix_rows_must_fit_the_position_table(loaded, registry):
    _upload_all(registry, loaded, {"prefix": random_prefix(loaded.model, 5)})
    engine = Engine(loaded, registry, EngineConfig(max_batch=2, max_seq_len=loaded.config.max_seq_len))
    prompt = prompt_of(loaded, 10, 0)
    with pytest.raises(InvalidRequestError, match="prefix of 5"):
        engine.submit(GenerationRequest(prompt, greedy(loaded.config.max_seq_len - 12), adapter="prefix"))
    assert registry.stats().pinned_count == 0


# ---- hostile LoRA uploads: refused, nothing persisted ----------------------------------------
def _lora_bytes(loaded, w, tmp_path, meta_edit=None, tensor_edit=None):
    meta = metadata_for(w, loaded.model, "uploaded", fingerprint=loaded.fingerprint)
    if meta_edit:
        meta_edit(meta)
    path = tmp_path / "evil.safetensors"
    save_adapter(path, w, meta)
    if tensor_edit:
        from safetensors.torch import load_file, save_file
        tensors = load_file(path)
        tensor_edit(tensors)
        save_file(tensors, path, metadata=meta.to_strings())
    return path.read_bytes()


def test_hostile_lora_uploads_are_refused_with_nothing_persisted(loaded, registry, tmp_path):
    model = loaded.model
    registry.upload("existing", adapter_bytes(model, random_lora(model, 2, ("q",)), loaded.fingerprint))
    before = tree_snapshot(registry.store.root)
    nan = random_lora(model, 4, ("q", "v"))
    nan.b["v"][1, 3, 2] = float("nan")
    bad_target = random_lora(model, 4, ("q",))

    def rename_target(tensors):
        for ab in "AB":
            tensors[f"layers.0.lora.qkv.{ab}"] = tensors.pop(f"layers.0.lora.q.{ab}")

    cases = [
        (_lora_bytes(loaded, random_lora(model, 129, ("q",), layers=[0]), tmp_path), "rank 129 exceeds the limit of 128"),
        (_lora_bytes(loaded, random_lora(model, 4, ("q",)), tmp_path,
                     tensor_edit=lambda t: t.__setitem__("layers.1.lora.q.A", torch.zeros(4, 32))),
         "shape differs|lora target 'q'"),
        (_lora_bytes(loaded, random_lora(model, 4, ("q",)), tmp_path,
                     tensor_edit=lambda t: [t.__setitem__(f"layers.{i}.lora.q.A", torch.zeros(4, 32)) for i in range(3)]),
         "lora target 'q': A is \\[r, 32\\]"),
        (_lora_bytes(loaded, nan, tmp_path), "NaN"),
        (_lora_bytes(loaded, bad_target, tmp_path, meta_edit=lambda m: setattr(m, "lora_targets", ("qkv",))),
         "lora_targets \\['qkv'\\]"),
        (_lora_bytes(loaded, bad_target, tmp_path, tensor_edit=rename_target), "unexpected tensors"),
    ]
    for data, reason in cases:
        with pytest.raises(AdapterValidationError, match=reason):
            registry.upload("evil", data)
        assert tree_snapshot(registry.store.root) == before
    assert [a.name for a in registry.list()] == ["existing"]
