"""`adapter-server bench --only modes`: the engine in every CPU weight format (`--weights`), one
after another in one process, each row with its peers' numbers from the same run:

(e) batch-1 decode, (a) the requests over the adapters, (b) the same requests on the base model,
and the process's resident memory after loading the mode and at its peak while it ran (the
peak is reset before each mode's load: Linux's /proc/self/clear_refs). llama.cpp's batch-1 on
the model's GGUF (when llama-cpp-python is installed) runs before the first mode and after the
last: (e)/llama.cpp divides by their mean, and the two readings show how steady the machine was.
A mode the checkpoint cannot be loaded in (gguf without a .gguf file) is listed as skipped.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from pathlib import Path

from model.weight_modes import WEIGHT_CHOICES


def rss_mib() -> tuple[float, float]:
    """(resident, peak resident) MiB of this process, from /proc/self/status (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) over from the current RSS; a no-op where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure_modes(spec: str, sizes, peers: bool, repeats: int = 1) -> dict:
    from adapters.registry import AdapterRegistry  # noqa: PLC0415
    from adapters.store import AdapterStore  # noqa: PLC0415
    from model.loaders import CheckpointError  # noqa: PLC0415
    from model.loading import load_model  # noqa: PLC0415

    from .bench import (engine_run, gguf_of, llama_cpp_batch1, random_adapters,  # noqa: PLC0415
                        story_prompts, upload_adapters)

    rows, llama_cpp, name, gguf, prompt = [], [], None, None, None
    for mode in WEIGHT_CHOICES:
        reset_peak_rss()
        try:
            loaded = load_model(spec, weights=mode)
        except CheckpointError as e:
            rows.append({"weights": mode, "skipped": str(e)})
            continue
        name, rss_loaded = loaded.name, rss_mib()[0]
        prompts = story_prompts(loaded.tokenizer, sizes.requests)
        if peers and gguf is None:
            gguf, prompt = gguf_of(Path(loaded.path)), prompts[0]
            if gguf is not None:
                llama_cpp.append(llama_cpp_batch1(gguf, prompt, sizes.new_tokens))
        with tempfile.TemporaryDirectory(prefix="adapter-server-bench-") as tmp:
            registry = AdapterRegistry(AdapterStore(Path(tmp) / "store"), loaded.model, loaded.fingerprint)
            refs = upload_adapters(loaded, registry, random_adapters(loaded.model, sizes)[:sizes.adapters])
            per_request = [refs[i % sizes.adapters] for i in range(sizes.requests)]
            engine_run(loaded, registry, prompts[:2], per_request[:2], 4)     # warm-up
            a = max(engine_run(loaded, registry, prompts, per_request, sizes.new_tokens)["tok_s"]
                    for _ in range(repeats))
            b = max(engine_run(loaded, registry, prompts, [None] * sizes.requests, sizes.new_tokens)["tok_s"]
                    for _ in range(repeats))
            e = engine_run(loaded, registry, prompts[:1], [None], sizes.new_tokens)["decode_tok_s"]
        rows.append({"weights": mode, "batch1_decode_tok_s": e, "adapters_tok_s": a, "base_tok_s": b,
                     "rss_loaded_mib": rss_loaded, "rss_peak_mib": rss_mib()[1]})
        del loaded, registry
        gc.collect()
    if gguf is not None:
        llama_cpp.append(llama_cpp_batch1(gguf, prompt, sizes.new_tokens))
    out = {"model": name, "sizes": {k: getattr(sizes, k) for k in ("requests", "adapters", "new_tokens")},
           "repeats": repeats, "modes": rows}
    if llama_cpp and None not in llama_cpp:
        out["llama_cpp_batch1_decode_tok_s"] = llama_cpp      # before the modes, after them
    return out


def format_modes(r: dict, threads: int) -> list[str]:
    s = r["sizes"]
    lc = r.get("llama_cpp_batch1_decode_tok_s")
    lines = [f"adapter-server bench --only modes: {r['model']}, {threads} threads; (a) {s['requests']} requests "
             f"over {s['adapters']} adapters, (b) the same on the base model, (e) batch 1; "
             f"{s['new_tokens']} new tokens each",
             f"{'--weights':10s} {'(e) tok/s':>10s} {'(e)/llama.cpp':>13s} {'(a) tok/s':>10s} {'(b) tok/s':>10s} "
             f"{'(a)/(b)':>8s} {'RSS loaded / peak MiB':>22s}"]
    for row in r["modes"]:
        if "skipped" in row:
            lines.append(f"{row['weights']:10s} skipped: {row['skipped']}")
            continue
        vs = f"{row['batch1_decode_tok_s'] / statistics.mean(lc):13.2f}" if lc else f"{'–':>13s}"
        lines.append(f"{row['weights']:10s} {row['batch1_decode_tok_s']:10.1f} {vs} {row['adapters_tok_s']:10.1f} "
                     f"{row['base_tok_s']:10.1f} {row['adapters_tok_s'] / row['base_tok_s']:8.2f} "
                     f"{row['rss_loaded_mib']:10.0f} / {row['rss_peak_mib']:<9.0f}")
    lines.append(f"llama.cpp batch-1 on the GGUF: {lc[0]:.1f} tok/s before the modes, {lc[1]:.1f} after" if lc
                 else "llama.cpp batch-1 (skipped: no llama-cpp-python, no GGUF, or --no-peers)")
    return lines
