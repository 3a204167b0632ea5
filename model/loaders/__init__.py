"""Checkpoint readers: each turns one on-disk format into a `Checkpoint` — a `ModelConfig` plus
a lazy stream of tensors under this package's (Meta) names, already in the half-split RoPE
layout. `build_model` turns a checkpoint into a `Transformer` without ever holding two copies
of the weights: the model is built on the meta device and each tensor is converted to the
target device/dtype as it is read, then assigned in place. `build_for_inference` then packs the
linears in a CPU weight mode (model/packed_linear.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..fingerprint import fingerprint_weights
from ..llama import Transformer
from ..packed_linear import Int4Weight
from ..weight_modes import GGUF_MODE


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
    tensors: TensorStream       # yields (our name, tensor or Int4Weight) one at a time, in half-split layout
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


def read_checkpoint(path: str | Path, weights: str | None = None) -> Checkpoint:
    """`weights`: the weight mode the model will be packed in; GGUF mode needs a .gguf file."""
    # Imported here: the format modules import `Checkpoint` from this package.
    from . import gguf, hf, meta  # noqa: PLC0415

    path = Path(path).expanduser()
    fmt = detect_format(path)
    if fmt == "gguf":
        return gguf.read_checkpoint(path, keep_4bit=weights == GGUF_MODE)
    if weights == GGUF_MODE:
        raise CheckpointError(f"{path}: weight mode {GGUF_MODE!r} serves a GGUF file's own quantization; "
                              "this checkpoint is not a .gguf file")
    return {"hf": hf.read_checkpoint, "meta": meta.read_checkpoint}[fmt](path)


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Frozen, eval-mode Transformer holding the checkpoint's weights, dense, on `device` in `dtype`."""
    model, four_bit = _assemble(ckpt, device, dtype)
    if four_bit:
        raise CheckpointError(f"{ckpt.path}: read for 4-bit serving; build it with build_for_inference")
    return model.to(device)   # the non-persistent RoPE tables (kept float32 for precision)


def build_for_inference(ckpt: Checkpoint, weights: str) -> tuple[Transformer, str]:
    """(frozen eval-mode Transformer on the CPU with its linears packed in weight mode `weights`,
    its base fingerprint, taken from the dense values before packing)."""
    model, four_bit = _assemble(ckpt, "cpu", torch.float32)
    fingerprint = fingerprint_weights(
        ckpt.config, lambda n: four_bit[n].dequantize() if n in four_bit else model.get_parameter(n))
    if not model.pack_for_cpu_inference(weights, four_bit):
        raise CheckpointError(f"weight mode {weights!r} needs a torch build with oneDNN")
    return model, fingerprint


def _assemble(ckpt: Checkpoint, device: str | torch.device,
              dtype: torch.dtype) -> tuple[Transformer, dict[str, Int4Weight]]:
    """The model with the checkpoint's dense tensors assigned; 4-bit ones (GGUF mode) are
    returned aside and their parameters stay on the meta device until packing replaces them."""
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    tied = ckpt.config.tie_embeddings
    state: dict[str, torch.Tensor] = {}
    four_bit: dict[str, Int4Weight] = {}
    for name, tensor in ckpt.tensors():
        if name not in expected:
            raise CheckpointError(f"{ckpt.path}: unexpected tensor {name!r}")
        if tensor.shape != expected[name]:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config implies {tuple(expected[name])}")
        if tied and name == "output.weight":
            continue   # some tied checkpoints store a copy of the embedding; the tie wins
        if isinstance(tensor, Int4Weight):
            four_bit[name] = tensor
            continue
        # Converted one tensor at a time so the peak is one full copy plus one tensor.
        state[name] = tensor.to(device=device, dtype=dtype).contiguous()
    missing = set(expected) - set(state) - set(four_bit) - ({"output.weight"} if tied else set())
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing tensors {sorted(missing)[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight   # assign=True replaced the tied Parameter
    return model.requires_grad_(False).eval(), four_bit
