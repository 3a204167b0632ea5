"""The registry: leases pin exact versions, hot swap, deletes, other processes' changes, K/V cache."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest
import torch

import adapters.registry as registry_module
from adapter_helpers import adapter_bytes, random_adapter
from adapters.prefix_kv import kv_cache_filename
from adapters.registry import AdapterNotFoundError, AdapterRegistry, PoolConfig
from adapters.store import AdapterStore, StoreCorruptError
from model.adapter import AdapterKV, compute_adapter_kv
from model.fingerprint import base_fingerprint


@pytest.fixture
def model(make_tiny_model):
    return make_tiny_model()


def _registry(root, model, **pool) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(root), model, base_fingerprint(model),
                           PoolConfig(**pool) if pool else None)


def _expected(model, weights) -> AdapterKV:
    with torch.no_grad():
        return compute_adapter_kv(model, weights)


def _same(a: AdapterKV, b: AdapterKV) -> bool:
    return (a.layers == b.layers and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            and torch.equal(a.gates, b.gates))


def test_acquire_gives_the_precomputed_kv_of_the_latest_version(tmp_path, model):
    reg = _registry(tmp_path / "s", model)
    w = random_adapter(model, per_head=True)
    info = reg.upload("alpaca", adapter_bytes(model, w))
    with reg.acquire("alpaca") as lease:
        assert (lease.name, lease.version, lease.ref) == ("alpaca", 1, "alpaca@1")
        assert lease.info == info
        assert _same(lease.kv, _expected(model, w))
        assert not lease.kv.keys.requires_grad
        assert reg.stats().pinned_count == 1
    assert reg.stats().pinned_count == 0
    lease.release()                         # idempotent
    assert reg.stats().pinned_count == 0


def test_unknown_refs_raise_not_found_naming_them(tmp_path, model):
    reg = _registry(tmp_path / "s", model)
    reg.upload("a", adapter_bytes(model, random_adapter(model)))
    for ref in ("b", "a@2", "../etc/passwd", "a@0", "a@x"):
        with pytest.raises(AdapterNotFoundError, match="not found") as e:
            reg.acquire(ref)
        assert ref in str(e.value) and isinstance(e.value, LookupError)


def test_replace_and_delete_never_affect_a_lease(tmp_path, model):
    reg = _registry(tmp_path / "s", model)
    w1, w2 = random_adapter(model, seed=1), random_adapter(model, seed=2)
    reg.upload("x", adapter_bytes(model, w1))
    held = reg.acquire("x")
    reg.upload("x", adapter_bytes(model, w2))              # replace: new version
    with reg.acquire("x") as latest:
        assert latest.version == 2 and _same(latest.kv, _expected(model, w2))   # never stale
    with reg.acquire("x@1") as pinned:
        assert _same(pinned.kv, _expected(model, w1))
    reg.delete("x", 1)
    with pytest.raises(AdapterNotFoundError, match="x@1"):
        reg.acquire("x@1")
    assert reg.is_resident("x", 1)                         # the running request still has it
    assert _same(held.kv, _expected(model, w1))
    held.release()
    assert not reg.is_resident("x", 1)                     # freed with its last lease
    reg.delete("x")
    with pytest.raises(AdapterNotFoundError):
        reg.acquire("x")
    assert reg.stats().resident_count == 0


def test_lru_never_evicts_a_leased_adapter(tmp_path, model):
    reg = _registry(tmp_path / "s", model, max_adapters=1)
    for i in range(3):
        reg.upload(f"a{i}", adapter_bytes(model, random_adapter(model, seed=i)))
    held = reg.acquire("a0")
    for name in ("a1", "a2", "a1"):
        reg.acquire(name).release()
        assert reg.is_resident("a0", 1)
    held.release()
    reg.acquire("a2").release()
    assert not reg.is_resident("a0", 1)


def test_another_process_changes_propagate(tmp_path, model):
    a, b = _registry(tmp_path / "s", model), _registry(tmp_path / "s", model)
    w = random_adapter(model)
    a.upload("shared", adapter_bytes(model, w))
    lease = b.acquire("shared")
    assert _same(lease.kv, _expected(model, w))
    assert b.stats().loads == 1                 # B loaded the K/V that A cached on disk
    a.delete("shared")
    with pytest.raises(AdapterNotFoundError):
        b.acquire("shared")
    assert b.is_resident("shared", 1)           # B's request in flight keeps it...
    lease.release()
    assert not b.is_resident("shared", 1)       # ...and B frees it afterwards
    assert [x.name for x in b.list()] == []


def test_kv_is_read_from_the_disk_cache(tmp_path, model, monkeypatch):
    w = random_adapter(model)
    info = _registry(tmp_path / "s", model).upload("c", adapter_bytes(model, w))
    cache = tmp_path / "s" / "adapters" / "c" / "1" / kv_cache_filename(base_fingerprint(model), torch.float32)
    assert cache.is_file()

    def no_compute(*a):
        raise AssertionError("K/V recomputed although cached")

    monkeypatch.setattr(registry_module, "compute_prefix_kv", no_compute)
    with _registry(tmp_path / "s", model).acquire("c") as lease:
        assert _same(lease.kv, _expected(model, w)) and lease.info == info
    monkeypatch.undo()
    cache.write_bytes(b"garbage")               # a broken cache is recomputed and rewritten
    with _registry(tmp_path / "s", model).acquire("c") as lease:
        assert _same(lease.kv, _expected(model, w))
    assert cache.read_bytes() != b"garbage"


def test_kv_cache_is_per_base_model(tmp_path, model, make_tiny_model):
    w = random_adapter(model)
    _registry(tmp_path / "s", model).upload("c", adapter_bytes(model, w))
    other = make_tiny_model(seed=5)              # same shape, other weights
    with _registry(tmp_path / "s", other).acquire("c") as lease:
        assert _same(lease.kv, _expected(other, w))


def test_corrupted_store_file_is_detected(tmp_path, model):
    reg = _registry(tmp_path / "s", model)
    info = reg.upload("c", adapter_bytes(model, random_adapter(model)))
    vdir = tmp_path / "s" / "adapters" / "c" / "1"
    for f in vdir.glob("kv-*"):
        f.unlink()
    path = reg.store.path(info)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="sha256"):
        _registry(tmp_path / "s", model).acquire("c")


def test_threads_acquire_while_versions_change(tmp_path, model):
    reg = _registry(tmp_path / "s", model, max_adapters=3)
    expected: dict[str, AdapterKV] = {}      # by file sha256, known before the upload lands

    def upload(name, seed):
        w = random_adapter(model, seed=seed)
        data = adapter_bytes(model, w)
        expected[hashlib.sha256(data).hexdigest()] = _expected(model, w)
        reg.upload(name, data)

    for i, name in enumerate(("p", "q", "r")):
        upload(name, i)
    errors, served = [], []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(40):
            try:
                with reg.acquire(rng.choice(("p", "q", "r", "p@1"))) as lease:
                    served.append(_same(lease.kv, expected[lease.info.sha256]))
            except AdapterNotFoundError:
                pass
            except Exception as e:   # noqa: BLE001 - reported by the assertion
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for i in range(6):
        upload(("p", "q", "r")[i % 3], 10 + i)
        if i == 3:
            reg.delete("p", 1)
    for t in threads:
        t.join()
    assert not errors and served and all(served)
    s = reg.stats()
    assert s.pinned_count == 0 and s.resident_count <= 3


def test_load_benchmark_runs_through_the_real_path(model):
    from adapters.bench_load import bench_adapter_load

    r = bench_adapter_load(model, adapter_len=3, repeats=2)
    assert (r.adapted_layers, r.adapter_len) == (2, 3)
    w = random_adapter(model, k=3)
    assert r.kv_bytes == _expected(model, w).nbytes()
    assert r.cached_load_ms > 0 and r.computed_load_ms > 0
