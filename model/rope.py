"""Rotary position embeddings in the half-split layout (HF's `rotate_half`).

Meta and GGUF checkpoints store wq/wk for the interleaved layout; the loaders permute those
rows once (`permute_for_half_split`) so a single RoPE implementation serves every format.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv = _llama3_scale(inv, scaling)
    return inv.float()


def _llama3_scale(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def rope_table(head_dim: int, max_pos: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape [max_pos, head_dim]: each frequency repeated for both halves,
    the sine negated in the first half (what `apply_rope` expects)."""
    inv = inv_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32, device="cpu"), inv)
    sin = angles.sin()
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [..., D]; cos/signed_sin broadcastable to x, already gathered at each token's position.

    rotate_half(x)·sin = [-x2, x1]·[sin, sin] = [x2, x1]·[-sin, sin]: a roll by half a head
    times the signed sine, so the rotation is three kernels (decode is launch-bound).
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def permute_for_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Meta/GGUF wq or wk (interleaved pairs) → half-split order, per head."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_for_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_for_half_split` (used to write Meta/GGUF-layout test checkpoints)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
