"""The fused CPU kernels (model/native_ops.py): each against the plain torch ops it replaces, the
decode step through them against the model without them, and the fallback when they cannot be built."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from adapter_helpers import random_lora
from conftest import random_tiny_model
from model import native_ops
from model.adapter import AdapterBatch, adapter_attention, compute_adapter_kv
from model.batch_adapters import BatchAdapters
from model.kv_cache import DecodeRows, PagedKVCache
from model.packed_linear import packing_available
from model.rope import apply_rope, rope_table
from test_engine import random_adapter

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or not packing_available(torch.ones(1)),
                                reason="no C++ compiler or no oneDNN")


@pytest.fixture(scope="module")
def kernels():
    ops = native_ops.load()
    assert ops is not None, "the fused kernels failed to build (see the log)"
    return ops


def test_rms_norm_and_silu_mul_match_torch(kernels):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 96, generator=g), torch.rand(96, generator=g) + 0.5
    got = kernels.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape
    torch.testing.assert_close(got, F.rms_norm(x, (96,), w, 1e-5), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="weight size"):
        kernels.rms_norm(x, w[:10], 1e-5)
    # gate | up side by side; a row stride wider than 2F (int4's padded outputs are sliced views).
    wide = torch.randn(3, 2 * 40 + 16, generator=g)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        gate_up = wide.to(dtype)[:, :80]
        ref = F.silu(gate_up[:, :40].float()) * gate_up[:, 40:].float()
        got = kernels.silu_mul(gate_up, 40)
        assert got.dtype == dtype and got.shape == (3, 40)
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


def test_decode_attention_rotates_appends_and_attends_each_row_over_its_own_tokens(kernels):
    g = torch.Generator().manual_seed(1)
    h, hkv, d, width = 6, 2, 16, 24
    lengths = torch.tensor([1, 9, 24])          # a first token, a middle row, a full row
    b = len(lengths)
    rows_k, rows_v = torch.randn(b * width, hkv, d, generator=g), torch.randn(b * width, hkv, d, generator=g)
    pool_k, pool_v = torch.zeros(50, hkv, d), torch.zeros(50, hkv, d)
    pool_slots = torch.tensor([7, 0, 49])
    cos, sin = rope_table(d, 64, 10000.0, None)
    positions = lengths - 1
    # bf16 q/k/v in a wider (padded) buffer, as the int4 kernel returns them.
    qkv = torch.randn(b, (h + 2 * hkv) * d + 16, generator=g).bfloat16()[:, :(h + 2 * hkv) * d]
    rk, rv = rows_k.clone(), rows_v.clone()
    new_slots = torch.arange(b) * width + lengths - 1      # each row's new token, at its end
    out, q = kernels.decode_attention(qkv, cos[positions], sin[positions], rows_k, rows_v,
                                      new_slots, 0, lengths, pool_k, pool_v, pool_slots, h, hkv)
    for r in range(b):
        heads = qkv[r].float().view(h + 2 * hkv, d)
        q_ref = apply_rope(heads[:h], cos[positions[r]], sin[positions[r]])
        k_new, v_new = apply_rope(heads[h:h + hkv], cos[positions[r]], sin[positions[r]]), heads[h + hkv:]
        slot = r * width + lengths[r] - 1
        rk[slot], rv[slot] = k_new, v_new
        torch.testing.assert_close(q[r], q_ref)
        torch.testing.assert_close(rows_k[slot], k_new)
        torch.testing.assert_close(rows_v[slot], v_new)
        torch.testing.assert_close(pool_k[pool_slots[r]], k_new)
        torch.testing.assert_close(pool_v[pool_slots[r]], v_new)
        keys = rk[r * width:slot + 1].transpose(0, 1).repeat_interleave(h // hkv, 0)
        values = rv[r * width:slot + 1].transpose(0, 1).repeat_interleave(h // hkv, 0)
        ref = F.scaled_dot_product_attention(q_ref[:, None], keys, values)[:, 0]
        torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5)
    # The other slots are untouched.
    written = {r * width + int(lengths[r]) - 1 for r in range(b)}
    assert all(torch.equal(rows_k[s], rk[s]) for s in range(b * width) if s not in written)
    with pytest.raises(RuntimeError, match="outside"):
        kernels.decode_attention(qkv, cos[positions], sin[positions], rows_k, rows_v, new_slots,
                                 width, lengths, pool_k, pool_v, pool_slots, h, hkv)


def test_a_long_row_alone_is_split_across_threads_and_merged_exactly(kernels):
    g = torch.Generator().manual_seed(2)
    h, hkv, d, n = 4, 2, 32, 2500        # long enough for a part per thread
    rows_k, rows_v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    qkv = torch.randn(1, (h + 2 * hkv) * d, generator=g)
    cos, sin = torch.ones(1, d), torch.zeros(1, d)           # position 0's rotation: none
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, q = kernels.decode_attention(qkv, cos, sin, rows_k, rows_v, torch.tensor([n - 1]), 0,
                                          torch.tensor([n]), torch.zeros(1, hkv, d), torch.zeros(1, hkv, d),
                                          torch.tensor([0]), h, hkv)
    finally:
        torch.set_num_threads(threads)
    keys = rows_k.transpose(0, 1).repeat_interleave(h // hkv, 0)
    values = rows_v.transpose(0, 1).repeat_interleave(h // hkv, 0)
    ref = F.scaled_dot_product_attention(q[0][:, None], keys, values)[:, 0]
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)


def test_gated_adapter_attention_matches_the_explicit_reference(kernels):
    model = random_tiny_model()
    cfg = model.config
    # Prompts of different lengths in one group (a key mask), a row with none, and a prompt
    # over twice as long (its own group, a subset of the rows); one query and several.
    kvs = [compute_adapter_kv(model, random_adapter(model, s, layers=(1,), k_len=k, per_head=True))
           for s, k in ((1, 3), (2, 5), (3, 11))]
    layer = AdapterBatch.build([kvs[0], None, kvs[1], kvs[2]], cfg.n_layers).layer(1)
    assert len(layer.groups) == 2 and layer.groups[0].key_mask is not None
    g = torch.Generator().manual_seed(4)
    for t in (1, 3):
        q = torch.randn(4, cfg.n_heads, t, cfg.head_dim, generator=g)
        got, ref = adapter_attention(q, layer, True, kernels), adapter_attention(q, layer)
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _decode_logits(model, prompts, adapters):
    """Prefill each prompt on its own, then decode 3 steps for all rows at once through the
    cache's decode rows (as the engine's CPU decode does) → the decode steps' logits."""
    bs = 16
    cache = PagedKVCache.for_model(model, 16, bs)
    cache.prepare(range(16))
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(prompts))]
    seqs = [object() for _ in prompts]
    lengths = [len(p) for p in prompts]
    last = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            row = BatchAdapters.build([adapters[i]], model.config.n_layers)
            logits = model(torch.tensor([p]), torch.arange(len(p))[None], cache, torch.tensor([tables[i]]), row)
            last.append(int(logits[0, -1].argmax()))
        steps = []
        for _ in range(3):
            order = cache.decode_rows.place(seqs, tables, lengths)     # row r runs seqs[order[r]]
            batch = BatchAdapters.build([adapters[i] for i in order], model.config.n_layers)
            cache.decode_rows.active = True
            try:
                logits = model(torch.tensor([last[i] for i in order])[:, None],
                               torch.tensor([lengths[i] for i in order])[:, None], cache,
                               torch.tensor([tables[i] for i in order]), batch, read_len=max(lengths) + 1)[:, 0]
            finally:
                cache.decode_rows.active = False
            logits = logits[torch.tensor(order).argsort()]
            steps.append(logits)
            last = logits.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
    return torch.stack(steps)


@pytest.mark.parametrize("mode", ["bf16", "int4"])
def test_a_decode_step_through_the_kernels_matches_the_plain_ops_with_every_adapter_kind(mode, kernels,
                                                                                       monkeypatch):
    fused_layers = []
    attend = DecodeRows.attend

    def counted(rows, kernels, layer, *args):
        fused_layers.append(layer)
        return attend(rows, kernels, layer, *args)

    monkeypatch.setattr(DecodeRows, "attend", counted)
    dense = random_tiny_model(tie_embeddings=True)
    models = {}
    for fused in (True, False):
        m = random_tiny_model(tie_embeddings=True)
        m.load_state_dict(dense.state_dict())
        assert m.pack_for_cpu_inference(mode, fused_kernels=fused)
        assert (m.layers[0].attention.kernels is kernels) == fused
        models[fused] = m
    gated = compute_adapter_kv(models[True], random_adapter(dense, 1, layers=(1, 3)))
    lora = random_lora(dense, 4, ("q", "v", "o"), layers=[2])
    # Base rows, a LLaMA-Adapter row (fused attention plus its gated branch) and a LoRA row (its
    # layer falls back to the plain path, the others stay fused) in one batch.
    rows = [(), ((gated, 1.0),), ((lora, 1.0),), ()]
    prompts = [[1, 2, 3], list(range(5, 25)), list(range(40, 47)), [9] * 33]
    got = _decode_logits(models[True], prompts, rows)
    # Every layer of the 3 steps but LoRA's layer 2, which takes the plain path for the whole batch.
    assert fused_layers == [0, 1, 3] * 3
    ref = _decode_logits(models[False], prompts, rows)
    assert len(fused_layers) == 9
    # The same arithmetic rounded in another order (silu·up once instead of twice in bf16).
    assert float((got - ref).norm() / ref.norm()) < 0.01
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_fp32_never_uses_the_kernels_and_the_switch_turns_them_off(monkeypatch):
    m = random_tiny_model(tie_embeddings=True)
    assert m.pack_for_cpu_inference("fp32")
    assert all(layer.attention.kernels is None and layer.ffn_norm.kernels is None for layer in m.layers)
    native_ops.load.cache_clear()
    monkeypatch.setenv(native_ops.DISABLE_ENV, "0")
    try:
        assert native_ops.load() is None
        m = random_tiny_model(tie_embeddings=True)
        assert m.pack_for_cpu_inference("bf16")
        assert m.norm.kernels is None and m.layers[0].feed_forward.kernels is None
    finally:
        native_ops.load.cache_clear()
