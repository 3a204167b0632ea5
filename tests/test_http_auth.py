"""Inference API keys and tenants over real HTTP (uvicorn, httpx, the openai SDK): the auth
matrix (no key, wrong key, revoked key, another tenant's adapter, filtered listings), per-key
limits (429 + Retry-After), tenant admin keys scoped to their patterns, metrics by tenant, open
inference without keys; plus the keys file's parsing and the token window's arithmetic."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from adapter_helpers import adapter_bytes, random_adapter
from http_harness import ADMIN_TOKEN, live_server
from server.api_keys import WINDOW_S, KeyEntry, KeysFileError, KeyUsage, RateLimited, key_hash, parse_keys_file
from server.app import ServerSettings
from server.cli import build_parser
from server.serve import api_keys

KEY_A, KEY_B, KEY_A_ADMIN, KEY_TPM, KEY_OLD, KEY_CLI = (
    "sk-team-a", "sk-team-b", "sk-team-a-admin", "sk-tokens", "sk-to-revoke", "sk-from-the-command-line")
ENTRIES = [
    {"tenant": "team-a", "sha256": key_hash(KEY_A), "adapters": ["team-a-*"]},
    {"tenant": "team-b", "sha256": key_hash(KEY_B), "adapters": ["team-b-*"], "base_model": False},
    {"tenant": "team-a", "sha256": key_hash(KEY_A_ADMIN), "adapters": ["team-a-*"], "admin": True},
    {"tenant": "team-c", "sha256": key_hash(KEY_TPM), "tokens_per_minute": 40},
    {"tenant": "team-a", "sha256": key_hash(KEY_OLD), "adapters": ["team-a-*"]},
]
TGI_BODY = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}


def write_keys(path, entries) -> None:
    """Replace the keys file atomically, as an operator's deploy tool would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    write_keys(path, ENTRIES)
    return path


@pytest.fixture(scope="module")
def server(tiny_loaded, tmp_path_factory, keys_file):
    settings = ServerSettings(admin_token=ADMIN_TOKEN, api_keys=(KEY_CLI,), api_keys_file=str(keys_file))
    with live_server(tiny_loaded, tmp_path_factory.mktemp("store"), settings=settings) as s:
        for seed, name in enumerate(["team-a-x", "team-b-x"]):
            s.upload(name, seed)
        yield s


def post(server, path: str, key: str | None, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def tgi(server, key: str | None, adapter: str | None = None) -> httpx.Response:
    return post(server, "/generate", key, {**TGI_BODY, "adapter_id": adapter})


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_missing_and_wrong_keys_are_401_on_every_inference_route(server):
    routes = [("/generate", TGI_BODY), ("/generate_stream", TGI_BODY), ("/", TGI_BODY),
              ("/v1/completions", {"model": "team-a-x", "prompt": "Hi", "max_tokens": 2}),
              ("/v1/chat/completions", {"model": "team-a-x", "messages": [{"role": "user", "content": "Hi"}]})]
    for path, body in routes:
        for key in (None, "sk-wrong", KEY_A_ADMIN, ADMIN_TOKEN):   # admin credentials are not inference keys
            r = post(server, path, key, body)
            assert r.status_code == 401, (path, key, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            if path.startswith("/v1/"):
                assert r.json()["error"]["type"] == "authentication_error"
            else:
                assert r.json()["error_type"] == "auth"
    r = httpx.post(server.url + "/generate", json=TGI_BODY, headers={"Authorization": f"Basic {KEY_A}"})
    assert r.status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").models.list()
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):   # operations stay open
        assert httpx.get(server.url + path).status_code == 200, path
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert paths["/generate"]["post"]["security"] == paths["/v1/models"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in paths["/health"]["get"]
    assert server.metric("adapter_server_auth_rejected_requests_total", reason="missing_key") >= 6
    assert server.metric("adapter_server_auth_rejected_requests_total", reason="invalid_key") >= 16


def test_keys_reach_their_own_adapters_and_nothing_else(server):
    assert tgi(server, KEY_A, "team-a-x").status_code == 200
    assert tgi(server, KEY_A).status_code == 200                  # base model allowed by default
    assert tgi(server, KEY_B, "team-b-x@1").status_code == 200
    assert tgi(server, KEY_CLI, "team-b-x").status_code == 200    # --api-key: every adapter
    # Another tenant's adapter answers exactly like one that does not exist.
    for ref in ("team-b-x", "team-b-x@1"):
        forbidden, missing = tgi(server, KEY_A, ref), tgi(server, KEY_A, ref.replace("team-b-x", "team-b-nope"))
        assert forbidden.status_code == missing.status_code == 404
        assert forbidden.text == missing.text.replace("team-b-nope", "team-b-x")
    with pytest.raises(openai.NotFoundError) as forbidden:
        client(server, KEY_A).completions.create(model="team-b-x", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        client(server, KEY_A).completions.create(model="team-b-nope", prompt="Hi", max_tokens=2)
    assert forbidden.value.body == json.loads(json.dumps(missing.value.body).replace("team-b-nope", "team-b-x"))
    # A key without base-model access.
    r = tgi(server, KEY_B)
    assert r.status_code == 404 and "base model" in r.json()["error"]
    with pytest.raises(openai.NotFoundError):
        client(server, KEY_B).chat.completions.create(
            model=server.app.state.ctx.model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    out = client(server, KEY_A).chat.completions.create(
        model="team-a-x", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_model_listing_is_filtered_per_key(server):
    base = server.app.state.ctx.model_id
    assert [m.id for m in client(server, KEY_A).models.list()] == [base, "team-a-x"]
    assert [m.id for m in client(server, KEY_B).models.list()] == ["team-b-x"]
    assert [m.id for m in client(server, KEY_CLI).models.list()] == [base, "team-a-x", "team-b-x"]


def test_revoked_and_rotated_keys_take_effect_without_restart(server, keys_file, caplog):
    assert tgi(server, KEY_OLD, "team-a-x").status_code == 200
    new_key = "sk-rotated"
    rotated = [e for e in ENTRIES if e["sha256"] != key_hash(KEY_OLD)] + [
        {"tenant": "team-a", "sha256": key_hash(new_key), "adapters": ["team-a-*"]}]
    try:
        write_keys(keys_file, rotated)
        assert tgi(server, KEY_OLD, "team-a-x").status_code == 401
        assert tgi(server, new_key, "team-a-x").status_code == 200
        # A broken file keeps the keys read last, and the log says why (never a key).
        with caplog.at_level(logging.ERROR, logger="adapter_server.auth"):
            keys_file.write_text('{"keys": [')
            assert tgi(server, new_key, "team-a-x").status_code == 200
            assert tgi(server, KEY_OLD, "team-a-x").status_code == 401
        assert any("previous keys stay in force" in r.getMessage() for r in caplog.records)
        assert new_key not in caplog.text and key_hash(new_key) not in caplog.text
    finally:
        write_keys(keys_file, ENTRIES)
    assert tgi(server, KEY_OLD, "team-a-x").status_code == 200
    assert tgi(server, new_key, "team-a-x").status_code == 401


def test_tokens_per_minute_limit_is_a_429_with_retry_after(server):
    body = {**TGI_BODY, "parameters": {"max_new_tokens": 40, "ignore_eos_token": True}}
    assert post(server, "/generate", KEY_TPM, body).status_code == 200   # 40 + prompt tokens: over 40
    r = post(server, "/generate", KEY_TPM, body)
    assert r.status_code == 429 and r.json()["error_type"] == "rate_limited"
    assert 55 <= int(r.headers["retry-after"]) <= 60
    with pytest.raises(openai.RateLimitError) as e:
        client(server, KEY_TPM).completions.create(model=server.app.state.ctx.model_id, prompt="Hi", max_tokens=1)
    assert e.value.response.headers["retry-after"].isdigit()
    assert e.value.body["code"] == "rate_limit_exceeded" and "tokens per minute" in e.value.body["message"]
    assert tgi(server, KEY_A).status_code == 200                          # other keys are unaffected
    assert server.metric("adapter_server_auth_rejected_requests_total", tenant="team-c",
                         reason="tokens_per_minute") == 2


def test_metrics_carry_the_tenant_never_the_key(server):
    before = server.metric("adapter_server_requests_total", adapter="team-a-x", endpoint="generate",
                           status="200", tenant="team-a")
    tokens = server.metric("adapter_server_generated_tokens_total", adapter="team-a-x", tenant="team-a")
    assert tgi(server, KEY_A, "team-a-x").status_code == 200
    assert server.metric("adapter_server_requests_total", adapter="team-a-x", endpoint="generate",
                         status="200", tenant="team-a") == before + 1
    assert server.metric("adapter_server_generated_tokens_total", adapter="team-a-x", tenant="team-a") > tokens
    text = httpx.get(server.url + "/metrics").text
    for key in (KEY_A, KEY_B, KEY_CLI, KEY_TPM):
        assert key not in text and key_hash(key) not in text


def test_tenant_admin_sees_and_manages_only_its_prefix(server):
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_A_ADMIN}"}, timeout=30)
    data = adapter_bytes(server.loaded.model, random_adapter(server.loaded.model, seed=7), server.loaded.fingerprint)
    with admin:
        assert [a["name"] for a in admin.get("/admin/adapters").json()["adapters"]] == ["team-a-x"]
        r = admin.put("/admin/adapters/team-a-new", files={"file": ("a.safetensors", data)})
        assert r.status_code == 201, r.text
        r = admin.put("/admin/adapters/team-b-new", files={"file": ("a.safetensors", data)})
        assert r.status_code == 403 and "team-a-*" in r.json()["error"]
        for ref, params in (("team-b-x", {}), ("team-b-x", {"version": 1})):
            shown = admin.get(f"/admin/adapters/{ref}") if not params else None
            gone = admin.delete(f"/admin/adapters/{ref}", params=params)
            missing = admin.delete("/admin/adapters/team-b-nope", params=params)
            assert gone.status_code == missing.status_code == 404
            assert gone.text == missing.text.replace("team-b-nope", "team-b-x")
            if shown is not None:
                assert shown.text == admin.get("/admin/adapters/team-b-nope").text.replace("team-b-nope", "team-b-x")
        assert admin.delete("/admin/adapters/team-a-new").status_code == 200
    with server.admin() as root:   # the global token still sees everything; team-b-x survived
        assert [a["name"] for a in root.get("/admin/adapters").json()["adapters"]] == ["team-a-x", "team-b-x"]
    r = httpx.get(server.url + "/admin/adapters", headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 403   # an inference key is not an admin key


def test_concurrency_limit_is_a_429_until_the_request_in_flight_ends(tiny_loaded, tmp_path):
    key = "sk-one-at-a-time"
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\ntenant = "solo"\nsha256 = "{key_hash(key)}"\nmax_concurrent = 1\n')
    settings = ServerSettings(api_keys_file=str(path))
    with live_server(tiny_loaded, tmp_path / "store", settings=settings, start_engine=False) as s:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}, "stream": True}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, s, "/", key, body)   # a stream, held until the engine steps
            deadline = time.monotonic() + 20
            while s.engine.stats().waiting == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = post(s, "/generate", key, TGI_BODY)
            assert r.status_code == 429 and "concurrent" in r.json()["error"]
            assert r.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                client(s, key).completions.create(model=s.app.state.ctx.model_id, prompt="Hi", max_tokens=1)
            while not first.done():
                s.engine.step()
                time.sleep(0.001)
            assert first.result().status_code == 200 and first.result().text.count("data:") == 3
        assert s.stepping(tgi, s, key).result().status_code == 200   # the slot came back


def test_without_keys_inference_stays_open(tiny_loaded, tmp_path):
    with live_server(tiny_loaded, tmp_path) as s:
        assert tgi(s, None).status_code == 200
        assert tgi(s, "sk-anything").status_code == 200
        assert [m.id for m in client(s, "unused").models.list()] == [s.app.state.ctx.model_id]
        r = httpx.get(s.url + "/admin/adapters", headers={"Authorization": "Bearer sk-anything"})
        assert r.status_code == 403 and "rejected" in r.json()["error"]


def test_api_key_flags_and_variable(monkeypatch):
    monkeypatch.setenv("ADAPTER_SERVER_API_KEY", " sk-1, sk-2 ,")
    assert api_keys(build_parser().parse_args(["serve"])) == ("sk-1", "sk-2")
    assert api_keys(build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b"])) == ("a", "b")
    monkeypatch.delenv("ADAPTER_SERVER_API_KEY")
    assert api_keys(build_parser().parse_args(["serve"])) == ()


def test_keys_file_json_and_toml_agree_and_bad_files_say_why(tmp_path):
    as_json = tmp_path / "k.json"
    as_json.write_text(json.dumps({"keys": ENTRIES[:2]}))
    as_toml = tmp_path / "k.toml"
    as_toml.write_text(
        f'[[keys]]\ntenant = "team-a"\nsha256 = "{key_hash(KEY_A).upper()}"\nadapters = ["team-a-*"]\n'
        f'[[keys]]\ntenant = "team-b"\nsha256 = "{key_hash(KEY_B)}"\nadapters = ["team-b-*"]\nbase_model = false\n')
    assert parse_keys_file(as_json) == parse_keys_file(as_toml)
    bad = {
        '{"keys": [{"tenant": "a", "sha256": "%s", "adapter": ["x"]}]}' % key_hash("k"): "unknown field",
        '{"keys": [{"tenant": "a", "sha256": "abc"}]}': "64 hex digits",
        '{"keys": [{"tenant": "a b", "sha256": "%s"}]}' % key_hash("k"): "tenant must be",
        '{"keys": [{"tenant": "a", "sha256": "%s", "max_concurrent": 0}]}' % key_hash("k"): "max_concurrent",
        '{"keys": [{"tenant": "a", "sha256": "%s", "admin": true, "tokens_per_minute": 5}]}' % key_hash("k"):
            "admin key",
        json.dumps({"keys": [ENTRIES[0], ENTRIES[0]]}): "appears twice",
        '{"keys": {}}': "'keys' list",
        "{": "not valid JSON",
    }
    for text, why in bad.items():
        as_json.write_text(text)
        with pytest.raises(KeysFileError, match=why):
            parse_keys_file(as_json)
    with pytest.raises(KeysFileError, match="cannot read"):
        parse_keys_file(tmp_path / "missing.json")


def test_token_window_retry_after_is_when_enough_tokens_expire():
    entry = KeyEntry(tenant="t", sha256=key_hash("k"), tokens_per_minute=100)
    usage = KeyUsage()
    usage.admit(entry, 1, now=0.0)
    usage.release()
    usage.charge(60, now=0.0)
    usage.charge(50, now=30.0)                     # 110 ≥ 100 in the window
    with pytest.raises(RateLimited) as e:
        usage.admit(entry, 1, now=40.0)
    assert e.value.retry_after_s == 20 and e.value.limit == "tokens_per_minute"   # at 60 s the first 60 expire
    usage.admit(entry, 1, now=WINDOW_S + 0.5)      # 50 left in the window
    assert usage.in_flight == 1


def test_keys_commands_make_entries_the_server_accepts(tmp_path, capsys, monkeypatch):
    args = build_parser().parse_args(["keys", "new", "--tenant", "team-a", "--adapters", "team-a-*"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    key = err.rsplit(" ", 1)[-1].strip()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [json.loads(out)]}))
    (entry,) = parse_keys_file(path)
    assert entry.sha256 == key_hash(key) and entry.adapters == ("team-a-*",) and key not in out
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{key}\n\n"))
    args = build_parser().parse_args(["keys", "hash"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.split() == [key_hash(key)]
