"""Replicas sharing one adapter store.

In-process: two registries on one store directory and the StoreWatcher between them (no timing).
End to end: two real `adapter-server serve` processes on 127.0.0.1 sharing one store directory:
an upload on A is served by B, a delete on B is a 404 on A, and simultaneous uploads to both
leave a consistent store. Propagation times are printed (pytest -s) for the record, not asserted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from server.replica_watch import StoreWatcher
from adapter_helpers import adapter_bytes, random_adapter

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "replica-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------- in process

@pytest.fixture
def two_registries(tmp_path, tiny_loaded):
    def registry():
        return AdapterRegistry(AdapterStore(tmp_path / "store"), tiny_loaded.model, tiny_loaded.fingerprint)
    return registry(), registry()


def upload(registry, name, seed):
    model = registry.model
    return registry.upload(name, adapter_bytes(model, random_adapter(model, seed=seed), registry.fingerprint))


def test_watcher_reports_uploads_and_deletes_of_another_replica(two_registries):
    a, b = two_registries
    watcher = StoreWatcher(b)
    assert watcher.poll() is None
    upload(a, "alpha", seed=1)
    upload(a, "beta", seed=2)
    change = watcher.poll()
    assert change.added == ("alpha@1", "beta@1") and change.removed == ()
    assert watcher.poll() is None
    a.delete("alpha")
    assert watcher.poll().removed == ("alpha@1",)


def test_watcher_sees_a_change_that_a_request_already_reloaded(two_registries):
    a, b = two_registries
    watcher = StoreWatcher(b)
    upload(a, "alpha", seed=1)
    b.acquire("alpha").release()          # a request on B picks up the new index first
    assert watcher.poll().added == ("alpha@1",)


def test_watcher_drops_versions_deleted_elsewhere_from_the_device_pool(two_registries):
    a, b = two_registries
    watcher = StoreWatcher(b)
    upload(a, "alpha", seed=1)
    b.acquire("alpha").release()
    watcher.poll()
    assert b.is_resident("alpha", 1)
    a.delete("alpha")
    watcher.poll()                        # no request on B
    assert not b.is_resident("alpha", 1)


def test_watcher_preloads_new_versions_of_adapters_resident_here_only(two_registries):
    a, b = two_registries
    watcher = StoreWatcher(b)
    upload(a, "hot", seed=1)
    upload(a, "cold", seed=2)
    b.acquire("hot").release()
    watcher.poll()
    upload(a, "hot", seed=3)
    upload(a, "cold", seed=4)
    assert watcher.poll().added == ("cold@2", "hot@2")
    assert b.is_resident("hot", 2)
    assert not b.is_resident("cold", 2) and not b.is_resident("cold", 1)


def test_watcher_thread_applies_changes_in_the_background(two_registries):
    a, b = two_registries
    watcher = StoreWatcher(b, interval_s=0.05).start()
    try:
        upload(a, "alpha", seed=1)
        b.acquire("alpha").release()
        a.delete("alpha")
        deadline = time.monotonic() + 10
        while b.is_resident("alpha", 1) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not b.is_resident("alpha", 1)
    finally:
        watcher.stop()


def test_watcher_rejects_a_non_positive_interval(two_registries):
    with pytest.raises(ValueError, match="interval"):
        StoreWatcher(two_registries[0], interval_s=0)


# ---------------------------------------------------------------- two real servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, name: str, model_dir: Path, store: Path, log_dir: Path):
        self.name = name
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"replica-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_SERVER_")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--store", str(store),
                 "--host", "127.0.0.1", "--port", str(self.port), "--admin-token", TOKEN,
                 "--max-batch", "4"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"replica {self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/ready").status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"replica {self.name} not ready in {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")

    def upload(self, name: str, data: bytes) -> httpx.Response:
        return self.client.put(f"/admin/adapters/{name}", headers=AUTH,
                               files={"file": ("adapter.safetensors", data, "application/octet-stream")})

    def generate(self, adapter: str | None) -> httpx.Response:
        return self.client.post("/generate", json={
            "inputs": "The quick brown fox", "parameters": {
                "adapter_id": adapter, "max_new_tokens": 4, "do_sample": False, "details": True}})

    def logprobs(self, adapter: str | None) -> list[float]:
        r = self.generate(adapter)
        assert r.status_code == 200, r.text
        return [t["logprob"] for t in r.json()["details"]["tokens"]]

    def metric(self, name: str) -> float:
        text = self.client.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics of replica {self.name}")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    pair = [Replica(n, tiny_model_dir, tmp / "store", tmp) for n in ("a", "b")]
    try:
        for r in pair:
            r.wait_ready()
        yield pair
    finally:
        for r in pair:
            r.stop()


@pytest.fixture(scope="module")
def make_adapter(tiny_loaded):
    def make(seed: int) -> bytes:
        model = tiny_loaded.model
        return adapter_bytes(model, random_adapter(model, seed=seed), tiny_loaded.fingerprint)
    return make


def wait_until(condition, timeout_s: float = 10, step_s: float = 0.05) -> float:
    """Seconds until condition() held; fails after timeout_s."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        time.sleep(step_s)
    return time.monotonic() - start


def test_upload_on_a_is_served_by_b_and_delete_on_b_is_404_on_a(replicas, make_adapter):
    a, b = replicas
    base = b.logprobs(None)
    assert a.upload("shared", make_adapter(seed=11)).status_code == 201
    served_s = wait_until(lambda: b.generate("shared").status_code == 200)
    on_b = b.logprobs("shared")
    assert on_b == a.logprobs("shared") and on_b != base   # B uses exactly A's upload
    assert "shared" in {m["id"] for m in b.client.get("/v1/models").json()["data"]}

    # B now has shared@1 resident; A publishes version 2: B's watcher loads it with no request.
    loads = b.metric("adapter_server_adapter_loads_total")
    assert a.upload("shared", make_adapter(seed=12)).status_code == 201
    preload_s = wait_until(lambda: b.metric("adapter_server_adapter_loads_total") > loads)
    assert b.logprobs("shared") == a.logprobs("shared@2") != on_b

    assert b.client.delete("/admin/adapters/shared", headers=AUTH).status_code == 200
    # A drops the deleted versions from its device pool by itself: /metrics makes no lookup.
    evict_s = wait_until(lambda: a.metric("adapter_server_adapters_resident") == 0)
    gone_s = wait_until(lambda: a.generate("shared").status_code == 404)
    assert a.generate("shared@1").status_code == 404
    print(f"\npropagation: upload A→B served after {served_s * 1000:.0f} ms; new version preloaded on B "
          f"after {preload_s * 1000:.0f} ms; delete on B evicted from A's pool after {evict_s * 1000:.0f} ms, "
          f"then 404 on A after {gone_s * 1000:.0f} ms more")


def test_simultaneous_uploads_to_both_replicas_leave_a_consistent_store(replicas, make_adapter, tmp_path):
    a, b = replicas
    per_replica = 6
    results: dict[str, list[httpx.Response]] = {"a": [], "b": []}

    def upload_many(replica: Replica) -> None:
        for i in range(per_replica):
            name = "contested" if i % 2 == 0 else f"own-{replica.name}"
            results[replica.name].append(replica.upload(name, make_adapter(seed=100 + i)))

    threads = [threading.Thread(target=upload_many, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [r.status_code for rs in results.values() for r in rs]
    assert statuses == [201] * (2 * per_replica)
    contested = sorted(r.json()["version"] for rs in results.values() for r in rs
                       if r.json()["name"] == "contested")
    assert contested == list(range(1, per_replica + 1))     # distinct versions, none lost

    listings = [r.client.get("/admin/adapters", headers=AUTH).json() for r in (a, b)]
    assert listings[0] == listings[1]
    store = AdapterStore(a.store)
    assert store.check() == []
    assert {v.ref for x in store.list() for v in x.versions} == {
        v["ref"] for x in listings[0]["adapters"] for v in x["versions"]}
    for name in ("contested", "own-a", "own-b"):
        assert a.logprobs(name) == b.logprobs(name)

