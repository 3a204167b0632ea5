"""The device pool: LRU over idle entries, pinned entries never evicted, one load per key."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adapters.pool import AdapterPool, PoolConfig
from model.adapter import AdapterKV


def _kv(n_bytes_per_tensor: int = 64) -> AdapterKV:
    n = n_bytes_per_tensor // 4
    return AdapterKV(torch.zeros(1, 1, 1, n), torch.zeros(1, 1, 1, n), torch.zeros(1, n), (0,))


def _use(pool: AdapterPool, key, kv: AdapterKV | None = None) -> AdapterKV:
    got = pool.acquire(key, lambda: kv if kv is not None else _kv())
    pool.release(key)
    return got


def test_lru_evicts_the_least_recently_used_idle_entry():
    pool = AdapterPool(PoolConfig(max_adapters=2))
    _use(pool, "a"), _use(pool, "b")
    _use(pool, "a")                  # a is now more recent than b
    _use(pool, "c")
    assert set(pool.keys()) == {"a", "c"}
    s = pool.stats()
    assert (s.loads, s.hits, s.evictions, s.resident_count) == (3, 1, 1, 2)
    assert s.resident_bytes == 2 * _kv().nbytes()


def test_pinned_entries_are_never_evicted():
    pool = AdapterPool(PoolConfig(max_adapters=1))
    pinned = pool.acquire("pinned", _kv)
    for key in ("b", "c", "d"):
        _use(pool, key)
        assert "pinned" in pool.keys() and pool.is_pinned("pinned")
    # Over budget only while pinned; released, it is evicted back down to the budget.
    pool.acquire("also", _kv)
    assert set(pool.keys()) == {"pinned", "also"} and pool.stats().pinned_count == 2
    pool.release("also")
    assert set(pool.keys()) == {"pinned"}
    assert pool.acquire("pinned", _kv) is pinned      # a second lease: a hit on the same K/V
    pool.release("pinned"), pool.release("pinned")
    assert pool.stats().pinned_count == 0


def test_byte_budget():
    one = _kv().nbytes()
    pool = AdapterPool(PoolConfig(max_adapters=100, max_bytes=2 * one))
    for key in "abcd":
        _use(pool, key)
    assert pool.keys() == ["c", "d"] and pool.stats().resident_bytes == 2 * one


def test_concurrent_acquirers_share_one_load():
    pool = AdapterPool()
    calls = []

    def load():
        calls.append(1)
        time.sleep(0.05)        # give the other threads time to arrive while loading
        return _kv()

    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.acquire("k", load))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 6 and all(g is got[0] for g in got)
    for _ in got:
        pool.release("k")
    assert not pool.is_pinned("k")


def test_failed_load_is_not_cached():
    pool = AdapterPool()

    def boom():
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        pool.acquire("k", boom)
    assert pool.keys() == [] and pool.stats().loads == 0
    assert _use(pool, "k") is not None


def test_discard_waits_for_the_last_lease():
    pool = AdapterPool()
    _use(pool, "idle")
    pool.discard("idle")
    assert pool.keys() == []
    kv = pool.acquire("busy", _kv)
    pool.discard("busy")
    assert pool.keys() == ["busy"]          # still serving the request that holds it
    assert kv.keys.sum() == 0               # and its tensors are intact
    pool.release("busy")
    assert pool.keys() == [] and pool.stats().resident_bytes == 0


def test_release_without_acquire_is_an_error():
    pool = AdapterPool()
    _use(pool, "k")
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release("k")


def test_budget_must_be_positive():
    with pytest.raises(ValueError):
        PoolConfig(max_adapters=0)
