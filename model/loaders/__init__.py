"""Checkpoint readers: each turns one on-disk format into a `Checkpoint` — a `ModelConfig` plus
a lazy stream of tensors under this package's (Meta) names, already in the half-split RoPE
layout. `build_model` turns a checkpoint into a `Transformer` without ever holding two copies
of the weights: the model is built on the meta device and each tensor is converted to the
target device/dtype as it is read, then assigned in place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..llama import Transformer


class CheckpointError(ValueError):
    """A checkpoint is missing files, corrupt, or does not match its own config."""


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file (config, params, tokenizer settings), or a CheckpointError."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


TensorStream = Callable[[], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class Checkpoint:
    format: str                 # "hf" | "meta" | "gguf"
    path: Path
    name: str
    config: ModelConfig
    tensors: TensorStream       # yields (our name, tensor) one at a time, in half-split layout
    metadata: dict[str, Any] = field(default_factory=dict)   # GGUF key/values (tokenizer lives there)


def detect_format(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{path} is not a GGUF file (expected a .gguf file or a checkpoint directory)")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    raise CheckpointError(f"{path} has neither config.json (HF) nor params.json (Meta)")


def read_checkpoint(path: str | Path) -> Checkpoint:
    # Imported here: the format modules import `Checkpoint` from this package.
    from . import gguf, hf, meta  # noqa: PLC0415

    path = Path(path).expanduser()
    readers = {"gguf": gguf.read_checkpoint, "hf": hf.read_checkpoint, "meta": meta.read_checkpoint}
    return readers[detect_format(path)](path)


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Frozen, eval-mode Transformer holding the checkpoint's weights on `device` in `dtype`."""
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    tied = ckpt.config.tie_embeddings
    state: dict[str, torch.Tensor] = {}
    for name, tensor in ckpt.tensors():
        if name not in expected:
            raise CheckpointError(f"{ckpt.path}: unexpected tensor {name!r}")
        if tensor.shape != expected[name]:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config implies {tuple(expected[name])}")
        if tied and name == "output.weight":
            continue   # some tied checkpoints store a copy of the embedding; the tie wins
        # Converted one tensor at a time so the peak is one full copy plus one tensor.
        state[name] = tensor.to(device=device, dtype=dtype).contiguous()
    missing = set(expected) - set(state) - ({"output.weight"} if tied else set())
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing tensors {sorted(missing)[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight   # assign=True replaced the tied Parameter
    model.to(device)   # the non-persistent RoPE tables (kept float32 for precision)
    return model.requires_grad_(False).eval()
