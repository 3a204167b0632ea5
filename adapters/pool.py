"""Device-resident adapter pool: each exact adapter version's resident form (LLaMA-Adapter
prefix K/V, LoRA A/B, prefix-tuning keys/values) under one budget, LRU-evicted.

Entries are keyed by the exact version (never by name alone), so replacing an adapter can never
serve the previous version's K/V. An entry with leases is pinned: it is never evicted, and a
deleted version stays until its last lease ends. Only idle entries count as evictable; when
pinned entries alone exceed the budget the pool holds them (requests in flight need them) and
shrinks back to the budget as soon as they are released.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Hashable

from model.batch_adapters import Resident


@dataclass(frozen=True)
class PoolConfig:
    max_adapters: int = 64
    max_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if self.max_adapters < 1 or self.max_bytes < 1:
            raise ValueError("pool budget must allow at least one adapter and one byte")


@dataclass(frozen=True)
class PoolStats:
    resident_count: int
    resident_bytes: int
    pinned_count: int
    max_adapters: int
    max_bytes: int
    loads: int               # disk → device loads (misses)
    hits: int                # acquisitions served from the pool
    evictions: int
    load_seconds_total: float
    last_load_seconds: float


@dataclass
class _Entry:
    kv: Resident
    nbytes: int
    leases: int = 0
    doomed: bool = False     # deleted: drop when the last lease ends


class AdapterPool:
    def __init__(self, config: PoolConfig | None = None):
        self.config = config or PoolConfig()
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()   # oldest use first
        self._loading: dict[Hashable, Future] = {}
        self._doom_after_load: set[Hashable] = set()
        self._bytes = 0
        self._loads = self._hits = self._evictions = 0
        self._load_seconds = self._last_load = 0.0

    def acquire(self, key: Hashable, load: Callable[[], Resident]) -> Resident:
        """The resident form for `key`, pinned until `release(key)`; `load()` runs once on a miss.

        Loads run outside the pool lock (other adapters keep being served); concurrent
        acquirers of the same key wait for the one load.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.leases += 1
                self._entries.move_to_end(key)
                self._hits += 1
                return entry.kv
            pending = self._loading.get(key)
            if pending is None:
                pending = self._loading[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            pending.result()          # re-raises the loader's error
            return self.acquire(key, load)
        start = time.perf_counter()
        try:
            kv = load()
        except BaseException as e:
            with self._lock:
                del self._loading[key]
                self._doom_after_load.discard(key)
            pending.set_exception(e)
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            entry = _Entry(kv, kv.nbytes(), leases=1, doomed=key in self._doom_after_load)
            self._doom_after_load.discard(key)
            self._entries[key] = entry
            self._bytes += entry.nbytes
            self._loads += 1
            self._load_seconds += elapsed
            self._last_load = elapsed
            del self._loading[key]
            self._evict_to_budget()
        pending.set_result(None)
        return kv

    def release(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries[key]
            if entry.leases <= 0:
                raise RuntimeError(f"pool entry {key!r} released more often than acquired")
            entry.leases -= 1
            if entry.leases == 0:
                if entry.doomed:
                    self._drop(key)
                else:
                    self._evict_to_budget()

    def discard(self, key: Hashable) -> None:
        """Forget a deleted version: now if idle, else when its last lease ends."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if key in self._loading:
                    self._doom_after_load.add(key)
                return
            if entry.leases == 0:
                self._drop(key)
            else:
                entry.doomed = True

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def is_pinned(self, key: Hashable) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.leases > 0

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                resident_count=len(self._entries), resident_bytes=self._bytes,
                pinned_count=sum(1 for e in self._entries.values() if e.leases),
                max_adapters=self.config.max_adapters, max_bytes=self.config.max_bytes,
                loads=self._loads, hits=self._hits, evictions=self._evictions,
                load_seconds_total=self._load_seconds, last_load_seconds=self._last_load)

    def _drop(self, key: Hashable) -> None:
        self._bytes -= self._entries.pop(key).nbytes

    def _evict_to_budget(self) -> None:
        over = lambda: (len(self._entries) > self.config.max_adapters   # noqa: E731
                        or self._bytes > self.config.max_bytes)
        if not over():
            return
        for key in [k for k, e in self._entries.items() if e.leases == 0]:   # LRU order
            self._drop(key)
            self._evictions += 1
            if not over():
                return
