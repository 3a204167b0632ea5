"""GGUF files (llama.cpp): metadata + (quantized) tensors, dequantized with the `gguf` package.

GGUF stores attn_q/attn_k rows for interleaved RoPE; they are permuted to the half-split
layout. Without an `output.weight` the output head is tied to the token embedding.

With `keep_4bit`, the layers' Q4_0/Q4_1 matrices come out as their own 4-bit codes, scales and
minimums (`Int4Weight`, exactly the values the file stores) for the int4 kernel to serve as they
are (the GGUF weight mode); every other tensor is dequantized as usual.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig, UnsupportedModelError
from ..packed_linear import INT4_GROUP, Int4Weight
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


def int4_codes(data: np.ndarray, shape: tuple[int, int], type_name: str) -> Int4Weight:
    """A Q4_0 or Q4_1 matrix's blocks → Int4Weight. A block of 32 weights is an fp16 scale d
    (Q4_1: then an fp16 minimum m) and 16 bytes of codes q, elements 0–15 in the low nibbles,
    16–31 in the high ones; the weight is d·q + m (Q4_0: d·(q − 8))."""
    n, k = shape
    head = 4 if type_name == "Q4_1" else 2
    blocks = np.asarray(data, dtype=np.uint8).reshape(n, k // INT4_GROUP, head + INT4_GROUP // 2)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    mins = (blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if head == 4
            else -8 * scales)
    nibbles = blocks[..., head:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)
    return Int4Weight(torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(scales),
                      torch.from_numpy(mins))


def read_checkpoint(path: Path, keep_4bit: bool = False) -> Checkpoint:
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

    def permuted(name: str, w):
        if name.endswith("attention.wq.weight"):
            return permute_for_half_split(w, config.n_heads)
        if name.endswith("attention.wk.weight"):
            return permute_for_half_split(w, config.n_kv_heads)
        return w

    def tensors():
        for t in reader.tensors:
            name = gguf_to_ours(t.name)
            # GGUF lists dims innermost first; numpy/torch want them outermost first.
            shape = tuple(int(d) for d in reversed(t.shape))
            if keep_4bit and name.startswith("layers.") and t.tensor_type.name in ("Q4_0", "Q4_1"):
                q = int4_codes(t.data, shape, t.tensor_type.name)
                yield name, Int4Weight(*(permuted(name, x) for x in (q.codes, q.scales, q.mins)))
                continue
            try:
                values = dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise UnsupportedModelError(f"{path}: cannot dequantize {t.name} "
                                            f"({t.tensor_type.name}): {e}") from e
            values = np.asarray(values, dtype=np.float32).reshape(shape)
            if not values.flags.writeable:   # F32 tensors come back as views of the read-only mmap
                values = values.copy()
            yield name, permuted(name, torch.from_numpy(values))

    return Checkpoint("gguf", path, path.name.removesuffix(".gguf"), config, tensors, meta)
