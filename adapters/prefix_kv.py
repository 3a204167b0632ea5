"""Precomputed adapter prefix K/V: computing it, and caching it on disk next to the adapter.

The prompt keys/values of an adapter depend only on the adapter and the frozen wk/wv, so they
are computed once per (adapter version, base model, dtype). Computing them reads every adapted
layer's wk and wv (≈ 4 GB of fp32 weights for a 7B model): far too slow for a millisecond load
on a CPU. So the result is also written to the version's directory in the store, and a later
load (another process, a restart, a replica) only reads that file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.adapter import AdapterKV, AdapterWeights, compute_adapter_kv

KV_FORMAT = "llama-adapter-prefix-kv"
KV_FORMAT_VERSION = "1"


def compute_prefix_kv(model, weights: AdapterWeights) -> AdapterKV:
    """Inference-time K/V (no autograd graph) on the model's device and dtype."""
    with torch.no_grad():
        return compute_adapter_kv(model, weights)


def kv_cache_filename(fingerprint: str, dtype: torch.dtype) -> str:
    return f"kv-{fingerprint or 'unknown'}-{str(dtype).removeprefix('torch.')}.safetensors"


def _identity(adapter_sha256: str, fingerprint: str, kv_dtype: torch.dtype) -> dict[str, str]:
    return {"format": KV_FORMAT, "format_version": KV_FORMAT_VERSION, "adapter_sha256": adapter_sha256,
            "base_fingerprint": fingerprint, "dtype": str(kv_dtype).removeprefix("torch.")}


def save_prefix_kv(path: str | Path, kv: AdapterKV, adapter_sha256: str, fingerprint: str) -> None:
    """Only the adapted layers are written; the unadapted ones are zeros by definition."""
    idx = torch.tensor(kv.layers, dtype=torch.long, device=kv.keys.device)
    tensors = {"keys": kv.keys.index_select(0, idx), "values": kv.values.index_select(0, idx),
               "gates": kv.gates.index_select(0, idx)}
    meta = _identity(adapter_sha256, fingerprint, kv.keys.dtype)
    meta["layers"] = ",".join(map(str, kv.layers))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)


def load_prefix_kv(path: str | Path, model, adapter_sha256: str, fingerprint: str) -> AdapterKV | None:
    """The cached K/V for this model, or None if the file is absent or not exactly what we need."""
    cfg = model.config
    ref = model.layers[0].attention.wk.weight
    try:
        with safe_open(str(path), framework="pt", device=str(ref.device)) as f:
            meta = f.metadata() or {}
            layers = tuple(int(x) for x in meta.get("layers", "").split(",") if x)
            if ({k: meta.get(k) for k in ("format", "format_version", "adapter_sha256",
                                           "base_fingerprint", "dtype")}
                    != _identity(adapter_sha256, fingerprint, ref.dtype) or not layers):
                return None
            keys, values, gates = (f.get_tensor(n) for n in ("keys", "values", "gates"))
    except (FileNotFoundError, OSError, ValueError, RuntimeError):
        return None
    n = len(layers)
    k_len = keys.shape[2] if keys.dim() == 4 else 0
    want_kv = (n, cfg.n_kv_heads, k_len, cfg.head_dim)
    if (k_len == 0 or tuple(keys.shape) != want_kv or tuple(values.shape) != want_kv
            or tuple(gates.shape) != (n, cfg.n_heads) or max(layers) >= cfg.n_layers
            or list(layers) != sorted(set(layers))):
        return None
    idx = torch.tensor(layers, dtype=torch.long, device=keys.device)
    dense_k = keys.new_zeros(cfg.n_layers, *want_kv[1:]).index_copy_(0, idx, keys)
    dense_v = values.new_zeros(cfg.n_layers, *want_kv[1:]).index_copy_(0, idx, values)
    dense_g = gates.new_zeros(cfg.n_layers, cfg.n_heads).index_copy_(0, idx, gates)
    return AdapterKV(dense_k, dense_v, dense_g, layers)
