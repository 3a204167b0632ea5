"""Bench rows for the adapter family (part of `adapter-server bench`, same run as its rows):

(i) the engine: the same requests spread over LoRA adapters (rank 8 on q/v), against (b);
(j) transformers + PEFT LoRA, one batch per adapter (`set_adapter`), against (i);
(k) the engine: a mix of LLaMA-Adapter, LoRA and base rows (thirds), against (b);
(l) cold load per kind: disk → resident in an empty pool (LLaMA-Adapter with its cached K/V file).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from model.lora import LoraWeights

LORA_RANK, LORA_TARGETS = 8, ("q", "v")
GOALS = {"i_over_b": 0.85, "i_over_j": 10.0}


def random_loras(model, n: int, rank: int = LORA_RANK, layers: list[int] | None = None,
                 seed: int = 1) -> list[LoraWeights]:
    """Random q/v LoRAs (default rank 8 on every layer; B non-zero so they change the output)."""
    from model.lora import target_shape  # noqa: PLC0415

    cfg = model.config
    layers = list(layers) if layers is not None else list(range(cfg.n_layers))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a = {t: torch.randn(len(layers), rank, target_shape(cfg, t)[0], generator=g) * 0.02 for t in LORA_TARGETS}
        b = {t: torch.randn(len(layers), target_shape(cfg, t)[1], rank, generator=g) * 0.02 for t in LORA_TARGETS}
        out.append(LoraWeights(layers, rank, 2.0 * rank, False, a, b))
    return out


def measure_kinds(loaded, registry, prompts, llama_refs, sizes, peers: bool, tmp: Path, engine_run,
                  base_tok_s: float) -> dict:
    from adapters.format import metadata_for  # noqa: PLC0415
    from adapters.importers import adapter_file_bytes, export_peft  # noqa: PLC0415
    from adapters.registry import AdapterRegistry  # noqa: PLC0415
    from model.prefix_tuning import PrefixWeights  # noqa: PLC0415

    model, n = loaded.model, sizes.requests
    loras = random_loras(model, sizes.adapters)
    metas = [metadata_for(w, model, "uploaded", fingerprint=loaded.fingerprint) for w in loras]
    lora_refs = [registry.upload(f"lora{i}", adapter_file_bytes(w, m)).ref for i, (w, m) in enumerate(zip(loras, metas))]
    h = engine_run(loaded, registry, prompts, [lora_refs[i % len(lora_refs)] for i in range(n)], sizes.new_tokens)
    mixed = [(llama_refs, lora_refs, [None])[i % 3] for i in range(n)]
    j = engine_run(loaded, registry, prompts, [refs[(i // 3) % len(refs)] for i, refs in enumerate(mixed)],
                   sizes.new_tokens)
    cfg = model.config
    prefix = PrefixWeights(torch.randn(cfg.n_layers, cfg.n_kv_heads, sizes.adapter_len, cfg.head_dim) * 0.1,
                           torch.randn(cfg.n_layers, cfg.n_kv_heads, sizes.adapter_len, cfg.head_dim) * 0.1)
    prefix_ref = registry.upload("prefix0", adapter_file_bytes(
        prefix, metadata_for(prefix, model, "uploaded", fingerprint=loaded.fingerprint))).ref
    cold = AdapterRegistry(registry.store, model, loaded.fingerprint)   # empty pool, same files
    cold_ms = {}
    for kind, ref in (("llama-adapter", llama_refs[0]), ("lora", lora_refs[0]), ("prefix-tuning", prefix_ref)):
        start = time.perf_counter()
        cold.acquire(ref).release()
        cold_ms[kind] = (time.perf_counter() - start) * 1e3
    out = {"lora_tok_s": h["tok_s"], "mixed_tok_s": j["tok_s"], "cold_load_ms": cold_ms,
           "i_over_b": h["tok_s"] / base_tok_s, "k_over_b": j["tok_s"] / base_tok_s}
    if peers:
        dirs = [export_peft(w, m, tmp / "peft-lora" / f"lora{i}") for i, (w, m) in enumerate(zip(loras, metas))]
        out["peft_lora_tok_s"] = peft_lora_rate(Path(loaded.path), prompts, dirs, sizes)
        out["i_over_j"] = h["tok_s"] / out["peft_lora_tok_s"]
    return out


def peft_lora_rate(path: Path, prompts, peft_dirs, sizes) -> float:
    import transformers  # noqa: PLC0415 (dev dependencies, imported only for the bench)
    from peft import PeftModel  # noqa: PLC0415

    from .bench import hf_generate  # noqa: PLC0415

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(hf, str(peft_dirs[0]), adapter_name="lora0").eval()
    for i, d in enumerate(peft_dirs[1:], 1):
        peft.load_adapter(str(d), adapter_name=f"lora{i}")
    groups = [[p for j, p in enumerate(prompts) if j % len(peft_dirs) == i] for i in range(len(peft_dirs))]
    measured = [g for g in groups if g][:sizes.peft_batches]
    hf_generate(peft, measured[0][:1], 2)     # warm-up
    start = time.perf_counter()
    for i, group in enumerate(measured):
        peft.set_adapter(f"lora{i}")
        hf_generate(peft, group, sizes.new_tokens)
    return sum(len(g) for g in measured) * sizes.new_tokens / (time.perf_counter() - start)


def format_kinds(k: dict, sizes: dict) -> list[str]:
    def ratio(key, label):
        if key not in k:
            return ""
        goal = GOALS.get(key)
        verdict = "" if goal is None else f" (goal ≥ {goal:g}: {'ok' if k[key] >= goal else 'BELOW GOAL'})"
        return f"{label} = {k[key]:.2f}{verdict}"

    rows = [(f"(i) engine: {sizes['requests']} requests over {sizes['adapters']} LoRAs (r{LORA_RANK}, q/v)",
             k["lora_tok_s"], ratio("i_over_b", "(i)/(b)")),
            ("(j) transformers+PEFT LoRA, one batch per adapter", k.get("peft_lora_tok_s"),
             ratio("i_over_j", "(i)/(j)")),
            ("(k) engine: LLaMA-Adapter, LoRA and base rows in thirds", k["mixed_tok_s"], ratio("k_over_b", "(k)/(b)"))]
    lines = [f"{label:70s} {value:9.1f}   {note}".rstrip() if value is not None else f"{label:70s} {'–':>9s}"
             for label, value, note in rows]
    lines.append("(l) cold load, disk → resident: " + ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in k["cold_load_ms"].items()))
    return lines
