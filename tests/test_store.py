"""The versioned adapter store: versions, names, atomicity, threads, processes, SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapter_helpers import adapter_bytes, random_adapter, tree_snapshot
from adapters.format import load_adapter
from adapters.names import AdapterNameError, check_name, parse_ref
from adapters.store import STORE_ENV, AdapterNotFoundError, AdapterStore, default_store_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def adapter_file(tmp_path, make_tiny_model):
    model = make_tiny_model()
    path = tmp_path / "a.safetensors"
    path.write_bytes(adapter_bytes(model, random_adapter(model)))
    return path


def _add(store: AdapterStore, name: str, path: Path):
    _, meta = load_adapter(path)
    return store.add(name, path.read_bytes(), meta, "uploaded")


def test_versions_are_numbered_resolved_and_recorded(tmp_path, adapter_file):
    store = AdapterStore(tmp_path / "store")
    v1, v2 = _add(store, "alpaca", adapter_file), _add(store, "alpaca", adapter_file)
    assert (v1.version, v2.version) == (1, 2)
    assert store.resolve("alpaca") == v2 and store.resolve("alpaca@1") == v1
    assert v1.size == adapter_file.stat().st_size and len(v1.sha256) == 64
    assert (v1.adapter_len, v1.layers, v1.gate_kind, v1.source) == (3, (2, 3), "scalar", "uploaded")
    assert v1.param_count == 2 * (3 * 64 + 1)
    assert v1.base_fingerprint
    assert store.path(v1).read_bytes() == adapter_file.read_bytes()
    assert [a.name for a in store.list()] == ["alpaca"]
    assert [v.version for v in store.info("alpaca").versions] == [1, 2]
    # A fresh store object (a restart) sees the same thing.
    again = AdapterStore(tmp_path / "store")
    assert again.resolve("alpaca") == v2 and again.check() == []


def test_not_found_names_the_reference(tmp_path, adapter_file):
    store = AdapterStore(tmp_path / "store")
    _add(store, "a", adapter_file)
    for ref in ("b", "a@2", "b@1"):
        with pytest.raises(AdapterNotFoundError, match=ref):
            store.resolve(ref)
    with pytest.raises(AdapterNotFoundError, match="a@7"):
        store.delete("a", 7)


def test_deleted_version_numbers_are_never_reused(tmp_path, adapter_file):
    store = AdapterStore(tmp_path / "store")
    _add(store, "a", adapter_file), _add(store, "a", adapter_file)
    assert [v.version for v in store.delete("a", 2)] == [2]
    assert store.resolve("a").version == 1
    assert [v.version for v in store.delete("a")] == [1]
    assert store.list() == []
    with pytest.raises(AdapterNotFoundError):
        store.info("a")
    assert not (tmp_path / "store" / "adapters" / "a" / "1").exists()
    assert _add(store, "a", adapter_file).version == 3


@pytest.mark.parametrize("bad", [
    "", "../evil", "a/b", "a\\b", ".hidden", "-x", "a b", "x" * 65, "caf\u00e9", "\uff41bc",
    "a\n", "a\x00", "a@1", "\u0430dmin",
])
def test_bad_names_are_rejected(tmp_path, adapter_file, bad):
    store = AdapterStore(tmp_path / "store")
    before = tree_snapshot(tmp_path / "store")
    with pytest.raises(AdapterNameError):
        _add(store, bad, adapter_file)
    assert tree_snapshot(tmp_path / "store") == before


def test_names_and_refs():
    assert check_name("Llama-2_7b.alpaca") == "Llama-2_7b.alpaca"
    assert check_name("a" * 64)
    assert parse_ref("x") == ("x", None) and parse_ref("x@12") == ("x", 12)
    for bad in ("x@0", "x@", "x@-1", "x@1.0", "x@01", "x@1@2", "x@\u0661"):
        with pytest.raises(AdapterNameError):
            parse_ref(bad)


def test_default_store_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "elsewhere"))
    assert default_store_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(STORE_ENV)
    assert default_store_dir().parts[-2:] == ("llama-adapter-server", "adapters")


def test_reload_if_changed_sees_other_writers(tmp_path, adapter_file):
    a, b = AdapterStore(tmp_path / "s"), AdapterStore(tmp_path / "s")
    assert b.reload_if_changed() is False
    _add(a, "x", adapter_file)
    assert b.reload_if_changed() is True and b.resolve("x").version == 1
    assert b.reload_if_changed() is False
    assert b.generation == a.generation
    b.delete("x")
    assert a.reload_if_changed() is True
    with pytest.raises(AdapterNotFoundError):
        a.resolve("x")


def test_crash_before_index_update_leaves_nothing_visible(tmp_path, adapter_file, monkeypatch):
    store = AdapterStore(tmp_path / "s")
    _add(store, "x", adapter_file)

    def die(index):   # a process dying here runs no cleanup (a failed write, an OSError, does)
        raise SystemExit("simulated crash before the index rename")

    monkeypatch.setattr(store, "_write_index", die)
    with pytest.raises(SystemExit, match="simulated"):
        _add(store, "x", adapter_file)
    assert (tmp_path / "s" / "adapters" / "x" / "2").exists()     # the orphan exists on disk...
    monkeypatch.undo()
    reopened = AdapterStore(tmp_path / "s")
    assert reopened.resolve("x").version == 1                       # ...but was never visible
    assert not (tmp_path / "s" / "adapters" / "x" / "2").exists()   # and is collected on open
    assert _add(reopened, "x", adapter_file).version == 2
    assert reopened.check() == []


def test_concurrent_thread_uploads_get_distinct_versions(tmp_path, adapter_file):
    store = AdapterStore(tmp_path / "s")
    other = AdapterStore(tmp_path / "s")      # a second store object: its own lock file handle
    results, errors = [], []

    def upload(s):
        try:
            for _ in range(4):
                results.append(_add(s, "same", adapter_file).version)
        except Exception as e:   # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(s,)) for s in (store, other) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == list(range(1, 25))
    store.reload_if_changed()
    assert [v.version for v in store.info("same").versions] == list(range(1, 25))
    assert store.check() == []


_WRITER = """
import sys, pathlib
from adapters.format import load_adapter
from adapters.store import AdapterStore
root, src, name, count = sys.argv[1:5]
_, meta = load_adapter(src)
data = pathlib.Path(src).read_bytes()
store = AdapterStore(root)
print("ready", flush=True)
for _ in range(int(count)):
    print(store.add(name, data, meta, "uploaded").version, flush=True)
"""


def _writer(root: Path, src: Path, name: str, count: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(src), name, str(count)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)


def test_concurrent_processes_share_one_store(tmp_path, adapter_file):
    procs = [_writer(tmp_path / "s", adapter_file, "shared", 8) for _ in range(2)]
    versions = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        versions += [int(x) for x in out.split()[1:]]
    assert sorted(versions) == list(range(1, 17))
    store = AdapterStore(tmp_path / "s")
    assert [v.version for v in store.info("shared").versions] == list(range(1, 17))
    assert store.check() == []


def test_sigkill_during_writes_leaves_store_consistent(tmp_path, adapter_file):
    root = tmp_path / "s"
    rng = random.Random(0)
    completed: set[int] = set()
    for _ in range(3):
        proc = _writer(root, adapter_file, "victim", 100000)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        completed |= {int(x) for x in out.split()}
        store = AdapterStore(root)          # the restart: reopen (and collect garbage)
        assert store.check() == []
        indexed = {v.version for v in store.info("victim").versions}
        assert completed <= indexed           # every reported write survived
        assert indexed == set(range(1, max(indexed) + 1))
        on_disk = {int(p.name) for p in (root / "adapters" / "victim").iterdir()}
        assert on_disk == indexed             # no half-written version left behind
        json.loads((root / "index.json").read_text())
    assert completed
