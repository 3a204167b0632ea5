"""Training: data encoding and masking, the batch plan, the loop (frozen base, resume),
2-process gloo torchrun == 1 process, and the trained file served over HTTP.

All on the tiny random model of conftest (CPU, fp32); the real demonstration on the default
model is tests/demo_train_default.py (not part of the suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from adapters.format import check_fits, load_adapter
from adapters.store import AdapterStore
from http_harness import ADMIN_TOKEN, live_server
from model.adapter import AdapterBatch, AdapterWeights, compute_adapter_kv
from model.batch_adapters import BatchAdapters
from training import cli
from training.config import TrainConfig, load_recipe
from training.data import (IGNORE, DataError, Example, alpaca_prompt, collate, encode_record,
                           load_dataset, plan_epoch, rank_slice)
from training.distributed import DistContext
from training.loop import train
from training.model import LowerStates, TrainableAdapter

REPO = Path(__file__).resolve().parent.parent
WORDS = ["fox", "dog", "Paris", "France", "world", "hello", "quick", "brown", "lazy", "today",
         "capital", "numbers"]
SINGLE = DistContext(0, 1, 0, torch.device("cpu"))


def toy_records(n: int = 24) -> list[dict]:
    """A learnable toy task in the tiny tokenizer's vocabulary, with and without input."""
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        if i % 3:
            rows.append({"instruction": "Repeat the words.", "input": f"{a} {b}", "output": f"{a} {b} {a}"})
        else:
            rows.append({"instruction": f"Say {a}.", "output": a})
    return rows


@pytest.fixture
def toy_data(tmp_path) -> Path:
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_records()))
    return path


def small_config(**kw) -> TrainConfig:
    base = dict(adapter_len=3, adapter_layers=2, batch_size=4, grad_accum=2, lr=0.03, max_steps=6,
                warmup_epochs=0.5, max_len=200, eval_every=3, checkpoint_every=2, prompt_init_std=0.5)
    return TrainConfig(**{**base, **kw})


# ---- data ------------------------------------------------------------------------------------

def test_alpaca_template_is_stanfords_verbatim():
    assert alpaca_prompt("Add.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:")
    assert alpaca_prompt("Say hi.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:")


@pytest.mark.parametrize("rec", [{"instruction": "Repeat the words.", "input": "fox dog", "output": "fox dog fox"},
                                 {"instruction": "Say Paris.", "input": "", "output": "Paris"}])
def test_alpaca_labels_are_exactly_the_response_and_eos(tiny_loaded, rec):
    tok = tiny_loaded.tokenizer
    ex = encode_record(rec, tok, "test")
    prompt = tok.encode(alpaca_prompt(rec["instruction"], rec["input"]))
    assert ex.input_ids[:len(prompt)] == prompt          # what a client sending the prompt gets
    assert ex.labels[:len(prompt)] == [IGNORE] * len(prompt)
    target = ex.labels[len(prompt):]
    assert target == ex.input_ids[len(prompt):] and IGNORE not in target
    assert target[-1] == tok.eos_id
    assert tok.decode(target[:-1]) == rec["output"]


def test_chat_labels_are_the_assistant_turns(tiny_loaded):
    tok = tiny_loaded.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "fox?"},
            {"role": "assistant", "content": "quick brown fox"}]
    ex = encode_record({"messages": msgs}, tok, "test")
    assert ex.input_ids == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False), add_bos=False)
    # Contiguous runs of targets, decoded with specials: each assistant reply + its end of turn.
    runs, cur = [], []
    for i, label in zip(ex.input_ids, ex.labels):
        if label == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == i
            cur.append(i)
    runs.append(cur)
    assert [tok.decode(r, skip_special=False) for r in runs] == [
        "hello world<|im_end|>\n", "quick brown fox<|im_end|>\n"]


def test_bad_records_are_named(tiny_loaded, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"record 1: expected Alpaca fields"):
        load_dataset(path, tiny_loaded.tokenizer, 64, 0.0, 10, 0)
    path.write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_dataset(path, tiny_loaded.tokenizer, 64, 0.0, 10, 0)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="no assistant message"):
        load_dataset(path, tiny_loaded.tokenizer, 64, 0.0, 10, 0)


def test_truncation_and_split(tiny_loaded, toy_data):
    tok = tiny_loaded.tokenizer
    full = load_dataset(toy_data, tok, 512, 0.25, 100, seed=0)
    assert (len(full.train), len(full.eval), full.n_truncated, full.n_dropped) == (18, 6, 0, 0)
    assert load_dataset(toy_data, tok, 512, 0.25, 100, seed=0).eval == full.eval   # deterministic
    n_prompt_min = min(e.labels.index(next(x for x in e.labels if x != IGNORE)) for e in full.train + full.eval)
    cut = load_dataset(toy_data, tok, n_prompt_min + 1, 0.0, 100, seed=0)
    assert all(len(e.input_ids) <= n_prompt_min + 1 for e in cut.train)
    assert cut.n_truncated == 24 and cut.n_dropped == 24 - len(cut.train) > 0


def test_batch_plan_splits_one_global_batch_between_ranks():
    lengths = [5 + (i * 7) % 23 for i in range(50)]
    one = plan_epoch(lengths, epoch=1, seed=3, effective_batch=8, micro_batch=8)
    two = plan_epoch(lengths, epoch=1, seed=3, effective_batch=8, micro_batch=4)
    assert [sorted(sum(s, [])) for s in one] == [sorted(sum(s, [])) for s in two]
    seen = [i for s in one for m in s for i in m]
    assert len(seen) == len(set(seen)) == 48                     # each example once; tail dropped
    # Rank slices of a global micro-batch partition it.
    m = two[0][0]
    assert rank_slice(m, 0, 2) + rank_slice(m, 1, 2) == m
    # Length grouping: padding in a step is far below that of a random batch.
    waste = sum(max(lengths[i] for i in s[0]) * len(s[0]) - sum(lengths[i] for i in s[0]) for s in one)
    assert waste < 0.5 * sum(max(lengths) - lengths[i] for i in seen)
    assert plan_epoch(lengths, 2, 3, 8, 8) != one


def test_collate_right_pads_and_masks_padding():
    tokens, labels = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [IGNORE])], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert labels.tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]


# ---- model and loss ------------------------------------------------------------------------------

def test_training_loss_is_the_served_model_on_response_tokens_only(fresh_tiny_loaded):
    """Split forward + head-at-targets == the serving forward's cross-entropy over exactly the
    response tokens of each unpadded example; padding changes nothing."""
    base, tok = fresh_tiny_loaded.model, fresh_tiny_loaded.tokenizer
    recs = toy_records(4)
    examples = [encode_record(r, tok, "t") for r in recs]
    adapter = TrainableAdapter(base.config, 3, 2, "per_head", 0.5, seed=1)
    with torch.no_grad():
        adapter.gates.uniform_(0.3, 0.9)
    tokens, labels = collate(examples, tok.eos_id)
    for keep in (False, True):
        states = LowerStates(adapter, base, examples, tok.eos_id, torch.device("cpu"),
                             torch.autocast("cpu", enabled=False), keep, batch_size=3)
        loss = adapter.summed_loss(base, states.get(list(range(4)), tokens), labels)
        kv = compute_adapter_kv(base, adapter.weights())
        want = 0.0
        for e in examples:
            logits = base(torch.tensor([e.input_ids]), adapters=AdapterBatch.build([kv], base.config.n_layers))[0]
            first = e.labels.index(next(x for x in e.labels if x != IGNORE))   # first response token
            want += F.cross_entropy(logits[first - 1:-1], torch.tensor(e.input_ids[first:]), reduction="sum")
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_is_the_base_model_and_only_it_trains(fresh_tiny_loaded):
    base, tok = fresh_tiny_loaded.model, fresh_tiny_loaded.tokenizer
    adapter = TrainableAdapter(base.config, 3, 2, "per_head", 0.5, seed=0)
    assert not adapter.gates.any()
    ex = encode_record(toy_records(1)[0], tok, "t")
    tokens, labels = collate([ex], tok.eos_id)
    with torch.no_grad():
        logits = base(tokens)
    base_loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
    loss = adapter.summed_loss(base, adapter.lower_states(base, tokens), labels)
    torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert adapter.gates.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())


# ---- loop ---------------------------------------------------------------------------------------

def served_loss(base, weights, examples) -> float:
    """Token-mean loss through the serving path (BatchAdapters.build), base model if weights is None;
    any adapter kind."""
    total, n = 0.0, 0
    resident = compute_adapter_kv(base, weights) if isinstance(weights, AdapterWeights) else weights
    adapters = None if weights is None else BatchAdapters.build([((resident, 1.0),)], base.config.n_layers)
    for e in examples:
        with torch.no_grad():
            logits = base(torch.tensor([e.input_ids]), adapters=adapters)[0]
        total += float(F.cross_entropy(logits[:-1], torch.tensor(e.labels[1:]), ignore_index=IGNORE,
                                       reduction="sum"))
        n += e.n_targets
    return total / n


def test_resume_continues_to_the_uninterrupted_result(fresh_tiny_loaded, toy_data, tmp_path):
    base, tok = fresh_tiny_loaded.model, fresh_tiny_loaded.tokenizer
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = small_config()
    data = load_dataset(toy_data, tok, cfg.max_len, cfg.eval_fraction, cfg.eval_max_examples, cfg.seed)
    whole = train(cfg, base, data, SINGLE, tok.eos_id, tmp_path / "a", progress=False)

    class Crash(Exception):
        pass

    def crash_at_3(record):
        if record["step"] == 3:
            raise Crash
    with pytest.raises(Crash):
        train(cfg, base, data, SINGLE, tok.eos_id, tmp_path / "b", on_step=crash_at_3, progress=False)
    resumed = train(cfg, base, data, SINGLE, tok.eos_id, tmp_path / "b", resume=True, progress=False)

    assert torch.equal(resumed.weights.prompts, whole.weights.prompts)
    assert torch.equal(resumed.weights.gates, whole.weights.gates)
    assert resumed.history == whole.history
    assert whole.weights.gates.abs().min() > 0                     # it did train
    assert served_loss(base, whole.weights, data.train) < served_loss(base, None, data.train)   # and learned
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())   # base untouched
    with pytest.raises(ValueError, match="different run"):
        train(small_config(lr=0.01), base, data, SINGLE, tok.eos_id, tmp_path / "b", resume=True, progress=False)


def test_recipe_file_and_flag_precedence(tmp_path):
    recipe = load_recipe("alpaca_7b_8xa100")
    cfg = TrainConfig.from_dict(recipe)
    assert (cfg.adapter_len, cfg.adapter_layers, cfg.epochs, cfg.warmup_epochs) == (10, 30, 5, 2)
    assert cfg.peak_lr(world_size=8) == pytest.approx(9e-3 * 32 / 256)
    args = cli_args(["--data", "x.json", "--out", "a.safetensors", "--recipe", "alpaca_7b_8xa100",
                     "--adapter-layers", "8"])
    assert cli.resolve_config(args).adapter_layers == 8
    (tmp_path / "r.json").write_text('{"adapter_len": 4, "learning_rate": 1}')
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict(load_recipe(str(tmp_path / "r.json")))


def cli_args(argv):
    import argparse
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


# ---- end to end -------------------------------------------------------------------------------

COMMON = ["--adapter-len", "3", "--adapter-layers", "2", "--max-steps", "4", "--lr", "0.03",
          "--eval-every", "2", "--max-len", "200", "--seed", "5", "--grad-accum", "2"]


def test_two_gloo_processes_equal_one_process(tiny_model_dir, toy_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training", "--data", str(toy_data), "--model", str(tiny_model_dir),
         "--out", str(tmp_path / "two.safetensors"), "--batch-size", "2", "--backend", "gloo", *COMMON],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("adapter:") == 1                      # only rank 0 writes/prints
    one = cli_args(["--data", str(toy_data), "--model", str(tiny_model_dir),
                    "--out", str(tmp_path / "one.safetensors"), "--batch-size", "4", *COMMON])
    assert cli.run(one) == 0
    w2, m2 = load_adapter(tmp_path / "two.safetensors")
    w1, m1 = load_adapter(tmp_path / "one.safetensors")
    assert w1.gates.abs().min() > 1e-3
    torch.testing.assert_close(w2.prompts, w1.prompts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w2.gates, w1.gates, rtol=1e-4, atol=1e-5)
    assert m2.extra["world_size"] == 2 and m1.extra["world_size"] == 1
    assert m2.extra["final_eval_loss"] == pytest.approx(m1.extra["final_eval_loss"], rel=1e-4)
    assert (tmp_path / "one.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_adapter_is_served_without_restart(tiny_loaded, tiny_model_dir, toy_data, tmp_path):
    """--server uploads to a running server, --store NAME stores; the file loads and changes output."""
    with live_server(tiny_loaded, tmp_path / "served") as server:
        args = cli_args(["--data", str(toy_data), "--model", str(tiny_model_dir), "--batch-size", "4",
                         "--out", str(tmp_path / "t.safetensors"), "--name", "toy",
                         "--store", str(tmp_path / "store"), "--server", server.url,
                         "--admin-token", ADMIN_TOKEN, *COMMON])
        assert cli.run(args) == 0

        def generate(adapter):
            body = {"inputs": alpaca_prompt("Say fox."), "adapter_id": adapter,
                    "parameters": {"max_new_tokens": 8, "ignore_eos_token": True, "details": True}}
            r = httpx.post(server.url + "/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return [(t["id"], round(t["logprob"], 4)) for t in r.json()["details"]["tokens"]]
        assert generate("toy") != generate(None)

    weights, meta = load_adapter(tmp_path / "t.safetensors")
    check_fits(meta, tiny_loaded.model, tiny_loaded.fingerprint)
    assert meta.source == "trained" and meta.base_fingerprint == tiny_loaded.fingerprint
    assert meta.extra["data_sha256"] and meta.extra["recipe"]["adapter_len"] == 3
    assert meta.extra["final_train_loss"] > 0 and meta.extra["final_eval_loss"] > 0
    stored = AdapterStore(tmp_path / "store")
    assert stored.resolve("toy").ref == "toy@1"
    w_stored, _ = load_adapter(stored.path(stored.resolve("toy")))
    assert torch.equal(w_stored.prompts, weights.prompts)


def test_destination_errors_come_before_training(toy_data, monkeypatch):
    with pytest.raises(ValueError, match="--out FILE and/or --name"):
        cli.run(cli_args(["--data", str(toy_data)]))
    monkeypatch.delenv(cli.ADMIN_TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="--admin-token"):
        cli.run(cli_args(["--data", str(toy_data), "--name", "x", "--server", "http://127.0.0.1:9"]))


# ---- other methods ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,flags", [
    ("lora", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,v,down", "--lr", "0.01"]),
    ("prefix-tuning", ["--lr", "0.5"]),
])
def test_other_methods_learn_and_their_file_is_served(fresh_tiny_loaded, tiny_model_dir, toy_data, tmp_path,
                                                      method, flags):
    """--method lora / prefix-tuning: same loop, loss falls below the base model's, and the written
    file loads into a registry and changes what the engine generates."""
    from adapters.registry import AdapterRegistry
    from server.engine import Engine
    from server.types import EngineConfig, GenerationRequest, SamplingParams

    out = tmp_path / "m.safetensors"
    args = cli_args(["--data", str(toy_data), "--model", str(tiny_model_dir), "--batch-size", "4",
                     "--out", str(out), "--method", method, *flags, "--adapter-len", "3", "--adapter-layers", "2",
                     "--max-steps", "12", "--eval-every", "0", "--max-len", "200", "--seed", "5"])
    assert cli.run(args) == 0
    weights, meta = load_adapter(out)
    assert meta.kind == method and meta.extra["recipe"]["method"] == method
    base, tok = fresh_tiny_loaded.model, fresh_tiny_loaded.tokenizer
    data = load_dataset(toy_data, tok, 200, 0.05, 200, 0)
    assert served_loss(base, weights, data.train) < served_loss(base, None, data.train) - 0.05
    if method == "lora":
        assert meta.lora_rank == 4 and meta.lora_targets == ("q", "v", "down") and weights.layers == [2, 3]
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), fresh_tiny_loaded.model, fresh_tiny_loaded.fingerprint)
    registry.upload("trained", out.read_bytes())
    engine = Engine(fresh_tiny_loaded, registry, EngineConfig(max_batch=2, max_seq_len=128))
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    prompt = tok.encode(alpaca_prompt("Say fox."))
    handles = [engine.submit(GenerationRequest(prompt, params, adapter=a)) for a in ("trained", None)]
    while not all(h.done for h in handles):
        engine.step()
    assert handles[0].wait(0).logprobs != handles[1].wait(0).logprobs
