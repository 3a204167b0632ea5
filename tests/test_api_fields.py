"""The API fields real clients need, over real HTTP with real clients on a tiny random model:
prompt logprobs (echo + logprobs, TGI decoder_input_details), n / best_of, logit_bias, chat
logprobs, structured output (response_format, TGI grammar)."""

from __future__ import annotations

import json
import re

import httpx
import lorax
import openai
import pytest
import torch

from http_harness import live_server
from model.adapter import AdapterBatch

pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")

PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


@pytest.fixture(scope="module")
def server(tiny_loaded, tmp_path_factory):
    # A small step budget splits PROMPT's prefill into several chunks.
    with live_server(tiny_loaded, tmp_path_factory.mktemp("store"), max_batch=8,
                     max_tokens_per_step=8) as s:
        s.upload("alpha", seed=1)
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def reference_prompt_logprobs(server, ids: list[int], adapter: str | None = None) -> torch.Tensor:
    """One plain full forward (no cache, no chunks): logprob of token t given tokens < t."""
    model = server.loaded.model
    lease = server.registry.acquire(adapter) if adapter else None
    try:
        adapters = AdapterBatch.build([lease.kv], model.config.n_layers) if lease else None
        with torch.inference_mode():
            lp = model(torch.tensor([ids]), adapters=adapters)[0].float().log_softmax(-1)
    finally:
        if lease:
            lease.release()
    return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---- prompt logprobs --------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["(base)", "alpha"])
def test_echo_logprobs_score_the_prompt(server, oai, model):
    model = server.app.state.ctx.model_id if model == "(base)" else model
    ids = server.loaded.tokenizer.encode(PROMPT)
    assert len(ids) > 16        # several prefill chunks
    # What lm-eval's local-completions sends: token ids, echo, logprobs=1, max_tokens 0 or 1.
    r = oai.completions.create(model=model, prompt=[ids], echo=True, logprobs=1, max_tokens=0, temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference_prompt_logprobs(server, ids, None if model == server.app.state.ctx.model_id else model)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), ref, atol=1e-4, rtol=0)
    for token, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert token in top.values() and max(top.values()) >= token
    # With a generated token: the prompt's entries are the same, the last one is the new token.
    one = oai.completions.create(model=model, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert one.choices[0].logprobs.token_logprobs[:-1] == lp.token_logprobs
    assert len(one.choices[0].logprobs.tokens) == len(ids) + 1
    assert one.usage.completion_tokens == 1


def test_batched_prompts_are_scored_in_one_call(server, oai):
    prompts = [server.loaded.tokenizer.encode(p) for p in ("Hello, world!", PROMPT, "def add(a, b):")]
    r = oai.completions.create(model="alpha", prompt=prompts, echo=True, logprobs=0, max_tokens=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for ids, choice in zip(prompts, r.choices):
        ref = reference_prompt_logprobs(server, ids, "alpha")
        torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]), ref, atol=1e-4, rtol=0)
    assert r.usage.prompt_tokens == sum(map(len, prompts))


def test_max_tokens_zero_needs_logprobs(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="alpha", prompt="Hi", max_tokens=0)
    assert e.value.param == "max_tokens"


def test_tgi_decoder_input_details_fill_prefill_logprobs(server):
    client = lorax.Client(server.url, timeout=30)
    r = client.generate(PROMPT, adapter_id="alpha", max_new_tokens=2, details=True, decoder_input_details=True)
    ids = server.loaded.tokenizer.encode(PROMPT)
    prefill = r.details.prefill
    assert [t.id for t in prefill] == ids and prefill[0].logprob is None
    ref = reference_prompt_logprobs(server, ids, "alpha")
    torch.testing.assert_close(torch.tensor([t.logprob for t in prefill[1:]]), ref, atol=1e-4, rtol=0)


# ---- n / best_of ------------------------------------------------------------------------------

def test_n_sampled_choices_are_distinct_and_seeded_per_choice(oai):
    kw = dict(model="alpha", prompt="Hello", max_tokens=12, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    four = oai.completions.create(n=4, **kw)
    assert [c.index for c in four.choices] == [0, 1, 2, 3]
    texts = [c.text for c in four.choices]
    assert len(set(texts)) == 4
    assert four.usage.prompt_tokens == oai.completions.create(n=1, **kw).usage.prompt_tokens
    assert four.usage.completion_tokens == 4 * 12
    two = oai.completions.create(n=2, **kw)
    assert [c.text for c in two.choices] == texts[:2]      # choice i does not depend on n
    assert oai.completions.create(n=1, **kw).choices[0].text == texts[0]
    chat = dict(model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=1.0,
                seed=3, extra_body={"ignore_eos": True})
    c3 = oai.chat.completions.create(n=3, **chat)
    assert len({c.message.content for c in c3.choices}) == 3
    assert [c.message.content for c in oai.chat.completions.create(n=2, **chat).choices] == \
        [c.message.content for c in c3.choices[:2]]


def test_n_greedy_choices_are_identical(oai):
    r = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}], n=3,
                                    max_tokens=8, temperature=0)
    assert len(r.choices) == 3 and len({c.message.content for c in r.choices}) == 1


def test_best_of_returns_the_most_likely_choices(oai):
    kw = dict(model="alpha", prompt="Hello", max_tokens=6, temperature=1.0, seed=11, logprobs=0,
              extra_body={"ignore_eos": True})
    every = oai.completions.create(n=5, **kw).choices
    best = oai.completions.create(n=2, best_of=5, **kw)
    ranked = sorted(every, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)[:2]
    assert [c.text for c in best.choices] == [c.text for c in ranked]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == 5 * 6       # every generated token is counted
    for bad in (dict(n=3, best_of=2), dict(best_of=17), dict(best_of=3, stream=True)):
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(**{**kw, **bad})
        assert e.value.param == "best_of"


def test_streaming_n_tags_chunks_by_index(oai):
    kw = dict(model="alpha", max_tokens=6, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    whole = oai.completions.create(prompt="Hello", n=3, **kw)
    texts, finished = ["", "", ""], set()
    for chunk in oai.completions.create(prompt="Hello", n=3, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert texts == [c.text for c in whole.choices] and finished == {0, 1, 2}
    chat = oai.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], n=2, stream=True,
                                       stream_options={"include_usage": True}, **kw)
    contents, usage = ["", ""], None
    for chunk in chat:
        usage = chunk.usage or usage
        for c in chunk.choices:
            contents[c.index] += c.delta.content or ""
    assert all(contents) and usage.completion_tokens == 12


# ---- logit_bias and chat logprobs -------------------------------------------------------------

def test_logit_bias_forces_and_bans_tokens(server, oai):
    tok = server.loaded.tokenizer
    target = tok.encode(" fox")[0]
    kw = dict(model="alpha", prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
    for temperature in (0, 1.0):
        forced = oai.completions.create(logit_bias={str(target): 100}, temperature=temperature, seed=1,
                                        logprobs=0, **kw)
        assert forced.choices[0].text == tok.decode([target] * 4)
    free = oai.completions.create(temperature=0, **kw).choices[0].text
    first = tok.encode(free)[0]
    banned = oai.completions.create(logit_bias={str(first): -100}, temperature=0, **kw).choices[0].text
    assert tok.encode(banned)[0] != first
    for bias, why in (({"5": 101}, "[-100, 100]"), ({"x": 1}, "token ids"), ({"999999": 1}, "token ids")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(logit_bias=bias, **kw)
        assert e.value.param == "logit_bias" and why in e.value.message


def test_chat_logprobs_have_openai_shape(server, oai):
    r = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                    temperature=0.8, seed=2, logprobs=True, top_logprobs=4,
                                    extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert bytes(e.bytes).decode() == e.token and len(e.top_logprobs) == 4
        assert e.logprob <= e.top_logprobs[0].logprob


# ---- structured output ------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer"}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_parses(oai, seed):
    r = oai.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=120, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content     # the grammar ended it
    value = json.loads(choice.message.content)
    assert set(value) == {"name", "n"} and isinstance(value["n"], int) and len(value["name"]) <= 8
    obj = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=60,
                                      temperature=0, response_format={"type": "json_object"},
                                      extra_body={"seed": seed})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_grammars_through_lorax_client_and_httpx(server):
    client = lorax.Client(server.url, timeout=30)
    for seed in range(2):
        r = client.generate("Hello", adapter_id="alpha", do_sample=True, seed=seed, max_new_tokens=80,
                            response_format={"type": "json_object", "schema": SCHEMA})
        value = json.loads(r.generated_text)
        assert set(value) == {"name", "n"}
    pattern = r"(cat|dog)-[0-9]{3}"
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 20, "do_sample": True, "details": True,
                                              "grammar": {"type": "regex", "value": pattern}}}
    for seed in range(3):
        body["parameters"]["seed"] = seed
        r = httpx.post(server.url + "/generate", json=body, timeout=30).json()
        assert re.fullmatch(pattern, r["generated_text"]), r
        assert r["details"]["finish_reason"] in ("stop_sequence", "eos_token")


def test_constrained_and_free_rows_share_a_batch(server):
    """Constrained and unconstrained requests in flight together: each gets what it asked for, and
    the free one's seeded output is what it is alone."""
    from concurrent.futures import ThreadPoolExecutor

    free = {"inputs": "Hello", "parameters": {"max_new_tokens": 10, "do_sample": True, "seed": 4,
                                              "ignore_eos_token": True}}
    alone = httpx.post(server.url + "/generate", json=free, timeout=30).json()["generated_text"]
    constrained = {"inputs": "Hello", "parameters": {"max_new_tokens": 10, "do_sample": True, "seed": 5,
                                                     "grammar": {"type": "regex", "value": "[a-c]{4}"}}}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, server.url + "/generate", json=b, timeout=30)
                   for b in (free, constrained, free, constrained)]
        answers = [f.result().json()["generated_text"] for f in futures]
    assert answers[0] == answers[2] == alone
    assert re.fullmatch("[a-c]{4}", answers[1]) and re.fullmatch("[a-c]{4}", answers[3])


def test_invalid_schema_is_422_naming_the_problem(oai, server):
    bad = {"type": "object", "properties": {"a": {"type": "strnig"}}}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    assert e.value.body["param"] == "response_format" and "strnig" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                    response_format={"type": "yaml"})
    assert e.value.param == "response_format"
    r = httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {
        "grammar": {"type": "json", "value": bad}}})
    assert r.status_code == 422 and r.json()["error"].startswith("grammar") and "strnig" in r.json()["error"]
