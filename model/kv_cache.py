"""Preallocated slot-based KV cache: one row per concurrent sequence, written by index.

No allocation per token; a slot is reused by the next sequence once freed. When the slots of
a batch are a contiguous run the reads are views, not gathers (the engine keeps them so).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (n_layers, n_slots, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len

    @classmethod
    def for_model(cls, model, n_slots: int, max_seq_len: int | None = None) -> "KVCache":
        cfg = model.config
        ref = model.tok_embeddings.weight
        return cls(cfg.n_layers, n_slots, cfg.n_kv_heads, max_seq_len or cfg.max_seq_len,
                   cfg.head_dim, ref.dtype, ref.device)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write_and_read(self, layer: int, slots: torch.Tensor | slice, positions: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, read_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at (slot, position) and return keys/values [B, Hkv, read_len, D]."""
        ck, cv = self.k[layer], self.v[layer]
        if isinstance(slots, slice):
            ck, cv = ck[slots], cv[slots]
            rows = torch.arange(ck.shape[0], device=ck.device)[:, None]
        else:
            rows = slots[:, None]
        ck[rows, :, positions] = k.transpose(1, 2)
        cv[rows, :, positions] = v.transpose(1, 2)
        if isinstance(slots, slice):
            return ck[:, :, :read_len], cv[:, :, :read_len]
        # Scattered slots: a gather (copy) of just the live prefix.
        return ck[slots, :, :read_len], cv[slots, :, :read_len]


def as_slice(slots: torch.Tensor) -> torch.Tensor | slice:
    """A contiguous ascending run of slot ids becomes a slice so reads are views."""
    ids = slots.tolist()
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return slots
