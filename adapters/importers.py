"""Importers from other adapter formats, and export back to PEFT.

* HF PEFT `adaption_prompt` folders: `adapter_config.json` + `adapter_model.safetensors`, one
  adapter at the top level ("default") and/or one per subfolder (what `save_pretrained` writes
  for several named adapters). Gates are PEFT's scalars, used as is. Pickled
  `adapter_model.bin` files are refused: never unpickle untrusted data.
* Official LLaMA-Adapter v1 release checkpoints (`.pth`, read with `weights_only=True`):
  `adapter_query.weight` [L·K, dim] holds the prompts of the top L layers in order, and
  `layers.{i}.attention.gate` [1, H, 1, 1] the raw per-head gates, which the training code
  used as tanh(gate); we store the effective gate (tanh applied unless `raw_gate`).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.format import AdapterMetadata, save_adapter
from adapters.validation import AdapterValidationError, read_safetensors_header
from model.adapter import AdapterWeights
from model.config import ModelConfig

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PEFT_DEFAULT = "default"
_PEFT_KEY = re.compile(r"^(?:.+\.)?layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")
_PEFT_PREFIX = "base_model.model.model."
_OFFICIAL_PROMPTS = "adapter_query.weight"
_OFFICIAL_GATE = re.compile(r"^layers\.(\d+)\.attention\.gate$")


class AdapterImportError(ValueError):
    """A source checkpoint cannot be imported; the message says why."""


@dataclass
class ImportedAdapter:
    label: str                     # PEFT adapter name ("default", subfolder) or checkpoint stem
    weights: AdapterWeights
    source: str                    # "imported:peft" | "imported:llama-adapter"
    extra: dict[str, Any] = field(default_factory=dict)   # provenance, stored in the file


# ---- PEFT ------------------------------------------------------------------------------------
def find_peft_adapters(src: str | Path) -> dict[str, Path]:
    """PEFT adapter folders in `src`: itself ("default") and/or its subfolders (by name)."""
    src = Path(src)
    if not src.is_dir():
        raise AdapterImportError(f"{src}: a PEFT adapter is a directory with {PEFT_CONFIG}")
    found = {PEFT_DEFAULT: src} if (src / PEFT_CONFIG).is_file() else {}
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        if (sub / PEFT_CONFIG).is_file():
            found[sub.name] = sub
    if not found:
        raise AdapterImportError(f"{src}: no {PEFT_CONFIG} in it or in its subdirectories")
    return found


def import_peft(src: str | Path, cfg: ModelConfig, only: str | None = None) -> list[ImportedAdapter]:
    """Every adaption-prompt adapter in a PEFT folder (or just the one named `only`)."""
    found = find_peft_adapters(src)
    if only is not None:
        if only not in found:
            raise AdapterImportError(f"{src}: no PEFT adapter {only!r} (found: {', '.join(found)})")
        found = {only: found[only]}
    return [_import_peft_dir(label, path, cfg) for label, path in found.items()]


def _import_peft_dir(label: str, folder: Path, cfg: ModelConfig) -> ImportedAdapter:
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise AdapterImportError(f"{folder / PEFT_CONFIG}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "ADAPTION_PROMPT":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterImportError(
            f"{folder}: PEFT type {kind!r} is not an adaption prompt (LLaMA-Adapter) adapter")
    if config.get("target_modules", "self_attn") != "self_attn":
        raise AdapterImportError(
            f"{folder}: target_modules {config.get('target_modules')!r}: only LLaMA 'self_attn' is supported")
    k_len, n_adapted = config.get("adapter_len"), config.get("adapter_layers")
    if not all(isinstance(x, int) and x > 0 for x in (k_len, n_adapted)):
        raise AdapterImportError(f"{folder}: adapter_len / adapter_layers missing or not positive integers")
    weights_path = folder / PEFT_WEIGHTS
    if not weights_path.is_file():
        if (folder / PEFT_PICKLE).is_file():
            raise AdapterImportError(
                f"{folder / PEFT_PICKLE} is a pickle, which is never loaded (it can run code). Convert it "
                f"to {PEFT_WEIGHTS} where you trust it, e.g. by loading it with PEFT and calling "
                "save_pretrained(dir, safe_serialization=True)")
        raise AdapterImportError(f"{folder}: {PEFT_WEIGHTS} missing")
    try:
        read_safetensors_header(weights_path)
    except AdapterValidationError as e:
        raise AdapterImportError(f"{weights_path}: {e}") from None
    prompts: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():
            m = _PEFT_KEY.match(key)
            if not m:
                raise AdapterImportError(f"{weights_path}: unexpected tensor {key!r}")
            (prompts if m.group(2) == "prompt" else gates)[int(m.group(1))] = f.get_tensor(key)
    layers = sorted(prompts)
    if sorted(gates) != layers:
        raise AdapterImportError(f"{weights_path}: prompt layers {layers} and gate layers {sorted(gates)} differ")
    top = list(range(cfg.n_layers - n_adapted, cfg.n_layers))
    if layers != top:
        raise AdapterImportError(
            f"{weights_path}: adapted layers {layers} are not the top {n_adapted} of this "
            f"{cfg.n_layers}-layer model (was it made for another model?)")
    for i in layers:
        p, g = prompts[i], gates[i]
        if p.dim() == 3 and p.shape[0] == 1:
            prompts[i] = p = p[0]
        if tuple(p.shape) != (k_len, cfg.dim):
            raise AdapterImportError(
                f"{weights_path}: layer {i} prompt shape {tuple(p.shape)} != ({k_len}, {cfg.dim})")
        if g.numel() != 1:
            raise AdapterImportError(f"{weights_path}: layer {i} gate has {g.numel()} values, PEFT's is one")
    weights = AdapterWeights(
        layers, torch.stack([prompts[i].float() for i in layers]),
        torch.stack([gates[i].float().reshape(1) for i in layers]))
    provenance = {k: config.get(k) for k in ("base_model_name_or_path", "peft_version", "revision")
                  if config.get(k) is not None}
    return ImportedAdapter(label, weights, "imported:peft",
                           {"imported_from": "peft", "peft_adapter": label, **provenance})


def export_peft(weights: AdapterWeights, meta: AdapterMetadata, out_dir: str | Path) -> Path:
    """Write a PEFT `adaption_prompt` folder that `PeftModel.from_pretrained` loads."""
    out = Path(out_dir)
    n, l_count = meta.base_n_layers, len(weights.layers)
    if list(weights.layers) != list(range(n - l_count, n)):
        raise AdapterImportError(
            f"PEFT adapts exactly the top layers; this adapter's layers {list(weights.layers)} "
            f"are not the top {l_count} of {n}")
    gates = weights.gates
    if gates.shape[1] > 1:
        if not torch.equal(gates, gates[:, :1].expand_as(gates)):
            raise AdapterImportError("this adapter has per-head gates; PEFT stores one gate per layer")
        gates = gates[:, :1]
    if (out / PEFT_CONFIG).exists() or (out / PEFT_WEIGHTS).exists():
        raise AdapterImportError(f"{out} already holds a PEFT adapter; choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, layer in enumerate(weights.layers):
        tensors[f"{_PEFT_PREFIX}layers.{layer}.self_attn.adaption_prompt"] = \
            weights.prompts[i].detach().float().unsqueeze(0).contiguous()
        tensors[f"{_PEFT_PREFIX}layers.{layer}.self_attn.adaption_gate"] = \
            gates[i].detach().float().reshape(1).contiguous()
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "target_modules": "self_attn",
        "adapter_len": weights.adapter_len, "adapter_layers": l_count,
        "base_model_name_or_path": meta.extra.get("base_model_name_or_path"),
        "inference_mode": True, "revision": None, "auto_mapping": None,
    }
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---- official LLaMA-Adapter v1 ---------------------------------------------------------------
def import_llama_adapter(path: str | Path, cfg: ModelConfig, adapter_len: int = 10,
                         raw_gate: bool = False) -> ImportedAdapter:
    path = Path(path)
    if adapter_len < 1:
        raise AdapterImportError(f"--adapter-len must be positive, got {adapter_len}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterImportError(f"{path}: no such file") from None
    except Exception as e:   # weights_only refuses arbitrary objects; torch raises various types
        raise AdapterImportError(
            f"{path}: not loadable as plain tensors (weights_only=True; pickled objects are never "
            f"loaded): {e}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):   # training checkpoints wrap it
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or _OFFICIAL_PROMPTS not in ckpt:
        raise AdapterImportError(f"{path}: no {_OFFICIAL_PROMPTS!r}; not a LLaMA-Adapter v1 checkpoint")
    gate_by_layer: dict[int, torch.Tensor] = {}
    for key, value in ckpt.items():
        m = _OFFICIAL_GATE.match(key)
        if m:
            gate_by_layer[int(m.group(1))] = value
        elif key != _OFFICIAL_PROMPTS:
            raise AdapterImportError(
                f"{path}: unexpected key {key!r} (only LLaMA-Adapter v1 adapters are supported)")
    query = ckpt[_OFFICIAL_PROMPTS]
    if not isinstance(query, torch.Tensor) or query.dim() != 2 or query.shape[1] != cfg.dim:
        shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise AdapterImportError(f"{path}: {_OFFICIAL_PROMPTS} is {shape}, expected [L*K, {cfg.dim}]")
    rows = query.shape[0]
    if rows % adapter_len:
        raise AdapterImportError(
            f"{path}: {rows} prompt rows are not a multiple of --adapter-len {adapter_len}")
    n_adapted = rows // adapter_len
    if n_adapted > cfg.n_layers:
        raise AdapterImportError(
            f"{path}: {n_adapted} adapted layers (with --adapter-len {adapter_len}) but the model has "
            f"{cfg.n_layers}")
    if gate_by_layer and max(gate_by_layer) >= cfg.n_layers:
        raise AdapterImportError(
            f"{path}: gates up to layer {max(gate_by_layer)} but the model has {cfg.n_layers} layers")
    layers = list(range(cfg.n_layers - n_adapted, cfg.n_layers))
    gates = []
    for layer in layers:
        g = gate_by_layer.get(layer)
        if g is None:
            raise AdapterImportError(f"{path}: no gate for adapted layer {layer}")
        if g.numel() not in (1, cfg.n_heads):
            raise AdapterImportError(
                f"{path}: layer {layer} gate shape {tuple(g.shape)}: expected [1, {cfg.n_heads}, 1, 1]")
        gates.append(g.float().reshape(-1))
    if len({g.numel() for g in gates}) > 1:
        raise AdapterImportError(f"{path}: gates mix per-layer and per-head shapes")
    gate_t = torch.stack(gates)
    weights = AdapterWeights(
        layers, query.float().reshape(n_adapted, adapter_len, cfg.dim).clone(),
        gate_t if raw_gate else gate_t.tanh())
    return ImportedAdapter(path.stem, weights, "imported:llama-adapter",
                           {"imported_from": "llama-adapter-v1", "checkpoint": path.name,
                            "gate_activation": "raw" if raw_gate else "tanh"})


def adapter_file_bytes(weights: AdapterWeights, meta: AdapterMetadata) -> bytes:
    """The adapter in our file format, as bytes (what the registry's upload takes)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "adapter.safetensors"
        save_adapter(path, weights, meta)
        return path.read_bytes()
