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
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from adapters.validation import ValidationLimits, check_adapter_bytes
from model.adapter import AdapterKV, AdapterWeights, compute_adapter_kv

KV_FORMAT = "llama-adapter-prefix-kv"
KV_FORMAT_VERSION = "2"   # 2: adapted layers only (1 was dense over all layers)
# Our own cache files: checked for structure, but larger than any uploaded adapter may be.
_KV_FILE_LIMITS = ValidationLimits(max_file_bytes=1 << 36, max_header_bytes=1 << 20, max_tensors=3)


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
    """The adapted layers only, as AdapterKV holds them, so loading is a single copy per tensor."""
    tensors = {"keys": kv.keys, "values": kv.values, "gates": kv.gates}
    meta = _identity(adapter_sha256, fingerprint, kv.keys.dtype)
    meta["layers"] = ",".join(map(str, kv.layers))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)


def load_prefix_kv(path: str | Path, model, adapter_sha256: str, fingerprint: str) -> AdapterKV | None:
    """The cached K/V for this model, or None if the file is absent or not exactly what we need.

    The file is read into memory in one go (not memory-mapped): resident K/V must not depend on
    a file that a delete may remove, and one sequential read is the fastest path here.
    """
    cfg = model.config
    ref = model.tok_embeddings.weight
    try:
        data = Path(path).read_bytes()
        meta = check_adapter_bytes(data, _KV_FILE_LIMITS).metadata
        layers = tuple(int(x) for x in meta.get("layers", "").split(",") if x)
        if ({k: meta.get(k) for k in ("format", "format_version", "adapter_sha256",
                                       "base_fingerprint", "dtype")}
                != _identity(adapter_sha256, fingerprint, ref.dtype) or not layers):
            return None
        tensors = load_safetensors(data)
        keys, values, gates = (tensors[n].to(ref.device) for n in ("keys", "values", "gates"))
    except Exception:   # absent or damaged (safetensors has its own error type): recompute
        return None
    k_len = keys.shape[2] if keys.dim() == 4 else 0
    want_kv = (len(layers), cfg.n_kv_heads, k_len, cfg.head_dim)
    if (k_len == 0 or tuple(keys.shape) != want_kv or tuple(values.shape) != want_kv
            or tuple(gates.shape) != (len(layers), cfg.n_heads) or max(layers) >= cfg.n_layers
            or list(layers) != sorted(set(layers))):
        return None
    return AdapterKV(keys, values, gates, layers)
