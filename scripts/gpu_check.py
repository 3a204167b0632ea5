"""GPU readiness check (run through scripts/gpu-check.sh). Prints three figures:

1. equivalence: the engine on --device in --dtype (bfloat16 on CUDA) against the engine on CPU
   in float32, same tiny random model, base and adapter rows: identical greedy tokens and the
   largest logprob difference over the tokens both produced;
2. batch-1 decode tok/s of a random-weight model shaped like LLaMA-7B (32 layers, dim 4096)
   against the memory-bandwidth roofline (weight bytes ÷ a copy bandwidth measured here);
3. --requests concurrent requests over --adapters adapters against all-base, CUDA graphs on
   and off (graphs only exist on CUDA: on CPU both columns run the same eager step);
4. host synchronisations per decode step (CUDA's sync debug mode counts them) over rows that
   sample with temperature, top-k, top-p, repetition penalty and top logprobs: the goal is one,
   the read of the step's sampled tokens.

`--tiny` swaps the 7B shape for a small one, so the whole script runs on a CPU in seconds (a
test does that). Exit status 1 when float32 equivalence (--dtype float32) is not exact.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.registry import AdapterRegistry  # noqa: E402
from adapters.store import AdapterStore  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.fingerprint import base_fingerprint  # noqa: E402
from model.llama import Transformer  # noqa: E402
from model.loading import LoadedModel  # noqa: E402
from server.bench import BenchSizes, engine_run, random_adapters, serve_config, upload_adapters  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.types import EngineConfig, GenerationRequest, SamplingParams  # noqa: E402

SEVEN_B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_dim=11008,
               max_seq_len=4096)
SMALL = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=256, max_seq_len=1024)
TINY = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=160, max_seq_len=256)


def tokenizer():
    """A small byte-level BPE (ids past its vocabulary decode to nothing, so bigger models work)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from model.tokenizer import HFTokenizer

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."] * 4
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return HFTokenizer(tok, special_tokens={"eos_token": "<|im_end|>"})


def random_model(shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(**shape)
    with torch.device(device):
        model = Transformer(cfg).to(device).eval().requires_grad_(False)
    for param in model.parameters():        # weights in dtype; the RoPE tables stay float32
        param.data = param.data.to(dtype)
    return LoadedModel(model, tokenizer(), cfg, base_fingerprint(model), "random", Path("."))


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, min(vocab, 300), (length + i % 7,), generator=g).tolist() for i in range(n)]


def greedy_results(loaded, refs, batch, new_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        registry = AdapterRegistry(AdapterStore(Path(tmp)), loaded.model, loaded.fingerprint)
        names = upload_adapters(loaded, registry, refs)
        engine = Engine(loaded, registry, EngineConfig(max_batch=len(batch), max_seq_len=256))
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        handles = [engine.submit(GenerationRequest(p, params, adapter=names[i % len(names)] if i % 3 else None))
                   for i, p in enumerate(batch)]
        engine.shutdown(graceful=True)
        return [h.wait() for h in handles]


def check_equivalence(device: str, dtype: torch.dtype) -> bool:
    reference = random_model(TINY, "cpu", torch.float32)
    tested = random_model(TINY, device, dtype)
    weights = random_adapters(reference.model, BenchSizes(adapters=2, adapter_len=6, adapter_layers=3,
                                                          concurrency_adapters=2))
    batch = prompts(8, 20, TINY["vocab_size"])
    want = greedy_results(reference, weights, batch, 16)
    got = greedy_results(tested, weights, batch, 16)
    same = sum(a.token_ids == b.token_ids for a, b in zip(want, got))
    diff = 0.0
    for a, b in zip(want, got):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        diff = max([diff] + [abs(x - y) for x, y in zip(a.logprobs[:n + 1], b.logprobs[:n + 1])])
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    ok = diff <= tolerance and (same == len(want) or dtype != torch.float32)
    print(f"[1] {device} {str(dtype).removeprefix('torch.')} vs cpu float32 (tiny model, base + 2 adapters): "
          f"identical greedy tokens in {same}/{len(want)} requests; max |Δ logprob| {diff:.2e} "
          f"(tolerance {tolerance:g}) → {'PASS' if ok else 'FAIL'}")
    return ok


def device_copy_gb_s(device: str, mib: int = 1024) -> float:
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_batch1(loaded, device: str, new_tokens: int) -> None:
    cfg = loaded.config
    weight_bytes = cfg.param_count() * loaded.model.tok_embeddings.weight.element_size()
    bw = device_copy_gb_s(device, 1024 if torch.device(device).type == "cuda" else 64)
    roof = bw * 1e9 / weight_bytes
    prompt = prompts(1, 16, cfg.vocab_size)
    engine_run(loaded, None, prompt, [None], 4, serve_config(loaded, max_batch=1, max_seq_len=512))  # warm-up
    run = engine_run(loaded, None, prompt, [None], new_tokens, serve_config(loaded, max_batch=1, max_seq_len=512))
    print(f"[2] batch-1 decode, {cfg.n_layers} layers × dim {cfg.dim} ({weight_bytes / 1e9:.2f} GB of weights): "
          f"{run['decode_tok_s']:.1f} tok/s; roofline {roof:.1f} tok/s ({bw:.0f} GB/s copy) → "
          f"{run['decode_tok_s'] / roof:.2f} of it")


def check_concurrency(loaded, device: str, requests: int, n_adapters: int, new_tokens: int) -> None:
    sizes = BenchSizes(adapters=n_adapters, concurrency_adapters=n_adapters, adapter_len=10,
                       adapter_layers=loaded.config.n_layers)
    batch = prompts(requests, 24, loaded.config.vocab_size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        registry = AdapterRegistry(AdapterStore(Path(tmp)), loaded.model, loaded.fingerprint)
        refs = upload_adapters(loaded, registry, random_adapters(loaded.model, sizes))
        per_request = [refs[i % len(refs)] for i in range(requests)]
        for graphs in (True, False):
            config = serve_config(loaded, max_batch=max(64, requests), max_seq_len=512, cuda_graphs=graphs)
            engine_run(loaded, registry, batch[:2], per_request[:2], 4, config)     # warm-up (and capture)
            for label, adapters in (("adapters", per_request), ("base", [None] * requests)):
                results[graphs, label] = engine_run(loaded, registry, batch, adapters, new_tokens, config)
    print(f"[3] {requests} concurrent requests × {new_tokens} tokens, tok/s (TTFT p50):")
    for graphs in (True, False):
        a, b = results[graphs, "adapters"], results[graphs, "base"]
        print(f"    CUDA graphs {'on ' if graphs else 'off'}: over {n_adapters} adapters {a['tok_s']:8.1f} "
              f"({a['ttft_p50_s']:.2f} s), all base {b['tok_s']:8.1f} ({b['ttft_p50_s']:.2f} s), "
              f"adapters/base {a['tok_s'] / b['tok_s']:.2f}")
    on, off = results[True, "adapters"]["tok_s"], results[False, "adapters"]["tok_s"]
    print(f"    graphs on / off (adapters): {on / off:.2f}")


def check_syncs(loaded, device: str, steps: int = 8) -> None:
    if torch.device(device).type != "cuda":
        print("[4] host synchronisations per decode step: skipped (CUDA only)")
        return
    engine = Engine(loaded, None, serve_config(loaded, max_seq_len=512))
    kinds = [dict(temperature=0), dict(temperature=0.8, top_k=40), dict(temperature=1.0, top_p=0.9),
             dict(temperature=0.7, repetition_penalty=1.2), dict(temperature=0, top_logprobs=3)]
    batch = prompts(2 * len(kinds), 24, loaded.config.vocab_size)
    handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True,
                                                                 seed=i, **kinds[i % len(kinds)])))
               for i, p in enumerate(batch)]
    while engine.stats().running < len(handles) or any(s.in_prefill for s in engine.scheduler.running):
        engine.step()
    engine.step()      # a first decode step of this batch (graph capture, adapter stacking)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"[4] host synchronisations per decode step ({len(handles)} rows, mixed sampling): "
          f"{len(syncs) / steps:.1f} (goal 1: the read of the sampled tokens)")
    for w in syncs[:5]:
        print(f"    {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}")
    engine.shutdown(graceful=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="small shapes instead of 7B (a smoke test on CPU)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --tiny", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    start = time.perf_counter()
    ok = check_equivalence(args.device, dtype)
    big = random_model(SMALL if args.tiny else SEVEN_B, args.device, dtype)
    check_batch1(big, args.device, args.new_tokens)
    check_concurrency(big, args.device, args.requests, args.adapters, args.new_tokens)
    check_syncs(big, args.device)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
