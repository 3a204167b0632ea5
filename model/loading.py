"""`load_model`: any supported checkpoint (or the embedded default) → model + tokenizer, ready to run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .fingerprint import base_fingerprint
from .llama import Transformer
from .loaders import CheckpointError, build_model, read_checkpoint
from .tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model: Transformer          # eval mode, requires_grad False
    tokenizer: Tokenizer
    config: ModelConfig
    fingerprint: str            # model.fingerprint.base_fingerprint; adapters are checked against it
    name: str                   # e.g. "SmolLM2-135M-Instruct"
    path: Path                  # what was loaded (the converted directory for "default")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU (no fast half-precision matmuls there), bfloat16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_model(spec: str | Path = "default", device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> LoadedModel:
    """spec: "default" | HF directory | Meta directory | file.gguf."""
    name = None
    if str(spec) == "default":
        from .default_model import DEFAULT_MODEL_NAME, default_model_dir  # noqa: PLC0415

        spec, name = default_model_dir(), DEFAULT_MODEL_NAME
    ckpt = read_checkpoint(spec)
    tokenizer = load_tokenizer(ckpt.path, ckpt.metadata if ckpt.format == "gguf" else None)   # fails fast
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise CheckpointError(f"{ckpt.path}: tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the model only {ckpt.config.vocab_size}")
    model = build_model(ckpt, device, dtype or default_dtype(device))
    return LoadedModel(model, tokenizer, ckpt.config, base_fingerprint(model), name or ckpt.name, ckpt.path)
