"""Kernels and milliseconds per decode step on the default model (issue 17's "fewer kernels").

    python scripts/decode_profile.py --weights bf16 --threads 2

Prints, for one decode step from context --context on (batch 1, 32 base rows, 32 rows over 16
LLaMA-Adapters of 10 prompts on 28 layers; through the KV cache's decode rows, as the engine
runs it): the median and best ms over --iters steps and the kernels one step launches, counted
with torch.profiler as top-level ATen/oneDNN ops that do work (views, and reshapes or dtype
casts that copy nothing, are not counted), plus the calls into the fused CPU kernels
(model/native_ops.py, named fused::…), which the profiler does not see.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# This checkout's packages, not an installed copy (a script's own directory comes first on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.adapter import AdapterWeights, compute_adapter_kv  # noqa: E402
from model.batch_adapters import BatchAdapters  # noqa: E402
from model.kv_cache import PagedKVCache  # noqa: E402
from model.loading import load_model  # noqa: E402
from model.weight_modes import WEIGHT_CHOICES  # noqa: E402

_VIEWS = {"aten::view", "aten::transpose", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
          "aten::split", "aten::split_with_sizes", "aten::alias", "aten::expand", "aten::as_strided",
          "aten::narrow", "aten::permute", "aten::t", "aten::detach", "aten::_reshape_alias",
          # allocations (the fused kernels' outputs): no work of their own
          "aten::empty", "aten::empty_like", "aten::empty_strided"}
_MAYBE_COPY = {"aten::to", "aten::reshape", "aten::contiguous", "aten::type_as", "aten::float"}


def _copies(event) -> bool:
    return any(c.name in ("aten::copy_", "aten::_to_copy", "aten::clone") or _copies(c) for c in event.cpu_children)


def kernels(prof) -> Counter:
    ops = Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if parent is not None and parent.name.startswith(("aten::", "mkldnn::")):
            continue            # inside another op: part of it
        if not e.name.startswith(("aten::", "mkldnn::")) or e.name in _VIEWS:
            continue
        if e.name in _MAYBE_COPY and not _copies(e):
            continue
        ops[e.name] += 1
    return ops


class CountingKernels:
    """Stands in for the fused kernels module, counting its calls."""

    def __init__(self, ops):
        self.ops, self.calls = ops, Counter()

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def call(*args):
            self.calls[f"fused::{name}"] += 1
            return fn(*args)
        return call


def count_fused_calls(model) -> Counter:
    """Route every module's fused kernels through one counter → its (live) call counts."""
    counting = None
    for m in model.modules():
        if getattr(m, "kernels", None) is not None:
            counting = counting or CountingKernels(m.kernels)
            m.kernels = counting
    return counting.calls if counting is not None else Counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="bf16")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--context", type=int, default=100, help="tokens already cached per row")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("default", weights=args.weights)
    model, cfg = loaded.model, loaded.config
    fused = count_fused_calls(model)
    g = torch.Generator().manual_seed(0)
    layers = list(range(max(0, cfg.n_layers - 28), cfg.n_layers))
    kvs = [compute_adapter_kv(model, AdapterWeights(layers, torch.randn(len(layers), 10, cfg.dim, generator=g) * 0.02,
                                                    torch.rand(len(layers), 1, generator=g) * 0.2))
           for _ in range(16)]
    ctx, bs = args.context, 16
    for rows, adapted in ((1, False), (32, False), (32, True)):
        width = -(-(ctx + args.iters + 5) // bs)      # every step adds a token
        # Blocks to spare: the decode rows reserve what the pool does, in widths of 64 tokens.
        cache = PagedKVCache.for_model(model, rows * (width + 4) + 1, bs)
        cache.prepare(range(rows * width + 1))
        tables = torch.arange(rows * width).view(rows, width)
        batch = BatchAdapters.build([((kvs[i % 16], 1.0),) for i in range(rows)], cfg.n_layers) if adapted else None
        tokens = torch.randint(0, 1000, (rows, 1), generator=g)
        seqs, table_lists, length = [object() for _ in range(rows)], tables.tolist(), [ctx]

        def step():
            # As the engine's CPU decode runs: through the cache's decode rows, each step one
            # token longer (the rows hold the same sequences, so only the new token is copied).
            assert cache.decode_rows.place(seqs, table_lists, [length[0]] * rows) is not None
            cache.decode_rows.active = True
            try:
                model(tokens, torch.full((rows, 1), length[0]), cache, tables, batch, read_len=length[0] + 1)
            finally:
                cache.decode_rows.active = False
            length[0] += 1

        with torch.inference_mode():
            for _ in range(3):
                step()
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            fused.clear()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
        ops = kernels(prof) + fused
        n = sum(ops.values())
        label = f"{rows} rows over 16 adapters" if adapted else f"{rows} row{'s' * (rows > 1)}, base"
        print(f"{args.weights}, {label}: {statistics.median(times) * 1e3:.1f} ms/step (best "
              f"{min(times) * 1e3:.1f}), {n} kernels ({n / cfg.n_layers:.1f} a layer)")
        print("    " + ", ".join(f"{k.removeprefix('aten::').removeprefix('mkldnn::')} {v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
