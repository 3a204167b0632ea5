"""The adapter file format (a public interface: keep it stable; bump FORMAT_VERSION on change).

An adapter is one safetensors file:

Tensors (one pair per adapted layer ``i``, ``i`` = the model's layer index, 0-based):
  ``layers.{i}.prompt``  [K, dim]  float32 | float16 | bfloat16 — the adaption prompt P_i
  ``layers.{i}.gate``    [G]       same dtype — the *effective* gate (G = 1: one per layer as
                                   PEFT stores it; G = n_heads: one per head as in the paper).
                                   It multiplies the prompt attention as is; importers of
                                   checkpoints that use tanh(gate) store tanh already applied.

Metadata (safetensors ``__metadata__``, all strings):
  ``format``               "llama-adapter"          (required)
  ``format_version``       "1"                       (required)
  ``adapter_len``          K                         (required)
  ``layers``               "28,29,..." ascending     (required; must match the tensors)
  ``gate_kind``            "scalar" | "per_head"     (required)
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

from model.adapter import AdapterWeights

FORMAT_NAME = "llama-adapter"
FORMAT_VERSION = "1"
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TENSOR_NAME = re.compile(r"^layers\.(0|[1-9][0-9]{0,3})\.(prompt|gate)$")


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

    def to_strings(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "adapter_len": str(self.adapter_len), "layers": ",".join(map(str, self.layers)),
            "gate_kind": self.gate_kind, "base_dim": str(self.base_dim),
            "base_n_layers": str(self.base_n_layers), "base_n_heads": str(self.base_n_heads),
            "base_fingerprint": self.base_fingerprint, "source": self.source,
            "extra": json.dumps(self.extra, sort_keys=True),
        }

    @classmethod
    def from_strings(cls, m: dict[str, str] | None) -> "AdapterMetadata":
        if not m or m.get("format") != FORMAT_NAME:
            raise AdapterFormatError(f"not a {FORMAT_NAME} file (metadata 'format' missing or wrong)")
        if m.get("format_version") != FORMAT_VERSION:
            raise AdapterFormatError(f"unsupported format_version {m.get('format_version')!r}")
        try:
            layers = [_decimal(x) for x in m["layers"].split(",")] if m.get("layers") else []
            meta = cls(
                adapter_len=_decimal(m["adapter_len"]), layers=layers, gate_kind=m["gate_kind"],
                base_dim=_decimal(m["base_dim"]), base_n_layers=_decimal(m["base_n_layers"]),
                base_n_heads=_decimal(m["base_n_heads"]), base_fingerprint=m.get("base_fingerprint", ""),
                source=m.get("source", "uploaded"), extra=json.loads(m.get("extra") or "{}"))
        except (KeyError, ValueError, TypeError, RecursionError) as e:   # RecursionError: nested 'extra'
            raise AdapterFormatError(f"bad metadata field: {e}") from None
        if meta.gate_kind not in ("scalar", "per_head"):
            raise AdapterFormatError(f"gate_kind must be 'scalar' or 'per_head', got {meta.gate_kind!r}")
        if not layers or layers != sorted(set(layers)):
            raise AdapterFormatError("metadata 'layers' must be a non-empty ascending list")
        if meta.adapter_len < 1:   # K = 0 would pass the shape checks and give NaN attention
            raise AdapterFormatError(f"adapter_len must be at least 1, got {meta.adapter_len}")
        return meta


def _decimal(text: str) -> int:
    """A plain decimal integer: int() would also take '0_4', ' 4', '+4' or non-ASCII digits."""
    if not isinstance(text, str) or not re.fullmatch(r"0|[1-9][0-9]{0,9}", text, re.ASCII):
        raise ValueError(f"expected a decimal integer, got {text!r}")
    return int(text)


def metadata_for(weights: AdapterWeights, model, source: str, extra: dict[str, Any] | None = None,
                 fingerprint: str = "") -> AdapterMetadata:
    cfg = model.config if hasattr(model, "config") else model
    return AdapterMetadata(
        adapter_len=weights.adapter_len, layers=list(weights.layers), gate_kind=weights.gate_kind,
        base_dim=cfg.dim, base_n_layers=cfg.n_layers, base_n_heads=cfg.n_heads,
        base_fingerprint=fingerprint, source=source, extra=dict(extra or {}))


def save_adapter(path: str | Path, weights: AdapterWeights, meta: AdapterMetadata) -> None:
    """Write an adapter file (not atomic by itself; the store wraps it in temp + rename)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(weights.layers):
        tensors[f"layers.{layer}.prompt"] = weights.prompts[i].detach().contiguous().cpu()
        tensors[f"layers.{layer}.gate"] = weights.gates[i].detach().contiguous().cpu()
    save_file(tensors, str(path), metadata=meta.to_strings())


def load_adapter(path: str | Path) -> tuple[AdapterWeights, AdapterMetadata]:
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
    expected = {f"layers.{i}.{kind}" for i in meta.layers for kind in ("prompt", "gate")}
    unexpected = sorted(n for n in names if n not in expected or not _TENSOR_NAME.match(n))
    if unexpected:
        raise AdapterFormatError(f"unexpected tensors: {unexpected[:5]}")
    missing = sorted(expected - names)
    if missing:
        raise AdapterFormatError(f"missing tensors: {missing[:5]}")
    prompts, gates = [], []
    for i in meta.layers:
        p, g = tensors[f"layers.{i}.prompt"], tensors[f"layers.{i}.gate"]
        for name, t in ((f"layers.{i}.prompt", p), (f"layers.{i}.gate", g)):
            if t.dtype not in ALLOWED_DTYPES:
                raise AdapterFormatError(f"{name}: dtype {t.dtype} not allowed (float32/float16/bfloat16)")
            if not torch.isfinite(t).all():
                raise AdapterFormatError(f"{name}: contains NaN or Inf")
        if p.shape != (meta.adapter_len, meta.base_dim):
            raise AdapterFormatError(
                f"layers.{i}.prompt: shape {tuple(p.shape)} != ({meta.adapter_len}, {meta.base_dim})")
        want_g = 1 if meta.gate_kind == "scalar" else meta.base_n_heads
        if g.shape != (want_g,):
            raise AdapterFormatError(f"layers.{i}.gate: shape {tuple(g.shape)} != ({want_g},)")
        prompts.append(p.float())
        gates.append(g.float())
    return AdapterWeights(list(meta.layers), torch.stack(prompts), torch.stack(gates)), meta


def check_fits(meta: AdapterMetadata, model, fingerprint: str | None = None,
               allow_fingerprint_mismatch: bool = False) -> None:
    """Raise AdapterFormatError unless the adapter fits this base model."""
    cfg = model.config
    if (meta.base_dim, meta.base_n_layers, meta.base_n_heads) != (cfg.dim, cfg.n_layers, cfg.n_heads):
        raise AdapterFormatError(
            f"adapter is for a model with dim={meta.base_dim}, n_layers={meta.base_n_layers}, "
            f"n_heads={meta.base_n_heads}; this model has dim={cfg.dim}, n_layers={cfg.n_layers}, "
            f"n_heads={cfg.n_heads}")
    bad = [i for i in meta.layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise AdapterFormatError(f"adapter layers {bad} do not exist in a {cfg.n_layers}-layer model")
    # An adapter that does not say which base it was made for is a mismatch too: its maker
    # could have trained it on any model of this shape.
    if fingerprint and meta.base_fingerprint != fingerprint and not allow_fingerprint_mismatch:
        made_for = meta.base_fingerprint or "an unrecorded base (empty base_fingerprint)"
        raise AdapterFormatError(
            f"base-model fingerprint mismatch: adapter made for {made_for}, this model is {fingerprint} "
            "(an admin may override: allow_fingerprint_mismatch)")
