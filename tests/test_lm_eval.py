"""lm-evaluation-harness as a real client of the server.

A small multiple-choice task (tests/data/lm_eval, local JSONL: no hub download) is run through
lm-eval's `local-completions` model against a real server, on the base model and with an
adapter, and through lm-eval's `hf` model (transformers, + PEFT for the adapter) on the same
weights: every example gets the same choice and the same per-choice loglikelihoods (fp32, 1e-4).
The adapter is a PEFT adaption-prompt saved by PEFT and imported into our format, as in
test_peft_equivalence. A generation task runs through `local-chat-completions`.
"""

from __future__ import annotations

import os

# lm-eval reads its data through HF datasets: the task is local, nothing may be fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from adapter_helpers import adapter_bytes  # noqa: E402
from adapters.importers import import_peft  # noqa: E402
from http_harness import live_server  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lm_eval import evaluator  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
MC, GEN = "adapter_server_mc", "adapter_server_gen"


def peft_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT adaption-prompt adapter with random prompts and non-zero gates, saved by PEFT."""
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2,
                                                                task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("adaption_gate"):
                p.copy_(torch.empty(p.shape).uniform_(0.3, 1.0, generator=gen))
    model.save_pretrained(out)
    return out


def run(model: str, model_args: str, task: str) -> list[dict]:
    """The task's per-example samples (sorted by doc_id), evaluated by lm-eval."""
    cwd = os.getcwd()
    os.chdir(DATA)                  # the task's data_files path is relative to the YAML
    try:
        out = evaluator.simple_evaluate(
            model=model, model_args=model_args, tasks=[task], batch_size=1, log_samples=True,
            task_manager=TaskManager(include_path=str(DATA), include_defaults=False),
            apply_chat_template=model == "local-chat-completions")
    finally:
        os.chdir(cwd)
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def choice_logliks(samples: list[dict]) -> torch.Tensor:
    return torch.tensor([[ll for ll, _ in s["filtered_resps"]] for s in samples], dtype=torch.float64)


@pytest.fixture(scope="module")
def server(tiny_loaded, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm-eval")
    peft_dir = peft_adapter(tiny_model_dir, tmp / "peft", seed=3)
    (imported,) = import_peft(peft_dir, tiny_loaded.config)
    with live_server(tiny_loaded, tmp / "store", max_batch=4) as s:
        with s.admin() as c:
            data = adapter_bytes(tiny_loaded.model, imported.weights, tiny_loaded.fingerprint)
            assert c.put("/admin/adapters/peft-mc", files={"file": ("a.safetensors", data)}).status_code == 201
        s.peft_dir = peft_dir
        yield s


@pytest.fixture(scope="module")
def scores(server, tiny_model_dir):
    """Per-example loglikelihoods of every choice: {(client, adapter): samples}, each run once."""
    cache = {}

    def get(client: str, adapter: str | None) -> list[dict]:
        if (client, adapter) not in cache:
            if client == "server":
                args = (f"model={adapter or server.app.state.ctx.model_id},base_url={server.url}/v1/completions,"
                        f"tokenizer_backend=huggingface,tokenizer={tiny_model_dir},max_length=256,max_retries=1")
                cache[client, adapter] = run("local-completions", args, MC)
            else:
                args = f"pretrained={tiny_model_dir},dtype=float32,device=cpu"
                cache[client, adapter] = run("hf", args + (f",peft={server.peft_dir}" if adapter else ""), MC)
        return cache[client, adapter]
    return get


@pytest.mark.parametrize("adapter", [None, "peft-mc"])
def test_local_completions_choices_equal_hf(scores, adapter):
    ours, reference = scores("server", adapter), scores("hf", adapter)
    assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in reference] == list(range(12))
    ours_ll, ref_ll = choice_logliks(ours), choice_logliks(reference)
    assert ours_ll.argmax(-1).tolist() == ref_ll.argmax(-1).tolist()
    torch.testing.assert_close(ours_ll, ref_ll, atol=1e-4, rtol=0)
    assert [s["acc"] for s in ours] == [s["acc"] for s in reference]


def test_adapter_changes_the_scores(scores):
    assert not torch.allclose(choice_logliks(scores("server", None)), choice_logliks(scores("server", "peft-mc")),
                              atol=1e-3)


def test_local_chat_completions_generation_task(server):
    samples = run("local-chat-completions", f"model=peft-mc,base_url={server.url}/v1/chat/completions,"
                  "tokenizer_backend=none,max_retries=1", GEN)
    assert [s["doc_id"] for s in samples] == list(range(12))
    # Each answer is what the server gives that question as a greedy chat, with the task's stop.
    for s in samples[:4]:
        r = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "peft-mc", "messages": [{"role": "user", "content": f"{s['doc']['question']} Answer in one word."}],
            "max_tokens": 8, "temperature": 0, "stop": ["\n"]}, timeout=30).json()
        assert s["resps"][0][0] == r["choices"][0]["message"]["content"]
