"""Helpers shared by the adapter store / registry / importer tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from adapters.format import metadata_for
from adapters.importers import adapter_file_bytes
from model.adapter import AdapterWeights
from model.fingerprint import base_fingerprint


def random_adapter(model, layers: list[int] | None = None, k: int = 3, per_head: bool = False,
                   seed: int = 0) -> AdapterWeights:
    """Random prompts with clearly non-zero gates (a zero gate would hide mistakes)."""
    cfg = model.config
    layers = layers if layers is not None else list(range(cfg.n_layers - 2, cfg.n_layers))
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randn(len(layers), k, cfg.dim, generator=g)
    gates = torch.rand(len(layers), cfg.n_heads if per_head else 1, generator=g) * 0.8 + 0.2
    return AdapterWeights(layers, prompts, gates)


def adapter_bytes(model, weights: AdapterWeights, fingerprint: str | None = None,
                  source: str = "uploaded") -> bytes:
    fp = base_fingerprint(model) if fingerprint is None else fingerprint
    return adapter_file_bytes(weights, metadata_for(weights, model, source, fingerprint=fp))


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file under root (temp files included) → sha256: 'the store is unchanged'."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def random_lora(model, rank: int, targets: tuple[str, ...], layers: list[int] | None = None, alpha: float = 16.0,
                use_rslora: bool = False, seed: int = 0, std: float = 0.2):
    """A LoRA with random A and B (PEFT starts B at zero, which would hide mistakes)."""
    from model.lora import LoraWeights, target_shape

    cfg = model.config
    layers = layers if layers is not None else list(range(cfg.n_layers))
    g = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for t in targets:
        d_in, d_out = target_shape(cfg, t)
        a[t] = torch.randn(len(layers), rank, d_in, generator=g) * std
        b[t] = torch.randn(len(layers), d_out, rank, generator=g) * std
    return LoraWeights(list(layers), rank, alpha, use_rslora, a, b)


def random_prefix(model, prefix_len: int, seed: int = 0, std: float = 1.0):
    from model.prefix_tuning import PrefixWeights

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.n_layers, cfg.n_kv_heads, prefix_len, cfg.head_dim)
    return PrefixWeights(torch.randn(shape, generator=g) * std, torch.randn(shape, generator=g) * std)
