"""Schemathesis over /openapi.json against a live server: valid and invalid requests to every
route (admin included, with the token) must never produce a 5xx, and answers must match the
schema. Bounded example counts keep it to seconds on the tiny model. Plus a Hypothesis fuzz of
every sampling field in combination, with greedy requests in flight beside it.

Operations are driven with plain Hypothesis (`operation.as_strategy()`): schemathesis' pytest
plugin does not run under this pytest version."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from http_harness import ADMIN_TOKEN, live_server

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def fuzz_server(tiny_loaded, tmp_path_factory):
    # A short context keeps generated requests short (most random max_new_tokens are a 4xx).
    with live_server(tiny_loaded, tmp_path_factory.mktemp("store"), max_queue=8, max_seq_len=64) as s:
        s.upload("alpha", seed=1)
        yield s


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12

    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzz_server.url, headers=headers, timeout=60)
            checks = [not_a_server_error] + ([response_schema_conformance] if response.status_code < 300 else [])
            case.validate_response(response, checks=checks)

        try:
            check()
        except Unsatisfiable:    # no invalid input exists (e.g. GET /health in negative mode)
            pass
        except Exception as e:   # collect every operation's failure, not just the first
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)


# ---- every sampling field in combination, with greedy neighbours in flight -----------------------

# Each field is drawn from its valid range, boundaries included, and at most one field per
# request from wild values besides (uniform draws would almost never be valid all at once, so the
# engine would never see the combination; one wild field tests it against valid neighbours).
_WILD = {float: [1e-300, 1e-40, -1.0, 1e40, float("inf"), float("nan")], int: [-1, 2 ** 31, 2 ** 70]}


def _floats(lo: float, hi: float, *special: float):
    return st.one_of(st.none(), st.sampled_from(special), st.floats(lo, hi))


def _ints(lo: int, hi: int, *special: int):
    return st.one_of(st.none(), st.sampled_from(special), st.integers(lo, hi))


_SAMPLING = {   # field → (type, valid values); names as on /generate
    "temperature": (float, _floats(0, 100, 0.0, 1e-300, 1e-6, 1e-5, 2e-5, 0.01, 1.0, 100.0)),
    "top_p": (float, _floats(1e-9, 1, 1e-300, 1e-40, 1e-6, 0.5, 1.0)),
    "top_k": (int, _ints(0, 400, 0, 1, 299, 300, 2 ** 31)),
    "repetition_penalty": (float, _floats(0.01, 100, 0.01, 0.5, 1.0, 2.0, 100.0)),
    "seed": (int, _ints(0, 2 ** 63 - 1, 0, 2 ** 63 - 1)),
    "max_new_tokens": (int, _ints(1, 12, 1)),
    "top_n_tokens": (int, _ints(1, 20, 20)),
}
_TGI_ONLY = {"return_k_alternatives": (int, _ints(1, 20, 20)), "truncate": (int, _ints(1, 40, 1))}
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "top_n_tokens": "logprobs"}


@st.composite
def _sampling_fields(draw, fields: dict) -> dict:
    values = {name: draw(strategy) for name, (_, strategy) in fields.items()}
    wild = draw(st.sampled_from([*sorted(fields), None]))
    if wild is not None:
        values[wild] = draw(st.sampled_from(_WILD[fields[wild][0]]))
    values["stop"] = draw(st.one_of(st.none(), st.lists(st.text(max_size=6), max_size=4)))
    return {k: v for k, v in values.items() if v is not None}


@st.composite
def _tgi_request(draw) -> tuple[str, dict]:
    params = draw(_sampling_fields({**_SAMPLING, **_TGI_ONLY}))
    params.update(do_sample=draw(st.booleans()), ignore_eos_token=draw(st.booleans()), details=draw(st.booleans()))
    return "/generate", {"inputs": "The quick brown fox", "adapter_id": draw(st.sampled_from([None, "alpha"])),
                         "parameters": params}


@st.composite
def _openai_request(draw) -> tuple[str, dict]:
    fields = draw(_sampling_fields(_SAMPLING))
    body = {_OPENAI_NAMES.get(k, k): v for k, v in fields.items()}
    return "/v1/completions", {"model": draw(st.sampled_from(["tiny-llama", "alpha"])), "prompt": "Hello",
                               "ignore_eos": draw(st.booleans()), **body}


def test_sampling_fields_in_combination_never_disturb_greedy_neighbours(fuzz_server):
    """Hypothesis draws every sampling field at once (extremes, NaN, infinities, huge integers)
    while greedy requests run in the same batches: each fuzzed request gets a 200 or a 4xx, and
    every greedy request finishes with exactly its reference output."""
    url = fuzz_server.url
    base_id = fuzz_server.ctx.model_id
    greedy = [{"inputs": "Hello, world!", "adapter_id": a,
               "parameters": {"max_new_tokens": 24, "ignore_eos_token": True}} for a in (None, "alpha")]
    with httpx.Client(base_url=url, timeout=60) as c:
        reference = [c.post("/generate", json=body).json()["generated_text"] for body in greedy]
    stop, checked, problems = threading.Event(), [0], []

    def neighbour(body, expected):
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/generate", json=body)
                if r.status_code != 200 or r.json()["generated_text"] != expected:
                    problems.append(f"greedy neighbour {body['adapter_id']}: {r.status_code} {r.text[:200]}")
                checked[0] += 1

    threads = [threading.Thread(target=neighbour, args=args) for args in zip(greedy, reference)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            @given(request=st.one_of(_tgi_request(), _openai_request()))
            @example(request=("/generate", {"inputs": "Hi", "parameters": {   # issue 12's reproducer
                "do_sample": True, "temperature": 1, "repetition_penalty": 1e-40, "max_new_tokens": 8}}))
            @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def fuzz(request):
                path, body = request
                if path.startswith("/v1/") and body["model"] == "tiny-llama":
                    body["model"] = base_id
                content = json.dumps(body, allow_nan=True)   # NaN/Infinity literals, as some clients send
                r = c.post(path, content=content, headers={"content-type": "application/json"})
                assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text)
                assert not problems, problems

            fuzz()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not problems, problems[:5]
    assert checked[0] >= 4
