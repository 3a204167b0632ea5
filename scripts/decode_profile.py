"""Kernels and milliseconds per decode step on the default model (issue 17's "fewer kernels").

    python scripts/decode_profile.py --weights bf16 --threads 2

Prints, for one decode step at context --context (batch 1, 32 base rows, 32 rows over 16
LLaMA-Adapters of 10 prompts on 28 layers): the median and best ms over --iters steps and the
kernels one step launches, counted with torch.profiler as top-level ATen/oneDNN ops that do
work (views, and reshapes or dtype casts that copy nothing, are not counted).
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
          "aten::narrow", "aten::permute", "aten::t", "aten::detach", "aten::_reshape_alias"}
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
    g = torch.Generator().manual_seed(0)
    layers = list(range(max(0, cfg.n_layers - 28), cfg.n_layers))
    kvs = [compute_adapter_kv(model, AdapterWeights(layers, torch.randn(len(layers), 10, cfg.dim, generator=g) * 0.02,
                                                    torch.rand(len(layers), 1, generator=g) * 0.2))
           for _ in range(16)]
    ctx, bs = args.context, 16
    for rows, adapted in ((1, False), (32, False), (32, True)):
        width = -(-(ctx + 1) // bs)
        cache = PagedKVCache.for_model(model, rows * width + 1, bs)
        cache.prepare(range(rows * width + 1))
        tables = torch.arange(rows * width).view(rows, width)
        batch = BatchAdapters.build([((kvs[i % 16], 1.0),) for i in range(rows)], cfg.n_layers) if adapted else None
        tokens, positions = torch.randint(0, 1000, (rows, 1), generator=g), torch.full((rows, 1), ctx)

        def step():
            model(tokens, positions, cache, tables, batch, read_len=ctx + 1)

        with torch.inference_mode():
            for _ in range(3):
                step()
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
        ops = kernels(prof)
        n = sum(ops.values())
        label = f"{rows} rows over 16 adapters" if adapted else f"{rows} row{'s' * (rows > 1)}, base"
        print(f"{args.weights}, {label}: {statistics.median(times) * 1e3:.1f} ms/step (best "
              f"{min(times) * 1e3:.1f}), {n} kernels ({n / cfg.n_layers:.1f} a layer)")
        print("    " + ", ".join(f"{k.split('::')[-1]} {v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
