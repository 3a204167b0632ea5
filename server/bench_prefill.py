"""Bench rows for prompt processing (part of `adapter-server bench`; alone with `--only prefill`):

(o) one prefill chunk of 512 and of 2,048 tokens (`prefill_rows` prompts of equal length, each
    with its own adapter, all in one engine step; the step samples one token per row): prompt
    tokens/s against the compute roofline at the chunk's mean context, and against transformers'
    forward on the same tokens (base model, no adapters, logits at the last position only; in
    bfloat16 when the engine's weights are bf16, else float32);
(p) TTFT p50/p95 of 32 concurrent requests with 400-token prompts over the concurrency
    adapters, serve's default engine, 32 new tokens each (the prefill-heavy load of issue 18).

Prompts are random token ids, distinct per request, so the prefix cache never serves them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

GOALS = {"o_over_compute_roofline": 0.5}


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Distinct random prompts (ids from 100 up: clear of the special tokens at the vocabulary's start)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size, (n, length), generator=g).tolist()


def measure_prefill(loaded, registry, refs, sizes, machine: dict, peers: bool, repeats: int) -> dict:
    from .bench import engine_run, rooflines, serve_config  # noqa: PLC0415 (bench imports this module)
    from .types import EngineConfig  # noqa: PLC0415

    model, vocab = loaded.model, loaded.config.vocab_size
    rows = sizes.prefill_rows
    hf = transformers_model(loaded) if peers else None
    chunks = []
    for chunk in sizes.prefill_chunks:
        length = chunk // rows
        prompts = random_prompts(rows, length, vocab, seed=chunk)
        config = EngineConfig(max_batch=rows, max_queue=rows, max_tokens_per_step=rows * length,
                              max_seq_len=length + 1, prefix_caching=False)
        adapters = [refs[i % len(refs)] for i in range(rows)]
        # The first run also warms oneDNN's kernels for these shapes.
        wall = min(engine_run(loaded, registry, prompts, adapters, 1, config)["wall_s"]
                   for _ in range(max(2, repeats)))
        row = {"chunk_tokens": rows * length, "rows": rows, "ms": wall * 1e3,
               "tok_s": rows * length / wall,
               "compute_roofline_tok_s": rooflines(model, machine, length / 2, loaded.weights)["compute_tok_s"]}
        if hf is not None:
            row["transformers_tok_s"] = rows * length / transformers_forward_s(hf, prompts, max(2, repeats))
        chunks.append(row)
    prompts = random_prompts(sizes.ttft_requests, sizes.ttft_prompt_tokens, vocab, seed=1)
    ttft = engine_run(loaded, registry, prompts, [refs[i % sizes.concurrency_adapters] for i in range(len(prompts))],
                      sizes.ttft_new_tokens, serve_config(loaded))
    return {"chunks": chunks, "ttft": {"requests": len(prompts), "prompt_tokens": sizes.ttft_prompt_tokens,
                                       "new_tokens": sizes.ttft_new_tokens, **ttft}}


def transformers_model(loaded):
    """The HF model in the engine's weight precision where transformers has it (bf16), else fp32."""
    import transformers  # noqa: PLC0415 (dev dependency, imported only for the bench)

    from .bench import hf_dir_of  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    dtype = torch.bfloat16 if loaded.weights == "bf16" else torch.float32
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir_of(Path(loaded.path)), dtype=dtype).eval()


def transformers_forward_s(hf, prompts: list[list[int]], repeats: int) -> float:
    """Best wall time of one transformers forward over the prompts as one batch."""
    ids = torch.tensor(prompts)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):        # the first is a warm-up
            start = time.perf_counter()
            hf(input_ids=ids, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return best


def prefill_ratios(p: dict) -> dict:
    out = {}
    for row in p["chunks"]:
        n = row["chunk_tokens"]
        out[f"o{n}_over_compute_roofline"] = row["tok_s"] / row["compute_roofline_tok_s"]
        if "transformers_tok_s" in row:
            out[f"o{n}_over_transformers"] = row["tok_s"] / row["transformers_tok_s"]
    return out


def format_prefill(p: dict, weights: str | None) -> list[str]:
    goal = GOALS["o_over_compute_roofline"]
    lines = [f"(o) prefill: one chunk, {p['chunks'][0]['rows']} prompts over as many adapters "
             f"(prompt tok/s; transformers: base model, {'bf16' if weights == 'bf16' else 'fp32'}, same tokens):"]
    for row in p["chunks"]:
        ratio = row["tok_s"] / row["compute_roofline_tok_s"]
        peer = (f", transformers {row['transformers_tok_s']:.0f} tok/s → ×{row['tok_s'] / row['transformers_tok_s']:.2f}"
                if "transformers_tok_s" in row else "")
        lines.append(f"    {row['chunk_tokens']:5d} tokens: {row['ms']:8.0f} ms, {row['tok_s']:7.1f} tok/s = "
                     f"{ratio:.2f} of the compute roofline {row['compute_roofline_tok_s']:.0f} tok/s "
                     f"(goal ≥ {goal:g}: {'ok' if ratio >= goal else 'BELOW GOAL'}){peer}")
    t = p["ttft"]
    lines.append(f"(p) TTFT, {t['requests']} concurrent {t['prompt_tokens']}-token prompts over adapters, serve's "
                 f"default engine, {t['new_tokens']} new tokens: p50 {t['ttft_p50_s']:.2f} s, "
                 f"p95 {t['ttft_p95_s']:.2f} s, {t['tok_s']:.1f} generated tok/s")
    return lines
