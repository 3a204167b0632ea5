"""Where a trained adapter goes besides a file: the registry store and/or a running server."""

from __future__ import annotations

from pathlib import Path

import httpx

from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore


def add_to_store(store_dir: Path | None, name: str, data: bytes, loaded, vision=None) -> str:
    """Store as the next version of `name` (validated, prefix K/V cached); returns "name@N".
    `vision`: the image encoder an image adapter is checked against.

    A server watching the same store serves it from its next request on.
    """
    registry = AdapterRegistry(AdapterStore(store_dir), loaded.model, loaded.fingerprint, vision=vision)
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
