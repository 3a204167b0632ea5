"""CPU weight modes (`--weights`): each against fp32 within its documented tolerance, GGUF 4-bit
codes served as they are, adapters in every mode, and batched = solo in every mode."""

import numpy as np
import pytest
import torch

from conftest import random_tiny_model
from model.adapter import AdapterBatch, adapter_attention, compute_adapter_kv
from model.fingerprint import base_fingerprint
from model.loaders import CheckpointError, build_for_inference, build_model, read_checkpoint
from model.loading import LoadedModel, inference_weights, load_model
from model.packed_linear import INT4_GROUP, Int4Weight, packing_available, pack_linear, quantize_int4
from model.weight_modes import WEIGHT_CHOICES, WEIGHT_MODES
from server.engine import Engine
from server.types import EngineConfig, GenerationRequest
from test_engine import greedy, prompt_of, random_adapter, run_until_done, upload

pytestmark = pytest.mark.skipif(not packing_available(torch.ones(1)), reason="no oneDNN in this torch build")
gguf = pytest.importorskip("gguf")

# Relative error of the logits against the dense fp32 model (‖Δ‖ / ‖ref‖), as documented in
# docs/configuration.md ("Weight formats"): fp32 is the same math, bf16 rounds weights and
# inputs to 8 significant bits, int8 keeps 127 levels per output channel, int4 15 per group.
TOLERANCE = {"fp32": 1e-5, "bf16": 0.01, "int8": 0.02, "int4": 0.15}


def _packed(dense, mode):
    model = random_tiny_model(tie_embeddings=True)
    model.load_state_dict(dense.state_dict())
    assert model.pack_for_cpu_inference(mode)
    return model


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", WEIGHT_MODES)
def test_each_mode_matches_fp32_within_its_tolerance_with_and_without_adapters(mode):
    dense = random_tiny_model(tie_embeddings=True)
    packed = _packed(dense, mode)
    cfg = dense.config
    tokens = torch.randint(0, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    w = random_adapter(dense, 1, layers=(1, 3))
    with torch.inference_mode():
        base = dense(tokens)
        for adapter in (None, w):
            batches = [AdapterBatch.build([compute_adapter_kv(m, adapter)] * 3, cfg.n_layers)
                       if adapter is not None else None for m in (dense, packed)]
            ref, got = dense(tokens, adapters=batches[0]), packed(tokens, adapters=batches[1])
            assert _relative_error(got, ref) < TOLERANCE[mode], adapter
            assert got.dtype == torch.float32
        # With the adapter, the mode is far closer to the adapted fp32 model than to the base.
        assert _relative_error(got, base) > 2 * max(_relative_error(got, ref), TOLERANCE["fp32"])


def test_fused_gated_branch_matches_the_explicit_one_and_only_non_fp32_modes_use_it():
    model = random_tiny_model()
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    # Rows with prompts of different lengths (one group, key mask), a row with none, and a
    # prompt over twice as long (its own group, a subset of rows).
    kvs = [compute_adapter_kv(model, random_adapter(model, s, layers=(1,), k_len=k, per_head=True))
           for s, k in ((1, 3), (2, 5), (3, 11))]
    layer = AdapterBatch.build([kvs[0], None, kvs[1], kvs[2]], cfg.n_layers).layer(1)
    assert len(layer.groups) == 2 and layer.groups[0].key_mask is not None
    q = torch.randn(4, cfg.n_heads, 2, cfg.head_dim, generator=g)
    explicit, fused = adapter_attention(q, layer), adapter_attention(q, layer, fused=True)
    assert torch.equal(fused[1], torch.zeros_like(fused[1]))
    assert (fused - explicit).abs().max() < 1e-5 * explicit.abs().max()
    for mode in WEIGHT_MODES:
        assert _packed(random_tiny_model(tie_embeddings=True), mode).layers[0].attention.fused_adapter_attention \
            == (mode != "fp32")


def test_int4_quantization_and_fused_outputs():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(48, 64, generator=g), torch.randn(16, 64, generator=g)
    q = quantize_int4(w1)
    assert q.codes.min() >= 0 and q.codes.max() <= 15 and q.scales.shape == (48, 64 // INT4_GROUP)
    # Round to nearest of 16 levels between each group's min and max: error ≤ half a step.
    assert ((q.dequantize() - w1).abs() <= q.scales.repeat_interleave(INT4_GROUP, 1) / 2 + 1e-6).all()
    x = torch.randn(2, 5, 64, generator=g)
    for mode in ("int8", "int4", "bf16"):
        a, b = pack_linear([w1, w2], mode)(x)
        for got, w in ((a, w1), (b, w2)):
            assert _relative_error(got, x @ w.T) < TOLERANCE[mode], mode
    with pytest.raises(ValueError, match="unknown weight mode"):
        pack_linear([w1], "fp8")


def test_inference_weights_per_device():
    assert inference_weights(None, "cpu") in WEIGHT_CHOICES
    assert inference_weights("int8", "cpu") == "int8"
    assert inference_weights(None, "cuda") is None
    with pytest.raises(ValueError, match="for CPU serving"):
        inference_weights("int8", "cuda")


# ---- GGUF 4-bit codes ------------------------------------------------------------------------------

Q4_LAYERS = {**dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_output"), "Q4_0"),
             **dict.fromkeys(("ffn_gate", "ffn_up", "ffn_down"), "Q4_1")}

def _write_q4_gguf(path, model):
    """`model` as a GGUF with Q4_0 attention, Q4_1 feed-forward and a Q8_0 embedding (the mix
    llama.cpp's Q4 files use), written with the test suite's GGUF writer."""
    from test_loaders import write_gguf

    write_gguf(path, model, {**Q4_LAYERS, "token_embd": "Q8_0"})


def test_gguf_mode_serves_the_files_own_4bit_codes(tmp_path):
    reference = random_tiny_model(seed=5, tie_embeddings=True)
    path = tmp_path / "q4.gguf"
    _write_q4_gguf(path, reference)
    dense = build_model(read_checkpoint(path))            # the file's values, dequantized by gguf
    ckpt = read_checkpoint(path, "gguf")
    four_bit = {name: t for name, t in ckpt.tensors() if isinstance(t, Int4Weight)}
    assert len(four_bit) == 7 * reference.config.n_layers     # every layer matrix; the embedding is Q8_0
    for name, q in four_bit.items():
        # Exact: the codes, scales and minimums are the file's, in the half-split RoPE layout.
        assert torch.equal(q.dequantize(), dense.get_parameter(name)), name
    model, fingerprint = build_for_inference(read_checkpoint(path, "gguf"), "gguf")
    assert fingerprint == base_fingerprint(dense)        # adapters made on the dense load fit
    assert type(model.layers[0].attention.wqkv).__name__ == "Int4Linear"
    assert type(model.output).__name__ == "Int8Linear"         # Q8_0 head: requantized per channel
    tokens = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        # Only the kernel's bf16 scales/inputs and the int8 head separate it from the dense load.
        assert _relative_error(model(tokens), dense(tokens)) < TOLERANCE["int8"]


def test_gguf_mode_needs_a_gguf_file(tiny_model_dir):
    with pytest.raises(CheckpointError, match="not a .gguf file"):
        load_model(tiny_model_dir, weights="gguf")
    with pytest.raises(ValueError, match="pack float32 checkpoints for the CPU"):
        load_model(tiny_model_dir, dtype=torch.bfloat16, weights="bf16")


def test_int4_codes_unpack_like_gguf():
    from model.loaders.gguf import int4_codes

    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for kind in ("Q4_0", "Q4_1"):
        t = getattr(gguf.GGMLQuantizationType, kind)
        blocks = gguf.quants.quantize(w, t)
        expected = torch.from_numpy(np.asarray(gguf.quants.dequantize(blocks, t), dtype=np.float32))
        assert torch.equal(int4_codes(blocks, (4, 64), kind).dequantize(), expected.reshape(4, 64))


# ---- the engine in every mode ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", WEIGHT_CHOICES)
def test_batched_equals_solo_with_adapters_in_every_mode(mode, tmp_path, tiny_model_dir, tiny_loaded):
    from adapters.registry import AdapterRegistry
    from adapters.store import AdapterStore
    from test_loaders import write_gguf

    if mode == "gguf":
        # The tiny model's dims are multiples of 32 (the Q4 block); its tokenizer stays beside it.
        write_gguf(tmp_path / "m.gguf", load_model(tiny_model_dir).model, Q4_LAYERS)
        model, fingerprint = build_for_inference(read_checkpoint(tmp_path / "m.gguf", mode), mode)
        loaded = LoadedModel(model, tiny_loaded.tokenizer, model.config, fingerprint, "tiny", tmp_path, mode)
    else:
        loaded = load_model(tiny_model_dir, weights=mode)
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), loaded.model, loaded.fingerprint)
    model = loaded.model
    for name, seed in (("a", 1), ("b", 2)):
        upload(registry, loaded, tmp_path, name, random_adapter(model, seed, layers=(1, 3)))
    jobs = [("a", 5, 6), (None, 9, 6), ("b", 12, 6), ("a", 7, 6)]
    requests = [GenerationRequest(prompt_of(loaded, n, i), greedy(new), adapter=name)
                for i, (name, n, new) in enumerate(jobs)]

    def run(batch):
        engine = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=64, max_seq_len=64))
        return run_until_done(engine, [engine.submit(r) for r in batch])

    together = run(requests)
    for req, res in zip(requests, together):
        (solo,) = run([req])
        assert res.token_ids == solo.token_ids, (mode, req.adapter)
        assert res.logprobs == pytest.approx(solo.logprobs, abs=1e-3)
    # The adapters change what is generated in this mode too.
    assert together[0].token_ids != run([GenerationRequest(requests[0].prompt_ids, greedy(6))])[0].token_ids
