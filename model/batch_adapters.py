"""Every row of a batch with its own adapters, of any kind, in one forward pass.

A row names zero or more resident adapters with composition weights (`RowAdapters`):
  * LLaMA-Adapter (`AdapterKV`): each prompt attends with its own softmax and its own gate,
    scaled by its weight; a row composing several gets one "channel" per prompt.
  * LoRA (`LoraWeights`): the deltas add, each scaled by its weight (model/lora.py).
  * prefix tuning (`PrefixWeights`): joint softmax over prefix and tokens, RoPE positions
    shifted by the prefix length (model/prefix_tuning.py). It changes the positions of the
    whole sequence, so it composes with nothing else.
The engine (or any caller) hands `BatchAdapters.build` one `RowAdapters` per row; the model
asks it for each layer's inputs.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .adapter import AdapterBatch, AdapterKV, LayerAdapterInputs, VisualAdapterWeights
from .lora import LoraBatch, LoraLayer, LoraWeights
from .prefix_tuning import PrefixBatch, PrefixWeights

# An image adapter stays as weights: its prompt K/V are computed per request from the image
# (compute_visual_adapter_kv) and enter the batch as that row's AdapterKV.
Resident = AdapterKV | LoraWeights | PrefixWeights | VisualAdapterWeights
RowAdapters = tuple[tuple[Resident, float], ...]     # () = the base model
MAX_COMPOSED = 8
MAX_WEIGHT = 10.0


class CompositionError(ValueError):
    """A request's adapters cannot be combined; the message says why."""


def check_composition(parts: RowAdapters) -> None:
    if len(parts) > MAX_COMPOSED:
        raise CompositionError(f"at most {MAX_COMPOSED} adapters can be composed, got {len(parts)}")
    for _, weight in parts:
        if not math.isfinite(weight) or weight == 0 or abs(weight) > MAX_WEIGHT:
            raise CompositionError(
                f"adapter weight {weight} must be finite, non-zero and within ±{MAX_WEIGHT}")
    if len(parts) > 1 and any(isinstance(r, PrefixWeights) for r, _ in parts):
        raise CompositionError("a prefix-tuning adapter shifts every token's position and cannot be "
                               "composed with other adapters; call it alone")


def position_shift(parts: RowAdapters) -> int:
    """How far a row's RoPE positions move (its prefix-tuning prefix length, else 0)."""
    return sum(r.prefix_len for r, _ in parts if isinstance(r, PrefixWeights))


class LayerAdapters:
    """One layer's adapter inputs for a batch (what Attention and FeedForward receive)."""

    def __init__(self, gated: list[LayerAdapterInputs], lora: LoraLayer | None, prefix: PrefixBatch | None):
        self.gated, self.lora, self.prefix = gated, lora, prefix


class BatchAdapters:
    def __init__(self, gated: list[AdapterBatch], lora: LoraBatch | None = None,
                 prefix: PrefixBatch | None = None):
        self.gated, self.lora, self.prefix = gated, lora, prefix

    @property
    def position_offsets(self) -> torch.Tensor | None:
        """[B] RoPE position shift of each row (prefix tuning), or None."""
        return self.prefix.offsets if self.prefix is not None else None

    def layer(self, i: int) -> LayerAdapters | None:
        gated = [g for g in (c.layer(i) for c in self.gated) if g is not None]
        lora = self.lora.layer(i) if self.lora is not None else None
        if not gated and lora is None and self.prefix is None:
            return None
        return LayerAdapters(gated, lora, self.prefix)

    @classmethod
    def of(cls, adapters: "AdapterBatch | BatchAdapters | None") -> "BatchAdapters | None":
        """Accept a plain LLaMA-Adapter batch (what training and older callers build)."""
        if adapters is None or isinstance(adapters, BatchAdapters):
            return adapters
        return cls([adapters])

    @classmethod
    def build(cls, rows: list[RowAdapters], n_layers: int) -> "BatchAdapters | None":
        """Stack the adapters of a batch's rows. Returns None when no row has one."""
        if not any(rows):
            return None
        prompts = [[kv if w == 1.0 else _scaled(kv, w) for kv, w in parts if isinstance(kv, AdapterKV)]
                   for parts in rows]
        n_channels = max(len(p) for p in prompts)
        gated = [AdapterBatch.build([p[j] if j < len(p) else None for p in prompts], n_layers)
                 for j in range(n_channels)]
        lora = LoraBatch.build([tuple((r, w) for r, w in parts if isinstance(r, LoraWeights)) for parts in rows],
                               n_layers)
        prefix = PrefixBatch.build([next((r for r, _ in parts if isinstance(r, PrefixWeights)), None)
                                    for parts in rows])
        return cls([g for g in gated if g is not None], lora, prefix)


def _scaled(kv: AdapterKV, weight: float) -> AdapterKV:
    return dataclasses.replace(kv, gates=kv.gates * weight)
