"""LoRA and prefix-tuning adapters over real HTTP: admin upload of every kind, composition in
the TGI/LoRAX (`adapter_ids` + `adapter_weights`, `merged_adapters`) and OpenAI (`model:
"a:0.7+b:0.3"`) forms, and the 422s for what cannot be composed."""

from __future__ import annotations

import httpx
import lorax
import openai
import pytest
from adapter_helpers import adapter_bytes, random_lora, random_prefix
from http_harness import live_server

BODY = {"inputs": "Hello there", "parameters": {"max_new_tokens": 6, "details": True, "ignore_eos_token": True}}


@pytest.fixture(scope="module")
def server(tiny_loaded, tmp_path_factory):
    with live_server(tiny_loaded, tmp_path_factory.mktemp("store")) as s:
        s.upload("alpha", seed=1)
        model = s.loaded.model
        for name, w in (("qv8", random_lora(model, 8, ("q", "v"), seed=2)),
                        ("all4", random_lora(model, 4, ("q", "k", "v", "o", "gate", "up", "down"), seed=3)),
                        ("pre", random_prefix(model, 4, seed=4))):
            with s.admin() as c:
                r = c.put(f"/admin/adapters/{name}", files={"file": ("a.safetensors", adapter_bytes(model, w))})
            assert r.status_code == 201 and r.json()["kind"] == ("prefix-tuning" if name == "pre" else "lora"), r.text
        yield s


def _logprobs(response: dict) -> list[float]:
    return [t["logprob"] for t in response["details"]["tokens"]]


def _generate(server, **parameters) -> httpx.Response:
    return httpx.post(server.url + "/generate", json={**BODY, "parameters": {**BODY["parameters"], **parameters}},
                      timeout=30)


def test_each_kind_serves_and_differs_from_base(server):
    outs = {name: _logprobs(_generate(server, adapter_id=name).json()) for name in ("alpha", "qv8", "all4", "pre")}
    base = _logprobs(_generate(server).json())
    assert all(lp != base for lp in outs.values())
    models = {m.id for m in openai.OpenAI(base_url=server.url + "/v1", api_key="x").models.list()}
    assert {"alpha", "qv8", "all4", "pre"} <= models


def test_composition_forms_agree(server):
    ids = _generate(server, adapter_ids=["qv8", "alpha"], adapter_weights=[0.7, 0.3]).json()
    merged = lorax.Client(server.url, timeout=30).generate(
        BODY["inputs"], max_new_tokens=6, details=True, ignore_eos_token=True,
        merged_adapters=lorax.types.MergedAdapters(ids=["qv8", "alpha"], weights=[0.7, 0.3], density=1.0,
                                                   merge_strategy="linear"))
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x").completions.create(
        model="qv8:0.7+alpha:0.3", prompt=BODY["inputs"], max_tokens=6, logprobs=0, temperature=0,
        extra_body={"ignore_eos": True})
    assert merged.generated_text == ids["generated_text"] == oai.choices[0].text
    assert [t.logprob for t in merged.details.tokens] == _logprobs(ids)
    assert oai.system_fingerprint.endswith("+qv8@1:0.7+alpha@1:0.3")
    single = _generate(server, adapter_id="qv8").json()
    assert _logprobs(single) != _logprobs(ids)
    # Weight 1 each is the same as naming them without weights.
    assert _generate(server, adapter_ids=["qv8", "all4"]).json() == _generate(
        server, adapter_ids=["qv8", "all4"], adapter_weights=[1, 1]).json()


@pytest.mark.parametrize("parameters,field", [
    ({"adapter_ids": ["pre", "qv8"]}, "cannot be composed"),
    ({"adapter_ids": ["qv8", "alpha"], "adapter_weights": [1.0]}, "adapter_ids"),
    ({"adapter_weights": [1.0]}, "adapter_weights"),
    ({"adapter_ids": ["qv8"], "adapter_id": "alpha"}, "not both"),
    ({"merged_adapters": {"ids": ["qv8", "alpha"], "weights": [1, 1], "merge_strategy": "ties"}}, "merge_strategy"),
    ({"adapter_ids": ["qv8", "qv8@1"]}, "twice"),
    ({"adapter_ids": ["qv8", "alpha"], "adapter_weights": [0.0, 1.0]}, "non-zero"),
])
def test_bad_compositions_are_422(server, parameters, field):
    r = _generate(server, **parameters)
    assert r.status_code == 422 and field in r.json()["error"], r.text
    assert server.registry.stats().pinned_count == 0


def test_openai_composed_model_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="qv8+nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="cannot be composed"):
        client.completions.create(model="pre+qv8:0.5", prompt="hi", max_tokens=2)
