"""Base-model fingerprint: ties adapter files to the exact frozen weights they were made for.

An adapter's prompt keys/values go through the base wk/wv, so an adapter trained on other
weights of the same shape silently produces garbage; the fingerprint makes that an error.
"""

from __future__ import annotations

import hashlib

import torch


def base_fingerprint(model) -> str:
    """sha256 (hex, 16 chars) over the shape-defining config and a fixed sample of weights."""
    if model.packed_fingerprint is not None:     # packed models no longer hold dense wk/wv
        return model.packed_fingerprint
    cfg = model.config
    h = hashlib.sha256()
    h.update(f"{cfg.dim}|{cfg.n_layers}|{cfg.n_heads}|{cfg.n_kv_heads}|{cfg.head_dim}|"
             f"{cfg.vocab_size}|{cfg.ffn_dim}".encode())
    # The projections the adapter math depends on, sampled at both ends of the stack,
    # rounded through float32 so fp32/bf16 copies of one checkpoint agree on CPU and GPU.
    for layer in (model.layers[0], model.layers[-1]):
        for w in (layer.attention.wk.weight, layer.attention.wv.weight):
            sample = w.detach()[:4, :64].to(device="cpu", dtype=torch.bfloat16).float()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
