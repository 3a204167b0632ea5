"""The adapter registry: store + validation + device pool behind one thread-safe interface.

`acquire("name")` resolves the latest version, `acquire("name@N")` pins version N; the lease
keeps that exact version's K/V resident until released, whatever happens to the name meanwhile
(new uploads, deletion, changes made by another process sharing the store).
"""

from __future__ import annotations

import hashlib
import logging

import torch

from adapters.format import AdapterFormatError, check_fits, load_adapter
from adapters.names import AdapterNameError, check_name, parse_ref
from adapters.pool import AdapterPool, PoolConfig, PoolStats
from adapters.prefix_kv import compute_prefix_kv, kv_cache_filename, load_prefix_kv, save_prefix_kv
from adapters.store import (AdapterInfo, AdapterNotFoundError, AdapterStore, StoreCorruptError,
                            VersionInfo)
from adapters.validation import (DEFAULT_LIMITS, AdapterValidationError, ValidationLimits,
                                 check_adapter_bytes, validate_adapter_file)
from model.adapter import AdapterKV

__all__ = ["AdapterRegistry", "AdapterLease", "AdapterNotFoundError", "AdapterValidationError",
           "PoolConfig", "PoolStats", "VersionInfo", "AdapterInfo"]

log = logging.getLogger(__name__)


class AdapterLease:
    """One user's hold on one exact adapter version; release it (or use `with`)."""

    def __init__(self, registry: "AdapterRegistry", info: VersionInfo, kv: AdapterKV):
        self._registry = registry
        self.info = info
        self.name = info.name
        self.version = info.version
        self.ref = info.ref
        self.kv = kv
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._pool.release((self.name, self.version))

    def __enter__(self) -> "AdapterLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"AdapterLease({self.ref}{', released' if self._released else ''})"


class AdapterRegistry:
    def __init__(self, store: AdapterStore, model, fingerprint: str,
                 pool_config: PoolConfig | None = None, limits: ValidationLimits = DEFAULT_LIMITS):
        self.store = store
        self.model = model
        self.fingerprint = fingerprint
        self.limits = limits
        self._pool = AdapterPool(pool_config)
        self.kv_cache_write_failures = 0    # K/V cache files that could not be written (metrics)
        weight = model.tok_embeddings.weight
        self._kv_filename = kv_cache_filename(fingerprint, weight.dtype)

    # ---- serving ---------------------------------------------------------------------------
    def acquire(self, ref: str) -> AdapterLease:
        try:
            parse_ref(ref)
        except AdapterNameError as e:
            raise AdapterNotFoundError(f"adapter {ref!r} not found ({e})") from None
        self.reload_if_changed()
        info = self.store.resolve(ref)
        kv = self._pool.acquire((info.name, info.version), lambda: self._load(info))
        return AdapterLease(self, info, kv)

    def resolve(self, ref: str) -> VersionInfo:
        self.reload_if_changed()
        return self.store.resolve(ref)

    def reload_if_changed(self) -> bool:
        """Pick up changes other processes made to the store; drops deleted versions' K/V."""
        if not self.store.reload_if_changed():
            return False
        for name, version in self._pool.keys():
            if not self.store.contains(name, version):
                self._pool.discard((name, version))
        return True

    def _load(self, info: VersionInfo) -> AdapterKV:
        """Disk → ready K/V: the cached K/V file if present, else compute it (and cache it)."""
        cached = load_prefix_kv(self.store.derived_path(info, self._kv_filename), self.model,
                                info.sha256, self.fingerprint)
        if cached is not None:
            return cached
        path = self.store.path(info)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise AdapterNotFoundError(f"adapter {info.ref!r} not found (deleted)") from None
        if digest != info.sha256:
            raise StoreCorruptError(f"adapter {info.ref}: file does not match its recorded sha256")
        try:
            weights, meta = load_adapter(path)
            # The fingerprint was checked (or overridden by an admin) at upload; shapes must fit.
            check_fits(meta, self.model, self.fingerprint, allow_fingerprint_mismatch=True)
        except AdapterFormatError as e:
            raise AdapterValidationError(f"adapter {info.ref} cannot be used with this model: {e}") from None
        kv = compute_prefix_kv(self.model, weights)
        self._cache_kv(info, kv)
        return kv

    def _cache_kv(self, info: VersionInfo, kv: AdapterKV) -> None:
        try:
            self.store.write_derived(info, self._kv_filename,
                                     lambda p: save_prefix_kv(p, kv, info.sha256, self.fingerprint))
        # Only a cache: a full or read-only store still serves, it just recomputes next time.
        # (safetensors reports a failed write with its own error type, not OSError.)
        except Exception as e:  # noqa: BLE001
            self.kv_cache_write_failures += 1
            log.warning("could not cache prefix K/V of %s: %s", info.ref, e)

    # ---- administration ----------------------------------------------------------------------
    def upload(self, name: str, data: bytes, source: str = "uploaded",
               allow_fingerprint_mismatch: bool = False) -> VersionInfo:
        """Validate `data` (an adapter file) and store it as the next version of `name`.

        Nothing reaches the store unless every check passes. The new version's K/V are
        computed, cached next to it and made resident, so its first request is fast.
        """
        check_name(name)
        check_adapter_bytes(data, self.limits)
        staged = self.store.stage(data)
        try:
            weights, meta = validate_adapter_file(staged.path, self.model, self.fingerprint,
                                                  allow_fingerprint_mismatch, self.limits)
            kv = compute_prefix_kv(self.model, weights)
            # Finite prompts can still overflow through wk/wv in half precision.
            if not all(torch.isfinite(t).all() for t in (kv.keys, kv.values)):
                raise AdapterValidationError(
                    f"the adapter's prompt keys/values overflow in this model's {kv.keys.dtype}")
            info = self.store.commit(name, staged, meta, source)
        finally:
            staged.discard()
        self._cache_kv(info, kv)
        key = (info.name, info.version)
        self._pool.acquire(key, lambda: kv)
        self._pool.release(key)
        return info

    def delete(self, name: str, version: int | None = None) -> list[VersionInfo]:
        """Delete a version (or all); leased versions stay resident until their leases end."""
        removed = self.store.delete(name, version)
        for info in removed:
            self._pool.discard((info.name, info.version))
        return removed

    def list(self) -> list[AdapterInfo]:
        self.reload_if_changed()
        return self.store.list()

    def info(self, name: str) -> AdapterInfo:
        self.reload_if_changed()
        return self.store.info(name)

    def stats(self) -> PoolStats:
        return self._pool.stats()

    def is_resident(self, name: str, version: int) -> bool:
        return (name, version) in self._pool.keys()
