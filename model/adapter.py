"""LLaMA-Adapter math (arXiv 2303.16199): the one implementation used by inference and training.

In an adapted layer every query also attends to K prompt vectors whose keys/values come from
the layer's frozen wk/wv (no RoPE, no norm). That attention has its own softmax, is scaled by a
gate (zero-initialised) and is added to the ordinary attention output before wo:

    out_h = softmax(q·K_tᵀ/√d)·V_t + g_h · softmax(q·K_pᵀ/√d)·V_p

A gate of zero therefore gives the base model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
class LayerAdapterInputs:
    keys: torch.Tensor               # [B, Hkv, K, D]
    values: torch.Tensor             # [B, Hkv, K, D]
    gates: torch.Tensor              # [B, H, 1, 1]
    key_mask: torch.Tensor | None    # [B, K] bool, True = real prompt (only when K differs)


class AdapterBatch:
    """Per-sequence adapters for one forward pass; `None` entries mean the base model."""

    def __init__(self, per_layer: dict[int, LayerAdapterInputs]):
        self.per_layer = per_layer       # only the layers some sequence adapts

    def layer(self, i: int) -> LayerAdapterInputs | None:
        return self.per_layer.get(i)

    @classmethod
    def build(cls, entries: list[AdapterKV | None], n_layers: int) -> "AdapterBatch | None":
        """Stack the adapters of a batch's sequences. Returns None when no sequence has one.

        A layer's inputs cover every row: rows whose adapter skips that layer (or that have
        none) get zero keys/values and a zero gate, which adds exactly nothing."""
        real = [e for e in entries if e is not None]
        if not real:
            return None
        ref = real[0]
        k_max = max(e.adapter_len for e in real)
        _, hkv, _, hd = ref.keys.shape
        h = ref.gates.shape[1]
        zero_kv = ref.keys.new_zeros(hkv, k_max, hd)
        zero_gate = ref.gates.new_zeros(h)
        rows = [{layer: i for i, layer in enumerate(e.layers)} if e is not None else {} for e in entries]
        per_layer = {}
        for layer in sorted(set().union(*(e.layers for e in real))):
            if layer >= n_layers:
                raise ValueError(f"adapter layer {layer} does not exist in a {n_layers}-layer model")
            keys, values, gates = [], [], []
            for e, index in zip(entries, rows):
                i = index.get(layer)
                if i is None:
                    keys.append(zero_kv), values.append(zero_kv), gates.append(zero_gate)
                    continue
                pad = k_max - e.adapter_len
                keys.append(_pad_len(e.keys[i], pad)), values.append(_pad_len(e.values[i], pad))
                gates.append(e.gates[i])
            per_layer[layer] = (torch.stack(keys), torch.stack(values), torch.stack(gates)[..., None, None])
        lengths = [e.adapter_len if e is not None else k_max for e in entries]
        key_mask = None
        if any(n != k_max for n in lengths):
            key_mask = torch.arange(k_max, device=ref.keys.device)[None, :] < torch.tensor(
                lengths, device=ref.keys.device)[:, None]
        return cls({layer: LayerAdapterInputs(k, v, g, key_mask) for layer, (k, v, g) in per_layer.items()})

    @classmethod
    def broadcast(cls, kv: AdapterKV, batch_size: int) -> "AdapterBatch":
        """One adapter shared by the whole batch (training); keeps the autograd graph."""
        return cls({layer: LayerAdapterInputs(
            kv.keys[i].expand(batch_size, -1, -1, -1), kv.values[i].expand(batch_size, -1, -1, -1),
            kv.gates[i].view(1, -1, 1, 1).expand(batch_size, -1, -1, -1), None)
            for i, layer in enumerate(kv.layers)})


def _pad_len(t: torch.Tensor, pad: int) -> torch.Tensor:
    """[Hkv, K, D] → [Hkv, K + pad, D] (zeros after)."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], pad, t.shape[2])], dim=1)


def adapter_attention(q: torch.Tensor, a: LayerAdapterInputs) -> torch.Tensor:
    """Gated attention of queries q [B, H, T, D] over the prompt keys/values → [B, H, T, D]."""
    b, h, t, d = q.shape
    hkv = a.keys.shape[1]
    # Query heads sharing a KV head are folded together so GQA needs no key repetition.
    qg = q.reshape(b, hkv, (h // hkv) * t, d)
    scores = (qg @ a.keys.transpose(-1, -2)).float() * (d ** -0.5)   # [B, Hkv, gT, K]
    if a.key_mask is not None:
        scores = scores.masked_fill(~a.key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    out = (probs @ a.values).reshape(b, h, t, d)
    return out * a.gates
