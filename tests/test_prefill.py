"""Prefill over the paged cache: a first chunk (every row from position 0) attends to its own keys
only, with no gather and no mask; it must give what the general cached path gives, logits and
stored K/V alike, with adapters, padding and weight modes."""

import pytest
import torch

from conftest import random_tiny_model
from model.adapter import AdapterBatch, AdapterWeights, compute_adapter_kv
from model.kv_cache import PagedKVCache
from model.llama import _StepContext
from model.packed_linear import OneDNNLinear, packing_available

LENGTHS = (19, 7, 33)       # rows of a padded chunk, the longest spanning three blocks


def _chunk(model):
    """A padded 3-row prompt chunk from position 0, its block tables, and two adapted rows."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    tokens = torch.randint(0, cfg.vocab_size, (len(LENGTHS), width), generator=g)
    positions = torch.arange(width).expand(len(LENGTHS), width)
    tables = torch.tensor([[4, 1, 8], [0, 5, 6], [3, 2, 7]])      # scattered blocks on purpose
    weights = AdapterWeights([1, 3], torch.randn(2, 5, cfg.dim, generator=g),
                             torch.rand(2, cfg.n_heads, generator=g) + 0.5)
    kv = compute_adapter_kv(model, weights)
    adapters = AdapterBatch.build([kv, None, kv], cfg.n_layers)
    return tokens, positions, tables, adapters


def _prefill(model, read_len):
    """Logits at every real position and the cache after the chunk. read_len=None lets the model
    choose (the first-chunk path); a given read_len forces the general cached path."""
    tokens, positions, tables, adapters = _chunk(model)
    cache = PagedKVCache.for_model(model, 9, 16)
    cache.prepare(range(9))
    with torch.inference_mode():
        hidden = model.run_layers(model.tok_embeddings(tokens), positions, cache, tables, adapters,
                                  read_len=read_len)
        logits = [model.head(hidden[i, :n]) for i, n in enumerate(LENGTHS)]
    slots = [tables[i].repeat_interleave(16)[:n] * 16 + torch.arange(n) % 16 for i, n in enumerate(LENGTHS)]
    stored = [(cache.k[:, s], cache.v[:, s]) for s in slots]
    return logits, stored


def _same_prefill(model, atol):
    fast, fast_kv = _prefill(model, None)
    general, general_kv = _prefill(model, max(LENGTHS))
    for a, b in zip(fast, general):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for (ka, va), (kb, vb) in zip(fast_kv, general_kv):
        torch.testing.assert_close(ka[0], kb[0], rtol=0, atol=0)    # layer 0's: before any attention
        torch.testing.assert_close(ka, kb, rtol=0, atol=atol)
        torch.testing.assert_close(va, vb, rtol=0, atol=atol)


def test_only_a_chunk_starting_every_row_at_zero_skips_the_cache_read():
    model = random_tiny_model()
    cfg = model.config
    cache = PagedKVCache.for_model(model, 4, 16)
    tables = torch.tensor([[0, 1], [2, 3]])

    def own_keys_only(positions, read_len=None):
        return _StepContext(cache, tables, positions, cfg.n_heads // cfg.n_kv_heads, read_len, None,
                            torch.float32, None, None).own_keys_only      # no decode rows: no RoPE rows

    assert own_keys_only(torch.arange(8).expand(2, 8))
    assert not own_keys_only(torch.stack([torch.arange(8), torch.arange(8) + 16]))   # a later chunk
    assert not own_keys_only(torch.tensor([[5], [9]]))                               # decode
    assert not own_keys_only(torch.arange(8).expand(2, 8), read_len=8)               # a fixed read


def test_first_chunk_gives_the_general_paths_logits_and_cache_fp32():
    _same_prefill(random_tiny_model().eval(), atol=1e-5)


@pytest.mark.skipif(not packing_available(torch.ones(1)), reason="no oneDNN in this torch build")
def test_first_chunk_in_bf16_weights_stays_within_bf16_rounding():
    """bf16 weights: attention over a first chunk runs in bf16 (wo's input dtype)."""
    model = random_tiny_model().eval()
    model.pack_for_cpu_inference("bf16")
    _same_prefill(model, atol=0.02)


@pytest.mark.skipif(not packing_available(torch.ones(1)), reason="no oneDNN in this torch build")
def test_packed_linear_native_output_is_the_kernels_dtype():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(48, 32, generator=g), torch.randn(16, 32, generator=g)
    x = torch.randn(2, 5, 32, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        linear = OneDNNLinear([w1, w2], dtype)
        native, as_float = linear.native(x), linear(x)
        assert all(n.dtype == dtype for n in native) and all(f.dtype == torch.float32 for f in as_float)
        for n, f in zip(native, as_float):
            torch.testing.assert_close(n.float(), f, rtol=0, atol=0)
        # A native output feeds the next product as it is (bf16 in, no round trip).
        torch.testing.assert_close(OneDNNLinear([w2.T.contiguous()], dtype)(native[1]),
                                   OneDNNLinear([w2.T.contiguous()], dtype)(as_float[1]), rtol=0, atol=0)
