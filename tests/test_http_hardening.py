"""Hostile and unlucky inputs over real HTTP (issue 12), one test per class of fault: parameter
ranges, storage faults at every write, unhandled input exceptions and the one error shape, work
done before it is allowed, per-request limits, adapter resource limits, draining on shutdown,
and the smaller items. The combined-parameter fuzz test is in test_http_fuzz.py."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import adapters.store as store_module
from adapter_helpers import adapter_bytes, random_adapter
from adapters.validation import ValidationLimits
from http_harness import ADMIN_TOKEN, live_server, raw_request
from server.app import ServerSettings
from server.serve import _drain

OPENAI_SHAPE = {"message", "type", "param", "code"}


def tgi_error(r: httpx.Response, status: int, error_type: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    return body["error"]


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_SHAPE, body
    return body["error"]


@pytest.fixture(scope="module")
def server(tiny_loaded, tmp_path_factory):
    with live_server(tiny_loaded, tmp_path_factory.mktemp("store"), max_seq_len=128) as s:
        s.upload("alpha", seed=1)
        yield s


def post_raw(server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)


# ---- 1. sampling parameter ranges ---------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    ({"do_sample": True, "temperature": 1, "repetition_penalty": 1e-40}, "repetition_penalty"),
    ({"do_sample": True, "repetition_penalty": 1e40}, "repetition_penalty"),
    ({"do_sample": True, "temperature": 1e300}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"do_sample": True, "top_p": 0}, "top_p"),
    ({"stop": ["x" * 300]}, "stop"),
])
def test_out_of_range_sampling_parameters_are_refused_and_name_the_field(server, params, field):
    r = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, **params}},
                   timeout=30)
    assert tgi_error(r, 422, "validation").startswith(field)


# ---- 2. storage faults --------------------------------------------------------------------------

class _Faults:
    """Stands in for the store module's `os` and `open`: counts every write-side call and fails
    the one numbered `fail_at` with `code`."""

    WRITES = ("open", "fsync", "replace", "mkdir")

    def __init__(self, fail_at: int | None = None, code: int = errno.ENOSPC):
        self.fail_at, self.code, self.calls = fail_at, code, []

    def hit(self, what: str) -> None:
        self.calls.append(what)
        if len(self.calls) - 1 == self.fail_at:
            raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):   # the rest of `os` unchanged
        fn = getattr(os, name)
        if name not in self.WRITES:
            return fn

        def write_call(*args, **kw):
            self.hit(f"os.{name}")
            return fn(*args, **kw)
        return write_call

    def open_file(self, path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        if not any(c in mode for c in "wxa+"):
            return f
        self.hit(f"open({Path(path).name.split('-')[0]})")
        faults, write = self, f.write

        def failing_write(data):
            faults.hit("write")
            return write(data)
        f.write = failing_write
        return f


def _inject(monkeypatch, faults: _Faults) -> None:
    monkeypatch.setattr(store_module, "os", faults)
    monkeypatch.setattr(store_module, "open", faults.open_file, raising=False)


def _store_state(server) -> tuple[dict, set[str], list[str]]:
    """What the index says, which version directories exist, and any temp files left."""
    root = server.registry.store.root
    index = json.loads((root / "index.json").read_text()) if (root / "index.json").exists() else {"adapters": {}}
    listed = {name: sorted(e["versions"]) for name, e in index["adapters"].items()}
    dirs = {str(p.relative_to(root / "adapters")) for p in (root / "adapters").glob("*/*")}
    temps = sorted(p.name for p in (root / "tmp").iterdir())
    return listed, dirs, temps


def test_storage_faults_at_every_write_of_upload_and_delete(tiny_loaded, tmp_path, monkeypatch):
    with live_server(tiny_loaded, tmp_path / "store") as s:
        data = adapter_bytes(tiny_loaded.model, random_adapter(tiny_loaded.model, seed=3), tiny_loaded.fingerprint)
        with s.admin() as c:
            def upload(name):
                return c.put(f"/admin/adapters/{name}", files={"file": ("a.safetensors", data)})

            counting = _Faults()
            _inject(monkeypatch, counting)
            assert upload("probe").status_code == 201
            upload_points = list(counting.calls)
            monkeypatch.undo()
            # the commit: index.json replaced by its new version; the K/V cache file comes after
            commit_at = upload_points.index("os.replace", upload_points.index("open(index)"))
            assert upload_points[commit_at + 1:].count("open(derived)") == 1, upload_points
            outcomes = {}
            for code, status in ((errno.ENOSPC, 507), (errno.EROFS, 503)):
                for at, point in enumerate(upload_points):
                    name = f"u{code}-{at}"
                    before = _store_state(s)
                    _inject(monkeypatch, _Faults(at, code))
                    r = upload(name)
                    monkeypatch.undo()
                    listed, dirs, temps = _store_state(s)
                    assert temps == [], (point, temps)
                    if r.status_code == 201:    # failed after the commit: only the K/V cache is missing
                        outcomes[code, at] = 201
                        assert listed[name] == ["1"] and f"{name}/1" in dirs, point
                        assert c.get(f"/admin/adapters/{name}").status_code == 200
                        g = httpx.post(s.url + "/generate", json={"inputs": "Hi", "adapter_id": name,
                                                                  "parameters": {"max_new_tokens": 2}}, timeout=30)
                        assert g.status_code == 200, g.text
                    else:
                        outcomes[code, at] = r.status_code
                        assert tgi_error(r, status, "storage") and "nothing" in r.json()["error"], point
                        assert (listed, dirs) == before[:2], point
                        assert c.get(f"/admin/adapters/{name}").status_code == 404
            assert outcomes == {(code, at): (status if at <= commit_at else 201)
                                for code, status in ((errno.ENOSPC, 507), (errno.EROFS, 503))
                                for at in range(len(upload_points))}
            assert s.metric("adapter_server_admin_operations_total", operation="upload", status="507") > 0
            assert s.metric("adapter_server_admin_operations_total", operation="upload", status="503") > 0
            assert s.metric("adapter_server_adapter_kv_cache_write_failures_total") > 0

            assert upload("victim").status_code == 201
            counting = _Faults()
            _inject(monkeypatch, counting)
            assert c.delete("/admin/adapters/victim").status_code == 200
            delete_points = list(counting.calls)
            monkeypatch.undo()
            assert upload("victim").status_code == 201
            for code, status in ((errno.ENOSPC, 507), (errno.EROFS, 503)):
                for at, point in enumerate(delete_points):
                    before = _store_state(s)
                    _inject(monkeypatch, _Faults(at, code))
                    r = c.delete("/admin/adapters/victim")
                    monkeypatch.undo()
                    listed, dirs, temps = _store_state(s)
                    assert temps == [], (point, temps)
                    if r.status_code == 200:    # committed; a failed directory fsync is only logged
                        assert "victim" not in dirs and listed["victim"] == []
                        assert upload("victim").status_code == 201
                    else:
                        tgi_error(r, status, "storage")
                        assert (listed, dirs) == before[:2], point
            assert s.metric("adapter_server_admin_operations_total", operation="delete", status="503") > 0
            assert s.registry.store.check() == []


# ---- 3. unhandled input exceptions and the one error shape --------------------------------------

def test_lone_surrogates_anywhere_are_a_clear_4xx(server):
    model = server.ctx.model_id
    cases = [
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi \udfff"}]}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "\ud800"}]}]}),
        ("/v1/completions", {"model": model, "prompt": ["\udfff"]}),
        ("/v1/completions", {"model": model, "prompt": "hi", "stop": "\udfff"}),
        ("/v1/completions", {"model": "\udfff", "prompt": "hi"}),
        ("/generate", {"inputs": "hi", "parameters": {"stop": ["a\udfff"]}}),
        ("/generate", {"inputs": "hi", "adapter_id": "\ud800x"}),
        ("/generate", {"inputs": "\udfff"}),
    ]
    for path, body in cases:
        r = post_raw(server, path, json.dumps({**body, "max_tokens": 2}).encode())
        assert 400 <= r.status_code < 500, (path, body, r.text)
        if path.startswith("/v1/"):
            openai_error(r, r.status_code)
        else:
            tgi_error(r, r.status_code, r.json()["error_type"])


def test_bad_bodies_and_unknown_routes_use_the_documented_error_shape(server):
    deep = b'{"inputs": "hi", "parameters": ' + b'[' * 100_000 + b']' * 100_000 + b'}'
    # Not UTF-8 or too deep for the parser: 400; UTF-8 but not JSON: 422 on TGI routes (as TGI).
    for body, tgi_status in ((b'{"inputs": "\xff\xfe"}', 400), (deep, 400), (b'{"inputs": ', 422),
                             (b'\xed\xa0\x80', 422)):
        tgi_error(post_raw(server, "/generate", body), tgi_status, "validation")
        openai_error(post_raw(server, "/v1/completions", body), 400)
    tgi_error(httpx.get(server.url + "/no/such/route"), 404, "not_found")
    openai_error(httpx.get(server.url + "/v1/no-such"), 404)
    tgi_error(httpx.delete(server.url + "/health"), 405, "method_not_allowed")
    openai_error(httpx.get(server.url + "/v1/completions"), 405)
    tgi_error(httpx.post(server.url + "/generate", content=b"x" * (5 << 20)), 413, "too_large")


def test_deeply_nested_safetensors_header_is_refused(server):
    header = b'{"__metadata__": {"format": "llama-adapter"}, "t": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    data = len(header).to_bytes(8, "little") + header
    with server.admin() as c:
        r = c.put("/admin/adapters/nested", files={"file": ("a.safetensors", data)})
    assert "nested too deeply" in tgi_error(r, 422, "validation")


# ---- 4. work done before it is allowed ----------------------------------------------------------

def test_huge_prompts_are_refused_before_tokenizing_and_never_stall_the_loop(server):
    prompt = "lorem ipsum " * 300_000     # 3.6 MB: under the body limit, far over the context

    def send():
        return httpx.post(server.url + "/generate", json={"inputs": prompt}, timeout=60)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        worst = max(worst, time.monotonic() - t0)
    assert worst < 1.0
    assert "bytes" in tgi_error(send(), 422, "validation")


def test_admin_token_is_checked_before_the_body_is_read(server):
    head = (b"PUT /admin/adapters/x HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 62914560\r\n\r\n")
    answer, elapsed = raw_request(server, head, b"--b\r\n" + b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 401") and b'"error_type":"auth"' in answer and elapsed < 2, answer
    # Only the upload route gets the upload limit; other admin bodies get the request-body limit.
    auth = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
    head = b"DELETE /admin/adapters/x HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 10485760\r\n\r\n"
    answer, _ = raw_request(server, head, b"x")
    assert answer.startswith(b"HTTP/1.1 413"), answer


# ---- 5. per-request limits ----------------------------------------------------------------------

def test_max_new_tokens_limit_and_request_timeout(tiny_loaded, tmp_path):
    settings = ServerSettings(admin_token=ADMIN_TOKEN, max_new_tokens_limit=8, request_timeout_s=0.5)
    with live_server(tiny_loaded, tmp_path / "store", settings=settings, start_engine=False) as s:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 9}}
        assert "at most 8" in tgi_error(httpx.post(s.url + "/generate", json=body), 422, "validation")
        oai = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model=s.ctx.model_id, prompt="Hello", max_tokens=9)
        assert e.value.param == "max_tokens"
        # No limit asked for: the server's cap applies (TGI would otherwise fill the context).
        r = s.stepping(lambda: httpx.post(s.url + "/generate", timeout=30, json={
            "inputs": "Hello", "parameters": {"ignore_eos_token": True, "details": True}})).result()
        assert r.json()["details"]["generated_tokens"] == 8

        results = []

        def late(fn):
            """The engine does not step for 1 s: the 0.5 s deadline passes while the request waits."""
            with httpx.Client(base_url=s.url, timeout=30) as c:
                client = threading.Thread(target=lambda: results.append(fn(c)))
                client.start()
                time.sleep(1.0)
                while client.is_alive():
                    s.engine.step()
                    time.sleep(0.005)
        late(lambda c: c.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}}))
        assert "timeout" in tgi_error(results[-1], 504, "timeout")
        late(lambda c: c.post("/v1/completions", json={"model": s.ctx.model_id, "prompt": "Hi", "max_tokens": 4}))
        assert openai_error(results[-1], 504)["type"] == "timeout"

        def stream(c):
            with c.stream("POST", "/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}}) as r:
                return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        late(stream)
        assert results[-1][-1]["error_type"] == "timeout"
        s.wait_idle()


# ---- 6. adapter resource limits -----------------------------------------------------------------

def test_adapter_limits_sparse_kv_and_fingerprint(tiny_loaded, tmp_path):
    model = tiny_loaded.model
    cfg = model.config
    with live_server(tiny_loaded, tmp_path / "store") as s:
        s.registry.limits = ValidationLimits(max_adapter_len=16, max_kv_bytes=2 * 2 * cfg.n_kv_heads * 12 * cfg.head_dim * 4)

        def put(weights, fingerprint=tiny_loaded.fingerprint, **params):
            with s.admin() as c:
                return c.put("/admin/adapters/lim", params=params,
                             files={"file": ("a", adapter_bytes(model, weights, fingerprint))})
        assert "adapter_len 17" in tgi_error(put(random_adapter(model, layers=[1], k=17)), 422, "validation")
        assert "--max-adapter-kv-mb" in tgi_error(put(random_adapter(model, layers=[0, 1, 2], k=12)), 422,
                                                  "validation")
        # K/V is held for the adapted layer only (not for all layers), and cached the same way.
        info = put(random_adapter(model, layers=[2], k=12))
        assert info.status_code == 201, info.text
        with s.registry.acquire("lim") as lease:
            assert lease.kv.keys.shape == (1, cfg.n_kv_heads, 12, cfg.head_dim)
            assert lease.kv.nbytes() < 2 * cfg.n_kv_heads * 12 * cfg.head_dim * 4 + 1024
        cache = [p for p in (s.registry.store.root / "adapters" / "lim" / "1").iterdir() if p.name.startswith("kv-")]
        assert len(cache) == 1 and cache[0].stat().st_size < 2 * cfg.n_kv_heads * 12 * cfg.head_dim * 4 + 4096
        # An adapter that does not say which base it was made for is refused unless overridden.
        unsigned = random_adapter(model, layers=[1], k=2)
        assert "fingerprint" in tgi_error(put(unsigned, fingerprint=""), 422, "validation")
        assert put(unsigned, fingerprint="", allow_fingerprint_mismatch="true").status_code == 201


# ---- 7. draining on shutdown --------------------------------------------------------------------

def test_drain_keeps_answering_finishes_what_it_can_and_ends_the_rest_with_an_error(tiny_loaded, tmp_path):
    with live_server(tiny_loaded, tmp_path / "store", start_engine=False) as s:
        streams, answers = [], []

        def stream():
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 40, "ignore_eos_token": True}}
            with httpx.stream("POST", s.url + "/generate_stream", json=body, timeout=30) as r:
                streams.append([json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")])

        def plain():
            answers.append(httpx.post(s.url + "/v1/completions", timeout=30, json={
                "model": s.ctx.model_id, "prompt": "Hi", "max_tokens": 40, "ignore_eos": True}))
        clients = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for t in clients:
            t.start()
        while s.ctx.in_flight < 2:
            time.sleep(0.01)
        for _ in range(3):
            s.engine.step()
        s.ctx.draining = True
        drain = threading.Thread(target=_drain, args=(s.server, s.ctx, 0.5))
        drain.start()
        ready = httpx.get(s.url + "/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert "shutting down" in tgi_error(httpx.post(s.url + "/generate", json={"inputs": "x"}), 503, "unavailable")
        time.sleep(0.7)     # the grace period passes with both requests unfinished (no steps)
        while drain.is_alive() or any(t.is_alive() for t in clients):
            s.engine.step()
            time.sleep(0.005)
        [events] = streams
        assert 0 < len(events) < 40 and "token" in events[0]
        assert events[-1]["error_type"] == "unavailable" and "grace period" in events[-1]["error"]
        assert "grace period" in openai_error(answers[0], 503)["message"]
        assert s.server.should_exit


# ---- 8. smaller items ---------------------------------------------------------------------------

def test_smaller_items(server):
    r = httpx.post(server.url + "/generate/", json={"inputs": "x"}, headers={"Host": "evil.example"})
    assert "location" not in r.headers
    tgi_error(r, 404, "not_found")
    r = httpx.post(server.url + "/generate", json={"inputs": "Hi", "adapter_id": "alpha@99999999999"})
    assert "from 1 to 999999999" in tgi_error(r, 404, "not_found")
    r = httpx.post(server.url + "/generate", json={"inputs": "\x01" * 200, "parameters": {"max_new_tokens": 2}})
    assert tgi_error(r, 422, "validation").startswith("inputs: the prompt has")
    for params in ({"max_new_tokens": "4"}, {"temperature": "0.5"}, {"do_sample": 1}):
        r = httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": params})
        assert tgi_error(r, 422, "validation").startswith("parameters." + next(iter(params)))
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": "4"})
    assert openai_error(r, 400)["param"] == "max_tokens"
    r = httpx.post(server.url + "/v1/completions", timeout=30, json={
        "model": "alpha", "prompt": "Hi", "max_tokens": None, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
