"""Inference API keys and tenants: the keys file, key lookup, and per-key limits (no HTTP here;
server/auth.py turns this into FastAPI dependencies).

A keys file (JSON, or TOML on Python ≥ 3.11) lists keys by their SHA-256, never in clear:

    [[keys]]
    tenant = "team-a"                # label in logs and metrics
    sha256 = "9f86d0…"               # `adapter-server keys hash` prints it
    adapters = ["team-a-*"]          # fnmatch patterns of adapter names the key may use
    base_model = true                # may use the base model without an adapter (default true)
    max_concurrent = 4               # requests in flight at once (default: no limit)
    tokens_per_minute = 20000        # prompt + generated tokens over the last 60 s (default: no limit)

    [[keys]]
    tenant = "team-a"
    sha256 = "…"
    admin = true                     # a tenant admin key: /admin routes, only names matching `adapters`
    adapters = ["team-a-*"]

The file is re-read when it changes (checked with one stat per request), so keys are rotated or
revoked without a restart; a broken file keeps the previous keys and logs why.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterator

from adapters.names import AdapterNameError, parse_ref
from adapters.store import AdapterNotFoundError

log = logging.getLogger("adapter_server.auth")

WINDOW_S = 60.0                     # tokens_per_minute is counted over this sliding window
CLI_TENANT = "default"              # tenant of keys given with --api-key
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"tenant", "sha256", "adapters", "base_model", "admin", "max_concurrent", "tokens_per_minute"}


def key_hash(key: str) -> str:
    """What a keys file stores for `key`: its SHA-256 in hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeysFileError(ValueError):
    """The keys file cannot be read or is not valid; the message says where."""


@dataclass(frozen=True)
class KeyEntry:
    tenant: str
    sha256: str
    adapters: tuple[str, ...] = ()       # fnmatch patterns over adapter names
    base_model: bool = True
    admin: bool = False
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    def may_use(self, adapter_name: str | None) -> bool:
        """Whether this key may use adapter `adapter_name` (None = the base model)."""
        if adapter_name is None:
            return self.base_model
        return any(fnmatchcase(adapter_name, pattern) for pattern in self.adapters)


def _entry(raw: object, where: str) -> KeyEntry:
    if not isinstance(raw, dict):
        raise KeysFileError(f"{where}: expected a table/object, got {type(raw).__name__}")
    unknown = set(raw) - _FIELDS
    if unknown:   # a typo ("adapter") must not silently grant or deny something else
        raise KeysFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                            f"allowed: {', '.join(sorted(_FIELDS))}")
    tenant, digest = raw.get("tenant"), raw.get("sha256")
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise KeysFileError(f"{where}: tenant must be 1-64 ASCII letters, digits, '.', '_' or '-', got {tenant!r}")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
        raise KeysFileError(f"{where}: sha256 must be 64 hex digits (adapter-server keys hash)")
    adapters = raw.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(p, str) and p for p in adapters):
        raise KeysFileError(f"{where}: adapters must be a list of non-empty patterns")
    for flag in ("base_model", "admin"):
        if not isinstance(raw.get(flag, False), bool):
            raise KeysFileError(f"{where}: {flag} must be true or false")
    for limit in ("max_concurrent", "tokens_per_minute"):
        value = raw.get(limit)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KeysFileError(f"{where}: {limit} must be an integer ≥ 1, got {value!r}")
    admin = raw.get("admin", False)
    if admin and ({"base_model", "max_concurrent", "tokens_per_minute"} & set(raw)):
        raise KeysFileError(f"{where}: an admin key is for /admin only; base_model and limits apply to "
                            "inference keys")
    return KeyEntry(tenant=tenant, sha256=digest.lower(), adapters=tuple(adapters),
                    base_model=raw.get("base_model", True), admin=admin,
                    max_concurrent=raw.get("max_concurrent"), tokens_per_minute=raw.get("tokens_per_minute"))


def parse_keys_file(path: Path) -> tuple[KeyEntry, ...]:
    """Read and check a keys file: {"keys": [...]} in JSON, or [[keys]] tables in TOML."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeysFileError(f"cannot read keys file {path}: {e.strerror or e}") from None
    toml = path.suffix.lower() == ".toml"
    if toml and sys.version_info < (3, 11):
        raise KeysFileError(f"{path}: TOML keys files need Python 3.11+ (tomllib); use JSON")
    try:
        if toml:
            import tomllib  # noqa: PLC0415 (3.11+ only)
            doc = tomllib.loads(data.decode("utf-8"))
        else:
            doc = json.loads(data)
    except ValueError as e:   # JSONDecodeError, TOMLDecodeError and UnicodeDecodeError all are
        raise KeysFileError(f"{path}: not valid {'TOML' if toml else 'JSON'}: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"keys"} or not isinstance(doc["keys"], list):
        raise KeysFileError(f"{path}: expected exactly one top-level 'keys' list")
    entries = tuple(_entry(raw, f"{path}: keys[{i}]") for i, raw in enumerate(doc["keys"]))
    seen = set()
    for i, e in enumerate(entries):
        if e.sha256 in seen:
            raise KeysFileError(f"{path}: keys[{i}]: the same key hash appears twice")
        seen.add(e.sha256)
    return entries


class RateLimited(Exception):
    """A key is over one of its limits; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int, limit: str):
        super().__init__(message)
        self.retry_after_s, self.limit = retry_after_s, limit


class KeyUsage:
    """One key's requests in flight and tokens charged over the last minute. Shared by the
    event loop (admission) and the engine thread (charging), hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self._charges: deque[tuple[float, int]] = deque()   # (monotonic time, tokens)

    def _window_tokens(self, now: float) -> int:
        while self._charges and self._charges[0][0] <= now - WINDOW_S:
            self._charges.popleft()
        return sum(t for _, t in self._charges)

    def admit(self, entry: KeyEntry, concurrency_retry_s: int, now: float | None = None) -> None:
        """Count one more request in flight, or raise RateLimited. Tokens are charged when a
        request finishes, so the check is that the last minute's total is under the limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            limit = entry.tokens_per_minute
            if limit is not None:
                used = self._window_tokens(now)
                if used >= limit:
                    # Wait until enough of the oldest charges leave the window to get under the limit.
                    over, t_free = used - limit, now
                    for t, tokens in self._charges:
                        over -= tokens
                        t_free = t + WINDOW_S
                        if over < 0:
                            break
                    raise RateLimited(f"tokens per minute limit reached ({used} of {limit} used in the last "
                                      f"{WINDOW_S:.0f} s)", max(1, math.ceil(t_free - now)), "tokens_per_minute")
            if entry.max_concurrent is not None and self.in_flight >= entry.max_concurrent:
                raise RateLimited(f"concurrent request limit reached ({entry.max_concurrent} in flight)",
                                  concurrency_retry_s, "concurrency")
            self.in_flight += 1

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def charge(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._charges.append((now, tokens))
            self._window_tokens(now)   # drop what left the window so the deque stays short


@dataclass(frozen=True)
class Caller:
    """Who sent the request being served: the key's entry and its usage counters."""
    entry: KeyEntry
    usage: KeyUsage

    @property
    def tenant(self) -> str:
        return self.entry.tenant


# Set by server/auth.py's dependencies for the request being served (each request runs in its
# own task, so this never leaks between requests); None when inference is open.
current_caller: ContextVar[Caller | None] = ContextVar("adapter_server_caller", default=None)


def current_tenant() -> str | None:
    caller = current_caller.get()
    return caller.tenant if caller is not None else None


def check_adapter(requested: str | None) -> None:
    """Raise AdapterNotFoundError (a 404) for a model the current caller may not use. For an
    adapter the error is the store's own for a missing one, so a key cannot learn what other
    tenants have. `requested`: "name", "name@N", or None for the base model."""
    caller = current_caller.get()
    if caller is None:
        return
    if requested is None:
        if not caller.entry.may_use(None):
            raise AdapterNotFoundError("the base model is not available to this API key")
        return
    try:
        name, _ = parse_ref(requested)
    except AdapterNameError:
        return   # cannot exist; the registry words the error
    if not caller.entry.may_use(name):
        raise AdapterNotFoundError(f"adapter {requested!r} not found")   # the store's wording


def may_list(name: str | None) -> bool:
    """Whether the current caller (inference key or tenant admin) may see adapter `name`
    (None = the base model)."""
    caller = current_caller.get()
    return caller is None or caller.entry.may_use(name)


class ApiKeys:
    """The configured keys (--api-key ones plus the keys file's), reloaded when the file changes.

    `configured` is decided by the flags, not by what the file holds: a keys file that revokes
    every key locks inference, it never opens it."""

    def __init__(self, plain_keys: tuple[str, ...] = (), keys_file: str | os.PathLike | None = None):
        self.keys_file = Path(keys_file) if keys_file else None
        self.configured = bool(plain_keys) or self.keys_file is not None
        self._plain = tuple(KeyEntry(tenant=CLI_TENANT, sha256=key_hash(k), adapters=("*",))
                            for k in plain_keys)
        self._file_entries: tuple[KeyEntry, ...] = ()
        self._signature: tuple | None = None      # (mtime_ns, size, inode) of the last read attempt
        self._usage: dict[str, KeyUsage] = {}     # by hash; survives reloads so limits do too
        self._charged: dict[str, KeyUsage] = {}   # engine request id -> whose tokens it uses
        self._reload_lock = threading.Lock()
        if self.keys_file is not None:
            self._signature = self._stat()
            self._file_entries = parse_keys_file(self.keys_file)   # at startup a broken file is fatal

    # ---- the keys file ------------------------------------------------------------------------
    def _stat(self) -> tuple | None:
        try:
            st = self.keys_file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload_if_changed(self) -> None:
        """One stat; re-read the file if it changed. A broken or missing file keeps the keys
        read last and logs an error once per change."""
        if self.keys_file is None:
            return
        signature = self._stat()
        if signature == self._signature:
            return
        with self._reload_lock:
            if signature == self._signature:
                return
            self._signature = signature
            try:
                entries = parse_keys_file(self.keys_file)
            except KeysFileError as e:
                log.error("keys file not reloaded, the previous keys stay in force: %s", e)
                return
            self._file_entries = entries
            log.info("keys file %s reloaded: %s", self.keys_file, self.describe())

    def entries(self) -> tuple[KeyEntry, ...]:
        return self._plain + self._file_entries

    def describe(self) -> str:
        """For logs: counts per tenant, never keys or hashes."""
        inference = [e for e in self.entries() if not e.admin]
        admins = [e for e in self.entries() if e.admin]
        tenants = sorted({e.tenant for e in inference})
        return (f"{len(inference)} inference key(s) for {len(tenants)} tenant(s)"
                f"{' (' + ', '.join(tenants) + ')' if tenants else ''}, {len(admins)} tenant admin key(s)")

    # ---- lookup ------------------------------------------------------------------------------
    def lookup(self, key: str, admin: bool) -> Caller | None:
        """The caller presenting `key` for inference (admin=False) or /admin (admin=True).

        Every stored hash is compared, in constant time, whatever matches, so the time taken
        says nothing about which hashes exist."""
        self.reload_if_changed()
        digest = key_hash(key).encode()
        found = None
        for entry in self.entries():
            if hmac.compare_digest(digest, entry.sha256.encode()) and entry.admin == admin:
                found = entry
        if found is None:
            return None
        return Caller(found, self._usage.setdefault(found.sha256, KeyUsage()))

    # ---- tokens per minute: charged when the engine reports a request finished ----------------
    @contextmanager
    def charging_caller(self, request_id: str) -> Iterator[None]:
        """Around `engine.submit`: the request's tokens go to the current caller's key when the
        engine reports it finished (registered first: a fast engine may finish before submit
        returns); a refused submit charges nothing."""
        caller = current_caller.get()
        if caller is not None:
            self._charged[request_id] = caller.usage
        try:
            yield
        except BaseException:
            self._charged.pop(request_id, None)
            raise

    def on_result(self, result) -> None:
        """Engine completion callback: charge the request's prompt + generated tokens to its key."""
        usage = self._charged.pop(result.request_id, None)
        if usage is not None:
            usage.charge(result.prompt_tokens + result.generated_tokens)


# ---- `adapter-server keys ...` ----------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("keys", help="make inference API keys and the hashes a keys file stores")
    sub = p.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    new = sub.add_parser("new", help="print a fresh random key and its keys-file entry (JSON)")
    new.add_argument("--tenant", required=True, help="tenant the key belongs to")
    new.add_argument("--adapters", nargs="*", default=[], metavar="PATTERN",
                     help="adapter name patterns the key may use, e.g. 'team-a-*'")
    new.add_argument("--admin", action="store_true", help="a tenant admin key for /admin instead")
    new.set_defaults(func=_new)
    hashed = sub.add_parser("hash", help="read keys from stdin, one per line; print each one's sha256")
    hashed.set_defaults(func=_hash)


def _new(args: argparse.Namespace) -> int:
    key = "sk-" + secrets.token_urlsafe(32)
    entry = {"tenant": args.tenant, "sha256": key_hash(key), "adapters": args.adapters}
    if args.admin:
        entry["admin"] = True
    _entry(entry, "the new key")   # the same checks the server makes (tenant name ...)
    print(f"key (give it to the tenant; it is not stored anywhere): {key}", file=sys.stderr)
    print(json.dumps(entry))
    return 0


def _hash(args: argparse.Namespace) -> int:
    # From stdin, not argv: command lines are visible to every user in `ps`.
    for line in sys.stdin:
        if line.strip():
            print(key_hash(line.strip()))
    return 0
