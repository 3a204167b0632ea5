"""Keeps one replica's view of a shared adapter store current without any cluster protocol.

Several `serve` processes (on one host or many, over a shared filesystem) share one store. The
store's index.json is replaced atomically on every change and carries a generation number, so a
replica notices another one's upload or delete with a single `stat` per poll. The registry
already re-checks the index when a request names an adapter; this watcher adds what no request
triggers:
  * versions deleted elsewhere leave this replica's device pool within one poll interval, even
    if no request arrives here;
  * when another replica publishes a new version of an adapter that is resident here (one this
    replica is serving), the new version is loaded at once, so the first request for it does not
    pay the load;
  * each change is logged with the refs that appeared and disappeared.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from adapters.registry import AdapterNotFoundError, AdapterRegistry

log = logging.getLogger("adapter_server.replica_watch")

DEFAULT_INTERVAL_S = 1.0


@dataclass(frozen=True)
class StoreChange:
    generation: int
    added: tuple[str, ...]      # refs "name@N" now in the store
    removed: tuple[str, ...]    # refs gone from it


class StoreWatcher:
    def __init__(self, registry: AdapterRegistry, interval_s: float = DEFAULT_INTERVAL_S):
        if interval_s <= 0:
            raise ValueError(f"store poll interval must be > 0, got {interval_s}")
        self.registry = registry
        self.interval_s = interval_s
        # Compared by generation, not by reload_if_changed()'s answer: a request thread may
        # have reloaded the index first, and its change must still be seen here.
        self._generation = registry.store.generation
        self._refs = self._current_refs()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _current_refs(self) -> frozenset[str]:
        return frozenset(v.ref for a in self.registry.store.list() for v in a.versions)

    def poll(self) -> StoreChange | None:
        """One check of the shared index; the change since the previous poll, or None."""
        self.registry.reload_if_changed()
        generation = self.registry.store.generation
        if generation == self._generation:
            return None
        refs = self._current_refs()
        change = StoreChange(generation, tuple(sorted(refs - self._refs)), tuple(sorted(self._refs - refs)))
        self._generation, self._refs = generation, refs
        log.info("adapter store generation %d: added %s, removed %s", generation,
                 ", ".join(change.added) or "none", ", ".join(change.removed) or "none")
        self._preload_successors(change.added)
        return change

    def _preload_successors(self, added: tuple[str, ...]) -> None:
        resident = {name for name, version in self._resident_keys()}
        for ref in added:
            name = ref.split("@", 1)[0]
            if name not in resident:
                continue
            try:
                self.registry.acquire(ref).release()
            except AdapterNotFoundError:    # deleted again meanwhile
                continue
            except Exception as e:          # a bad file must not stop the watcher; requests report it
                log.warning("could not preload %s: %s", ref, e)

    def _resident_keys(self) -> list[tuple[str, int]]:
        return [(a.name, v.version) for a in self.registry.store.list() for v in a.versions
                if self.registry.is_resident(a.name, v.version)]

    # ---- background thread -------------------------------------------------------------------
    def start(self) -> "StoreWatcher":
        if self._thread is not None:
            raise RuntimeError("store watcher already started")
        self._thread = threading.Thread(target=self._run, name="store-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:   # e.g. the shared filesystem briefly unreachable: retry next tick
                log.exception("store watch poll failed")
