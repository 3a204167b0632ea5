"""Accuracy of each CPU weight format (`--weights`) against fp32, served by the engine (issue 17).

    python scripts/weight_accuracy.py --adapter /tmp/demo/adapter.safetensors [--modes fp32 bf16 ...]

For every mode, against the fp32 load of the same checkpoint:

- greedy agreement over --prompts chat prompts × --new-tokens tokens (EOS ignored): per prompt,
  the share of its tokens equal to fp32's up to the first one that differs ("prefix"), averaged;
  and the share of prompts whose tokens all equal fp32's ("identical");
- mean |Δ logprob| of fp32's generated tokens, teacher-forced: every mode scores the same
  sequences (prompt + fp32's tokens, as prompt logprobs), so the comparison is like for like;
  with the top-1 agreement of that pass (positions where the mode's most likely token is fp32's);
- held-out exact match on the synthetic task (training/synthetic.py) served with a trained
  adapter (--adapter, e.g. the one tests/demo_train_default.py trains), greedy as the demo
  scores it; --task-data names the held-out rows (default: the demo's split, regenerated).

Every request of a measurement runs in one engine batch, so a mode takes seconds to a minute.
Accuracy does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# This checkout's packages, not an installed copy (a script's own directory comes first on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.registry import AdapterRegistry  # noqa: E402
from adapters.store import AdapterStore  # noqa: E402
from model.loading import LoadedModel, load_model  # noqa: E402
from model.weight_modes import WEIGHT_CHOICES  # noqa: E402
from server.bench import batch_config, run_to_completion, story_prompts  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.types import GenerationRequest, SamplingParams  # noqa: E402
from training.data import alpaca_prompt, read_records  # noqa: E402
from training.synthetic import generate  # noqa: E402

# The demo's split (tests/demo_train_default.py: 300 train, 100 test, seed 0) and answer length.
DEMO_SPLIT = (300, 100, 0)
TASK_NEW_TOKENS = 24


def serve_mode(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int,
               scored: list[list[int]] | None, task: list[tuple[list[int], str]], adapter: Path | None,
               task_new_tokens: int, store: Path) -> dict:
    """One mode's outputs: greedy tokens for `prompts`; logprobs (and top-1 ids) of the last
    `new_tokens` tokens of each `scored` sequence (default: the prompts + this mode's own tokens);
    answers to the `task` prompts with `adapter`."""
    registry = AdapterRegistry(AdapterStore(store), loaded.model, loaded.fingerprint)
    ref = registry.upload("task", adapter.read_bytes()).ref if adapter is not None else None
    # No prefix cache: every sequence is computed afresh, as every other mode computes it.
    engine = Engine(loaded, registry, batch_config(loaded, max(len(prompts), len(task)), prefix_caching=False))
    try:
        greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        tokens = [r.token_ids for r in run_to_completion(engine, [GenerationRequest(p, greedy) for p in prompts])]
        scored = scored or [p + t for p, t in zip(prompts, tokens)]
        score = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
        tails = [r.prompt_logprobs[-new_tokens:]
                 for r in run_to_completion(engine, [GenerationRequest(s, score) for s in scored])]
        answer = SamplingParams(max_new_tokens=task_new_tokens, temperature=0)
        answers = [r.text.strip() for r in run_to_completion(
            engine, [GenerationRequest(p, answer, adapter=ref) for p, _ in task])] if ref else []
    finally:
        engine.shutdown(graceful=False)
    return {"tokens": tokens, "scored": scored, "logprobs": [[lp for lp, _ in t] for t in tails],
            "top1": [[top[0][0] for _, top in t] for t in tails], "answers": answers}


def compare(ref: dict, got: dict, task: list[tuple[list[int], str]]) -> dict:
    """`got`'s figures against the fp32 reference `ref` (both from serve_mode)."""
    out = {}
    if ref["tokens"]:
        prefixes = []
        for a, b in zip(ref["tokens"], got["tokens"]):
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            prefixes.append(same / len(a))
        deltas = [abs(x - y) for a, b in zip(ref["logprobs"], got["logprobs"]) for x, y in zip(a, b)]
        chosen = [s[-len(t):] for s, t in zip(ref["scored"], got["top1"])]
        top1 = [x == y for a, b in zip(chosen, got["top1"]) for x, y in zip(a, b)]
        out = {"greedy_prefix_agreement": statistics.mean(prefixes),
               "greedy_identical_prompts": sum(p == 1.0 for p in prefixes) / len(prefixes),
               "mean_abs_delta_logprob": statistics.mean(deltas), "max_abs_delta_logprob": max(deltas),
               "teacher_forced_top1_agreement": sum(top1) / len(top1)}
    if got["answers"]:
        out["task_exact_match"] = sum(a == e for a, (_, e) in zip(got["answers"], task)) / len(task)
    return out


def measure_accuracy(reference: LoadedModel, load: Callable[[str], LoadedModel], modes: Sequence[str],
                     prompts: list[list[int]], new_tokens: int, task: Sequence[tuple[list[int], str]] = (),
                     adapter: Path | None = None, task_new_tokens: int = TASK_NEW_TOKENS) -> dict[str, dict]:
    """Each mode's figures against `reference` (the checkpoint loaded in fp32); `load(mode)`
    loads it in a mode. An "fp32" row is a load and run of its own: fp32's reproducibility."""
    task = list(task)
    with tempfile.TemporaryDirectory(prefix="weight-accuracy-") as tmp:
        ref = serve_mode(reference, prompts, new_tokens, None, task, adapter, task_new_tokens,
                         Path(tmp) / "reference")
        return {mode: compare(ref, serve_mode(load(mode), prompts, new_tokens, ref["scored"], task, adapter,
                                              task_new_tokens, Path(tmp) / mode), task)
                for mode in modes}


def format_accuracy(report: dict[str, dict], n_prompts: int, new_tokens: int, n_task: int) -> list[str]:
    lines = [f"{'mode':6s} {'greedy prefix':>13s} {'identical':>9s} {'mean |Δlp|':>10s} {'max |Δlp|':>9s} "
             f"{'top-1 (tf)':>10s} {'task EM':>7s}"]
    for mode, r in report.items():
        em = f"{r['task_exact_match']:7.0%}" if "task_exact_match" in r else "      –"
        greedy = (f"{r['greedy_prefix_agreement']:13.3f} {r['greedy_identical_prompts']:9.0%} "
                  f"{r['mean_abs_delta_logprob']:10.4f} {r['max_abs_delta_logprob']:9.3f} "
                  f"{r['teacher_forced_top1_agreement']:10.3f}" if n_prompts else f"{'–':>13s} {'–':>9s} "
                  f"{'–':>10s} {'–':>9s} {'–':>10s}")
        lines.append(f"{mode:6s} {greedy} {em}")
    lines.append(f"against fp32: {n_prompts} prompts × {new_tokens} greedy tokens; |Δlp| and top-1 teacher-forced "
                 f"on fp32's tokens" + (f"; task EM: {n_task} held-out synthetic examples with the adapter"
                                        if n_task else ""))
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' or any load_model spec")
    p.add_argument("--modes", nargs="+", choices=WEIGHT_CHOICES, default=list(WEIGHT_CHOICES))
    p.add_argument("--adapter", type=Path, help="adapter trained on the synthetic task (no task row without it)")
    p.add_argument("--task-data", type=Path, help="held-out rows (JSONL: instruction, input, output; "
                                                  "default: the demo's split)")
    p.add_argument("--prompts", type=int, default=100, help="greedy prompts (0: the task row only)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_records(args.task_data) if args.task_data else generate(*DEMO_SPLIT)[1]

    def load(mode: str) -> LoadedModel:
        return load_model(args.model, weights=mode)

    reference = load("fp32")
    tokenizer = reference.tokenizer
    prompts = story_prompts(tokenizer, args.prompts)
    task = [(tokenizer.encode(alpaca_prompt(r["instruction"], r.get("input", ""))), r["output"])
            for r in rows] if args.adapter else []
    report = measure_accuracy(reference, load, args.modes, prompts, args.new_tokens, task, args.adapter)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(format_accuracy(report, len(prompts), args.new_tokens, len(task))))


if __name__ == "__main__":
    main()
