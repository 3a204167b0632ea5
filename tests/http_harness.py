"""A real uvicorn server on 127.0.0.1 (in a thread) over a real engine, registry and store,
for the HTTP tests and the load test."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import uvicorn

from adapter_helpers import adapter_bytes, random_adapter
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from server.app import ServerSettings, create_app
from server.engine import Engine
from server.types import EngineConfig

ADMIN_TOKEN = "test-admin-token"


@dataclass
class LiveServer:
    url: str
    engine: Engine
    registry: AdapterRegistry
    loaded: object
    app: object
    server: uvicorn.Server

    @property
    def ctx(self):
        return self.app.state.ctx

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                            timeout=30)

    def upload(self, name: str, seed: int, **adapter_kw) -> dict:
        """Upload a random adapter over HTTP; returns the 201 body."""
        data = adapter_bytes(self.loaded.model, random_adapter(self.loaded.model, seed=seed, **adapter_kw),
                             self.loaded.fingerprint)
        with self.admin() as c:
            r = c.put(f"/admin/adapters/{name}", files={"file": ("adapter.safetensors", data)})
        assert r.status_code == 201, r.text
        return r.json()

    def metric(self, name: str, **labels) -> float:
        """One sample from /metrics (0 when the series does not exist yet)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
        return 0.0

    def stepping(self, fn, *args, until=None):
        """Run fn(*args) in a thread while this thread drives an engine that was not started,
        one step at a time; stops early once until() is true. Returns the future."""
        pool = ThreadPoolExecutor(1)
        future = pool.submit(fn, *args)
        pool.shutdown(wait=False)
        while not future.done() and not (until and until()):
            self.engine.step()
            time.sleep(0.001)
        return future

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until the engine has nothing running or waiting (cancellations take one step)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.engine.stats()
            if s.running == 0 and s.waiting == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"engine still busy after {timeout}s: {self.engine.stats()}")


def raw_request(server, head: bytes, body_part: bytes) -> tuple[bytes, float]:
    """Send headers and the start of a body, and read what comes back before sending the rest."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(head + body_part)
        answer = sock.recv(65536)
        # The status line and headers may arrive before the body: read up to Content-Length.
        headers, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", headers, re.I)
        while length and len(body) < int(length.group(1)) and (more := sock.recv(65536)):
            body += more
        return headers + b"\r\n\r\n" + body, time.monotonic() - t0


@contextmanager
def live_server(loaded, store_dir: Path, *, start_engine: bool = True,
                settings: ServerSettings | None = None, vision=None, **engine_kw) -> Iterator[LiveServer]:
    """`vision`: a model.vision.VisionTower for image-conditioned adapters (registry and engine)."""
    config = EngineConfig(**{"max_batch": 4, "max_seq_len": 256, "max_tokens_per_step": 256,
                             "max_queue": 64, **engine_kw})
    registry = AdapterRegistry(AdapterStore(store_dir), loaded.model, loaded.fingerprint, vision=vision)
    engine = Engine(loaded, registry, config, vision=vision)
    if start_engine:
        engine.start()
    settings = settings or ServerSettings(admin_token=ADMIN_TOKEN)
    app = create_app(engine, registry, loaded, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", engine, registry, loaded, app, server)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown(graceful=False)
        sock.close()
