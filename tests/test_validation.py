"""Every class of malicious or broken upload is rejected, with its reason, and the store unchanged."""

from __future__ import annotations

import io
import json
import pickle
import struct

import pytest
import torch

from adapter_helpers import adapter_bytes, random_adapter, random_lora, tree_snapshot
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from adapters.validation import AdapterValidationError, ValidationLimits, check_adapter_bytes
from model.adapter import AdapterWeights
from model.fingerprint import base_fingerprint


@pytest.fixture
def model(make_tiny_model):
    return make_tiny_model()


@pytest.fixture
def registry(tmp_path, model):
    store = AdapterStore(tmp_path / "store")
    reg = AdapterRegistry(store, model, base_fingerprint(model))
    reg.upload("existing", adapter_bytes(model, random_adapter(model)))
    return reg


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _edit_header(data: bytes, edit) -> bytes:
    header, body = _split(data)
    edit(header)
    return _join(header, body)


def _expect_rejected(registry, data: bytes, reason: str, name: str = "new", **kw):
    root = registry.store.root
    before = tree_snapshot(root)
    with pytest.raises(AdapterValidationError, match=reason):
        registry.upload(name, data, **kw)
    assert tree_snapshot(root) == before
    assert [a.name for a in registry.list()] == ["existing"]


def test_valid_upload_is_accepted(registry, model):
    info = registry.upload("new", adapter_bytes(model, random_adapter(model, per_head=True)))
    assert info.ref == "new@1" and info.gate_kind == "per_head"


def test_pickle_disguised_as_safetensors(registry):
    _expect_rejected(registry, pickle.dumps({"layers.2.prompt": [1.0, 2.0]}), "pickle")
    buf = io.BytesIO()
    torch.save({"layers.2.prompt": torch.zeros(3, 64)}, buf)
    _expect_rejected(registry, buf.getvalue(), "zip archive")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(registry, model, bad_value):
    w = random_adapter(model)
    w.prompts[1, 2, 5] = bad_value
    _expect_rejected(registry, adapter_bytes(model, w), "NaN or Inf")
    w = random_adapter(model)
    w.gates[0, 0] = bad_value
    _expect_rejected(registry, adapter_bytes(model, w), "NaN or Inf")


def test_wrong_shapes(registry, model, make_tiny_model):
    other = make_tiny_model(dim=32, n_heads=2, n_kv_heads=1)
    _expect_rejected(registry, adapter_bytes(other, random_adapter(other)), "dim=32")
    deeper = make_tiny_model(n_layers=6)
    _expect_rejected(registry, adapter_bytes(deeper, random_adapter(deeper)), "n_layers=6")
    # Metadata claims this model's shape, but a prompt is the wrong width.
    data = adapter_bytes(model, random_adapter(model))
    lying = _edit_header(data, lambda h: h["layers.3.prompt"].update(shape=[6, 32]))
    _expect_rejected(registry, lying, r"layers.3.prompt: shape \(6, 32\)")
    # Per-head gates with the wrong head count.
    w = random_adapter(model)
    bad_gates = AdapterWeights(w.layers, w.prompts, torch.ones(2, 3))
    _expect_rejected(registry, adapter_bytes(model, bad_gates), r"gate: shape \(3,\)")


def test_layer_outside_the_model(registry, model):
    w = random_adapter(model)
    data = adapter_bytes(model, AdapterWeights([3, 7], w.prompts, w.gates))
    _expect_rejected(registry, data, r"layers \[7\] do not exist")


def test_oversize_file_and_header(registry, model, tmp_path):
    data = adapter_bytes(model, random_adapter(model))
    small = AdapterRegistry(registry.store, model, registry.fingerprint,
                            limits=ValidationLimits(max_file_bytes=len(data) - 1))
    _expect_rejected(small, data, "file too large")
    huge_header = struct.pack("<Q", 10 << 30) + b"{}"
    _expect_rejected(registry, huge_header, "header length")
    tight = AdapterRegistry(registry.store, model, registry.fingerprint,
                            limits=ValidationLimits(max_header_bytes=64))
    _expect_rejected(tight, data, "exceeds the limit")


def test_file_caps_are_per_kind_and_uploads_stream_from_a_file(registry, model):
    """A LoRA may be far larger than a LLaMA-Adapter (--max-lora-file-mb); each kind has its cap,
    checked from the header before any tensor is read, and a file object is staged in chunks."""
    lora = adapter_bytes(model, random_lora(model, 16, ("q", "v")))
    llama = adapter_bytes(model, random_adapter(model, k=64))
    limits = ValidationLimits(max_file_bytes=len(llama) - 1, max_lora_file_bytes=len(lora))
    capped = AdapterRegistry(registry.store, model, registry.fingerprint, limits=limits)
    assert len(lora) > limits.max_file_bytes
    _expect_rejected(capped, llama, r"too large for its kind \(llama-adapter\)")
    _expect_rejected(AdapterRegistry(registry.store, model, registry.fingerprint,
                                     limits=ValidationLimits(max_lora_file_bytes=len(lora) - 1)),
                     lora, r"too large for its kind \(lora\).*--max-lora-file-mb")
    info = capped.upload("big-lora", io.BytesIO(lora))
    assert info.kind == "lora" and info.size == len(lora)
    assert registry.store.path(info).read_bytes() == lora


def test_truncated_file(registry, model):
    data = adapter_bytes(model, random_adapter(model))
    _expect_rejected(registry, data[:-10], "truncated")
    _expect_rejected(registry, data[:100], "truncated")
    _expect_rejected(registry, data[:5], "only 5 bytes")
    _expect_rejected(registry, b"", "only 0 bytes")


def test_header_lying_about_offsets(registry, model):
    data = adapter_bytes(model, random_adapter(model))

    def overlap(h):
        a, b = h["layers.2.prompt"]["data_offsets"], h["layers.3.prompt"]["data_offsets"]
        h["layers.3.prompt"]["data_offsets"] = [a[0], a[0] + b[1] - b[0]]

    _expect_rejected(registry, _edit_header(data, overlap), "overlaps|gap")

    def past_end(h):
        e = h["layers.3.prompt"]["data_offsets"]
        h["layers.3.prompt"]["data_offsets"] = [e[0] + 10**6, e[1] + 10**6]

    _expect_rejected(registry, _edit_header(data, past_end), "gap|truncated")

    def wrong_span(h):
        h["layers.2.gate"]["data_offsets"][1] += 4

    _expect_rejected(registry, _edit_header(data, wrong_span), "needs")
    _expect_rejected(registry, data + b"\0" * 16, "unexplained bytes")


def test_disallowed_dtypes_and_malformed_headers(registry, model):
    data = adapter_bytes(model, random_adapter(model))
    _expect_rejected(registry, _edit_header(data, lambda h: h["layers.2.gate"].update(dtype="I32")),
                     "dtype 'I32' not allowed")
    header, body = _split(data)
    raw = json.dumps(header).encode()
    dup = raw[:-1] + b', "layers.2.gate": ' + json.dumps(header["layers.2.gate"]).encode() + b"}"
    _expect_rejected(registry, struct.pack("<Q", len(dup)) + dup + body, "duplicate keys")
    _expect_rejected(registry, struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON")
    _expect_rejected(registry, _edit_header(data, lambda h: h["__metadata__"].update(extra=5)),
                     "strings to strings")


def test_unexpected_tensor(registry, model):
    data = adapter_bytes(model, random_adapter(model))
    header, body = _split(data)
    header["payload"] = {"dtype": "F32", "shape": [4], "data_offsets": [len(body), len(body) + 16]}
    _expect_rejected(registry, _join(header, body + b"\0" * 16), "unexpected tensors")


def test_fingerprint_mismatch_needs_the_override(registry, model):
    data = adapter_bytes(model, random_adapter(model), fingerprint="0123456789abcdef")
    _expect_rejected(registry, data, "fingerprint mismatch")
    info = registry.upload("new", data, allow_fingerprint_mismatch=True)
    assert info.base_fingerprint == "0123456789abcdef"


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".x", "\u0430"])
def test_bad_names(registry, model, name):
    _expect_rejected(registry, adapter_bytes(model, random_adapter(model)), "invalid adapter name", name=name)


def test_check_adapter_bytes_reports_layout(model):
    header = check_adapter_bytes(adapter_bytes(model, random_adapter(model)))
    assert {t.name for t in header.tensors} == {"layers.2.prompt", "layers.2.gate",
                                               "layers.3.prompt", "layers.3.gate"}
    assert header.metadata["format"] == "llama-adapter"


def test_empty_prompt_and_overflowing_prompt(registry, model):
    w = random_adapter(model)
    empty = AdapterWeights(w.layers, w.prompts[:, :0], w.gates)
    _expect_rejected(registry, adapter_bytes(model, empty), "adapter_len must be at least 1")
    huge = AdapterWeights(w.layers, torch.full_like(w.prompts, 3e38), w.gates)
    _expect_rejected(registry, adapter_bytes(model, huge), "overflow")
