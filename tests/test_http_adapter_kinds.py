"""LoRA and prefix-tuning adapters over real HTTP: admin upload of every kind, composition in
the TGI/LoRAX (`adapter_ids` + `adapter_weights`, `merged_adapters`) and OpenAI (`model:
"a:0.7+b:0.3"`) forms, and the 422s for what cannot be composed."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zipfile

import httpx
import lorax
import openai
import pytest
import torch
from adapter_helpers import adapter_bytes, random_lora, random_prefix
from http_harness import live_server

from adapters.format import metadata_for
from adapters.importers import export_peft, import_peft

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
                r = c.put(f"/admin/adapters/{name}", files={"file": ("a.safetensors", adapter_bytes(model, w, s.loaded.fingerprint))})
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


# ---- PEFT folders uploaded as zip / tar -------------------------------------------------------
def _zip(folder, arcroot: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, arcroot + str(p.relative_to(folder)))
    return buf.getvalue()


def _tar_gz(folder) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for p in sorted(folder.rglob("*")):
            t.add(p, str(p.relative_to(folder)))
    return buf.getvalue()


def _put(server, name, data, filename="adapter.zip"):
    with server.admin() as c:
        return c.put(f"/admin/adapters/{name}", files={"file": (filename, data)})


def test_a_lora_larger_than_the_memory_spool_uploads_and_serves(server):
    """Uploads past 1 MiB are spooled to disk on the way in and staged in chunks."""
    model = server.loaded.model
    big = adapter_bytes(model, random_lora(model, 128, ("q", "k", "v", "o", "gate", "up", "down"), seed=5, std=0.02),
                        server.loaded.fingerprint)
    assert len(big) > 1 << 20
    r = _put(server, "big128", big, filename="a.safetensors")
    assert r.status_code == 201 and r.json()["kind"] == "lora" and r.json()["size"] == len(big), r.text
    assert _generate(server, adapter_id="big128").status_code == 200


@pytest.fixture(scope="module")
def peft_lora_dir(server, tmp_path_factory):
    """A LoRA folder written by PEFT itself for the served tiny model (random A and B)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(server.loaded.path, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("peft") / "my-lora"
    model.save_pretrained(out)
    return out


def test_peft_folder_uploads_as_zip_or_tar(server, peft_lora_dir, tmp_path):
    r = _put(server, "zipped", _zip(peft_lora_dir, "my-lora/"))
    assert r.status_code == 201 and r.json()["kind"] == "lora" and r.json()["source"] == "imported:peft", r.text
    prefix_dir = export_peft(random_prefix(server.loaded.model, 3, seed=8),
                             metadata_for(random_prefix(server.loaded.model, 3, seed=8), server.loaded.model, "t"),
                             tmp_path / "prefix")
    r = _put(server, "tarred", _tar_gz(prefix_dir), "prefix.tar.gz")
    assert r.status_code == 201 and r.json()["kind"] == "prefix-tuning", r.text
    (imported,) = import_peft(peft_lora_dir, server.loaded.config)
    server.registry.upload("direct", adapter_bytes(server.loaded.model, imported.weights, server.loaded.fingerprint))
    assert _logprobs(_generate(server, adapter_id="zipped").json()) == \
        _logprobs(_generate(server, adapter_id="direct").json())


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/h6-lora-pickle-payload-ran"


def test_hostile_peft_archives_are_refused_with_nothing_persisted(server, peft_lora_dir, tmp_path):
    import pickle

    before = {a.name for a in server.registry.list()}
    config = json.loads((peft_lora_dir / "adapter_config.json").read_text())
    weights = (peft_lora_dir / "adapter_model.safetensors").read_bytes()

    def folder(name, cfg=None, files=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**config, **(cfg or {})}))
        for fname, data in (files if files is not None else {"adapter_model.safetensors": weights}).items():
            (d / fname).write_bytes(data)
        return d

    evil_pickle = pickle.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Payload()})
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as z:
        z.writestr("../adapter_config.json", json.dumps(config))
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as t:
        info = tarfile.TarInfo("adapter_config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    cases = [
        (_zip(folder("rank", {"r": 129})), "r=129 exceeds the limit of 128"),
        (_zip(folder("dora", {"use_dora": True})), "use_dora"),
        (_zip(folder("embed", {"target_modules": ["q_proj", "embed_tokens"]})), "target_modules \\['embed_tokens'\\]"),
        (_zip(folder("saved", {"modules_to_save": ["lm_head"]})), "modules_to_save"),
        (_zip(folder("pickle", files={"adapter_model.bin": evil_pickle})), "weights_only"),
        (_zip(folder("shape", {"r": 8})), "do not have rank r=8"),
        (traversal.getvalue(), "only relative paths"),
        (link.getvalue(), "not a regular file"),
    ]
    for data, reason in cases:
        r = _put(server, "evil", data)
        assert r.status_code == 422 and re.search(reason, r.json()["error"]), r.text
    assert not os.path.exists(MARKER)
    assert {a.name for a in server.registry.list()} == before
