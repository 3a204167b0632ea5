"""Demonstration (not part of the test suite; minutes on 2 CPU cores): train an adapter with the
default settings on the default model for a synthetic task it cannot do, then compare exact-match
accuracy on the held-out split, base vs adapter, served by the real engine.

    PYTHONPATH=. .venv/bin/python tests/demo_train_default.py [--workdir DIR] [-- extra train flags]

The training step is the documented one-liner (`python -m training --data ... --out ...`, plus
`--name/--store` so the engine serves the result from the store) with nothing else set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from adapters.format import load_adapter
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from model.loading import load_model
from server.engine import Engine
from server.types import EngineConfig, GenerationRequest, SamplingParams
from training.data import alpaca_prompt
from training.synthetic import generate, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def exact_match(engine: Engine, tokenizer, rows: list[dict], adapter: str | None) -> list[str]:
    """Greedy answers for every row (all submitted at once: the engine batches them)."""
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    handles = [engine.submit(GenerationRequest(tokenizer.encode(alpaca_prompt(r["instruction"], r["input"])),
                                               params, adapter)) for r in rows]
    return [h.wait(timeout=1800).text.strip() for h in handles]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="keep data, adapter, loss curve here (default: a temp dir)")
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("train_flags", nargs="*", help="extra flags for the training command (after --)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="demo-train-"))
    work.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = generate(args.train, args.test, seed=0)
    write_jsonl(work / "train.jsonl", train_rows)
    write_jsonl(work / "test.jsonl", test_rows)

    cmd = [sys.executable, "-m", "training", "--data", str(work / "train.jsonl"),
           "--out", str(work / "adapter.safetensors"), "--name", "demo", "--store", str(work / "store"),
           *args.train_flags]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    train_seconds = time.perf_counter() - started
    _, meta = load_adapter(work / "adapter.safetensors")

    loaded = load_model("default")
    registry = AdapterRegistry(AdapterStore(work / "store"), loaded.model, loaded.fingerprint)
    engine = Engine(loaded, registry, EngineConfig(max_batch=32, max_seq_len=256, max_tokens_per_step=512))
    engine.start()
    try:
        t0 = time.perf_counter()
        base = exact_match(engine, loaded.tokenizer, test_rows, None)
        tuned = exact_match(engine, loaded.tokenizer, test_rows, "demo")
        eval_seconds = time.perf_counter() - t0
    finally:
        engine.shutdown()

    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r, b, t in zip(test_rows, base, tuned):
        s = per_task[r["task"]]
        s[0] += b == r["output"]
        s[1] += t == r["output"]
        s[2] += 1
    n = len(test_rows)
    base_acc = sum(b == r["output"] for r, b in zip(test_rows, base)) / n
    tuned_acc = sum(t == r["output"] for r, t in zip(test_rows, tuned)) / n
    print(f"\nheld-out exact match ({n} examples, names/cities partly unseen in training):")
    print(f"  {'task':10} {'base':>8} {'adapter':>8}")
    for task, (b, t, k) in sorted(per_task.items()):
        print(f"  {task:10} {b / k:8.0%} {t / k:8.0%}")
    print(f"  {'all':10} {base_acc:8.0%} {tuned_acc:8.0%}")
    print("\nexamples (expected | base | adapter):")
    for r, b, t in list(zip(test_rows, base, tuned))[:6]:
        print(f"  {r['output']!r} | {b[:60]!r} | {t!r}")
    recipe = meta.extra["recipe"]
    summary = {"train_seconds_wall": round(train_seconds, 1), "train_seconds_loop": meta.extra["train_seconds"],
               "steps": meta.extra["steps"], "final_train_loss": meta.extra["final_train_loss"],
               "final_eval_loss": meta.extra["final_eval_loss"], "base_exact_match": base_acc,
               "adapter_exact_match": tuned_acc, "eval_seconds": round(eval_seconds, 1),
               "adapter_len": recipe["adapter_len"], "adapter_layers": recipe["adapter_layers"],
               "epochs": recipe["epochs"], "method": recipe.get("method", "llama-adapter"), "workdir": str(work)}
    print("\n" + json.dumps(summary, indent=2))
    (work / "demo_result.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
