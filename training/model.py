"""The trainable part over a frozen base model, one class per method (`--method`):
  * LLaMA-Adapter: adaption prompts and zero-initialised gates;
  * image LLaMA-Adapter: the same, plus the projection of each example's (precomputed) image
    feature, added to every prompt (model.adapter.compute_visual_adapter_kv, per example);
  * LoRA: A (PEFT's Kaiming-uniform init) and B (zeros) per target projection;
  * prefix tuning: per-layer prefix keys/values.
Each starts at (LoRA, LLaMA-Adapter) or near (prefix tuning) the base model, and enters it
through the serving math itself (`model.adapter`, `model.lora`, `model.prefix_tuning`, as one
shared adapter broadcast over the batch), so what is trained is what is served.
Two savings that change nothing in the result:
  * the frozen layers below the first adapted one do not see the adapter: they run without
    autograd (and `LowerStates` can compute them once per example for a multi-epoch run);
  * the vocabulary head runs only at target positions, not over the (masked) prompt.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.adapter import (AdapterBatch, AdapterWeights, VisualAdapterWeights, compute_adapter_kv,
                           compute_visual_adapter_kv)
from model.batch_adapters import BatchAdapters
from model.config import ModelConfig
from model.lora import LoraBatch, LoraWeights, target_shape
from model.prefix_tuning import PrefixBatch, PrefixWeights

from .data import IGNORE, DataError, Example, collate

# Budget for per-example lower-layer states kept across epochs (beyond it they are recomputed).
LOWER_STATES_BUDGET_BYTES = 1 << 30


class Trainable(nn.Module):
    """What the loop needs of every method: the adapted layers and the loss. Each method adds
    `batch_adapters(base, batch_size)` (the adapter as the model takes it, differentiable),
    `weights()` (as served, differentiable) and `export()` (detached CPU float32 weights)."""

    def __init__(self, cfg: ModelConfig, adapter_layers: int):
        super().__init__()
        if adapter_layers > cfg.n_layers:
            raise ValueError(f"adapter_layers={adapter_layers} but the model has {cfg.n_layers} layers")
        self.n_layers = cfg.n_layers
        self.layers = list(range(cfg.n_layers - adapter_layers, cfg.n_layers))   # the top L layers

    @property
    def first_layer(self) -> int:
        return self.layers[0]

    @torch.no_grad()
    def lower_states(self, base, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, dim] entering the first adapted layer (adapter-independent)."""
        return base.run_layers(base.tok_embeddings(tokens), layers=range(self.first_layer))

    def summed_loss(self, base, lower: torch.Tensor, labels: torch.Tensor,
                    features: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of next-token cross-entropies over the target positions (the caller normalises);
        `features` [B, F]: each example's image feature (image adapters only)."""
        adapters = (self.batch_adapters(base, lower.shape[0]) if features is None
                    else self.image_batch_adapters(base, features))
        h = base.run_layers(lower, adapters=adapters, layers=range(self.first_layer, self.n_layers))
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = base.output(base.norm(h[:, :-1][keep])).float()    # [N_targets, V]
        return F.cross_entropy(logits, targets[keep], reduction="sum")


class TrainableAdapter(Trainable):
    def __init__(self, cfg: ModelConfig, adapter_len: int, adapter_layers: int, gate_kind: str,
                 init_std: float, seed: int):
        super().__init__(cfg, adapter_layers)
        # Same seed → same initial prompts on every rank, with no broadcast needed.
        g = torch.Generator().manual_seed(seed)
        self.prompts = nn.Parameter(torch.randn(adapter_layers, adapter_len, cfg.dim, generator=g) * init_std)
        # Raw gates; the effective gate is tanh(raw) as in the paper's training code. Zero → the
        # model starts exactly at the base model.
        n_gates = cfg.n_heads if gate_kind == "per_head" else 1
        self.gates = nn.Parameter(torch.zeros(adapter_layers, n_gates))

    def weights(self) -> AdapterWeights:
        """The adapter as served (effective gates); differentiable."""
        return AdapterWeights(self.layers, self.prompts, torch.tanh(self.gates))

    def batch_adapters(self, base, batch_size: int) -> AdapterBatch:
        return AdapterBatch.broadcast(compute_adapter_kv(base, self.weights()), batch_size)

    def export(self) -> AdapterWeights:
        w = self.weights()
        return AdapterWeights(list(w.layers), w.prompts.detach().float().cpu(), w.gates.detach().float().cpu())


class TrainableVisualAdapter(TrainableAdapter):
    """Prompts and gates as TrainableAdapter, plus the image projection. It is trained on
    standardised features z = (f - mean) / std (training-set statistics, so one learning rate
    suits every encoder's feature scale); `export` folds that into the projection, W/std and
    b - (W/std)·mean, so the served adapter takes raw features and computes the same thing."""

    def __init__(self, cfg: ModelConfig, adapter_len: int, adapter_layers: int, gate_kind: str,
                 init_std: float, seed: int, feature_mean: torch.Tensor, feature_std: torch.Tensor,
                 feature_layers: tuple[int, ...], encoder_fingerprint: str):
        super().__init__(cfg, adapter_len, adapter_layers, gate_kind, init_std, seed)
        n_feat = feature_mean.numel()
        g = torch.Generator().manual_seed(seed + 1)
        # Small random, not zero: with zero gates no gradient reaches it before the gates open,
        # and a zero start would make every image look the same to the first gate updates.
        self.proj_weight = nn.Parameter(torch.randn(cfg.dim, n_feat, generator=g) * init_std / n_feat ** 0.5)
        self.proj_bias = nn.Parameter(torch.zeros(cfg.dim))
        self.register_buffer("feature_mean", feature_mean.float().clone())
        self.register_buffer("feature_std", feature_std.float().clamp_min(1e-6).clone())
        self.feature_layers, self.encoder_fingerprint = tuple(feature_layers), encoder_fingerprint

    def standardised_weights(self) -> VisualAdapterWeights:
        w = self.weights()
        return VisualAdapterWeights(w.layers, w.prompts, w.gates, self.proj_weight, self.proj_bias,
                                    self.feature_layers, self.encoder_fingerprint)

    def image_batch_adapters(self, base, features: torch.Tensor) -> AdapterBatch:
        """One AdapterKV per example (its image's prompts), stacked differentiably."""
        weights = self.standardised_weights()
        z = (features.to(self.feature_mean.device) - self.feature_mean) / self.feature_std
        kvs = [compute_visual_adapter_kv(base, weights, row) for row in z]
        return AdapterBatch.build(kvs, base.config.n_layers)

    def export(self) -> VisualAdapterWeights:
        w = self.standardised_weights()
        proj = (w.proj_weight / self.feature_std).detach()
        bias = (w.proj_bias - proj @ self.feature_mean).detach()
        return VisualAdapterWeights(list(w.layers), w.prompts.detach().float().cpu(), w.gates.detach().float().cpu(),
                                    proj.float().cpu(), bias.float().cpu(), self.feature_layers,
                                    self.encoder_fingerprint)


class TrainableLora(Trainable):
    def __init__(self, cfg: ModelConfig, rank: int, alpha: float, use_rslora: bool, targets: tuple[str, ...],
                 adapter_layers: int, seed: int):
        super().__init__(cfg, adapter_layers)
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for t in targets:
            d_in, d_out = target_shape(cfg, t)
            # PEFT's init: A ~ Kaiming-uniform (a=√5, i.e. U(±1/√in)), B = 0, so training starts
            # exactly at the base model.
            bound = 1 / math.sqrt(d_in)
            self.a[t] = nn.Parameter(torch.rand(len(self.layers), rank, d_in, generator=g) * 2 * bound - bound)
            self.b[t] = nn.Parameter(torch.zeros(len(self.layers), d_out, rank))

    def weights(self) -> LoraWeights:
        return LoraWeights(self.layers, self.rank, self.alpha, self.use_rslora, dict(self.a), dict(self.b))

    def batch_adapters(self, base, batch_size: int) -> BatchAdapters:
        return BatchAdapters([], lora=LoraBatch.broadcast(self.weights(), self.n_layers))

    def export(self) -> LoraWeights:
        w = self.weights()
        return LoraWeights(list(w.layers), w.rank, w.alpha, w.use_rslora,
                           {t: v.detach().float().cpu() for t, v in w.a.items()},
                           {t: v.detach().float().cpu() for t, v in w.b.items()})


class TrainablePrefix(Trainable):
    """A prefix in every layer (as PEFT stores it), so nothing runs below the adapter."""

    def __init__(self, cfg: ModelConfig, prefix_len: int, init_std: float, seed: int):
        super().__init__(cfg, cfg.n_layers)
        g = torch.Generator().manual_seed(seed)
        shape = (cfg.n_layers, cfg.n_kv_heads, prefix_len, cfg.head_dim)
        self.keys = nn.Parameter(torch.randn(shape, generator=g) * init_std)
        self.values = nn.Parameter(torch.randn(shape, generator=g) * init_std)

    def weights(self) -> PrefixWeights:
        return PrefixWeights(self.keys, self.values)

    def batch_adapters(self, base, batch_size: int) -> BatchAdapters:
        return BatchAdapters([], prefix=PrefixBatch.broadcast(self.weights(), batch_size))

    def export(self) -> PrefixWeights:
        return PrefixWeights(self.keys.detach().float().cpu(), self.values.detach().float().cpu())


def make_trainable(cfg, model_cfg: ModelConfig, images: "ImageFeatures | None" = None) -> Trainable:
    """The trainable adapter `cfg.method` asks for (cfg: training.config.TrainConfig); an image
    adapter also needs the examples' image features."""
    if images is not None:
        return TrainableVisualAdapter(model_cfg, cfg.adapter_len, cfg.adapter_layers, cfg.gate_kind,
                                      cfg.prompt_init_std, cfg.seed, images.train.mean(0), images.train.std(0),
                                      images.feature_layers, images.encoder_fingerprint)
    if cfg.method == "lora":
        return TrainableLora(model_cfg, cfg.lora_rank, cfg.lora_alpha, cfg.lora_rslora, tuple(cfg.lora_targets),
                             cfg.adapter_layers, cfg.seed)
    if cfg.method == "prefix-tuning":
        return TrainablePrefix(model_cfg, cfg.adapter_len, cfg.prompt_init_std, cfg.seed)
    return TrainableAdapter(model_cfg, cfg.adapter_len, cfg.adapter_layers, cfg.gate_kind,
                            cfg.prompt_init_std, cfg.seed)


@dataclass
class ImageFeatures:
    """Each example's image feature, computed once before training (the encoder is frozen)."""

    train: torch.Tensor                # [N_train, F]
    eval: torch.Tensor                 # [N_eval, F]
    feature_layers: tuple[int, ...]
    encoder_fingerprint: str


@torch.no_grad()
def image_features(vision, examples: list[Example], layers: tuple[int, ...], batch_size: int = 32) -> torch.Tensor:
    """[N, F] multi-scale global features of the examples' images (each distinct file encoded once)."""
    from PIL import Image  # noqa: PLC0415

    from model.image_preprocess import preprocess  # noqa: PLC0415

    paths = sorted({e.image for e in examples})
    found: dict = {}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = []
        for p in chunk:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            except OSError as e:
                raise DataError(f"image {p}: cannot be read ({e})") from None
        pixels = preprocess(images, vision.config).to(vision.class_embedding.device)
        for p, f in zip(chunk, vision.global_features(pixels, layers).float().cpu()):
            found[p] = f
    if not examples:
        return torch.zeros(0, len(layers) * vision.width)
    return torch.stack([found[e.image] for e in examples])


class LowerStates:
    """Lower-layer states for a fixed list of examples: computed once and kept (`cache=True`,
    for runs that revisit examples) or computed per batch from the tokens."""

    def __init__(self, adapter: Trainable, base, examples: list[Example], pad_id: int,
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
    def worth_keeping(adapter: Trainable, examples: list[Example], dim: int,
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
