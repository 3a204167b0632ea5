"""Composed adapter references: several adapters with weights serving one request.

Syntax (stable, documented in docs/api.md): parts joined by "+", each ``name``, ``name@N``,
optionally followed by ``:weight`` (default 1), e.g. ``math:0.7+style@2:0.3``. A single part
without a weight is a plain reference. How weights act is the model's business
(model/batch_adapters.py): LoRA deltas add scaled by their weights, LLaMA-Adapter prompts each
keep their own softmax with their gate scaled by the weight; prefix tuning composes with nothing.
"""

from __future__ import annotations

import math
import re

from adapters.names import AdapterNameError, parse_ref
from adapters.validation import AdapterValidationError

_WEIGHT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def parse_composition(ref: str) -> list[tuple[str, float]]:
    """'a:0.7+b@2' → [('a', 0.7), ('b@2', 1.0)]. A bad name is an AdapterNameError (a 404 at
    the API, like any unknown adapter); a bad weight or a repeated adapter an AdapterValidationError."""
    if not isinstance(ref, str) or not ref:
        raise AdapterNameError(f"invalid adapter reference {ref!r}")
    parts = []
    for part in ref.split("+"):
        name_ref, sep, weight = part.partition(":")
        parse_ref(name_ref)
        if sep and not _WEIGHT.fullmatch(weight):
            raise AdapterValidationError(f"invalid adapter weight {weight!r} in {ref!r}: expected name[@N][:weight]")
        w = float(weight) if sep else 1.0
        if not math.isfinite(w):
            raise AdapterValidationError(f"adapter weight {weight!r} in {ref!r} is not finite")
        parts.append((name_ref, w))
    names = [parse_ref(r)[0] for r, _ in parts]
    if len(set(names)) != len(names):
        raise AdapterValidationError(f"{ref!r} names an adapter twice")
    return parts


def is_composed(ref: str) -> bool:
    return "+" in ref or ":" in ref


def format_composition(parts: list[tuple[str, float]]) -> str:
    return "+".join(r if w == 1.0 else f"{r}:{float(w)!r}" for r, w in parts)


def from_ids_and_weights(ids: list[str], weights: list[float] | None) -> str:
    """TGI/LoRAX-style `adapter_ids` + `adapter_weights` → one composed reference."""
    if weights is not None and len(weights) != len(ids):
        raise AdapterValidationError(f"{len(ids)} adapter ids but {len(weights)} adapter weights")
    if any(":" in i or "+" in i for i in ids):
        raise AdapterValidationError("adapter ids are plain 'name' or 'name@N' (weights go in adapter_weights)")
    for w in weights or ():
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise AdapterValidationError(f"adapter weight {w!r} is not a finite number")
    return format_composition(list(zip(ids, weights if weights is not None else [1.0] * len(ids))))
