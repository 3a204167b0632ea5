"""Demonstration (not part of the test suite; minutes on 2 CPU cores): train an image adapter
(llama-adapter-visual) with the default settings on the default model for the synthetic
colour-and-shape task, then compare held-out exact match, base vs adapter.

    PYTHONPATH=. .venv/bin/python tests/demo_train_images.py [--workdir DIR] [-- extra train flags]

The data and its encoder come from `python -m training.synthetic_images`, the training step is the
documented one-liner (`python -m training --method llama-adapter-visual --vision-model ...`).
Answers are greedy, decoded here by recomputing the whole sequence each step (a handful of
tokens) through the served adapter math: preprocess → encoder → compute_visual_adapter_kv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from adapters.format import load_adapter
from model.adapter import AdapterBatch, compute_visual_adapter_kv
from model.image_preprocess import preprocess
from model.loading import load_model
from model.vision import VisionTower
from training.data import alpaca_prompt

REPO = Path(__file__).resolve().parent.parent


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], kvs, max_new: int = 8) -> list[str]:
    """Greedy continuations of every prompt at once (right-padded, whole sequence each step)."""
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    out: list[list[int]] = [[] for _ in rows]
    adapters = AdapterBatch.build(kvs, model.config.n_layers) if kvs is not None else None
    for _ in range(max_new):
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        logits = model(tokens, adapters=adapters, logits_index=torch.tensor([len(r) - 1 for r in rows]))
        for i, t in enumerate(logits.argmax(-1).tolist()):
            if done[i]:
                continue
            if t in tokenizer.stop_ids:
                done[i] = True
            else:
                out[i].append(t)
            rows[i].append(t)
        if all(done):
            break
    return [tokenizer.decode(o).strip() for o in out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="keep data, encoder, adapter, loss curve here (default: a temp dir)")
    p.add_argument("--train", type=int, default=960)
    p.add_argument("--test", type=int, default=60)
    p.add_argument("train_flags", nargs="*", help="extra flags for the training command (after --)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="demo-images-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (work / "encoder" / "config.json").is_file():   # a workdir from an earlier run keeps its data
        subprocess.run([sys.executable, "-m", "training.synthetic_images", "--out", str(work), "--probe",
                        "--train", str(args.train), "--test", str(args.test)], check=True, cwd=REPO)
    data_seconds = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "training", "--data", str(work / "train.jsonl"), "--method",
           "llama-adapter-visual", "--vision-model", str(work / "encoder"),
           "--out", str(work / "adapter.safetensors"), *args.train_flags]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    train_seconds = time.perf_counter() - t0

    loaded = load_model("default")
    tower = VisionTower.from_dir(work / "encoder")
    weights, meta = load_adapter(work / "adapter.safetensors")
    rows = [json.loads(line) for line in (work / "test.jsonl").read_text().splitlines()]
    prompts = [loaded.tokenizer.encode(alpaca_prompt(r["instruction"], r.get("input", ""))) for r in rows]
    t0 = time.perf_counter()
    with torch.no_grad():
        pixels = preprocess([Image.open(work / r["image"]) for r in rows], tower.config)
        features = tower.global_features(pixels, weights.feature_layers)
        kvs = [compute_visual_adapter_kv(loaded.model, weights, f) for f in features]
    base = greedy_answers(loaded.model, loaded.tokenizer, prompts, None)
    tuned = greedy_answers(loaded.model, loaded.tokenizer, prompts, kvs)
    eval_seconds = time.perf_counter() - t0
    base_em = sum(b == r["output"] for b, r in zip(base, rows)) / len(rows)
    tuned_em = sum(t == r["output"] for t, r in zip(tuned, rows)) / len(rows)
    colour_ok = sum(t.split(" ")[0] == r["colour"] for t, r in zip(tuned, rows)) / len(rows)
    shape_ok = sum(t.split(" ")[-1] == r["shape"] for t, r in zip(tuned, rows)) / len(rows)
    for r, b, t in list(zip(rows, base, tuned))[:6]:
        print(f"  {r['output']!r:22} base {b[:40]!r:44} adapter {t!r}")
    print(json.dumps({"held_out_exact_match": {"base": base_em, "adapter": tuned_em},
                      "adapter_colour_right": colour_ok, "adapter_shape_right": shape_ok,
                      "test_examples": len(rows), "train_examples": args.train,
                      "data_and_encoder_seconds": round(data_seconds), "train_seconds": round(train_seconds),
                      "eval_seconds": round(eval_seconds), "steps": meta.extra.get("steps"),
                      "final_eval_loss": meta.extra.get("final_eval_loss")}, indent=2))


if __name__ == "__main__":
    main()
