"""`load_model`: any supported checkpoint (or the embedded default) → model + tokenizer, ready to run.

Loading for inference names a weight mode (`weights`, model/packed_linear.py): the model comes
back with its linears packed in that format, once, and whoever serves it (the engine) runs it as
it is. Loading for training or conversion names none and gets dense `nn.Linear`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .fingerprint import base_fingerprint
from .llama import Transformer
from .loaders import CheckpointError, build_for_inference, build_model, read_checkpoint
from .weight_modes import DEFAULT_CPU_WEIGHTS, GGUF_MODE, WEIGHT_CHOICES
from .tokenizer import Tokenizer, load_tokenizer



@dataclass
class LoadedModel:
    model: Transformer          # eval mode, requires_grad False
    tokenizer: Tokenizer
    config: ModelConfig
    fingerprint: str            # model.fingerprint.base_fingerprint; adapters are checked against it
    name: str                   # e.g. "SmolLM2-135M-Instruct"
    path: Path                  # what was loaded (the converted directory for "default")
    weights: str | None = None  # the weight mode the linears are packed in; None = dense


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU (no fast half-precision matmuls there), bfloat16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def inference_weights(requested: str | None, device: str | torch.device) -> str | None:
    """The weight mode serving loads on `device`: the requested one or the default on a CPU;
    none elsewhere (CUDA runs dense weights in its --dtype)."""
    if torch.device(device).type == "cpu":
        return requested or DEFAULT_CPU_WEIGHTS
    if requested is not None:
        raise ValueError(f"--weights {requested} is for CPU serving; on {device} use --dtype")
    return None


def load_model(spec: str | Path = "default", device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, weights: str | None = None) -> LoadedModel:
    """spec: "default" | HF directory | Meta directory | file.gguf.

    weights: None = dense linears (training, conversion, CUDA); one of WEIGHT_CHOICES = packed
    for CPU inference in that format ("gguf" with "default" serves the default model's own GGUF).
    """
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise ValueError(f"unknown weight mode {weights!r}; expected one of {', '.join(WEIGHT_CHOICES)}")
    name = None
    if str(spec) == "default":
        from .default_model import DEFAULT_MODEL_NAME, default_gguf_path, default_model_dir  # noqa: PLC0415

        spec = default_gguf_path() if weights == GGUF_MODE else default_model_dir()
        name = DEFAULT_MODEL_NAME
    ckpt = read_checkpoint(spec, weights)
    tokenizer = load_tokenizer(ckpt.path, ckpt.metadata if ckpt.format == "gguf" else None)   # fails fast
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise CheckpointError(f"{ckpt.path}: tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the model only {ckpt.config.vocab_size}")
    if weights is None:
        model = build_model(ckpt, device, dtype or default_dtype(device))
        fingerprint = base_fingerprint(model)
    elif torch.device(device).type != "cpu" or dtype not in (None, torch.float32):
        raise ValueError(f"weight modes pack float32 checkpoints for the CPU; got {device}, {dtype}")
    else:
        model, fingerprint = build_for_inference(ckpt, weights)
    return LoadedModel(model, tokenizer, ckpt.config, fingerprint, name or ckpt.name, ckpt.path, weights)
