"""Demonstration (not part of the test suite; minutes on 2 CPU cores): train an image adapter
(llama-adapter-visual) with the default settings on the default model for the synthetic
colour-and-shape task, then compare held-out exact match, base vs adapter.

    PYTHONPATH=. .venv/bin/python tests/demo_train_images.py [--workdir DIR] [--seed N] [-- extra train flags]

The data and its encoder come from `python -m training.synthetic_images`, the training step is the
documented one-liner (`python -m training --method llama-adapter-visual --vision-model ...`).
Answers are greedy, from the engine as served: the adapter is uploaded to a store and every test
image goes in as the server takes it (`decode_image`), so the demo measures the serving path.
It prints the adapter's wrong answers. On a busy machine set `OMP_NUM_THREADS=1`: the encoder
pretraining ran 6× faster with one thread than with two when other jobs shared the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from adapters.format import load_adapter
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from model.loading import load_model
from model.vision import load_vision
from server.engine import Engine
from server.images import decode_image
from server.routes_common import ServerSettings
from server.types import EngineConfig, GenerationRequest, SamplingParams
from training.data import alpaca_prompt

REPO = Path(__file__).resolve().parent.parent


def greedy_answers(engine: Engine, prompts: list[list[int]], adapter: str | None, images) -> list[str]:
    """Greedy answers for every prompt (all submitted at once: the engine batches them)."""
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    handles = [engine.submit(GenerationRequest(p, params, adapter=adapter, images=(image,) if image else ()))
               for p, image in zip(prompts, images)]
    return [h.wait(timeout=1800).text.strip() for h in handles]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="keep data, encoder, adapter, loss curve here (default: a temp dir)")
    p.add_argument("--train", type=int, default=960)
    p.add_argument("--test", type=int, default=60)
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the encoder and the training run")
    p.add_argument("train_flags", nargs="*", help="extra flags for the training command (after --)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="demo-images-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (work / "encoder" / "config.json").is_file():   # a workdir from an earlier run keeps its data
        subprocess.run([sys.executable, "-m", "training.synthetic_images", "--out", str(work), "--probe",
                        "--train", str(args.train), "--test", str(args.test), "--seed", str(args.seed)],
                       check=True, cwd=REPO)
    data_seconds = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "training", "--data", str(work / "train.jsonl"), "--method",
           "llama-adapter-visual", "--vision-model", str(work / "encoder"),
           "--out", str(work / "adapter.safetensors"), "--seed", str(args.seed), *args.train_flags]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    train_seconds = time.perf_counter() - t0

    _, meta = load_adapter(work / "adapter.safetensors")
    loaded = load_model("default")
    tower = load_vision(work / "encoder")
    registry = AdapterRegistry(AdapterStore(work / "store"), loaded.model, loaded.fingerprint, vision=tower)
    ref = registry.upload("shapes", (work / "adapter.safetensors").read_bytes()).ref
    rows = [json.loads(line) for line in (work / "test.jsonl").read_text().splitlines()]
    prompts = [loaded.tokenizer.encode(alpaca_prompt(r["instruction"], r.get("input", ""))) for r in rows]
    images = [decode_image((work / r["image"]).read_bytes(), None, ServerSettings.max_image_pixels, "image")
              for r in rows]
    engine = Engine(loaded, registry, EngineConfig(max_batch=64, max_seq_len=256, max_tokens_per_step=512),
                    vision=tower).start()
    try:
        t0 = time.perf_counter()
        base = greedy_answers(engine, prompts, None, [None] * len(rows))
        tuned = greedy_answers(engine, prompts, ref, images)
        eval_seconds = time.perf_counter() - t0
    finally:
        engine.shutdown()
    base_em = sum(b == r["output"] for b, r in zip(base, rows)) / len(rows)
    tuned_em = sum(t == r["output"] for t, r in zip(tuned, rows)) / len(rows)
    colour_ok = sum(t.split(" ")[0] == r["colour"] for t, r in zip(tuned, rows)) / len(rows)
    shape_ok = sum(t.split(" ")[-1] == r["shape"] for t, r in zip(tuned, rows)) / len(rows)
    for r, b, t in list(zip(rows, base, tuned))[:6]:
        print(f"  {r['output']!r:22} base {b[:40]!r:44} adapter {t!r}")
    wrong = Counter(f"{r['output']} -> {t}" for t, r in zip(tuned, rows) if t != r["output"])
    print("adapter's wrong answers:", dict(wrong.most_common()))
    print(json.dumps({"held_out_exact_match": {"base": base_em, "adapter": tuned_em},
                      "adapter_colour_right": colour_ok, "adapter_shape_right": shape_ok,
                      "test_examples": len(rows), "train_examples": args.train,
                      "data_and_encoder_seconds": round(data_seconds), "train_seconds": round(train_seconds),
                      "eval_seconds": round(eval_seconds), "steps": meta.extra.get("steps"),
                      "final_eval_loss": meta.extra.get("final_eval_loss")}, indent=2))


if __name__ == "__main__":
    main()
