"""Base-model fingerprint: ties adapter files to the exact frozen weights they were made for.

An adapter's prompt keys/values go through the base wk/wv, so an adapter trained on other
weights of the same shape silently produces garbage; the fingerprint makes that an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from .config import ModelConfig


def base_fingerprint(model) -> str:
    """The fingerprint of a dense (unpacked) model; the loader computes it before packing."""
    if model.packed:
        raise ValueError("a model packed for inference no longer holds its dense weights: use the "
                         "fingerprint its loader returned (LoadedModel.fingerprint)")
    return fingerprint_weights(model.config, model.get_parameter)


def fingerprint_weights(cfg: ModelConfig, weight: Callable[[str], torch.Tensor]) -> str:
    """sha256 (hex, 16 chars) over the shape-defining config and a fixed sample of weights,
    `weight(name)` giving the dense weight of a parameter name."""
    h = hashlib.sha256()
    h.update(f"{cfg.dim}|{cfg.n_layers}|{cfg.n_heads}|{cfg.n_kv_heads}|{cfg.head_dim}|"
             f"{cfg.vocab_size}|{cfg.ffn_dim}".encode())
    # The projections the adapter math depends on, sampled at both ends of the stack,
    # rounded through bfloat16 so fp32/bf16 copies of one checkpoint agree on CPU and GPU.
    for layer in (0, cfg.n_layers - 1):
        for proj in ("wk", "wv"):
            w = weight(f"layers.{layer}.attention.{proj}.weight")
            # + 0.0 turns −0.0 into 0.0: dequantizers differ in the sign of their zeros.
            sample = w.detach()[:4, :64].to(device="cpu", dtype=torch.bfloat16).float() + 0.0
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
