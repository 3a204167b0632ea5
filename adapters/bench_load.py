"""Adapter load benchmark: disk → K/V resident and ready, through the real store and registry.

Two paths are timed, each with a fresh registry (empty pool) per repetition, files in the page
cache:
  * cached:   the version's precomputed K/V file is read (what every load after the upload does);
  * computed: no K/V file, so the adapter file is hashed, parsed, and run through wk/wv.
`python -m adapters.bench_load` runs it for the default model's shape and a 7B shape.
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

from adapters.format import metadata_for
from adapters.importers import adapter_file_bytes
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from model.adapter import AdapterWeights
from model.config import ModelConfig
from model.fingerprint import base_fingerprint
from model.llama import Transformer

# Attention shapes only: the load path never touches embeddings or FFNs.
SHAPES = {
    "default": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3),     # SmolLM2-135M
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32),       # LLaMA-7B
}


@dataclass
class LoadBenchResult:
    shape: str
    n_layers: int
    dim: int
    adapter_len: int
    adapted_layers: int
    dtype: str
    adapter_file_bytes: int
    kv_bytes: int                 # device memory one resident adapter takes in the pool
    cached_load_ms: float         # median
    computed_load_ms: float       # median
    repeats: int


def attention_only_model(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    """A model of the given shape whose wk/wv are real random weights and everything else is on
    the meta device (a 7B model's other weights would not fit next to other work here)."""
    cfg = ModelConfig(vocab_size=32, ffn_dim=32, max_seq_len=16, **SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for lin in (layer.attention.wk, layer.attention.wv):
            w = torch.empty(lin.out_features, lin.in_features, dtype=dtype)
            lin.weight = torch.nn.Parameter(w.normal_(0, 0.02, generator=gen), requires_grad=False)
    return model.eval()


def bench_adapter_load(model, adapter_len: int = 10, adapted_layers: int | None = None,
                       repeats: int = 10, shape: str = "custom") -> LoadBenchResult:
    cfg = model.config
    n_adapted = adapted_layers or cfg.n_layers - 2
    weights = AdapterWeights(list(range(cfg.n_layers - n_adapted, cfg.n_layers)),
                             torch.randn(n_adapted, adapter_len, cfg.dim) * 0.02,
                             torch.rand(n_adapted, 1))
    fingerprint = base_fingerprint(model)
    data = adapter_file_bytes(weights, metadata_for(weights, model, "uploaded", fingerprint=fingerprint))
    with tempfile.TemporaryDirectory() as d:
        store = AdapterStore(Path(d))
        info = AdapterRegistry(store, model, fingerprint).upload("bench", data)
        kv_files = list(store.path(info).parent.glob("kv-*"))

        def timed_load() -> tuple[float, int]:
            registry = AdapterRegistry(store, model, fingerprint)
            start = time.perf_counter()
            with registry.acquire("bench") as lease:
                elapsed = time.perf_counter() - start
                return elapsed, lease.kv.nbytes()

        cached, sizes = zip(*(timed_load() for _ in range(repeats)), strict=True)
        computed = []
        for _ in range(max(2, repeats // 4)):     # the slow path; fewer repetitions
            for p in kv_files:
                p.unlink()                        # (each computed load writes it again)
            computed.append(timed_load()[0])
    dtype = model.tok_embeddings.weight.dtype
    return LoadBenchResult(shape, cfg.n_layers, cfg.dim, adapter_len, n_adapted,
                           str(dtype).removeprefix("torch."), len(data), sizes[0],
                           statistics.median(cached) * 1e3, statistics.median(computed) * 1e3, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=(*SHAPES, "all"), default="all")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (1 avoids OpenMP "
                                                     "barrier stalls on an oversubscribed CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for shape in SHAPES if args.shape == "all" else (args.shape,):
        torch.manual_seed(0)
        result = bench_adapter_load(attention_only_model(shape), repeats=args.repeats, shape=shape)
        print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
