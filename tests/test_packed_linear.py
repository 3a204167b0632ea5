"""The oneDNN-packed CPU inference path computes what the dense model computes."""

import copy

import pytest
import torch

from conftest import random_tiny_model
from model.adapter import AdapterBatch, AdapterWeights, compute_adapter_kv
from model.kv_cache import PagedKVCache
from model.packed_linear import OneDNNLinear, packing_available
from training.model import freeze

pytestmark = pytest.mark.skipif(not packing_available(torch.ones(1)), reason="no oneDNN in this torch build")


def test_packed_linear_matches_f_linear_and_splits_fused_outputs():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(48, 32, generator=g), torch.randn(16, 32, generator=g)
    for rows in (1, 5, 33):
        x = torch.randn(2, rows, 32, generator=g)
        a, b = OneDNNLinear([w1, w2])(x)
        torch.testing.assert_close(a, x @ w1.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, x @ w2.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(OneDNNLinear([w1])(x), x @ w1.T, rtol=1e-5, atol=1e-5)


def _adapters(model, seed):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    layers = [1, 3]
    return AdapterWeights(layers, torch.randn(len(layers), 5, cfg.dim, generator=g),
                          torch.rand(len(layers), cfg.n_heads, generator=g) + 0.5)


def _decode_logits(model, adapter_weights):
    """Prefill 3 rows (two with adapters) through a KV cache, then 4 decode steps → logits."""
    cfg = model.config
    cache = PagedKVCache.for_model(model, 6, 16)
    slots = torch.tensor([[4, 1], [0, 5], [3, 2]])     # block tables, scattered on purpose
    kvs = [compute_adapter_kv(model, w) if w is not None else None for w in adapter_weights]
    adapters = AdapterBatch.build(kvs, cfg.n_layers)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)
    out = [model(tokens, torch.arange(7).expand(3, 7), cache, slots, adapters)]
    for step in range(4):
        nxt = out[-1][:, -1].argmax(-1, keepdim=True)
        out.append(model(nxt, torch.full((3, 1), 7 + step), cache, slots, adapters))
    return torch.cat(out, dim=1)


def test_packed_model_gives_the_dense_models_logits_with_adapters():
    dense = random_tiny_model(tie_embeddings=True)
    packed = copy.deepcopy(dense)
    assert packed.pack_for_cpu_inference() and packed.packed
    with pytest.raises(ValueError, match="already packed"):
        packed.pack_for_cpu_inference("bf16")
    assert not hasattr(packed.layers[0].attention, "wq")     # the dense copies are gone
    adapter_weights = [_adapters(dense, 0), None, _adapters(dense, 1)]
    with torch.inference_mode():
        torch.testing.assert_close(_decode_logits(packed, adapter_weights),
                                   _decode_logits(dense, adapter_weights), rtol=1e-4, atol=1e-4)
        kv_dense = compute_adapter_kv(dense, adapter_weights[0])
        kv_packed = compute_adapter_kv(packed, adapter_weights[0])
    torch.testing.assert_close(kv_packed.keys, kv_dense.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_packed.values, kv_dense.values, rtol=1e-5, atol=1e-5)


def test_training_refuses_a_packed_model():
    model = random_tiny_model()
    model.pack_for_cpu_inference()
    with pytest.raises(ValueError, match="packed for CPU inference"):
        freeze(model)


def test_non_float32_models_stay_dense():
    model = random_tiny_model().to(torch.bfloat16)
    assert not model.pack_for_cpu_inference() and not model.packed
    assert hasattr(model.layers[0].attention, "wq")
