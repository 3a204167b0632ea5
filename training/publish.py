"""Where a trained adapter goes: a file, the registry store, and/or a running server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx

from adapters.format import AdapterMetadata
from adapters.importers import adapter_file_bytes
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from adapters.validation import validate_adapter_file
from model.adapter import AdapterWeights


def write_file(path: Path, weights: AdapterWeights, meta: AdapterMetadata, loaded) -> None:
    """Write, validate as the server would, then rename: nothing half-written at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        tmp.write_bytes(adapter_file_bytes(weights, meta))
        validate_adapter_file(tmp, loaded.model, loaded.fingerprint)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_to_store(store_dir: Path | None, name: str, data: bytes, loaded) -> str:
    """Store as the next version of `name` (validated, prefix K/V cached); returns "name@N".

    A server watching the same store serves it from its next request on.
    """
    registry = AdapterRegistry(AdapterStore(store_dir), loaded.model, loaded.fingerprint)
    return registry.upload(name, data, source="trained").ref


def upload_to_server(url: str, token: str, name: str, data: bytes, timeout: float = 120.0) -> str:
    """PUT /admin/adapters/{name} (multipart `file`); returns the new "name@N"."""
    endpoint = f"{url.rstrip('/')}/admin/adapters/{name}"
    try:
        r = httpx.put(endpoint, files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
                      headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except httpx.HTTPError as e:
        raise ConnectionError(f"upload to {endpoint} failed: {e}") from None
    if r.status_code != 201:
        try:
            detail = r.json().get("error", r.text)
        except ValueError:
            detail = r.text
        raise RuntimeError(f"server refused the upload ({r.status_code}): {detail}")
    return r.json()["ref"]
