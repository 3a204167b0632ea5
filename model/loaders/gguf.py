"""GGUF files (llama.cpp): metadata + (quantized) tensors, dequantized with the `gguf` package.

GGUF stores attn_q/attn_k rows for interleaved RoPE; they are permuted to the half-split
layout. Without an `output.weight` the output head is tied to the token embedding.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, UnsupportedModelError
from ..rope import permute_for_half_split
from . import Checkpoint, CheckpointError

_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
_LAYER_NAMES = {
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_to_ours(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def open_reader(path: Path):
    import gguf  # noqa: PLC0415 (slow import; only GGUF users pay for it)

    try:
        return gguf.GGUFReader(path)
    except Exception as e:   # the reader raises ValueError/struct.error/IndexError on damage
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader) -> dict[str, Any]:
    """All key/values (strings decoded, arrays as lists), minus the GGUF header fields."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_checkpoint(path: Path) -> Checkpoint:
    from gguf.quants import dequantize  # noqa: PLC0415

    reader = open_reader(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    unknown = sorted(n for n in names if gguf_to_ours(n) is None)
    if meta.get("general.architecture") == "llama" and unknown:
        # e.g. rope_freqs (Llama 3.1 scaling) or biases: ignoring them would silently change outputs.
        raise UnsupportedModelError(f"{path}: unsupported GGUF tensors {unknown[:5]}")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModelError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
    try:
        config = ModelConfig.from_gguf_metadata(meta, tied="output.weight" not in names)
    except KeyError as e:
        raise CheckpointError(f"{path}: GGUF metadata lacks {e}") from e

    def tensors():
        for t in reader.tensors:
            name = gguf_to_ours(t.name)
            try:
                values = dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise UnsupportedModelError(f"{path}: cannot dequantize {t.name} "
                                            f"({t.tensor_type.name}): {e}") from e
            # GGUF lists dims innermost first; numpy/torch want them outermost first.
            shape = tuple(int(d) for d in reversed(t.shape))
            values = np.asarray(values, dtype=np.float32).reshape(shape)
            if not values.flags.writeable:   # F32 tensors come back as views of the read-only mmap
                values = values.copy()
            w = torch.from_numpy(values)
            if name.endswith("attention.wq.weight"):
                w = permute_for_half_split(w, config.n_heads)
            elif name.endswith("attention.wk.weight"):
                w = permute_for_half_split(w, config.n_kv_heads)
            yield name, w

    return Checkpoint("gguf", path, path.name.removesuffix(".gguf"), config, tensors, meta)
