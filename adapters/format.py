"""The adapter file format (a public interface: keep it stable; bump FORMAT_VERSION on change).

An adapter is one safetensors file. Its metadata ``kind`` says which member of the adapter
family it is; each kind has its own tensors (``i`` = the model's layer index, 0-based):

``kind = "llama-adapter"`` (LLaMA-Adapter, arXiv 2303.16199; the only kind of version-1 files)
  ``layers.{i}.prompt``  [K, dim]  — the adaption prompt P_i
  ``layers.{i}.gate``    [G]       — the *effective* gate (G = 1: one per layer as PEFT stores
                                   it; G = n_heads: one per head as in the paper). It multiplies
                                   the prompt attention as is; importers of checkpoints that use
                                   tanh(gate) store tanh already applied.
``kind = "llama-adapter-visual"`` (the paper's image-conditioned LLaMA-Adapter, §4.3): the
  ``layers.{i}.prompt`` / ``layers.{i}.gate`` tensors of "llama-adapter", plus
  ``visual_proj.weight``  [dim, F]  — projection of the encoder's multi-scale global feature
  ``visual_proj.bias``    [dim]       (F = len(feature_layers) × the encoder's width); the
                                   projected feature is added to every prompt vector
``kind = "lora"`` (LoRA: delta s·B·A on each target projection of each listed layer)
  ``layers.{i}.lora.{t}.A``  [r, in]   t ∈ q, k, v, o, gate, up, down (the same targets in
  ``layers.{i}.lora.{t}.B``  [out, r]  every listed layer); s = alpha/r, or alpha/√r (rsLoRA)
``kind = "prefix-tuning"`` (PEFT prefix tuning: joint softmax over prefix and tokens, no gate)
  ``layers.{i}.prefix.keys``    [n_kv_heads, P, head_dim]   every layer of the model
  ``layers.{i}.prefix.values``  [n_kv_heads, P, head_dim]
Tensors are float32 | float16 | bfloat16.

Metadata (safetensors ``__metadata__``, all strings):
  ``format``               "llama-adapter"          (required)
  ``format_version``       "2" (version "1" files, which have no ``kind``, still load)
  ``kind``                 "llama-adapter" | "llama-adapter-visual" | "lora" | "prefix-tuning"
                           (required from version 2; a reader that predates a kind refuses it by
                           name, so new kinds join version 2 without a bump)
  ``layers``               "28,29,..." ascending     (required; must match the tensors)
  ``adapter_len``          K (llama-adapter[-visual]), P (prefix-tuning), "0" (lora)
  ``gate_kind``            "scalar" | "per_head" (llama-adapter[-visual]), "none" (other kinds)
  ``feature_layers``       "21,22,23,24": encoder hidden states (0 = embeddings) whose class
                           tokens make the image feature      (llama-adapter-visual only, required)
  ``encoder_fingerprint``  model.vision.VisionTower.fingerprint of the image encoder it was made
                           with; another encoder is refused    (llama-adapter-visual only, required)
  ``lora_rank``, ``lora_alpha``, ``lora_rslora`` ("true"/"false"), ``lora_targets``
                           ("q,v", in the order above)   (lora only, required)
  ``base_dim``, ``base_n_layers``, ``base_n_heads``   (required) shape of the base model
  ``base_fingerprint``     model.fingerprint.base_fingerprint of the base (required; "" = unknown)
  ``source``               "uploaded" | "imported:peft" | "imported:llama-adapter" | "trained" ...
  ``extra``                free-form JSON (training recipe, data hash, losses, description)
Nothing else is allowed in the file: no other tensors, no pickles.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.adapter import AdapterWeights, VisualAdapterWeights
from model.lora import LORA_TARGETS, LoraWeights, target_shape
from model.prefix_tuning import PrefixWeights

FORMAT_NAME = "llama-adapter"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
KINDS = ("llama-adapter", "llama-adapter-visual", "lora", "prefix-tuning")
VISUAL = "llama-adapter-visual"
_VISUAL_TENSORS = ("visual_proj.weight", "visual_proj.bias")
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TENSOR_NAME = re.compile(
    r"^(?:layers\.(0|[1-9][0-9]{0,3})\.(prompt|gate|lora\.(?:q|k|v|o|gate|up|down)\.[AB]|prefix\.(?:keys|values))"
    r"|visual_proj\.(?:weight|bias))$")

AnyAdapterWeights = AdapterWeights | LoraWeights | PrefixWeights


class AdapterFormatError(ValueError):
    """The file is not a valid adapter file; the message names the problem."""


@dataclass
class AdapterMetadata:
    adapter_len: int
    layers: list[int]
    gate_kind: str
    base_dim: int
    base_n_layers: int
    base_n_heads: int
    base_fingerprint: str = ""
    source: str = "uploaded"
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "llama-adapter"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_rslora: bool = False
    lora_targets: tuple[str, ...] = ()
    feature_layers: tuple[int, ...] = ()
    encoder_fingerprint: str = ""

    def to_strings(self) -> dict[str, str]:
        out = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": self.kind,
            "adapter_len": str(self.adapter_len), "layers": ",".join(map(str, self.layers)),
            "gate_kind": self.gate_kind, "base_dim": str(self.base_dim),
            "base_n_layers": str(self.base_n_layers), "base_n_heads": str(self.base_n_heads),
            "base_fingerprint": self.base_fingerprint, "source": self.source,
            "extra": json.dumps(self.extra, sort_keys=True),
        }
        if self.kind == "lora":
            out.update(lora_rank=str(self.lora_rank), lora_alpha=repr(float(self.lora_alpha)),
                       lora_rslora="true" if self.lora_rslora else "false",
                       lora_targets=",".join(self.lora_targets))
        if self.kind == VISUAL:
            out.update(feature_layers=",".join(map(str, self.feature_layers)),
                       encoder_fingerprint=self.encoder_fingerprint)
        return out

    @classmethod
    def from_strings(cls, m: dict[str, str] | None) -> "AdapterMetadata":
        if not m or m.get("format") != FORMAT_NAME:
            raise AdapterFormatError(f"not a {FORMAT_NAME} file (metadata 'format' missing or wrong)")
        version = m.get("format_version")
        if version not in READABLE_VERSIONS:
            raise AdapterFormatError(f"unsupported format_version {version!r}")
        kind = m.get("kind", "llama-adapter") if version != "1" else "llama-adapter"
        if version != "1" and "kind" not in m:
            raise AdapterFormatError("metadata 'kind' missing (required from format_version 2)")
        if kind not in KINDS:
            raise AdapterFormatError(f"unknown adapter kind {kind!r} (known: {', '.join(KINDS)})")
        try:
            layers = [_decimal(x) for x in m["layers"].split(",")] if m.get("layers") else []
            meta = cls(
                adapter_len=_decimal(m["adapter_len"]), layers=layers, gate_kind=m["gate_kind"],
                base_dim=_decimal(m["base_dim"]), base_n_layers=_decimal(m["base_n_layers"]),
                base_n_heads=_decimal(m["base_n_heads"]), base_fingerprint=m.get("base_fingerprint", ""),
                source=m.get("source", "uploaded"), extra=json.loads(m.get("extra") or "{}"), kind=kind)
            if kind == "lora":
                meta.lora_rank, meta.lora_alpha = _decimal(m["lora_rank"]), float(m["lora_alpha"])
                meta.lora_rslora = {"true": True, "false": False}[m["lora_rslora"]]
                meta.lora_targets = tuple(m["lora_targets"].split(",")) if m["lora_targets"] else ()
            if kind == VISUAL:
                meta.feature_layers = tuple(_decimal(x) for x in m["feature_layers"].split(","))
                meta.encoder_fingerprint = m["encoder_fingerprint"]
        except (KeyError, ValueError, TypeError, RecursionError) as e:   # RecursionError: nested 'extra'
            raise AdapterFormatError(f"bad metadata field: {e}") from None
        if not layers or layers != sorted(set(layers)):
            raise AdapterFormatError("metadata 'layers' must be a non-empty ascending list")
        if kind in ("llama-adapter", VISUAL):
            if meta.gate_kind not in ("scalar", "per_head"):
                raise AdapterFormatError(f"gate_kind must be 'scalar' or 'per_head', got {meta.gate_kind!r}")
            if meta.adapter_len < 1:   # K = 0 would pass the shape checks and give NaN attention
                raise AdapterFormatError(f"adapter_len must be at least 1, got {meta.adapter_len}")
        if kind == VISUAL:
            if list(meta.feature_layers) != sorted(set(meta.feature_layers)):
                raise AdapterFormatError("metadata 'feature_layers' must be an ascending list without repeats")
            if not meta.encoder_fingerprint:
                raise AdapterFormatError("metadata 'encoder_fingerprint' is empty: an image adapter must say "
                                         "which image encoder it was made with")
        elif kind == "prefix-tuning" and meta.adapter_len < 1:
            raise AdapterFormatError(f"adapter_len (the prefix length) must be at least 1, got {meta.adapter_len}")
        elif kind == "lora":
            unknown = [t for t in meta.lora_targets if t not in LORA_TARGETS]
            if unknown or not meta.lora_targets:
                raise AdapterFormatError(
                    f"lora_targets {list(meta.lora_targets)}: must be a non-empty subset of {list(LORA_TARGETS)}")
            if meta.lora_rank < 1 or not meta.lora_alpha == meta.lora_alpha or abs(meta.lora_alpha) == float("inf"):
                raise AdapterFormatError(f"lora_rank must be >= 1 and lora_alpha finite "
                                         f"(got {meta.lora_rank}, {meta.lora_alpha})")
        return meta


def _decimal(text: str) -> int:
    """A plain decimal integer: int() would also take '0_4', ' 4', '+4' or non-ASCII digits."""
    if not isinstance(text, str) or not re.fullmatch(r"0|[1-9][0-9]{0,9}", text, re.ASCII):
        raise ValueError(f"expected a decimal integer, got {text!r}")
    return int(text)


def metadata_for(weights: AnyAdapterWeights, model, source: str, extra: dict[str, Any] | None = None,
                 fingerprint: str = "") -> AdapterMetadata:
    cfg = model.config if hasattr(model, "config") else model
    common = dict(base_dim=cfg.dim, base_n_layers=cfg.n_layers, base_n_heads=cfg.n_heads,
                  base_fingerprint=fingerprint, source=source, extra=dict(extra or {}))
    if isinstance(weights, LoraWeights):
        return AdapterMetadata(adapter_len=0, layers=list(weights.layers), gate_kind="none", kind="lora",
                               lora_rank=weights.rank, lora_alpha=weights.alpha,
                               lora_rslora=weights.use_rslora, lora_targets=weights.targets, **common)
    if isinstance(weights, PrefixWeights):
        return AdapterMetadata(adapter_len=weights.prefix_len, layers=weights.layers, gate_kind="none",
                               kind="prefix-tuning", **common)
    if isinstance(weights, VisualAdapterWeights):
        return AdapterMetadata(adapter_len=weights.adapter_len, layers=list(weights.layers),
                               gate_kind=weights.gate_kind, kind=VISUAL, feature_layers=tuple(weights.feature_layers),
                               encoder_fingerprint=weights.encoder_fingerprint, **common)
    return AdapterMetadata(adapter_len=weights.adapter_len, layers=list(weights.layers),
                           gate_kind=weights.gate_kind, **common)


def _tensors_of(weights: AnyAdapterWeights) -> dict[str, torch.Tensor]:
    if isinstance(weights, LoraWeights):
        return {f"layers.{layer}.lora.{t}.{ab}": m[t][i]
                for i, layer in enumerate(weights.layers) for t in weights.targets
                for ab, m in (("A", weights.a), ("B", weights.b))}
    if isinstance(weights, PrefixWeights):
        return {f"layers.{layer}.prefix.{n}": t[layer] for layer in weights.layers
                for n, t in (("keys", weights.keys), ("values", weights.values))}
    out = {f"layers.{layer}.{n}": t[i] for i, layer in enumerate(weights.layers)
           for n, t in (("prompt", weights.prompts), ("gate", weights.gates))}
    if isinstance(weights, VisualAdapterWeights):
        out.update(zip(_VISUAL_TENSORS, (weights.proj_weight, weights.proj_bias)))
    return out


def save_adapter(path: str | Path, weights: AnyAdapterWeights, meta: AdapterMetadata) -> None:
    """Write an adapter file (not atomic by itself; the store wraps it in temp + rename)."""
    tensors = {n: t.detach().contiguous().cpu() for n, t in _tensors_of(weights).items()}
    save_file(tensors, str(path), metadata=meta.to_strings())


def _expected_names(meta: AdapterMetadata) -> set[str]:
    per_layer = {"llama-adapter": ("prompt", "gate"), VISUAL: ("prompt", "gate"), "prefix-tuning": ("prefix.keys", "prefix.values"),
                 "lora": tuple(f"lora.{t}.{ab}" for t in meta.lora_targets for ab in "AB")}[meta.kind]
    names = {f"layers.{i}.{n}" for i in meta.layers for n in per_layer}
    return names | set(_VISUAL_TENSORS) if meta.kind == VISUAL else names


def load_adapter(path: str | Path) -> tuple[AnyAdapterWeights, AdapterMetadata]:
    """Read and structurally check an adapter file (shape checks against a model: `check_fits`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = AdapterMetadata.from_strings(f.metadata())
            names = set(f.keys())
            tensors = {n: f.get_tensor(n) for n in names}
    except AdapterFormatError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise AdapterFormatError(f"not a readable safetensors file: {e}") from None
    expected = _expected_names(meta)
    unexpected = sorted(n for n in names if n not in expected or not _TENSOR_NAME.match(n))
    if unexpected:
        raise AdapterFormatError(f"unexpected tensors: {unexpected[:5]}")
    missing = sorted(expected - names)
    if missing:
        raise AdapterFormatError(f"missing tensors: {missing[:5]}")
    for name, t in tensors.items():
        if t.dtype not in ALLOWED_DTYPES:
            raise AdapterFormatError(f"{name}: dtype {t.dtype} not allowed (float32/float16/bfloat16)")
        if not torch.isfinite(t).all():
            raise AdapterFormatError(f"{name}: contains NaN or Inf")
    read = {"llama-adapter": _read_llama_adapter, VISUAL: _read_visual, "lora": _read_lora,
            "prefix-tuning": _read_prefix}
    return read[meta.kind](meta, tensors), meta


def _read_llama_adapter(meta: AdapterMetadata, tensors: dict[str, torch.Tensor]) -> AdapterWeights:
    prompts, gates = [], []
    for i in meta.layers:
        p, g = tensors[f"layers.{i}.prompt"], tensors[f"layers.{i}.gate"]
        if p.shape != (meta.adapter_len, meta.base_dim):
            raise AdapterFormatError(
                f"layers.{i}.prompt: shape {tuple(p.shape)} != ({meta.adapter_len}, {meta.base_dim})")
        want_g = 1 if meta.gate_kind == "scalar" else meta.base_n_heads
        if g.shape != (want_g,):
            raise AdapterFormatError(f"layers.{i}.gate: shape {tuple(g.shape)} != ({want_g},)")
        prompts.append(p.float())
        gates.append(g.float())
    return AdapterWeights(list(meta.layers), torch.stack(prompts), torch.stack(gates))


def _read_visual(meta: AdapterMetadata, tensors: dict[str, torch.Tensor]) -> VisualAdapterWeights:
    """Prompts and gates as "llama-adapter"; the projection [dim, F] with F a whole multiple of the
    number of feature layers (F = layers × encoder width; the width is checked by check_fits)."""
    base = _read_llama_adapter(meta, tensors)
    w, b = (tensors[n] for n in _VISUAL_TENSORS)
    n_feat = len(meta.feature_layers)
    if w.dim() != 2 or w.shape[0] != meta.base_dim or w.shape[1] == 0 or w.shape[1] % n_feat:
        raise AdapterFormatError(f"visual_proj.weight: shape {tuple(w.shape)} is not [{meta.base_dim}, F] with F "
                                 f"a multiple of the {n_feat} feature layers")
    if b.shape != (meta.base_dim,):
        raise AdapterFormatError(f"visual_proj.bias: shape {tuple(b.shape)} != ({meta.base_dim},)")
    return VisualAdapterWeights(base.layers, base.prompts, base.gates, w.float(), b.float(),
                                tuple(meta.feature_layers), meta.encoder_fingerprint)


def _read_lora(meta: AdapterMetadata, tensors: dict[str, torch.Tensor]) -> LoraWeights:
    """A [r, in] and B [out, r], the same shape in every layer (in/out checked by check_fits)."""
    r = meta.lora_rank
    a, b = {}, {}
    for t in meta.lora_targets:
        a_list = [tensors[f"layers.{i}.lora.{t}.A"] for i in meta.layers]
        b_list = [tensors[f"layers.{i}.lora.{t}.B"] for i in meta.layers]
        for i, (ta, tb) in zip(meta.layers, zip(a_list, b_list)):
            if ta.dim() != 2 or tb.dim() != 2 or ta.shape[0] != r or tb.shape[1] != r:
                raise AdapterFormatError(
                    f"layers.{i}.lora.{t}: A {tuple(ta.shape)} / B {tuple(tb.shape)} are not "
                    f"[{r}, in] / [out, {r}] (lora_rank {r})")
            if ta.shape != a_list[0].shape or tb.shape != b_list[0].shape:
                raise AdapterFormatError(f"layers.{i}.lora.{t}: shape differs from layer {meta.layers[0]}'s")
        a[t] = torch.stack(a_list).float()
        b[t] = torch.stack(b_list).float()
    return LoraWeights(list(meta.layers), r, meta.lora_alpha, meta.lora_rslora, a, b)


def _read_prefix(meta: AdapterMetadata, tensors: dict[str, torch.Tensor]) -> PrefixWeights:
    if meta.layers != list(range(meta.base_n_layers)):
        raise AdapterFormatError("a prefix-tuning adapter has a prefix in every layer of its base model")
    keys = [tensors[f"layers.{i}.prefix.keys"] for i in meta.layers]
    values = [tensors[f"layers.{i}.prefix.values"] for i in meta.layers]
    for i, k, v in zip(meta.layers, keys, values):
        if k.dim() != 3 or k.shape != keys[0].shape or v.shape != k.shape or k.shape[1] != meta.adapter_len:
            raise AdapterFormatError(
                f"layers.{i}.prefix: keys {tuple(k.shape)} / values {tuple(v.shape)} are not both "
                f"[n_kv_heads, {meta.adapter_len}, head_dim] like layer 0's")
    return PrefixWeights(torch.stack(keys).float(), torch.stack(values).float())


def check_fits(meta: AdapterMetadata, model, fingerprint: str | None = None,
               allow_fingerprint_mismatch: bool = False, weights: AnyAdapterWeights | None = None,
               vision=None) -> None:
    """Raise AdapterFormatError unless the adapter fits this base model (`weights`: also check
    the shapes that depend on more of the model's config than the metadata records) and, for an
    image adapter, this image encoder (`vision`: model.vision.VisionTower, None = none loaded)."""
    cfg = model.config
    if (meta.base_dim, meta.base_n_layers, meta.base_n_heads) != (cfg.dim, cfg.n_layers, cfg.n_heads):
        raise AdapterFormatError(
            f"adapter is for a model with dim={meta.base_dim}, n_layers={meta.base_n_layers}, "
            f"n_heads={meta.base_n_heads}; this model has dim={cfg.dim}, n_layers={cfg.n_layers}, "
            f"n_heads={cfg.n_heads}")
    bad = [i for i in meta.layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise AdapterFormatError(f"adapter layers {bad} do not exist in a {cfg.n_layers}-layer model")
    if isinstance(weights, LoraWeights):
        for t in weights.targets:
            d_in, d_out = target_shape(cfg, t)
            a, b = weights.a[t], weights.b[t]
            if a.shape[2] != d_in or b.shape[1] != d_out:
                raise AdapterFormatError(
                    f"lora target {t!r}: A is [r, {a.shape[2]}] and B [{b.shape[1]}, r]; this model's "
                    f"{t} projection needs [r, {d_in}] and [{d_out}, r]")
    if isinstance(weights, PrefixWeights) and tuple(weights.keys.shape[1::2]) != (cfg.n_kv_heads, cfg.head_dim):
        raise AdapterFormatError(
            f"prefix keys/values are [{weights.keys.shape[1]}, P, {weights.keys.shape[3]}]; this model "
            f"needs [{cfg.n_kv_heads}, P, {cfg.head_dim}] (n_kv_heads, P, head_dim)")
    # An adapter that does not say which base it was made for is a mismatch too: its maker
    # could have trained it on any model of this shape.
    if fingerprint and meta.base_fingerprint != fingerprint and not allow_fingerprint_mismatch:
        made_for = meta.base_fingerprint or "an unrecorded base (empty base_fingerprint)"
        raise AdapterFormatError(
            f"base-model fingerprint mismatch: adapter made for {made_for}, this model is {fingerprint} "
            "(an admin may override: allow_fingerprint_mismatch)")
    if meta.kind == VISUAL:
        check_encoder_fits(meta, vision, allow_fingerprint_mismatch,
                           weights.feature_dim if isinstance(weights, VisualAdapterWeights) else None)


def check_encoder_fits(meta: AdapterMetadata, vision, allow_fingerprint_mismatch: bool = False,
                       feature_dim: int | None = None) -> None:
    """An image adapter needs the encoder it was trained with: its feature layers and width, and
    (unless an admin overrides it, as for the base model) the same fingerprint."""
    if vision is None:
        raise AdapterFormatError("this is an image adapter (llama-adapter-visual) but no image encoder is "
                                 "loaded: start with --vision-model DIR")
    vcfg = vision.config
    if max(meta.feature_layers) > vcfg.num_hidden_layers:
        raise AdapterFormatError(f"feature_layers {list(meta.feature_layers)} go past the image encoder's "
                                 f"{vcfg.num_hidden_layers} layers")
    want = len(meta.feature_layers) * vcfg.hidden_size
    if feature_dim is not None and feature_dim != want:
        raise AdapterFormatError(f"visual_proj.weight takes {feature_dim} features; this image encoder gives "
                                 f"{want} ({len(meta.feature_layers)} feature layers × width {vcfg.hidden_size})")
    if meta.encoder_fingerprint != vision.fingerprint and not allow_fingerprint_mismatch:
        raise AdapterFormatError(
            f"image-encoder fingerprint mismatch: adapter made with encoder {meta.encoder_fingerprint}, the loaded "
            f"encoder is {vision.fingerprint} (an admin may override: allow_fingerprint_mismatch)")
