"""Persistent adapter store: named adapters with numbered, immutable versions.

Layout of the store directory (shared by threads, processes, and server replicas on a shared
filesystem):

    index.json                          the truth: every visible version and its record
    .lock                               flock'ed around version allocation + index update
    tmp/                                uploads being written (never visible)
    adapters/<name>/<N>/adapter.safetensors
    adapters/<name>/<N>/<derived files>  caches computed from the adapter (e.g. prefix K/V)

A write goes: bytes → tmp file, fsync → (under the lock) rename into its version directory,
fsync the directories → index rewritten to a temp file, fsync, renamed over index.json, fsync
the directory. The index is written last, so a crash at any point leaves either the old index
(the half-done version is an orphan that `collect_garbage` removes) or the new one (complete).
A write that fails (disk full, read-only mount) before the rename of the index removes what
it made and raises `StoreWriteError`; once the index is renamed the change has happened.
Version numbers of a name are never reused, even after deletion, so anything cached per
(name, version) can never go stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import platformdirs

from adapters.format import AdapterMetadata
from adapters.names import check_name, format_ref, parse_ref

log = logging.getLogger(__name__)

STORE_ENV = "ADAPTER_SERVER_STORE"
ADAPTER_FILE = "adapter.safetensors"
INDEX_FORMAT = "llama-adapter-store"
INDEX_VERSION = 1
# Uploads take milliseconds; a temp file this old belongs to a writer that died.
STALE_TMP_SECONDS = 600.0


class AdapterNotFoundError(LookupError):
    """No such adapter or version; the message names the reference."""


class StoreCorruptError(RuntimeError):
    """index.json cannot be read (it is only ever replaced atomically, so this means tampering)."""


class StoreWriteError(RuntimeError):
    """A change to the store failed before its commit and left nothing behind."""

    def __init__(self, what: str, cause: OSError):
        super().__init__(f"{what} failed: {cause.strerror or cause}")
        self.errno = cause.errno

    @property
    def no_space(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _before_commit(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise StoreWriteError(what, e) from e


def default_store_dir() -> Path:
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("llama-adapter-server")) / "adapters"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    sha256: str
    size: int
    created: float            # unix time
    source: str               # uploaded | imported:peft | imported:llama-adapter | trained ...
    adapter_len: int
    layers: tuple[int, ...]
    gate_kind: str
    base_fingerprint: str
    param_count: int
    kind: str = "llama-adapter"      # adapters.format.KINDS; records written before kinds existed lack it

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.version)

    def record(self) -> dict[str, Any]:
        """What index.json keeps for this version."""
        return {"sha256": self.sha256, "size": self.size, "created": self.created,
                "source": self.source, "adapter_len": self.adapter_len, "layers": list(self.layers),
                "gate_kind": self.gate_kind, "base_fingerprint": self.base_fingerprint,
                "param_count": self.param_count, "kind": self.kind}

    def to_dict(self) -> dict[str, Any]:
        created_iso = datetime.fromtimestamp(self.created, timezone.utc).isoformat(timespec="seconds")
        return {"name": self.name, "version": self.version, "ref": self.ref, **self.record(),
                "created_iso": created_iso}

    @classmethod
    def from_record(cls, name: str, version: int, r: dict[str, Any]) -> "VersionInfo":
        return cls(name=name, version=version, sha256=r["sha256"], size=int(r["size"]),
                   created=float(r["created"]), source=r["source"], adapter_len=int(r["adapter_len"]),
                   layers=tuple(int(x) for x in r["layers"]), gate_kind=r["gate_kind"],
                   base_fingerprint=r["base_fingerprint"], param_count=int(r["param_count"]),
                   kind=r.get("kind", "llama-adapter"))


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    versions: tuple[VersionInfo, ...]    # ascending

    @property
    def latest(self) -> VersionInfo:
        return self.versions[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "latest": self.latest.version,
                "versions": [v.to_dict() for v in self.versions]}


@dataclass
class StagedFile:
    """An upload written and fsynced in tmp/, not yet part of the store."""

    path: Path
    sha256: str
    size: int

    def discard(self) -> None:
        with contextlib.suppress(OSError):   # a read-only mount: garbage collection removes it later
            self.path.unlink(missing_ok=True)


def _chunks(f: BinaryIO, size: int = 1 << 20):
    f.seek(0)
    while chunk := f.read(size):
        yield chunk


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _empty_index() -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "generation": 0, "adapters": {}}


class AdapterStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_store_dir()
        self._tmp = self.root / "tmp"
        self._adapters = self.root / "adapters"
        self._index_path = self.root / "index.json"
        self._lock_path = self.root / ".lock"
        self.root.mkdir(parents=True, exist_ok=True)
        # A replica may mount the store read-only: it can still list, resolve and load.
        self.writable = os.access(self.root, os.W_OK)
        if self.writable:
            self._tmp.mkdir(exist_ok=True)
            self._adapters.mkdir(exist_ok=True)
        # flock locks separate open files even within one process; this lock just keeps our own
        # threads from opening the lock file concurrently.
        self._thread_lock = threading.Lock()
        # (index, (inode, mtime_ns, size) of the index.json it came from), swapped as one object
        # so that a reader never pairs one file's content with another file's identity.
        self._snapshot: tuple[dict[str, Any], tuple[int, int, int] | None] = (_empty_index(), None)
        self.reload_if_changed()
        if self.writable:
            self.collect_garbage()

    # ---- reading -------------------------------------------------------------------------
    def reload_if_changed(self) -> bool:
        """Re-read index.json if another writer replaced it (one stat when nothing changed)."""
        try:
            st = os.stat(self._index_path)
        except FileNotFoundError:
            return False
        previous, key = self._snapshot
        if (st.st_ino, st.st_mtime_ns, st.st_size) == key:
            return False
        try:
            with open(self._index_path, "rb") as f:
                st = os.fstat(f.fileno())
                index = self._parse_index(f.read())
        except FileNotFoundError:   # replaced between stat and open; the next call sees it
            return False
        self._snapshot = (index, (st.st_ino, st.st_mtime_ns, st.st_size))
        return index["generation"] != previous["generation"]

    @property
    def generation(self) -> int:
        """Increases with every committed change; cheap for watchers to compare."""
        return int(self._snapshot[0]["generation"])

    def list(self) -> list[AdapterInfo]:
        index = self._snapshot[0]
        return [self._info_from(name, entry) for name, entry in sorted(index["adapters"].items())
                if entry["versions"]]

    def info(self, name: str) -> AdapterInfo:
        check_name(name)
        entry = self._snapshot[0]["adapters"].get(name)
        if not entry or not entry["versions"]:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        return self._info_from(name, entry)

    def resolve(self, ref: str) -> VersionInfo:
        """'name' → latest version, 'name@N' → version N."""
        name, version = parse_ref(ref)
        entry = self._snapshot[0]["adapters"].get(name)
        versions = entry["versions"] if entry else {}
        if version is None:
            if not versions:
                raise AdapterNotFoundError(f"adapter {name!r} not found")
            version = max(int(v) for v in versions)
        record = versions.get(str(version))
        if record is None:
            raise AdapterNotFoundError(f"adapter {ref!r} not found")
        return VersionInfo.from_record(name, version, record)

    def contains(self, name: str, version: int) -> bool:
        entry = self._snapshot[0]["adapters"].get(name)
        return bool(entry) and str(version) in entry["versions"]

    def path(self, info: VersionInfo) -> Path:
        return self._version_dir(info.name, info.version) / ADAPTER_FILE

    def derived_path(self, info: VersionInfo, filename: str) -> Path:
        return self._version_dir(info.name, info.version) / filename

    # ---- writing ---------------------------------------------------------------------------
    def stage(self, data: bytes | BinaryIO) -> StagedFile:
        """Write an upload (bytes, or a readable binary file: copied in chunks, never whole in
        memory) to tmp/ and fsync it."""
        path = self._tmp / f"upload-{uuid.uuid4().hex}.part"
        digest, size = hashlib.sha256(), 0
        try:
            with _before_commit("writing the upload"), open(path, "xb") as f:
                chunks = [data] if isinstance(data, bytes) else _chunks(data)
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            StagedFile(path, "", 0).discard()
            raise
        return StagedFile(path, digest.hexdigest(), size)

    def commit(self, name: str, staged: StagedFile, meta: AdapterMetadata, source: str,
               param_count: int | None = None) -> VersionInfo:
        """Make a staged (already validated) file the next version of `name`."""
        check_name(name)
        g = 1 if meta.gate_kind == "scalar" else meta.base_n_heads
        if param_count is None:   # LLaMA-Adapter's count follows from the metadata alone
            param_count = len(meta.layers) * (meta.adapter_len * meta.base_dim + g)
        with _before_commit("storing the new version"), self._locked():
            index = self._read_index_file()
            entry = index["adapters"].setdefault(name, {"next_version": 1, "versions": {}})
            version = int(entry["next_version"])
            info = VersionInfo(
                name=name, version=version, sha256=staged.sha256, size=staged.size,
                created=time.time(), source=source, adapter_len=meta.adapter_len,
                layers=tuple(meta.layers), gate_kind=meta.gate_kind,
                base_fingerprint=meta.base_fingerprint, param_count=param_count, kind=meta.kind)
            name_dir = self._adapters / name
            new_name_dir = not name_dir.exists()
            vdir = name_dir / str(version)
            if vdir.exists():    # an orphan of a writer that died before its index update
                shutil.rmtree(vdir)
            try:
                if new_name_dir:
                    os.mkdir(name_dir)
                os.mkdir(vdir)
                os.replace(staged.path, vdir / ADAPTER_FILE)
                _fsync_dir(vdir)
                _fsync_dir(name_dir)
                if new_name_dir:
                    _fsync_dir(self._adapters)
                entry["versions"][str(version)] = info.record()
                entry["next_version"] = version + 1
                self._write_index(index)
            except OSError:   # not committed: leave no trace
                shutil.rmtree(name_dir if new_name_dir else vdir, ignore_errors=True)
                raise
        return info

    def add(self, name: str, data: bytes, meta: AdapterMetadata, source: str) -> VersionInfo:
        """stage + commit for bytes that were validated already."""
        staged = self.stage(data)
        try:
            return self.commit(name, staged, meta, source)
        finally:
            staged.discard()

    def write_derived(self, info: VersionInfo, filename: str, write: Callable[[Path], None]) -> bool:
        """Atomically add a cache file to a version directory; False if the version is gone."""
        tmp = self._tmp / f"derived-{uuid.uuid4().hex}.part"
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.derived_path(info, filename))
            return True
        except FileNotFoundError:   # the version was deleted meanwhile
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def delete(self, name: str, version: int | None = None) -> list[VersionInfo]:
        """Delete one version or (version None) every version of `name`; returns what went."""
        check_name(name)
        with _before_commit("deleting"), self._locked():
            index = self._read_index_file()
            entry = index["adapters"].get(name)
            versions = entry["versions"] if entry else {}
            keys = list(versions) if version is None else [str(version)]
            if not versions or any(k not in versions for k in keys):
                what = name if version is None else format_ref(name, version)
                raise AdapterNotFoundError(f"adapter {what!r} not found")
            removed = [VersionInfo.from_record(name, int(k), versions.pop(k)) for k in keys]
            # The entry stays (with next_version) even when empty so numbers are never reused.
            self._write_index(index)
            for info in removed:
                shutil.rmtree(self._version_dir(name, info.version), ignore_errors=True)
        return sorted(removed, key=lambda v: v.version)

    def collect_garbage(self) -> None:
        """Remove what crashed writers left behind: unindexed version dirs, stale temp files."""
        with self._locked():
            index = self._read_index_file()
            for name_dir in self._adapters.iterdir():
                entry = index["adapters"].get(name_dir.name)
                indexed = set(entry["versions"]) if entry else set()
                for vdir in name_dir.iterdir() if name_dir.is_dir() else ():
                    if vdir.name not in indexed:
                        shutil.rmtree(vdir, ignore_errors=True)
                if not indexed:
                    shutil.rmtree(name_dir, ignore_errors=True)
            now = time.time()
            for f in self._tmp.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if now - f.stat().st_mtime > STALE_TMP_SECONDS:
                        f.unlink()

    def check(self) -> list[str]:
        """Consistency problems (an indexed version whose file is missing or differs); [] = fine."""
        problems = []
        for info in (v for a in self.list() for v in a.versions):
            path = self.path(info)
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                problems.append(f"{info.ref}: file missing")
                continue
            if digest != info.sha256:
                problems.append(f"{info.ref}: sha256 mismatch")
        return problems

    # ---- internals -------------------------------------------------------------------------
    def _version_dir(self, name: str, version: int) -> Path:
        return self._adapters / check_name(name) / str(int(version))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)     # closing releases the flock

    def _parse_index(self, raw: bytes) -> dict[str, Any]:
        try:
            index = json.loads(raw)
        except ValueError as e:
            raise StoreCorruptError(f"{self._index_path}: not valid JSON ({e})") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise StoreCorruptError(f"{self._index_path}: not an adapter store index")
        if index.get("version") != INDEX_VERSION:
            raise StoreCorruptError(f"{self._index_path}: unsupported index version {index.get('version')!r}")
        return index

    def _read_index_file(self) -> dict[str, Any]:
        """The on-disk index (called under the lock: another process may have changed it)."""
        try:
            raw = self._index_path.read_bytes()
        except FileNotFoundError:
            return _empty_index()
        return self._parse_index(raw)

    def _write_index(self, index: dict[str, Any]) -> None:
        """Commit `index`: raises OSError (leaving no temp file) only if it is not committed."""
        index["generation"] = int(index["generation"]) + 1
        tmp = self._tmp / f"index-{uuid.uuid4().hex}.part"
        try:
            _write_synced(tmp, json.dumps(index, indent=1, sort_keys=True).encode())
            os.replace(tmp, self._index_path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        st = os.stat(self._index_path)
        self._snapshot = (index, (st.st_ino, st.st_mtime_ns, st.st_size))
        try:   # committed: a failed directory fsync only weakens durability across a power cut
            _fsync_dir(self.root)
        except OSError as e:
            log.warning("adapter store %s: index committed, but fsync of the directory failed: %s", self.root, e)

    @staticmethod
    def _info_from(name: str, entry: dict[str, Any]) -> AdapterInfo:
        return AdapterInfo(name, tuple(VersionInfo.from_record(name, int(v), r)
                                       for v, r in sorted(entry["versions"].items(), key=lambda kv: int(kv[0]))))
