"""The adapter registry: store + validation + device pool behind one thread-safe interface.

`acquire("name")` resolves the latest version, `acquire("name@N")` pins version N; the lease
keeps that exact version's resident form (LLaMA-Adapter: prefix K/V; LoRA: A/B; prefix tuning:
keys/values, all on the model's device and dtype) until released, whatever happens to the name
meanwhile (new uploads, deletion, changes made by another process sharing the store).
`acquire("a:0.7+b@2")` composes several adapters for one request (adapters/compose.py).

What a lease gives the engine: `lease.parts`, the row's adapters with their weights, which
`model.batch_adapters.BatchAdapters.build` stacks with the other rows' into one forward.
"""

from __future__ import annotations

import hashlib
import logging
from typing import BinaryIO

import torch

from adapters.archive import import_peft_archive
from adapters.compose import format_composition, is_composed, parse_composition
from adapters.format import AdapterFormatError, AnyAdapterWeights, check_fits, load_adapter, metadata_for
from adapters.importers import AdapterImportError, adapter_file_bytes
from adapters.names import AdapterNameError, check_name, parse_ref
from adapters.pool import AdapterPool, PoolConfig, PoolStats
from adapters.prefix_kv import compute_prefix_kv, kv_cache_filename, load_prefix_kv, save_prefix_kv
from adapters.store import (AdapterInfo, AdapterNotFoundError, AdapterStore, StoreCorruptError,
                            VersionInfo)
from adapters.validation import (DEFAULT_LIMITS, AdapterValidationError, ValidationLimits,
                                 check_adapter_bytes, validate_adapter_file)
from model.adapter import AdapterKV, AdapterWeights, VisualAdapterWeights
from model.lora import LoraWeights
from model.batch_adapters import CompositionError, Resident, RowAdapters, check_composition

__all__ = ["AdapterRegistry", "AdapterLease", "ComposedLease", "AdapterNotFoundError", "AdapterValidationError",
           "PoolConfig", "PoolStats", "VersionInfo", "AdapterInfo"]

log = logging.getLogger(__name__)


class AdapterLease:
    """One user's hold on one exact adapter version; release it (or use `with`)."""

    def __init__(self, registry: "AdapterRegistry", info: VersionInfo, kv: Resident):
        self._registry = registry
        self.info = info
        self.name = info.name
        self.version = info.version
        self.ref = info.ref
        self.kv = kv        # the resident form, whatever the kind
        self.parts: RowAdapters = ((kv, 1.0),)     # what the engine hands the model for this row
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


class ComposedLease:
    """Leases on several adapters that serve one request together, each with its weight."""

    def __init__(self, leases: list[AdapterLease], weights: list[float]):
        self.leases, self.weights = leases, weights
        self.ref = format_composition([(lease.ref, w) for lease, w in zip(leases, weights)])
        self.parts: RowAdapters = tuple((lease.kv, w) for lease, w in zip(leases, weights))

    def release(self) -> None:
        for lease in self.leases:
            lease.release()

    def __enter__(self) -> "ComposedLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AdapterRegistry:
    def __init__(self, store: AdapterStore, model, fingerprint: str,
                 pool_config: PoolConfig | None = None, limits: ValidationLimits = DEFAULT_LIMITS,
                 vision=None):
        self.store = store
        self.model = model
        self.fingerprint = fingerprint
        self.vision = vision        # model.vision.VisionTower | None: what image adapters are checked against
        self.limits = limits
        self._pool = AdapterPool(pool_config)
        self.kv_cache_write_failures = 0    # K/V cache files that could not be written (metrics)
        weight = model.tok_embeddings.weight
        self._kv_filename = kv_cache_filename(fingerprint, weight.dtype)

    # ---- serving ---------------------------------------------------------------------------
    def acquire(self, ref: str) -> AdapterLease | ComposedLease:
        if isinstance(ref, str) and is_composed(ref):
            return self._acquire_composed(ref)
        try:
            parse_ref(ref)
        except AdapterNameError as e:
            raise AdapterNotFoundError(f"adapter {ref!r} not found ({e})") from None
        self.reload_if_changed()
        info = self.store.resolve(ref)
        kv = self._pool.acquire((info.name, info.version), lambda: self._load(info))
        return AdapterLease(self, info, kv)

    def _acquire_composed(self, ref: str) -> ComposedLease:
        parts = parse_composition(ref)
        leases: list[AdapterLease] = []
        try:
            for part, _ in parts:
                leases.append(self.acquire(part))
            lease = ComposedLease(leases, [w for _, w in parts])
            check_composition(lease.parts)
        except CompositionError as e:
            for held in leases:
                held.release()
            raise AdapterValidationError(f"adapters {ref!r} cannot be composed: {e}") from None
        except BaseException:
            for held in leases:
                held.release()
            raise
        return lease

    def resolve(self, ref: str) -> VersionInfo:
        self.reload_if_changed()
        return self.store.resolve(ref)

    def pin(self, ref: str) -> str:
        """'a' → 'a@3', 'a:0.5+b' → 'a@3:0.5+b@1': the exact versions that serve `ref` now."""
        self.reload_if_changed()
        if not is_composed(ref):
            return self.store.resolve(ref).ref
        return format_composition([(self.store.resolve(r).ref, w) for r, w in parse_composition(ref)])

    def is_resident_ref(self, exact_ref: str) -> bool:
        """Whether every version an exact (pinned) reference names is on the device."""
        resident = set(self._pool.keys())
        return all(parse_ref(r) in resident for r, _ in parse_composition(exact_ref))

    def reload_if_changed(self) -> bool:
        """Pick up changes other processes made to the store; drops deleted versions' K/V."""
        if not self.store.reload_if_changed():
            return False
        for name, version in self._pool.keys():
            if not self.store.contains(name, version):
                self._pool.discard((name, version))
        return True

    def _load(self, info: VersionInfo) -> Resident:
        """Disk → resident form. LLaMA-Adapter: the cached K/V file if present, else compute it
        (and cache it); LoRA and prefix tuning: the file's tensors on the model's device/dtype."""
        if info.kind == "llama-adapter":
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
            check_fits(meta, self.model, self.fingerprint, allow_fingerprint_mismatch=True, weights=weights,
                       vision=self.vision)
        except AdapterFormatError as e:
            raise AdapterValidationError(f"adapter {info.ref} cannot be used with this model: {e}") from None
        resident = self._resident(weights)
        if isinstance(resident, AdapterKV):
            self._cache_kv(info, resident)
        return resident

    def _resident(self, weights: AnyAdapterWeights) -> Resident:
        """The form a forward pass uses, on the model's device and dtype (an image adapter stays as
        weights: its prompt K/V depend on each request's image, see compute_visual_adapter_kv)."""
        if isinstance(weights, VisualAdapterWeights):
            ref = self.model.tok_embeddings.weight
            return weights.to(ref.device, ref.dtype)
        if isinstance(weights, AdapterWeights):
            return compute_prefix_kv(self.model, weights)
        ref = self.model.tok_embeddings.weight
        return weights.to(ref.device, ref.dtype)

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
    def upload(self, name: str, data: bytes | BinaryIO, source: str = "uploaded",
               allow_fingerprint_mismatch: bool = False) -> VersionInfo:
        """Validate `data` (an adapter file, as bytes or a readable binary file) and store it as
        the next version of `name`.

        Nothing reaches the store unless every check passes. The new version's K/V are
        computed, cached next to it and made resident, so its first request is fast.
        """
        check_name(name)
        check_adapter_bytes(data, self.limits)
        staged = self.store.stage(data)
        try:
            weights, meta = validate_adapter_file(staged.path, self.model, self.fingerprint,
                                                  allow_fingerprint_mismatch, self.limits, self.vision)
            kv = self._resident(weights)
            # Finite weights can still overflow in half precision (through wk/wv for prompts).
            tensors = ((*kv.a.values(), *kv.b.values()) if isinstance(kv, LoraWeights) else
                       (kv.prompts, kv.proj_weight, kv.proj_bias) if isinstance(kv, VisualAdapterWeights) else
                       (kv.keys, kv.values))
            if not all(torch.isfinite(t).all() for t in tensors):
                raise AdapterValidationError(
                    f"the adapter's {meta.kind} tensors overflow in this model's {tensors[0].dtype}")
            info = self.store.commit(name, staged, meta, source, param_count=weights.param_count())
        finally:
            staged.discard()
        if isinstance(kv, AdapterKV):
            self._cache_kv(info, kv)
        key = (info.name, info.version)
        self._pool.acquire(key, lambda: kv)
        self._pool.release(key)
        return info

    def upload_peft_archive(self, name: str, data: bytes, allow_fingerprint_mismatch: bool = False) -> VersionInfo:
        """A PEFT adapter folder as a zip or tar (any peft_type we import): convert, then `upload`."""
        check_name(name)
        try:
            imported = import_peft_archive(data, self.model.config)
        except AdapterImportError as e:
            raise AdapterValidationError(str(e)) from None
        meta = metadata_for(imported.weights, self.model, imported.source, imported.extra, self.fingerprint)
        return self.upload(name, adapter_file_bytes(imported.weights, meta), source=imported.source,
                           allow_fingerprint_mismatch=allow_fingerprint_mismatch)

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
