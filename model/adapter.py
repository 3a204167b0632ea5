"""LLaMA-Adapter math (arXiv 2303.16199): the one implementation used by inference and training.

In an adapted layer every query also attends to K prompt vectors whose keys/values come from
the layer's frozen wk/wv (no RoPE, no norm). That attention has its own softmax, is scaled by a
gate (zero-initialised) and is added to the ordinary attention output before wo:

    out_h = softmax(q·K_tᵀ/√d)·V_t + g_h · softmax(q·K_pᵀ/√d)·V_p

A gate of zero therefore gives the base model exactly.

The multimodal variant (§4.3 of the paper, kind "llama-adapter-visual") conditions the prompts on
an image: a frozen CLIP encoder's multi-scale global feature f (class tokens of some layers,
concatenated; model/vision.py) is projected to the model's width and added to every prompt
vector of every adapted layer, P_l + (W f + b); from there the math above is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AdapterWeights:
    """What an adapter file holds: prompts and effective gates for a set of model layers."""

    layers: list[int]          # model layer indices, ascending
    prompts: torch.Tensor      # [L, K, dim]
    gates: torch.Tensor        # [L, G], G == 1 (one per layer, PEFT) or n_heads (paper); effective values

    @property
    def adapter_len(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def gate_kind(self) -> str:
        return "scalar" if self.gates.shape[1] == 1 else "per_head"

    def param_count(self) -> int:
        return self.prompts.numel() + self.gates.numel()


@dataclass
class VisualAdapterWeights(AdapterWeights):
    """An image-conditioned adapter: the prompts and gates plus the projection of the encoder's
    multi-scale feature (F = len(feature_layers) × encoder width) into the model's width."""

    proj_weight: torch.Tensor            # [dim, F]
    proj_bias: torch.Tensor              # [dim]
    feature_layers: tuple[int, ...]      # encoder hidden states whose class tokens make the feature
    encoder_fingerprint: str             # model.vision.VisionTower.fingerprint it was trained with

    @property
    def feature_dim(self) -> int:
        return int(self.proj_weight.shape[1])

    def param_count(self) -> int:
        return super().param_count() + self.proj_weight.numel() + self.proj_bias.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.prompts, self.gates, self.proj_weight, self.proj_bias))

    def to(self, device, dtype) -> "VisualAdapterWeights":
        return VisualAdapterWeights(list(self.layers), *(t.to(device=device, dtype=dtype) for t in (
            self.prompts, self.gates, self.proj_weight, self.proj_bias)), tuple(self.feature_layers),
            self.encoder_fingerprint)


def visual_prompts(weights: VisualAdapterWeights, features: torch.Tensor) -> torch.Tensor:
    """P_l + (W f + b) for every adapted layer: [L, K, dim] (`features` [F])."""
    ref = weights.prompts
    global_feature = F.linear(features.to(device=ref.device, dtype=ref.dtype), weights.proj_weight.to(ref.dtype),
                              weights.proj_bias.to(ref.dtype))        # [dim]
    return ref + global_feature


def compute_visual_adapter_kv(model, weights: VisualAdapterWeights, features: torch.Tensor) -> AdapterKV:
    """The prompt keys/values of an image-conditioned adapter for one image's feature [F];
    differentiable in prompts, gates and projection (training calls it per example)."""
    if features.dim() != 1 or features.shape[0] != weights.feature_dim:
        raise ValueError(f"image feature is {tuple(features.shape)}; this adapter takes [{weights.feature_dim}]")
    return compute_adapter_kv(model, AdapterWeights(weights.layers, visual_prompts(weights, features),
                                                    weights.gates))


@dataclass
class AdapterKV:
    """Precomputed prompt keys/values of one adapter, for its adapted layers only (an adapter
    of one layer in a 30-layer model holds one layer's K/V, not 30)."""

    keys: torch.Tensor         # [len(layers), Hkv, K, D]
    values: torch.Tensor       # [len(layers), Hkv, K, D]
    gates: torch.Tensor        # [len(layers), H]
    layers: tuple[int, ...]    # the adapted model layers, ascending; row i of each tensor is layers[i]

    @property
    def adapter_len(self) -> int:
        return int(self.keys.shape[2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.gates))


def adapter_kv_bytes(n_layers_adapted: int, adapter_len: int, n_kv_heads: int, head_dim: int,
                     element_size: int) -> int:
    """Device bytes of an adapter's prompt keys + values (what `AdapterKV` holds, gates aside)."""
    return 2 * n_layers_adapted * n_kv_heads * adapter_len * head_dim * element_size


def compute_adapter_kv(model, weights: AdapterWeights) -> AdapterKV:
    """Run each adapted layer's frozen wk/wv over its prompts.

    Differentiable in the prompts (training calls it every step); inference calls it once per
    adapter version and caches the result.
    """
    cfg = model.config
    hkv, hd, h = cfg.n_kv_heads, cfg.head_dim, cfg.n_heads
    k_len = weights.adapter_len
    ref = model.tok_embeddings.weight
    prompts = weights.prompts.to(device=ref.device, dtype=ref.dtype)
    gates = weights.gates.to(device=ref.device, dtype=ref.dtype)
    keys, values = [], []
    for i, layer in enumerate(weights.layers):
        k, v = model.layers[layer].attention.project_kv(prompts[i])
        keys.append(k.reshape(k_len, hkv, hd).transpose(0, 1))
        values.append(v.reshape(k_len, hkv, hd).transpose(0, 1))
    return AdapterKV(torch.stack(keys), torch.stack(values), gates.expand(-1, h).contiguous(),
                     tuple(weights.layers))


@dataclass
class AdapterRows:
    """Prompt keys/values for some rows of a batch, padded to one length."""

    keys: torch.Tensor               # [b, Hkv, K, D]
    values: torch.Tensor             # [b, Hkv, K, D]
    gates: torch.Tensor              # [b, H, 1, 1]
    key_mask: torch.Tensor | None    # [b, K] bool, True = real prompt (only when lengths differ)
    rows: torch.Tensor | None        # which batch rows, ascending; None = all of them


@dataclass
class LayerAdapterInputs:
    """One layer's adapters for a batch: rows grouped by prompt length, so that a row with a
    short prompt never pays for a long one in another row (a group's longest prompt is at most
    twice its shortest). Rows whose adapter skips the layer, or that have none, are in no group."""

    groups: list[AdapterRows]


class AdapterBatch:
    """Per-sequence adapters for one forward pass; `None` entries mean the base model."""

    def __init__(self, per_layer: dict[int, LayerAdapterInputs]):
        self.per_layer = per_layer       # only the layers some sequence adapts

    def layer(self, i: int) -> LayerAdapterInputs | None:
        return self.per_layer.get(i)

    @classmethod
    def build(cls, entries: list[AdapterKV | None], n_layers: int) -> "AdapterBatch | None":
        """Stack the adapters of a batch's sequences. Returns None when no sequence has one."""
        real = [e for e in entries if e is not None]
        if not real:
            return None
        device = real[0].keys.device
        per_layer: dict[int, LayerAdapterInputs] = {}
        for layer in sorted(set().union(*(e.layers for e in real))):
            if layer >= n_layers:
                raise ValueError(f"adapter layer {layer} does not exist in a {n_layers}-layer model")
            using = [(row, e, e.layers.index(layer)) for row, e in enumerate(entries)
                     if e is not None and layer in e.layers]
            groups = []
            for bucket in _length_buckets(using):
                k_max = max(e.adapter_len for _, e, _ in bucket)
                keys = torch.stack([_pad_len(e.keys[i], k_max - e.adapter_len) for _, e, i in bucket])
                values = torch.stack([_pad_len(e.values[i], k_max - e.adapter_len) for _, e, i in bucket])
                gates = torch.stack([e.gates[i] for _, e, i in bucket])[..., None, None]
                lengths = [e.adapter_len for _, e, _ in bucket]
                key_mask = None
                if min(lengths) != k_max:
                    key_mask = torch.arange(k_max, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
                rows = [row for row, _, _ in bucket]
                every_row = rows == list(range(len(entries)))
                groups.append(AdapterRows(keys, values, gates, key_mask,
                                          None if every_row else torch.tensor(rows, device=device)))
            per_layer[layer] = LayerAdapterInputs(groups)
        return cls(per_layer)

    @classmethod
    def broadcast(cls, kv: AdapterKV, batch_size: int) -> "AdapterBatch":
        """One adapter shared by the whole batch (training); keeps the autograd graph."""
        return cls({layer: LayerAdapterInputs([AdapterRows(
            kv.keys[i].expand(batch_size, -1, -1, -1), kv.values[i].expand(batch_size, -1, -1, -1),
            kv.gates[i].view(1, -1, 1, 1).expand(batch_size, -1, -1, -1), None, None)])
            for i, layer in enumerate(kv.layers)})


def _length_buckets(using: list[tuple[int, AdapterKV, int]]) -> list[list[tuple[int, AdapterKV, int]]]:
    """Split (row, adapter, layer index) by prompt length into buckets whose longest prompt is at
    most twice the shortest, each in row order: the padding a bucket costs stays under 2×, and
    the usual batch (a few similar lengths) stays one bucket, one attention call."""
    buckets: list[list] = []
    for item in sorted(using, key=lambda x: x[1].adapter_len):
        if buckets and item[1].adapter_len <= 2 * buckets[-1][0][1].adapter_len:
            buckets[-1].append(item)
        else:
            buckets.append([item])
    return [sorted(b, key=lambda x: x[0]) for b in buckets]


def _pad_len(t: torch.Tensor, pad: int) -> torch.Tensor:
    """[Hkv, K, D] → [Hkv, K + pad, D] (zeros after)."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], pad, t.shape[2])], dim=1)


def adapter_attention(q: torch.Tensor, a: LayerAdapterInputs, fused: bool = False, kernels=None) -> torch.Tensor:
    """Gated attention of queries q [B, H, T, D] over the prompt keys/values → [B, H, T, D]
    (zero for rows in no group).

    fused: one SDPA call instead of product, softmax and product (3 kernels a layer fewer per
    step); the same math, rounded differently (float32: |Δ| ≲ 1e-6 of the output). The packed
    non-fp32 weight modes use it; fp32 and training keep the explicit form, the reference.
    kernels: model/native_ops.py's, where those modes have them: the same math in one call
    (SDPA's CPU kernel is slow on these small shapes: 32 decode rows, 183 µs against 24)."""
    if len(a.groups) == 1 and a.groups[0].rows is None:
        return _attend(q, a.groups[0], fused, kernels)
    out = torch.zeros_like(q)
    for g in a.groups:
        out.index_copy_(0, g.rows, _attend(q.index_select(0, g.rows), g, fused, kernels))
    return out


def _attend(q: torch.Tensor, a: AdapterRows, fused: bool = False, kernels=None) -> torch.Tensor:
    if kernels is not None:
        return kernels.gated_attention(q, a.keys, a.values, a.gates, a.key_mask)
    b, h, t, d = q.shape
    hkv = a.keys.shape[1]
    # Query heads sharing a KV head are folded together so GQA needs no key repetition.
    qg = q.reshape(b, hkv, (h // hkv) * t, d)
    if fused:
        mask = a.key_mask[:, None, None, :] if a.key_mask is not None else None
        return F.scaled_dot_product_attention(qg, a.keys, a.values, attn_mask=mask).reshape(b, h, t, d) * a.gates
    scores = (qg @ a.keys.transpose(-1, -2)).float() * (d ** -0.5)   # [b, Hkv, gT, K]
    if a.key_mask is not None:
        scores = scores.masked_fill(~a.key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    out = (probs @ a.values).reshape(b, h, t, d)
    return out * a.gates
