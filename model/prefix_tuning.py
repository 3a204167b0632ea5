"""Prefix tuning (arXiv 2101.00190) as PEFT serves it: the one implementation for inference
and training.

Every layer gets P trained key/value vectors per KV head that sit in front of the sequence's
own keys/values: one joint softmax over prefix and tokens, no gate, the prefix keys used as
they are (no RoPE). As in PEFT (the prefix is handed to the model as a P-token KV cache), the
sequence's own tokens take the positions P, P+1, … for RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefixWeights:
    """What a prefix-tuning adapter file holds (also its resident form: nothing to precompute)."""

    keys: torch.Tensor         # [n_layers, Hkv, P, D]
    values: torch.Tensor       # [n_layers, Hkv, P, D]

    @property
    def prefix_len(self) -> int:
        return int(self.keys.shape[2])

    @property
    def layers(self) -> list[int]:
        return list(range(self.keys.shape[0]))

    def param_count(self) -> int:
        return self.keys.numel() + self.values.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def to(self, device, dtype) -> "PrefixWeights":
        return PrefixWeights(self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype))


@dataclass
class PrefixBatch:
    """The prefixes of one forward's rows, padded to the longest (rows without one: all padding)."""

    keys: torch.Tensor         # [n_layers, B, Hkv, P, D]
    values: torch.Tensor
    bias: torch.Tensor         # [B, 1, 1, P] additive: 0 for a real prefix entry, -inf for padding
    offsets: torch.Tensor      # [B] RoPE position shift of each row (its prefix length)

    @classmethod
    def build(cls, entries: list[PrefixWeights | None]) -> "PrefixBatch | None":
        real = [e for e in entries if e is not None]
        if not real:
            return None
        ref = real[0].keys
        p_max = max(e.prefix_len for e in real)
        n_layers, hkv, _, d = ref.shape
        keys = ref.new_zeros(n_layers, len(entries), hkv, p_max, d)
        values = torch.zeros_like(keys)
        lengths = [e.prefix_len if e is not None else 0 for e in entries]
        for b, e in enumerate(entries):
            if e is not None:
                keys[:, b, :, :e.prefix_len] = e.keys
                values[:, b, :, :e.prefix_len] = e.values
        lens = torch.tensor(lengths, device=ref.device)
        visible = torch.arange(p_max, device=ref.device)[None, :] < lens[:, None]
        bias = torch.zeros(visible.shape, dtype=ref.dtype, device=ref.device)
        bias = bias.masked_fill(~visible, float("-inf"))[:, None, None, :]
        return cls(keys, values, bias, lens)

    @classmethod
    def broadcast(cls, w: PrefixWeights, batch_size: int) -> "PrefixBatch":
        """One prefix shared by the whole batch (training); keeps the autograd graph."""
        expand = lambda t: t[:, None].expand(-1, batch_size, -1, -1, -1)  # noqa: E731
        bias = w.keys.new_zeros(batch_size, 1, 1, w.prefix_len)
        offsets = torch.full((batch_size,), w.prefix_len, device=w.keys.device)
        return cls(expand(w.keys), expand(w.values), bias, offsets)

    def joint_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """An additive mask [B, 1, Tq, L] over the tokens' keys → over [prefix; tokens]."""
        bias = self.bias.to(mask.dtype).expand(-1, -1, mask.shape[2], -1)
        return torch.cat([bias, mask], dim=-1)

    def prepend(self, i: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's prefix in front of keys/values [B, Hkv, L, D] (one joint softmax)."""
        return torch.cat([self.keys[i], keys], dim=2), torch.cat([self.values[i], values], dim=2)
