"""The trainable part: adaption prompts and zero-initialised gates over a frozen base model.

The adapter enters the base through the serving math itself (`model.adapter.compute_adapter_kv`
+ `AdapterBatch.broadcast` into `Transformer.run_layers`), so what is trained is what is served.
Two savings that change nothing in the result:
  * the frozen layers below the first adapted one do not see the adapter: they run without
    autograd (and `LowerStates` can compute them once per example for a multi-epoch run);
  * the vocabulary head runs only at target positions, not over the (masked) prompt.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from model.adapter import AdapterBatch, AdapterWeights, compute_adapter_kv
from model.config import ModelConfig

from .data import IGNORE, Example, collate

# Budget for per-example lower-layer states kept across epochs (beyond it they are recomputed).
LOWER_STATES_BUDGET_BYTES = 1 << 30


class TrainableAdapter(nn.Module):
    def __init__(self, cfg: ModelConfig, adapter_len: int, adapter_layers: int, gate_kind: str,
                 init_std: float, seed: int):
        super().__init__()
        if adapter_layers > cfg.n_layers:
            raise ValueError(f"adapter_layers={adapter_layers} but the model has {cfg.n_layers} layers")
        self.n_layers = cfg.n_layers
        self.layers = list(range(cfg.n_layers - adapter_layers, cfg.n_layers))   # the top L layers
        # Same seed → same initial prompts on every rank, with no broadcast needed.
        g = torch.Generator().manual_seed(seed)
        self.prompts = nn.Parameter(torch.randn(adapter_layers, adapter_len, cfg.dim, generator=g) * init_std)
        # Raw gates; the effective gate is tanh(raw) as in the paper's training code. Zero → the
        # model starts exactly at the base model.
        n_gates = cfg.n_heads if gate_kind == "per_head" else 1
        self.gates = nn.Parameter(torch.zeros(adapter_layers, n_gates))

    @property
    def first_layer(self) -> int:
        return self.layers[0]

    def weights(self) -> AdapterWeights:
        """The adapter as served (effective gates); differentiable."""
        return AdapterWeights(self.layers, self.prompts, torch.tanh(self.gates))

    @torch.no_grad()
    def lower_states(self, base, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, dim] entering the first adapted layer (adapter-independent)."""
        return base.run_layers(base.tok_embeddings(tokens), layers=range(self.first_layer))

    def summed_loss(self, base, lower: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of next-token cross-entropies over the target positions (the caller normalises)."""
        kv = compute_adapter_kv(base, self.weights())
        h = base.run_layers(lower, adapters=AdapterBatch.broadcast(kv, lower.shape[0]),
                            layers=range(self.first_layer, self.n_layers))
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = base.output(base.norm(h[:, :-1][keep])).float()    # [N_targets, V]
        return F.cross_entropy(logits, targets[keep], reduction="sum")


class LowerStates:
    """Lower-layer states for a fixed list of examples: computed once and kept (`cache=True`,
    for runs that revisit examples) or computed per batch from the tokens."""

    def __init__(self, adapter: TrainableAdapter, base, examples: list[Example], pad_id: int,
                 device: torch.device, autocast: contextlib.AbstractContextManager, cache: bool,
                 batch_size: int):
        self.adapter, self.base, self.autocast = adapter, base, autocast
        self.kept: list[torch.Tensor] | None = None
        if not cache:
            return
        self.kept = [torch.empty(0)] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            tokens, _ = collate([examples[i] for i in idx], pad_id)
            with autocast:
                h = adapter.lower_states(base, tokens.to(device))
            for row, i in enumerate(idx):
                self.kept[i] = h[row, :len(examples[i].input_ids)].clone()

    @staticmethod
    def worth_keeping(adapter: TrainableAdapter, examples: list[Example], dim: int,
                      element_size: int, passes: float) -> bool:
        size = sum(len(e.input_ids) for e in examples) * dim * element_size
        return adapter.first_layer > 0 and passes > 1 and size <= LOWER_STATES_BUDGET_BYTES

    def get(self, indices: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """States [B, T, dim] for these examples, right-padded like `tokens`."""
        if self.kept is None:
            with self.autocast:
                return self.adapter.lower_states(self.base, tokens)
        rows = [self.kept[i] for i in indices]
        out = rows[0].new_zeros(len(rows), tokens.shape[1], rows[0].shape[-1])
        for r, h in enumerate(rows):
            out[r, :h.shape[0]] = h
        return out


def freeze(base: nn.Module) -> None:
    """The base never gets gradients or optimizer state."""
    if base.packed:
        raise ValueError("this model was packed for CPU inference and has no autograd through its "
                         "linear layers: train on a model loaded without a weight mode")
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
