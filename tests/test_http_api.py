"""Generation over HTTP with real clients (openai, text-generation, lorax-client) against a real
uvicorn on 127.0.0.1, serving a tiny random model with two uploaded adapters."""

from __future__ import annotations

import json

import httpx
import lorax
import openai
import pytest
import text_generation
from lorax.errors import NotFoundError as LoraxNotFound
from lorax.errors import ValidationError as LoraxValidationError

from http_harness import ADMIN_TOKEN, live_server
from server.app import ServerSettings

# The TGI/LoRAX clients call pydantic's deprecated .dict(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")

MAX_BODY = 64 << 10
CHAT = [{"role": "user", "content": "Hello, world! How are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_loaded, tmp_path_factory):
    settings = ServerSettings(admin_token=ADMIN_TOKEN, max_body_bytes=MAX_BODY)
    with live_server(tiny_loaded, tmp_path_factory.mktemp("store"), settings=settings) as s:
        s.upload("alpha", seed=1)
        s.upload("beta", seed=2, per_head=True)
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def base_id(server) -> str:
    return server.app.state.ctx.model_id


def sse_events(response: httpx.Response) -> list:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


# ---- OpenAI -----------------------------------------------------------------------------------

def test_models_list_base_and_every_adapter(server, oai):
    ids = [m.id for m in oai.models.list().data]
    assert ids == [base_id(server), "alpha", "beta"]


@pytest.mark.parametrize("model", ["(base)", "alpha", "beta@1"])
def test_chat_streamed_equals_non_streamed(server, oai, model):
    model = base_id(server) if model == "(base)" else model
    kw = dict(model=model, messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens == 12
    adapter = None if model == base_id(server) else ("alpha@1" if model == "alpha" else "beta@1")
    assert whole.system_fingerprint.endswith(f"+{adapter}") if adapter else "+" not in whole.system_fingerprint


def test_adapters_change_the_output(server, oai):
    def first_logprobs(model):
        r = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0,
                                        logprobs=True, top_logprobs=5)
        return [(t.token, round(t.logprob, 4)) for t in r.choices[0].logprobs.content[0].top_logprobs]

    base, alpha, beta = first_logprobs(base_id(server)), first_logprobs("alpha"), first_logprobs("beta")
    assert base != alpha and base != beta and alpha != beta


def test_chat_logprobs(oai, server):
    r = oai.chat.completions.create(model="alpha", messages=CHAT, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    streamed = list(oai.chat.completions.create(model="alpha", messages=CHAT, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True,
                                                extra_body={"ignore_eos": True}))
    streamed_lp = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
    assert streamed_lp == pytest.approx([e.logprob for e in content])


def test_completions(server, oai):
    kw = dict(model="beta", prompt="The quick brown fox", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kw, logprobs=2)
    streamed = list(oai.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    echoed = oai.completions.create(**kw, echo=True)
    assert echoed.choices[0].text == "The quick brown fox" + whole.choices[0].text
    # token ids as the prompt give the same answer as the text they encode to
    ids = server.loaded.tokenizer.encode("The quick brown fox")
    by_ids = oai.completions.create(**{**kw, "prompt": ids})
    assert by_ids.choices[0].text == whole.choices[0].text


def test_openai_errors_name_the_field(server, oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-adapter", messages=CHAT)
    assert e.value.code == "model_not_found" and "no-such-adapter" in e.value.message
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="alpha@99", messages=CHAT)
    bad = [
        (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"), (dict(max_completion_tokens=-3), "max_completion_tokens"),
        (dict(max_tokens=10_000), "max_tokens"), (dict(n=17), "n"),
        (dict(logprobs=True, top_logprobs=99), "top_logprobs"), (dict(tools=[{"type": "function"}]), "tools"),
    ]
    for kw, field in bad:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="alpha", messages=CHAT, **kw)
        assert e.value.param == field, (kw, e.value.body)
        assert field in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "x"}])
    assert "messages" in e.value.message


# ---- TGI / LoRAX ------------------------------------------------------------------------------

def test_text_generation_client(server):
    client = text_generation.Client(server.url, timeout=30)
    r = client.generate("Paris is the capital of", max_new_tokens=10, decoder_input_details=True)
    assert r.details.generated_tokens == len(r.details.tokens) <= 10
    assert r.details.finish_reason.value in ("length", "eos_token")
    assert len(r.details.prefill) == len(server.loaded.tokenizer.encode("Paris is the capital of"))
    events = list(client.generate_stream("Paris is the capital of", max_new_tokens=10))
    assert events[-1].generated_text == r.generated_text
    assert "".join(e.token.text for e in events if not e.token.special) == r.generated_text
    assert [e.token.id for e in events] == [t.id for t in r.details.tokens]
    assert all(e.details is None for e in events[:-1]) and events[-1].details.generated_tokens == len(events)


def test_lorax_client_with_adapter_id(server):
    client = lorax.Client(server.url, timeout=30)
    prompt = "Below is an instruction that describes a task."
    base = client.generate(prompt, max_new_tokens=8, details=True, ignore_eos_token=True)
    alpha = client.generate(prompt, adapter_id="alpha", max_new_tokens=8, details=True, ignore_eos_token=True,
                            return_k_alternatives=2)
    assert [t.logprob for t in base.details.tokens] != [t.logprob for t in alpha.details.tokens]
    assert alpha.details.finish_reason.value == "length" and alpha.details.generated_tokens == 8
    assert alpha.details.prompt_tokens == len(server.loaded.tokenizer.encode(prompt))
    assert all(len(t.alternative_tokens) == 2 for t in alpha.details.tokens)
    events = list(client.generate_stream(prompt, adapter_id="alpha", max_new_tokens=8, ignore_eos_token=True,
                                         api_token="ignored", adapter_source="local"))
    assert events[-1].generated_text == alpha.generated_text
    assert events[-1].details.finish_reason.value == "length"

    with pytest.raises(LoraxNotFound, match="nope"):
        client.generate(prompt, adapter_id="nope")
    with pytest.raises(LoraxNotFound):
        list(client.generate_stream(prompt, adapter_id="nope"))
    with pytest.raises(LoraxValidationError, match="adapter_source"):
        client.generate(prompt, adapter_id="alpha", adapter_source="hub")
    with pytest.raises(LoraxValidationError, match="merge_strategy 'ties' is not supported"):
        client.generate(prompt, merged_adapters=lorax.types.MergedAdapters(
            ids=["alpha", "beta"], weights=[0.5, 0.5], density=1.0, merge_strategy="ties"))
    with pytest.raises(LoraxValidationError, match="response_format: invalid json grammar"):
        client.generate(prompt, response_format={"type": "json_object", "schema": {"type": "nonsense"}})


def test_generate_routes_and_top_level_adapter_id(server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True, "ignore_eos_token": True}}
    inner = httpx.post(server.url + "/generate",
                       json={**body, "parameters": {**body["parameters"], "adapter_id": "beta"}}).json()
    top = httpx.post(server.url + "/generate", json={**body, "adapter_id": "beta"}).json()
    compat = httpx.post(server.url + "/", json={**body, "adapter_id": "beta"}).json()
    assert inner == top == compat[0] and len(compat) == 1
    both = httpx.post(server.url + "/generate", json={**body, "adapter_id": "alpha",
                                                      "parameters": {"adapter_id": "beta"}})
    assert both.status_code == 422 and "adapter_id" in both.json()["error"]
    full = httpx.post(server.url + "/generate", json={
        **body, "adapter_id": "beta", "parameters": {**body["parameters"], "return_full_text": True}}).json()
    assert full["generated_text"] == "Hello" + top["generated_text"]

    stream = httpx.post(server.url + "/generate_stream", json={**body, "adapter_id": "beta"})
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = sse_events(stream)
    assert events[-1]["generated_text"] == top["generated_text"]
    assert set(events[-1]["details"]) == {"finish_reason", "prompt_tokens", "generated_tokens", "seed"}


def test_stop_sequence_maps_to_stop_sequence(server):
    body = {"inputs": "Numbers: 0 1 2", "parameters": {"max_new_tokens": 20, "ignore_eos_token": True}}
    text = httpx.post(server.url + "/generate", json=body).json()["generated_text"]
    stop = text[5:7]
    r = httpx.post(server.url + "/generate", json={
        **body, "parameters": {**body["parameters"], "stop": [stop], "details": True}}).json()
    assert r["details"]["finish_reason"] == "stop_sequence"
    assert r["generated_text"] == text[:text.index(stop)]


def test_sampling_is_reproducible_by_seed(server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 7,
                                              "temperature": 0.9, "top_p": 0.95, "top_k": 50, "details": True}}
    a = httpx.post(server.url + "/generate", json=body).json()
    b = httpx.post(server.url + "/generate", json=body).json()
    assert a == b and a["details"]["seed"] == 7


@pytest.mark.parametrize("parameters, field", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 100_000}, "max_new_tokens"), ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"temperature": "hot"}, "parameters.temperature"),
    ({"best_of": 2}, "best_of"), ({"watermark": True}, "watermark"), ({"typical_p": 0.5}, "typical_p"),
    ({"return_k_alternatives": 0}, "return_k_alternatives"), ({"top_n_tokens": 50}, "top_n_tokens"),
    ({"grammar": {"type": "regex", "value": "a(b"}}, "grammar"), ({"grammar": {"type": "xml"}}, "grammar"),
    ({"grammar": {"type": "json", "value": {"type": "nonsense"}}}, "grammar"),
])
def test_tgi_invalid_parameters_are_422_naming_the_field(server, parameters, field):
    r = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": parameters})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and r.json()["error"].startswith(field)


def test_missing_or_empty_inputs(server):
    for body in ({}, {"inputs": ""}, {"inputs": 3}):
        r = httpx.post(server.url + "/generate", json=body)
        assert r.status_code == 422 and "inputs" in r.json()["error"]
    assert httpx.post(server.url + "/generate", content=b"{not json").status_code == 422


# ---- limits, disconnects, metrics -------------------------------------------------------------

def test_oversize_bodies_are_413(server, oai):
    big = {"inputs": "x" * (MAX_BODY + 1)}
    r = httpx.post(server.url + "/generate", json=big)
    assert r.status_code == 413 and r.json()["error_type"] == "too_large"

    def chunked():   # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024
    r = httpx.post(server.url + "/generate", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    with pytest.raises(openai.APIStatusError) as e:
        oai.completions.create(model="alpha", prompt="y" * (MAX_BODY + 1))
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


@pytest.mark.parametrize("path, body", [
    ("/generate_stream", {"inputs": "Hello", "adapter_id": "alpha",
                          "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}),
    ("/v1/chat/completions", {"model": "beta", "messages": CHAT, "max_tokens": 200, "stream": True,
                              "ignore_eos": True}),
])
def test_disconnect_mid_stream_cancels_and_frees_the_slot(server, path, body):
    server.wait_idle()
    cancelled_before = server.engine.stats().requests_cancelled_total
    adapter = body.get("adapter_id") or body.get("model")
    endpoint = "generate_stream" if path == "/generate_stream" else "chat_completions"
    gone_before = server.metric("adapter_server_requests_total", adapter=adapter, endpoint=endpoint, status="499")
    with httpx.Client(timeout=30) as client, client.stream("POST", server.url + path, json=body) as r:
        lines = r.iter_lines()
        seen = sum(1 for _, line in zip(range(3), (x for x in lines if x.startswith("data:"))))
        assert seen == 3
    server.wait_idle()
    stats = server.engine.stats()
    assert stats.requests_cancelled_total == cancelled_before + 1
    assert stats.kv_blocks_used == 0
    assert server.metric("adapter_server_requests_total", adapter=adapter, endpoint=endpoint,
                         status="499") == gone_before + 1


def test_metrics(server, oai):
    oai.chat.completions.create(model="alpha", messages=CHAT, max_tokens=2)
    server.wait_idle()
    m = server.metric
    assert m("adapter_server_requests_total", adapter="alpha", endpoint="chat_completions", status="200") >= 1
    assert m("adapter_server_time_to_first_token_seconds_count", adapter="alpha") >= 1
    assert m("adapter_server_queue_seconds_count", adapter="alpha") >= 1
    assert m("adapter_server_generated_tokens_total", adapter="alpha") >= 2
    assert m("adapter_server_requests_total", adapter="(unknown)", endpoint="chat_completions", status="404") >= 1
    assert m("adapter_server_queue_depth") == 0 and m("adapter_server_running_requests") == 0
    assert m("adapter_server_kv_cache_blocks_total") == 8 * 256 // 16     # 8 sequences of max_seq_len
    assert m("adapter_server_kv_cache_blocks_used") == 0
    assert m("adapter_server_adapters_resident") == 2
    assert m("adapter_server_adapter_loads_total") >= 2


def test_health_and_ready(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["model"] == base_id(server)
