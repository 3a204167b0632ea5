"""Importers from other adapter formats, and export back to PEFT.

* HF PEFT folders: `adapter_config.json` + `adapter_model.safetensors` (or `adapter_model.bin`,
  read with `torch.load(weights_only=True)`, which never runs pickled code), one adapter at the
  top level ("default") and/or one per subfolder (what `save_pretrained` writes for several
  named adapters). `peft_type` picks the kind:
  - `ADAPTION_PROMPT` (LLaMA-Adapter): gates are PEFT's scalars, used as is;
  - `LORA`: targets q/k/v/o/gate/up/down projections; DoRA, modules_to_save, bias, LoRA on the
    embeddings or the head, and per-module rank/alpha patterns are refused naming the field;
  - `PREFIX_TUNING`: the saved `prompt_embeddings` [P, 2·n_layers·token_dim] split per layer
    into keys and values as PEFT's `get_prompt` does.
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

from adapters.format import AdapterMetadata, AnyAdapterWeights, save_adapter
from adapters.validation import DEFAULT_LIMITS, AdapterValidationError, largest_file_bytes, read_safetensors_header
from model.adapter import AdapterWeights, VisualAdapterWeights
from model.config import ModelConfig
from model.lora import LORA_TARGETS, LoraWeights
from model.prefix_tuning import PrefixWeights

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PEFT_DEFAULT = "default"
_PEFT_KEY = re.compile(r"^(?:.+\.)?layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")
_PEFT_PREFIX = "base_model.model.model."
_PEFT_LORA_KEY = re.compile(
    r"^(?:.+\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.lora_(A|B)\.weight$")
_PEFT_MODULE = {t: f"{'mlp' if t in ('gate', 'up', 'down') else 'self_attn'}.{t}_proj" for t in LORA_TARGETS}
_PEFT_PREFIX_KEY = "prompt_embeddings"
# Config fields of PEFT LoRA that change the math in ways this server does not implement.
_LORA_UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save (fully trained extra modules)",
                     "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
                     "lora_bias": "LoRA bias terms", "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
                     "trainable_token_indices": "trainable token embeddings", "layer_replication": "layer_replication"}
_OFFICIAL_PROMPTS = "adapter_query.weight"
_OFFICIAL_GATE = re.compile(r"^layers\.(\d+)\.attention\.gate$")


class AdapterImportError(ValueError):
    """A source checkpoint cannot be imported; the message says why."""


@dataclass
class ImportedAdapter:
    label: str                     # PEFT adapter name ("default", subfolder) or checkpoint stem
    weights: AnyAdapterWeights
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
    kind = config.get("peft_type") if isinstance(config, dict) else None
    read = {"ADAPTION_PROMPT": _import_peft_adaption_prompt, "LORA": _import_peft_lora,
            "PREFIX_TUNING": _import_peft_prefix}.get(kind)
    if read is None:
        raise AdapterImportError(
            f"{folder}: PEFT type {kind!r} is not supported (ADAPTION_PROMPT, LORA or PREFIX_TUNING)")
    weights = read(folder, config, cfg)
    provenance = {k: config.get(k) for k in ("base_model_name_or_path", "peft_version", "revision")
                  if config.get(k) is not None}
    return ImportedAdapter(label, weights, "imported:peft",
                           {"imported_from": "peft", "peft_adapter": label, "peft_type": kind, **provenance})


def _read_peft_tensors(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The folder's adapter weights: safetensors (header checked first), or a .bin read with
    torch.load(weights_only=True), which refuses anything but plain tensors and containers."""
    weights_path = folder / PEFT_WEIGHTS
    if weights_path.is_file():
        try:
            read_safetensors_header(weights_path)
        except AdapterValidationError as e:
            raise AdapterImportError(f"{weights_path}: {e}") from None
        with safe_open(str(weights_path), framework="pt") as f:
            return weights_path, {key: f.get_tensor(key) for key in f.keys()}
    pickled = folder / PEFT_PICKLE
    if not pickled.is_file():
        raise AdapterImportError(f"{folder}: {PEFT_WEIGHTS} missing")
    if pickled.stat().st_size > largest_file_bytes(DEFAULT_LIMITS):
        raise AdapterImportError(f"{pickled}: larger than {largest_file_bytes(DEFAULT_LIMITS)} bytes")
    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as e:   # weights_only refuses arbitrary objects; torch raises various types
        raise AdapterImportError(
            f"{pickled}: not loadable as plain tensors (a pickle is only read with "
            f"torch.load(weights_only=True), which never runs its code): {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterImportError(f"{pickled}: not a mapping of tensor names to tensors")
    return pickled, state


def _import_peft_adaption_prompt(folder: Path, config: dict, cfg: ModelConfig) -> AdapterWeights:
    if config.get("target_modules", "self_attn") != "self_attn":
        raise AdapterImportError(
            f"{folder}: target_modules {config.get('target_modules')!r}: only LLaMA 'self_attn' is supported")
    k_len, n_adapted = config.get("adapter_len"), config.get("adapter_layers")
    if not all(isinstance(x, int) and x > 0 for x in (k_len, n_adapted)):
        raise AdapterImportError(f"{folder}: adapter_len / adapter_layers missing or not positive integers")
    weights_path, state = _read_peft_tensors(folder)
    prompts: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if not m:
            raise AdapterImportError(f"{weights_path}: unexpected tensor {key!r}")
        (prompts if m.group(2) == "prompt" else gates)[int(m.group(1))] = value
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
    return AdapterWeights(layers, torch.stack([prompts[i].float() for i in layers]),
                          torch.stack([gates[i].float().reshape(1) for i in layers]))


def _import_peft_lora(folder: Path, config: dict, cfg: ModelConfig) -> LoraWeights:
    for name, what in _LORA_UNSUPPORTED.items():
        if config.get(name):
            raise AdapterImportError(f"{folder}: {name}={config[name]!r}: {what} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterImportError(f"{folder}: bias={config['bias']!r}: LoRA bias training is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        known = {f"{t}_proj" for t in LORA_TARGETS}
        unknown = sorted(str(t).rsplit(".", 1)[-1] for t in targets if str(t).rsplit(".", 1)[-1] not in known)
        if unknown:
            raise AdapterImportError(
                f"{folder}: target_modules {unknown}: only the q/k/v/o/gate/up/down projections can "
                "carry LoRA here (not the embeddings or the output head)")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterImportError(f"{folder}: r / lora_alpha missing or invalid ({rank!r}, {alpha!r})")
    if rank > DEFAULT_LIMITS.max_lora_rank:
        raise AdapterImportError(f"{folder}: r={rank} exceeds the limit of {DEFAULT_LIMITS.max_lora_rank}")
    weights_path, state = _read_peft_tensors(folder)
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = _PEFT_LORA_KEY.match(key)
        if not m:
            field = ("use_dora" if "magnitude" in key else
                     "target_modules" if "embed" in key or "lm_head" in key else "target_modules / modules_to_save")
            raise AdapterImportError(f"{weights_path}: tensor {key!r} is not a LoRA A/B of a q/k/v/o/gate/up/down "
                                     f"projection (see {field})")
        found.setdefault((m.group(2), m.group(3)), {})[int(m.group(1))] = value
    if not found:
        raise AdapterImportError(f"{weights_path}: no LoRA tensors")
    present = [t for t in LORA_TARGETS if (t, "A") in found or (t, "B") in found]
    layers = sorted(found.get((present[0], "A"), {}))
    a, b = {}, {}
    for t in present:
        if sorted(found.get((t, "A"), {})) != layers or sorted(found.get((t, "B"), {})) != layers:
            raise AdapterImportError(
                f"{weights_path}: target {t}_proj has LoRA in other layers than {present[0]}_proj; "
                "every target must cover the same layers")
        a[t] = torch.stack([found[(t, "A")][i].float() for i in layers])
        b[t] = torch.stack([found[(t, "B")][i].float() for i in layers])
        if a[t].shape[1] != rank or b[t].shape[2] != rank:
            raise AdapterImportError(
                f"{weights_path}: {t}_proj A {tuple(a[t].shape[1:])} / B {tuple(b[t].shape[1:])} do not "
                f"have rank r={rank}")
    if layers[-1] >= cfg.n_layers:
        raise AdapterImportError(f"{weights_path}: LoRA in layer {layers[-1]} but the model has {cfg.n_layers} layers")
    return LoraWeights(layers, rank, float(alpha), bool(config.get("use_rslora")), a, b)


def _import_peft_prefix(folder: Path, config: dict, cfg: ModelConfig) -> PrefixWeights:
    p_len = config.get("num_virtual_tokens")
    if not isinstance(p_len, int) or p_len < 1:
        raise AdapterImportError(f"{folder}: num_virtual_tokens missing or not a positive integer")
    want = {"num_layers": cfg.n_layers, "num_attention_heads": cfg.n_kv_heads,
            "token_dim": cfg.n_kv_heads * cfg.head_dim}
    for name, value in want.items():
        if config.get(name) is not None and config[name] != value:
            raise AdapterImportError(f"{folder}: {name}={config[name]} but this model needs {value} "
                                     "(was it made for another model?)")
    weights_path, state = _read_peft_tensors(folder)
    if set(state) != {_PEFT_PREFIX_KEY}:
        raise AdapterImportError(f"{weights_path}: expected only {_PEFT_PREFIX_KEY!r}, found {sorted(state)[:5]}")
    emb = state[_PEFT_PREFIX_KEY]
    hkv, hd, n = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    if tuple(emb.shape) != (p_len, 2 * n * hkv * hd):
        hint = " (prefix_projection adapters saved in inference mode lack their projection)" \
            if config.get("prefix_projection") else ""
        raise AdapterImportError(
            f"{weights_path}: {_PEFT_PREFIX_KEY} is {tuple(emb.shape)}, expected ({p_len}, {2 * n * hkv * hd})"
            f" = (num_virtual_tokens, 2 * num_layers * token_dim){hint}")
    # PEFT's get_prompt: view [P, 2L, Hkv, D] → per layer i, keys = 2i and values = 2i + 1.
    kv = emb.float().view(p_len, 2 * n, hkv, hd).permute(1, 2, 0, 3)
    return PrefixWeights(kv[0::2].contiguous(), kv[1::2].contiguous())


def export_peft(weights: AnyAdapterWeights, meta: AdapterMetadata, out_dir: str | Path) -> Path:
    """Write a PEFT folder (adaption_prompt, LoRA or prefix tuning) that `PeftModel.from_pretrained` loads."""
    if isinstance(weights, VisualAdapterWeights):
        raise AdapterImportError("PEFT has no image-conditioned adapter type: a llama-adapter-visual adapter "
                                 "exists only in this server's format (copy its .safetensors file instead)")
    out = Path(out_dir)
    if (out / PEFT_CONFIG).exists() or (out / PEFT_WEIGHTS).exists():
        raise AdapterImportError(f"{out} already holds a PEFT adapter; choose an empty directory")
    write = {AdapterWeights: _peft_adaption_prompt_files, LoraWeights: _peft_lora_files,
             PrefixWeights: _peft_prefix_files}[type(weights)]
    tensors, config = write(weights, meta)
    config = {"task_type": "CAUSAL_LM", "inference_mode": True, "revision": None,
              "base_model_name_or_path": meta.extra.get("base_model_name_or_path"), **config}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(out / PEFT_WEIGHTS),
              metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _peft_lora_files(w: LoraWeights, meta: AdapterMetadata) -> tuple[dict, dict]:
    tensors = {f"{_PEFT_PREFIX}layers.{layer}.{_PEFT_MODULE[t]}.lora_{ab}.weight": m[t][i]
               for i, layer in enumerate(w.layers) for t in w.targets for ab, m in (("A", w.a), ("B", w.b))}
    all_layers = list(w.layers) == list(range(meta.base_n_layers))
    return tensors, {"peft_type": "LORA", "r": w.rank, "lora_alpha": w.alpha, "use_rslora": w.use_rslora,
                     "target_modules": [f"{t}_proj" for t in w.targets], "lora_dropout": 0.0, "bias": "none",
                     "layers_to_transform": None if all_layers else list(w.layers),
                     "layers_pattern": None if all_layers else "layers", "fan_in_fan_out": False,
                     "use_dora": False, "modules_to_save": None}


def _peft_prefix_files(w: PrefixWeights, meta: AdapterMetadata) -> tuple[dict, dict]:
    n, hkv, p_len, hd = w.keys.shape
    kv = torch.stack([w.keys, w.values], dim=1).reshape(2 * n, hkv, p_len, hd)
    emb = kv.permute(2, 0, 1, 3).reshape(p_len, 2 * n * hkv * hd)
    return {_PEFT_PREFIX_KEY: emb}, {
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": p_len, "num_layers": n,
        "token_dim": hkv * hd, "num_attention_heads": hkv, "num_transformer_submodules": 1,
        "encoder_hidden_size": hkv * hd, "prefix_projection": False}


def _peft_adaption_prompt_files(weights: AdapterWeights, meta: AdapterMetadata) -> tuple[dict, dict]:
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
    tensors = {}
    for i, layer in enumerate(weights.layers):
        tensors[f"{_PEFT_PREFIX}layers.{layer}.self_attn.adaption_prompt"] = weights.prompts[i].unsqueeze(0)
        tensors[f"{_PEFT_PREFIX}layers.{layer}.self_attn.adaption_gate"] = gates[i].reshape(1)
    return tensors, {"peft_type": "ADAPTION_PROMPT", "target_modules": "self_attn",
                     "adapter_len": weights.adapter_len, "adapter_layers": l_count, "auto_mapping": None}


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


def adapter_file_bytes(weights: AnyAdapterWeights, meta: AdapterMetadata) -> bytes:
    """The adapter in our file format, as bytes (what the registry's upload takes)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "adapter.safetensors"
        save_adapter(path, weights, meta)
        return path.read_bytes()
