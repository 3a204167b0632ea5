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


# Targets that read the same input share one shrink product (x·[A_q; A_k; A_v]): the fused,
# packed q/k/v and gate/up linears of the base model.
FUSED_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


class LoraLayer:
    """One layer's LoRA inputs for a batch, applied as Punica's SGMV in plain torch.

    Inference (`segments` given): the batch's LoRA rows are grouped by distinct mix into a padded
    [n_mix, m, T, in] block; per group of targets reading the same input, one bmm against the
    mixes' stacked A (each distinct mix's A once, not once per row), then one bmm per target
    against its B, and the deltas go back to their rows. Training (`segments` None): one LoRA
    shared by every row, plain matmuls that keep the autograd graph.
    """

    def __init__(self, segments: "_Segments | None", a: dict[tuple[str, ...], torch.Tensor],
                 b: dict[str, torch.Tensor], offsets: dict[str, tuple[int, int]]):
        self.segments = segments
        self.a = a              # target group → [n_mix, ΣR, in] (training: [ΣR, in] shared)
        self.b = b              # target → [n_mix, out, R], scaling and weights folded in (training: [out, R])
        self.offsets = offsets  # target → its (start, end) columns in its group's shrink output

    def add(self, targets: tuple[str, ...], x: torch.Tensor, ys: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """ys [B, T, out_t] = the base projections of x [B, T, in] for `targets` (one group of
        FUSED_GROUPS, in its order) → each plus every row's delta for that target."""
        a = self.a.get(targets)
        if a is None:
            return ys
        if self.segments is None:        # one LoRA for all rows: plain matmuls, autograd intact
            h = x @ a.transpose(-1, -2)
            return tuple(y if t not in self.b else y + h[..., slice(*self.offsets[t])] @ self.b[t].transpose(-1, -2)
                         for t, y in zip(targets, ys))
        seg = self.segments
        b, t, d_in = x.shape
        xs = x.reshape(b, t * d_in)[seg.gather].view(seg.n_mix, seg.m * t, d_in)
        h = torch.bmm(xs, a.transpose(1, 2))                                 # [n_mix, m·T, ΣR]
        out = []
        for name, y in zip(targets, ys):
            if name not in self.b:
                out.append(y)
                continue
            delta = torch.bmm(h[..., slice(*self.offsets[name])], self.b[name].transpose(1, 2))
            delta = delta.view(seg.n_mix * seg.m, t, -1)[seg.scatter]        # [b', T, out]
            out.append(y + delta if seg.rows is None else y.index_add(0, seg.rows, delta))
        return tuple(out)


@dataclass
class _Segments:
    """Where a batch's LoRA rows sit in the padded per-mix block (rows sorted by mix)."""

    n_mix: int
    m: int                          # rows per mix, padded to the largest count
    gather: torch.Tensor            # [n_mix·m] batch row filling each slot (padding repeats a row)
    scatter: torch.Tensor           # [b'] slot of each LoRA row, in `rows` order
    rows: torch.Tensor | None       # [b'] batch indices of the LoRA rows; None = every row, in order


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
        B = [w_1 s_1 B_1, w_2 s_2 B_2], so Σ w_i s_i B_i A_i x costs one product. Each target's
        stack is built with whole-depth tensor ops (a handful per distinct mix, not per layer);
        the engine builds it once per change of its decode batch and reuses it across steps.
        """
        distinct: dict[tuple, int] = {}
        uniq: list[tuple[tuple[LoraWeights, float], ...]] = []
        rows: list[int] = []
        mix_of_row: list[int] = []
        for r, mix in enumerate(mixes):
            if not mix:
                continue
            key = tuple((id(w), weight) for w, weight in mix)
            if key not in distinct:
                distinct[key] = len(uniq)
                uniq.append(mix)
            rows.append(r)
            mix_of_row.append(distinct[key])
        if not rows:
            return None
        some = next(iter(uniq[0][0][0].a.values()))
        segments = _segments(rows, mix_of_row, len(uniq), len(mixes), some.device)
        a_full, b_full = {}, {}       # target → [L, n_mix, R_t, in] / [L, n_mix, out, R_t]
        present: dict[str, list[bool]] = {}
        for t in LORA_TARGETS:
            parts = [[(w, weight) for w, weight in mix if t in w.a] for mix in uniq]
            if any(parts):
                a_full[t], b_full[t], present[t] = _stack_target(t, parts, n_layers, some)
        per_layer: list[LoraLayer | None] = []
        for layer in range(n_layers):
            a_by_group, b_by_t, offsets = {}, {}, {}
            for group in FUSED_GROUPS:
                names = [t for t in group if t in present and present[t][layer]]
                if not names:
                    continue
                at = 0
                for t in names:
                    b_by_t[t] = b_full[t][layer]
                    offsets[t] = (at, at + b_by_t[t].shape[2])
                    at = offsets[t][1]
                a_by_group[group] = (a_full[names[0]][layer] if len(names) == 1
                                     else torch.cat([a_full[t][layer] for t in names], dim=1))
            per_layer.append(LoraLayer(segments, a_by_group, b_by_t, offsets) if a_by_group else None)
        return cls(per_layer)

    @classmethod
    def broadcast(cls, w: LoraWeights, n_layers: int) -> "LoraBatch":
        """One LoRA shared by the whole batch (training); keeps the autograd graph."""
        pos = {layer: i for i, layer in enumerate(w.layers)}
        s = w.scaling
        per_layer: list[LoraLayer | None] = []
        for layer in range(n_layers):
            if layer not in pos:
                per_layer.append(None)
                continue
            i = pos[layer]
            a, offsets = {}, {}
            for group in FUSED_GROUPS:
                names = [t for t in group if t in w.a]
                if names:
                    a[group] = torch.cat([w.a[t][i] for t in names]) if len(names) > 1 else w.a[names[0]][i]
                    offsets.update({t: (j * w.rank, (j + 1) * w.rank) for j, t in enumerate(names)})
            per_layer.append(LoraLayer(None, a, {t: w.b[t][i] * s for t in w.targets}, offsets))
        return cls(per_layer)


def _segments(rows: list[int], mix_of_row: list[int], n_mix: int, batch: int, device) -> _Segments:
    counts = [0] * n_mix
    slot = []
    for i in mix_of_row:
        slot.append(counts[i])
        counts[i] += 1
    m = max(counts)
    gather = [0] * (n_mix * m)
    for r, i, k in zip(rows, mix_of_row, slot):
        gather[i * m + k] = r
    for i, c in enumerate(counts):          # padding slots repeat the mix's first row
        first = gather[i * m]
        for k in range(c, m):
            gather[i * m + k] = first
    scatter = [i * m + k for i, k in zip(mix_of_row, slot)]
    every_row = len(rows) == batch
    return _Segments(n_mix, m, torch.tensor(gather, device=device), torch.tensor(scatter, device=device),
                     None if every_row else torch.tensor(rows, device=device))


def _stack_target(target: str, parts: list[list[tuple[LoraWeights, float]]], n_layers: int,
                  like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """One target over the batch's distinct mixes: A as [L, n, R, in] and B (scaled) as
    [L, n, out, R], zero-padded to the largest rank and over the layers a mix does not adapt;
    and which layers any mix adapts. Each LoRA's own layout, so each is one block copy (the
    products read them transposed: measured no slower than a transposed copy, which would
    cost more to build than a decode step's LoRA math)."""
    w0 = next(p[0][0] for p in parts if p)
    d_in, d_out = w0.a[target].shape[2], w0.b[target].shape[1]
    r_max = max(sum(w.rank for w, _ in mix) for mix in parts)
    a = like.new_zeros(n_layers, len(parts), r_max, d_in)
    b = like.new_zeros(n_layers, len(parts), d_out, r_max)
    present = [False] * n_layers
    for n, mix in enumerate(parts):
        at = 0
        for w, weight in mix:
            layers = torch.tensor(w.layers, device=like.device)
            a[layers, n, at:at + w.rank] = w.a[target]
            b[layers, n, :, at:at + w.rank] = w.b[target] * (w.scaling * weight)
            at += w.rank
            for layer in w.layers:
                present[layer] = True
    return a, b, present
