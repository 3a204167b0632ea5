"""Admin API over HTTP: auth, upload (hot swap, also mid-stream), invalid uploads, delete; and the
queue limit. The engine here is not started: each test drives its steps, so "mid-stream" and
"queue full" are exact states rather than races against a fast tiny model."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from adapter_helpers import adapter_bytes, random_adapter
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from conftest import random_tiny_model
from http_harness import ADMIN_TOKEN, live_server
from model.fingerprint import base_fingerprint
from server.app import ServerSettings

MAX_UPLOAD = 16 << 10


@pytest.fixture(scope="module")
def server(tiny_loaded, tmp_path_factory):
    settings = ServerSettings(admin_token=ADMIN_TOKEN, max_upload_bytes=MAX_UPLOAD)
    with live_server(tiny_loaded, tmp_path_factory.mktemp("store"), settings=settings, start_engine=False,
                     max_batch=2, max_queue=1) as s:
        yield s


def generate(server, adapter: str | None, n: int = 24) -> httpx.Response:
    body = {"inputs": "Hello, world!", "adapter_id": adapter,
            "parameters": {"max_new_tokens": n, "ignore_eos_token": True, "details": True}}
    return server.stepping(lambda: httpx.post(server.url + "/generate", json=body, timeout=60)).result()


def tokens(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def upload_raw(server, name: str, data: bytes, **params) -> httpx.Response:
    with server.admin() as c:
        return c.put(f"/admin/adapters/{name}", files={"file": ("a.safetensors", data)}, params=params)


def test_auth(server):
    url = server.url + "/admin/adapters"
    r = httpx.get(url)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url, headers={"Authorization": f"Basic {ADMIN_TOKEN}"}).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and "rejected" in r.json()["error"]
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}x"}).status_code == 403
    assert httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    r = httpx.put(server.url + "/admin/adapters/x", files={"file": ("a", b"data")})
    assert r.status_code == 401


def test_admin_disabled_without_token(tiny_loaded, tmp_path):
    with live_server(tiny_loaded, tmp_path / "store", settings=ServerSettings(admin_token=None)) as s:
        for r in (httpx.get(s.url + "/admin/adapters", headers={"Authorization": "Bearer anything"}),
                  httpx.delete(s.url + "/admin/adapters/x")):
            assert r.status_code == 403 and "admin API is disabled" in r.json()["error"]


def test_upload_list_show_delete(server):
    base = tokens(generate(server, None))
    v1 = server.upload("ad", seed=1)
    assert (v1["name"], v1["version"], v1["ref"]) == ("ad", 1, "ad@1")
    assert v1["base_fingerprint"] == server.loaded.fingerprint
    out1 = tokens(generate(server, "ad"))          # servable as soon as the 201 returned
    assert out1 != base
    v2 = server.upload("ad", seed=2, per_head=True)
    assert v2["version"] == 2
    out2 = tokens(generate(server, "ad"))
    assert out2 not in (out1, base) and out2 == tokens(generate(server, "ad@2"))
    assert out1 == tokens(generate(server, "ad@1"))

    with server.admin() as c:
        listed = c.get("/admin/adapters").json()["adapters"]
        assert [(a["name"], a["latest"], [v["version"] for v in a["versions"]]) for a in listed] == [
            ("ad", 2, [1, 2])]
        shown = c.get("/admin/adapters/ad").json()
        assert shown["versions"][1]["gate_kind"] == "per_head"
        assert c.get("/admin/adapters/nope").status_code == 404

        # invalid uploads: a clear 422, and the previous version keeps serving
        other_shape = random_tiny_model(dim=32, n_heads=2, n_kv_heads=1)
        other_weights = random_tiny_model(seed=9)
        bad = [
            (b"definitely not safetensors", "safetensors"),
            (adapter_bytes(other_shape, random_adapter(other_shape)), "dim=32"),
            (adapter_bytes(other_weights, random_adapter(other_weights), base_fingerprint(other_weights)),
             "fingerprint"),
        ]
        for data, reason in bad:
            r = upload_raw(server, "ad", data)
            assert r.status_code == 422, r.text
            assert r.json()["error_type"] == "validation" and reason in r.json()["error"], r.text
        assert c.get("/admin/adapters/ad").json()["latest"] == 2
        assert tokens(generate(server, "ad")) == out2
        # an admin may knowingly accept a base of the same shape with other weights
        r = upload_raw(server, "other", bad[2][0], allow_fingerprint_mismatch="true")
        assert r.status_code == 201 and r.json()["ref"] == "other@1"

        assert upload_raw(server, "bad name!", bad[2][0]).status_code == 422
        r = upload_raw(server, server.app.state.ctx.model_id, bad[2][0])
        assert r.status_code == 422 and "base model" in r.json()["error"]
        r = c.put("/admin/adapters/ad", data={"nofile": "x"})
        assert r.status_code == 422 and "file" in r.json()["error"]
        r = upload_raw(server, "big", b"\0" * (MAX_UPLOAD + 1))
        assert r.status_code == 413 and r.json()["error_type"] == "too_large"

        r = c.delete("/admin/adapters/ad", params={"version": 1})
        assert r.status_code == 200 and [v["ref"] for v in r.json()["deleted"]] == ["ad@1"]
        gone = generate(server, "ad@1")
        assert gone.status_code == 404 and "ad@1" in gone.json()["error"]
        assert tokens(generate(server, "ad")) == out2
        assert c.delete("/admin/adapters/ad", params={"version": 0}).status_code == 422
        assert c.delete("/admin/adapters/ad").status_code == 200
        assert generate(server, "ad").status_code == 404
        assert c.get("/admin/adapters/ad").status_code == 404
        assert c.delete("/admin/adapters/ad").status_code == 404
        # version numbers are never reused: a re-upload continues at 3
        assert server.upload("ad", seed=3)["version"] == 3


def test_replace_during_a_stream(server):
    server.upload("swap", seed=10)
    n = 40
    reference_v1 = generate(server, "swap@1", n).json()

    events: list[dict] = []
    first_events = threading.Event()

    def stream():
        body = {"inputs": "Hello, world!", "adapter_id": "swap",
                "parameters": {"max_new_tokens": n, "ignore_eos_token": True}}
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 3:
                        first_events.set()

    running = server.stepping(stream, until=first_events.is_set)
    v2 = server.upload("swap", seed=11)                 # lands while the stream is mid-way
    assert v2["version"] == 2 and not running.done() and 3 <= len(events) < n
    server.stepping(running.result)
    assert [e["token"]["id"] for e in events] == [t["id"] for t in reference_v1["details"]["tokens"]]
    assert events[-1]["generated_text"] == reference_v1["generated_text"]

    new = tokens(generate(server, "swap", n))
    assert new == tokens(generate(server, "swap@2", n))
    assert new != [t["id"] for t in reference_v1["details"]["tokens"]]


def test_queue_full_is_503_with_retry_after_and_client_gone_cancels(server):
    cancelled_before = server.engine.stats().requests_cancelled_total
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}
    # Nothing steps the engine here: the first request waits in the queue (max_queue=1) ...
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=0.5)   # ... and its client gives up
    assert server.engine.stats().waiting == 1
    r = httpx.post(server.url + "/generate", json=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error_type"] == "overloaded"
    r = httpx.post(server.url + "/v1/completions", json={"model": "x", "prompt": "a"})
    assert r.status_code == 404     # an unknown model is reported before the queue is looked at
    r = httpx.post(server.url + "/v1/completions", json={"model": server.app.state.ctx.model_id, "prompt": "a"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
    deadline = time.monotonic() + 10
    while server.metric("adapter_server_requests_total", adapter="(base)", endpoint="generate",
                        status="499") != 1:
        assert time.monotonic() < deadline, "the abandoned request was not noticed"
        time.sleep(0.05)
    server.engine.step()           # the cancellation of the abandoned request is applied
    stats = server.engine.stats()
    assert (stats.waiting, stats.running) == (0, 0)
    assert stats.requests_cancelled_total == cancelled_before + 1
    assert tokens(generate(server, None, 4))


def test_adapter_added_by_another_replica_is_loaded_on_first_use(server):
    model = server.loaded.model
    replica = AdapterRegistry(AdapterStore(server.registry.store.root), model, server.loaded.fingerprint)
    replica.upload("elsewhere", adapter_bytes(model, random_adapter(model, seed=21), server.loaded.fingerprint))
    assert not server.registry.is_resident("elsewhere", 1)
    out = generate(server, "elsewhere")
    assert server.registry.is_resident("elsewhere", 1)
    assert tokens(out) == tokens(generate(server, "elsewhere@1")) != tokens(generate(server, None))
