"""LoRA math (arXiv 2106.09685): the one implementation used by inference and training.

A LoRA adapter adds, to each target projection y = W x of its layers, a low-rank delta
s · B (A x) with A [r, in], B [out, r] and s = alpha / r (alpha / √r for rsLoRA). The base
weights are never changed, so one frozen model serves every adapter.

A batch mixes rows with different LoRAs (different ranks, targets, compositions) and rows with
none. Punica's BGMV idea in plain torch: per target and layer, the A/B of the batch's distinct
LoRA mixes are stacked once per forward ([n, R, in] / [n, out, R], zero-padded to the largest
rank, scaling and composition weights folded into B); each LoRA row gathers its mix's matrices
by index and two `torch.bmm`s give every row's delta at once. Rows without a LoRA are never
touched, so they stay bit-identical to the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Target names as in our format; PEFT's module names map onto them (adapters/importers.py).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def target_shape(cfg, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target projection in a model of config `cfg`."""
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q": (cfg.dim, q_out), "k": (cfg.dim, kv_out), "v": (cfg.dim, kv_out),
            "o": (q_out, cfg.dim), "gate": (cfg.dim, cfg.ffn_dim), "up": (cfg.dim, cfg.ffn_dim),
            "down": (cfg.ffn_dim, cfg.dim)}[target]


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class LoraWeights:
    """What a LoRA adapter file holds: A and B of every target, for the same set of layers."""

    layers: list[int]                    # model layer indices, ascending
    rank: int
    alpha: float
    use_rslora: bool
    a: dict[str, torch.Tensor]           # target → [L, r, in]
    b: dict[str, torch.Tensor]           # target → [L, out, r]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in LORA_TARGETS if t in self.a)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.use_rslora)

    def param_count(self) -> int:
        return sum(t.numel() for t in (*self.a.values(), *self.b.values()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def to(self, device, dtype) -> "LoraWeights":
        move = lambda d: {k: v.to(device=device, dtype=dtype) for k, v in d.items()}  # noqa: E731
        return LoraWeights(list(self.layers), self.rank, self.alpha, self.use_rslora,
                           move(self.a), move(self.b))


class LoraLayer:
    """One layer's LoRA inputs for a batch: per target, the rows that have it and their A/B."""

    def __init__(self, rows: torch.Tensor | None, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
        self.rows = rows   # [b'] indices of the LoRA rows in the batch; None = every row (training)
        self.a = a         # target → [b', R, in] gathered per row (or [R, in] shared)
        self.b = b         # target → [b', out, R] (or [out, R] shared), scaling folded in

    def add(self, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [B, T, out] = the base projection of x [B, T, in] → y plus each row's delta."""
        a = self.a.get(target)
        if a is None:
            return y
        b = self.b[target]
        if self.rows is None:            # one LoRA for all rows: plain matmuls, autograd intact
            return y + (x @ a.transpose(-1, -2)) @ b.transpose(-1, -2)
        delta = torch.bmm(torch.bmm(x[self.rows], a.transpose(1, 2)), b.transpose(1, 2))
        return y.index_add(0, self.rows, delta)


class LoraBatch:
    """Per-layer LoRA inputs of one forward pass."""

    def __init__(self, per_layer: list[LoraLayer | None]):
        self.per_layer = per_layer

    def layer(self, i: int) -> LoraLayer | None:
        return self.per_layer[i]

    @classmethod
    def build(cls, mixes: list[tuple[tuple[LoraWeights, float], ...]], n_layers: int) -> "LoraBatch | None":
        """`mixes[b]`: row b's LoRAs with their composition weights (empty = no LoRA).

        A mix of several LoRAs is one LoRA of their concatenated ranks: A = [A_1; A_2],
        B = [w_1 s_1 B_1, w_2 s_2 B_2], so Σ w_i s_i B_i A_i x costs one gathered product.
        """
        distinct: dict[tuple, int] = {}
        row_index: list[int] = []
        rows: list[int] = []
        for r, mix in enumerate(mixes):
            if not mix:
                continue
            key = tuple((id(w), weight) for w, weight in mix)
            rows.append(r)
            row_index.append(distinct.setdefault(key, len(distinct)))
        if not rows:
            return None
        uniq = [None] * len(distinct)
        for r, i in zip(rows, row_index):
            uniq[i] = mixes[r]
        ref = uniq[0][0][0]
        some = next(iter(ref.a.values()))
        device = some.device
        rows_t = torch.tensor(rows, device=device)
        idx = torch.tensor(row_index, device=device)
        rank_of = [sum(w.rank for w, _ in mix) for mix in uniq]
        r_max = max(rank_of)
        per_layer: list[LoraLayer | None] = []
        for layer in range(n_layers):
            a_by_t, b_by_t = {}, {}
            for t in LORA_TARGETS:
                parts = [[(w, weight) for w, weight in mix if t in w.a and layer in w.layers] for mix in uniq]
                if not any(parts):
                    continue
                a_stack, b_stack = _stack_target(t, layer, parts, r_max, some)
                a_by_t[t], b_by_t[t] = a_stack[idx], b_stack[idx]
            per_layer.append(LoraLayer(rows_t, a_by_t, b_by_t) if a_by_t else None)
        return cls(per_layer)

    @classmethod
    def broadcast(cls, w: LoraWeights, n_layers: int) -> "LoraBatch":
        """One LoRA shared by the whole batch (training); keeps the autograd graph."""
        pos = {layer: i for i, layer in enumerate(w.layers)}
        s = w.scaling
        return cls([LoraLayer(None, {t: w.a[t][pos[layer]] for t in w.targets},
                              {t: w.b[t][pos[layer]] * s for t in w.targets})
                    if layer in pos else None for layer in range(n_layers)])


def _stack_target(target: str, layer: int, parts: list[list[tuple[LoraWeights, float]]], r_max: int,
                  like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, r_max, in] and [n, out, r_max] for one target/layer over the batch's distinct mixes."""
    (w0, _) = next(p[0] for p in parts if p)
    _, _, d_in = w0.a[target].shape
    d_out = w0.b[target].shape[1]
    a = like.new_zeros(len(parts), r_max, d_in)
    b = like.new_zeros(len(parts), d_out, r_max)
    for n, mix in enumerate(parts):
        at = 0
        for w, weight in mix:
            i = w.layers.index(layer)
            a[n, at:at + w.rank] = w.a[target][i]
            b[n, :, at:at + w.rank] = w.b[target][i] * (w.scaling * weight)
            at += w.rank
    return a, b
