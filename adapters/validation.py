"""Validation of untrusted adapter files before anything is stored or loaded.

The safetensors header is parsed here first, by hand, so that limits, dtypes and the tensor
layout are checked before any library touches the bytes; pickles are never deserialised.
Then the file is read with `adapters.format.load_adapter` and checked against the base model.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapters.format import (AdapterFormatError, AdapterMetadata, AnyAdapterWeights, check_fits, load_adapter,
                             save_adapter)
from model.adapter import adapter_kv_bytes

# safetensors dtype tag → bytes per element; the adapter format allows only these.
_ITEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2}


class AdapterValidationError(ValueError):
    """An adapter file was rejected; the message names the reason."""


@dataclass(frozen=True)
class ValidationLimits:
    # LLaMA-Adapter and prefix-tuning files: 7B-shaped ones are ~5 MB in fp32 and 70B-shaped
    # ~26 MB; anything far larger is abuse.
    max_file_bytes: int = 64 << 20
    # LoRA files are legitimately larger: rank 64 on every linear of a 7B is ~640 MB in fp32,
    # rank 128 ~1.3 GB (serve --max-lora-file-mb).
    max_lora_file_bytes: int = 2 << 30
    max_header_bytes: int = 1 << 20
    max_tensors: int = 2 * 1024
    # What a version costs once resident: K/V grows with adapter_len × adapted layers, and a
    # long prompt slows every batch it joins. Published adapters use K ≤ 64.
    max_adapter_len: int = 256
    max_kv_bytes: int = 256 << 20
    # LoRA ranks above this are refused (serving pads every row of a batch to its largest rank).
    max_lora_rank: int = 128


DEFAULT_LIMITS = ValidationLimits()


def largest_file_bytes(limits: ValidationLimits) -> int:
    """The size cap before the kind is known (a file's header names its kind)."""
    return max(limits.max_file_bytes, limits.max_lora_file_bytes)


def file_size_limit(kind: str, limits: ValidationLimits) -> int:
    return limits.max_lora_file_bytes if kind == "lora" else limits.max_file_bytes


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: list[TensorEntry]
    metadata: dict[str, str]
    file_size: int


def _what_it_looks_like(head: bytes) -> str | None:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (torch .bin/.pt/.pth)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save format)"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    return None


def _reject_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise AdapterValidationError("safetensors header has duplicate keys")
    return dict(pairs)


def parse_safetensors_header(head: bytes, total_size: int,
                             limits: ValidationLimits = DEFAULT_LIMITS) -> SafetensorsHeader:
    """Check a safetensors header. `head` holds at least the first 8 + header-length bytes."""
    if total_size > largest_file_bytes(limits):
        raise AdapterValidationError(
            f"file too large: {total_size} bytes (limit {largest_file_bytes(limits)})")
    looks_like = _what_it_looks_like(head[:8])
    if looks_like:
        raise AdapterValidationError(
            f"not a safetensors file: it looks like {looks_like}; only safetensors adapters are accepted")
    if total_size < 8 or len(head) < 8:
        raise AdapterValidationError(f"not a safetensors file: only {total_size} bytes")
    (n,) = struct.unpack("<Q", head[:8])
    if n > limits.max_header_bytes:
        raise AdapterValidationError(
            f"not a safetensors file: header length {n} exceeds the limit of {limits.max_header_bytes} bytes")
    if 8 + n > total_size:
        raise AdapterValidationError(
            f"truncated file: header claims {n} bytes but the file has {total_size - 8} after the length")
    if len(head) < 8 + n:   # the file shrank while it was being read
        raise AdapterValidationError("truncated file: header incomplete")
    raw = head[8:8 + n]
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterValidationError(f"not a safetensors file: header is not JSON ({e})") from None
    except RecursionError:
        raise AdapterValidationError("not a safetensors file: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise AdapterValidationError("not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterValidationError("safetensors __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise AdapterValidationError(f"too many tensors: {len(header)} (limit {limits.max_tensors})")
    entries = [_tensor_entry(name, info) for name, info in header.items()]
    _check_layout(entries, total_size - 8 - n)
    return SafetensorsHeader(entries, metadata, total_size)


def _tensor_entry(name: str, info) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterValidationError(f"tensor {name!r}: malformed header entry")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _ITEM_SIZE:
        raise AdapterValidationError(
            f"tensor {name!r}: dtype {dtype!r} not allowed (F32, F16 or BF16 only)")
    if (not isinstance(shape, list) or len(shape) > 4
            or not all(type(d) is int and 0 <= d < 2**31 for d in shape)):
        raise AdapterValidationError(f"tensor {name!r}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise AdapterValidationError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * _ITEM_SIZE[dtype]:
        raise AdapterValidationError(
            f"tensor {name!r}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} "
            f"needs {numel * _ITEM_SIZE[dtype]}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_layout(entries: list[TensorEntry], data_size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing hidden after."""
    pos = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else "leaves a gap before it"
            raise AdapterValidationError(f"tensor {e.name!r}: data_offsets {what}")
        pos = e.end
    if pos != data_size:
        if pos > data_size:
            raise AdapterValidationError(
                f"truncated file: tensors need {pos} data bytes, the file has {data_size}")
        raise AdapterValidationError(
            f"file has {data_size - pos} unexplained bytes after the last tensor")


def check_adapter_bytes(data: bytes | BinaryIO, limits: ValidationLimits = DEFAULT_LIMITS) -> SafetensorsHeader:
    """Cheap structural check of an upload (in-memory bytes, or a spooled file read only as far
    as its header) before it is written to the store."""
    if isinstance(data, bytes):
        return parse_safetensors_header(data[:8 + limits.max_header_bytes], len(data), limits)
    size = data.seek(0, os.SEEK_END)
    data.seek(0)
    head = data.read(8 + limits.max_header_bytes)
    data.seek(0)
    return parse_safetensors_header(head, size, limits)


def read_safetensors_header(path: str | Path, limits: ValidationLimits = DEFAULT_LIMITS) -> SafetensorsHeader:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) == 8 and size <= largest_file_bytes(limits) and _what_it_looks_like(head) is None:
            (n,) = struct.unpack("<Q", head)
            if n <= limits.max_header_bytes:
                head += f.read(n)
    return parse_safetensors_header(head, size, limits)


def validate_adapter_file(path: str | Path, model, fingerprint: str | None = None,
                          allow_fingerprint_mismatch: bool = False,
                          limits: ValidationLimits = DEFAULT_LIMITS,
                          vision=None) -> tuple[AnyAdapterWeights, AdapterMetadata]:
    """Everything an incoming adapter file must pass; returns what it holds.

    `model` is the loaded base Transformer (its config gives dim / n_layers / n_heads); `vision`
    the loaded image encoder (model.vision.VisionTower), which image adapters need.
    """
    header = read_safetensors_header(path, limits)
    try:
        check_resource_limits(AdapterMetadata.from_strings(header.metadata), model, limits, header.file_size)
        weights, meta = load_adapter(path)
        check_fits(meta, model, fingerprint, allow_fingerprint_mismatch, weights, vision)
    except AdapterFormatError as e:
        raise AdapterValidationError(str(e)) from None
    return weights, meta


def check_resource_limits(meta: AdapterMetadata, model, limits: ValidationLimits, file_size: int) -> None:
    """Refuse, before any tensor is read, an adapter too large for its kind or whose K/V would
    cost more than allowed."""
    cap = file_size_limit(meta.kind, limits)
    if file_size > cap:
        flag = "--max-lora-file-mb" if meta.kind == "lora" else "the cap of every kind but LoRA"
        raise AdapterValidationError(f"file too large for its kind ({meta.kind}): {file_size} bytes "
                                     f"(limit {cap}, {flag})")
    if meta.kind == "lora" and meta.lora_rank > limits.max_lora_rank:
        raise AdapterValidationError(f"LoRA rank {meta.lora_rank} exceeds the limit of {limits.max_lora_rank}")
    if meta.adapter_len > limits.max_adapter_len:
        raise AdapterValidationError(f"adapter_len {meta.adapter_len} exceeds this server's limit of "
                                     f"{limits.max_adapter_len} (--max-adapter-len)")
    cfg = model.config
    element_size = model.tok_embeddings.weight.element_size()
    kv = adapter_kv_bytes(len(meta.layers), meta.adapter_len, cfg.n_kv_heads, cfg.head_dim, element_size)
    if kv > limits.max_kv_bytes:
        raise AdapterValidationError(
            f"the adapter's prompt keys/values would take {kv} bytes ({len(meta.layers)} layers × "
            f"adapter_len {meta.adapter_len}); this server's limit is {limits.max_kv_bytes} (--max-adapter-kv-mb)")


def write_validated_adapter(path: Path, weights: AnyAdapterWeights, meta: AdapterMetadata, model,
                            fingerprint: str | None, vision=None) -> None:
    """Write an adapter file, validate it as an upload would be, then rename it into place,
    so nothing half-written or invalid ever appears at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        save_adapter(tmp, weights, meta)
        validate_adapter_file(tmp, model, fingerprint, vision=vision)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
