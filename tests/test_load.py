"""A bounded load test against `adapter-server serve` (a separate process on 127.0.0.1, tiny model):
200 streaming requests, 32 at a time, random adapters (and the base model), TGI and OpenAI
streams mixed, 20% of the clients hanging up mid-stream. Must hold: no 5xx, every stream that
was read to the end is complete, the running/queued gauges return to 0, the server's RSS stays
roughly flat. The figures are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapter_helpers import adapter_bytes, random_adapter

REPO = Path(__file__).resolve().parents[1]
TOKEN = "load-test-token"
ADAPTERS = [None, "a0", "a1", "a2", "a3", "a1@1"]
REQUESTS, CONCURRENCY, DISCONNECT_EVERY = 200, 32, 5      # every 5th client hangs up: 20%
WARMUP = 32
RSS_GROWTH_LIMIT = 64 << 20


@dataclass
class Outcome:
    status: int
    disconnected: bool
    complete: bool
    ttft_s: float | None
    latency_s: float


def _rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
    return total


def _request(i: int, model_id: str) -> tuple[str, dict, bool]:
    rnd = random.Random(i)
    adapter = rnd.choice(ADAPTERS)
    disconnect = i % DISCONNECT_EVERY == 0
    # Clients that hang up ask for long answers, so they really leave mid-generation.
    n = 200 if disconnect else rnd.randint(8, 40)
    if rnd.random() < 0.5:
        return "/generate_stream", {"inputs": f"Request {i}: tell me something.", "adapter_id": adapter,
                                    "parameters": {"max_new_tokens": n, "do_sample": True, "seed": i,
                                                   "temperature": 0.8, "ignore_eos_token": disconnect}}, disconnect
    return "/v1/chat/completions", {"model": adapter or model_id, "stream": True, "max_tokens": n, "seed": i,
                                    "temperature": 0.8, "top_p": 0.9, "ignore_eos": disconnect,
                                    "messages": [{"role": "user", "content": f"Request {i}, hello!"}]}, disconnect


async def _one(client: httpx.AsyncClient, url: str, i: int, model_id: str) -> Outcome:
    path, body, disconnect = _request(i, model_id)
    stop_after = 1 + i % 4
    t0 = time.perf_counter()
    ttft, events, last = None, 0, None
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(r.status_code, disconnect, False, None, time.perf_counter() - t0)
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            events += 1
            last = line[5:].strip()
            if disconnect and events >= stop_after:
                break      # leaving the block closes the connection mid-stream
    if path == "/generate_stream":
        complete = last is not None and json.loads(last).get("details") is not None
    else:
        complete = last == "[DONE]"
    return Outcome(200, disconnect, complete, ttft, time.perf_counter() - t0)


async def _run(url: str, indices: range, model_id: str) -> list[Outcome]:
    limit = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def bounded(i):
            async with limit:
                return await _one(client, url, i, model_id)
        return await asyncio.gather(*(bounded(i) for i in indices))


def _wait_until_idle(url: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        if _metric_sum(text, "adapter_server_running_requests") == 0 and \
                _metric_sum(text, "adapter_server_queue_depth") == 0:
            return text
        assert time.monotonic() < deadline, "gauges did not return to 0:\n" + text
        time.sleep(0.1)


@pytest.fixture
def served(tiny_model_dir, tiny_loaded, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ADAPTER_SERVER_ADMIN_TOKEN": TOKEN}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_model_dir), "--device", "cpu",
         "--store", str(tmp_path / "store"), "--port", str(port), "--max-batch", "8", "--max-queue", "64",
         "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        model = tiny_loaded.model
        for k in range(4):
            data = adapter_bytes(model, random_adapter(model, seed=k, per_head=k % 2 == 1), tiny_loaded.fingerprint)
            r = httpx.put(url + f"/admin/adapters/a{k}", files={"file": ("a.safetensors", data)},
                          headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 201, r.text
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def test_streaming_load(served):
    url, pid = served
    model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    asyncio.run(_run(url, range(REQUESTS, REQUESTS + WARMUP), model_id))   # allocator and caches warm
    before = _wait_until_idle(url)
    rss_before = _rss_bytes(pid)

    t0 = time.perf_counter()
    outcomes = asyncio.run(_run(url, range(REQUESTS), model_id))
    wall = time.perf_counter() - t0
    after = _wait_until_idle(url)
    rss_after = _rss_bytes(pid)

    statuses = [o.status for o in outcomes]
    dropped = [o for o in outcomes if o.disconnected]
    finished = [o for o in outcomes if not o.disconnected]
    tokens = (_metric_sum(after, "adapter_server_generated_tokens_total")
              - _metric_sum(before, "adapter_server_generated_tokens_total"))
    cancelled = (_metric_sum(after, "adapter_server_finish_reasons_total", reason="cancelled")
                 - _metric_sum(before, "adapter_server_finish_reasons_total", reason="cancelled"))
    ttfts = sorted(o.ttft_s for o in outcomes if o.ttft_s is not None)
    latencies = sorted(o.latency_s for o in finished)
    print(f"\nload: {REQUESTS} streams, {CONCURRENCY} concurrent, {len(dropped)} disconnected mid-stream "
          f"({cancelled:.0f} cancelled in the engine); wall {wall:.2f}s, {REQUESTS / wall:.1f} req/s, "
          f"{tokens / wall:.0f} generated tok/s; TTFT p50 {statistics.median(ttfts) * 1e3:.0f} ms, "
          f"p95 {ttfts[int(0.95 * len(ttfts))] * 1e3:.0f} ms; completed-stream latency p50 "
          f"{statistics.median(latencies) * 1e3:.0f} ms, p95 {latencies[int(0.95 * len(latencies))] * 1e3:.0f} ms; "
          f"statuses {sorted(set(statuses))}; server RSS {rss_before / 2**20:.1f} → {rss_after / 2**20:.1f} MiB")

    assert not [s for s in statuses if s >= 500]
    assert set(statuses) == {200}
    assert len(dropped) == REQUESTS // DISCONNECT_EVERY
    assert all(o.complete for o in finished)
    assert 0 < cancelled <= len(dropped)
    assert _metric_sum(after, "adapter_server_kv_cache_blocks_used") == 0
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
