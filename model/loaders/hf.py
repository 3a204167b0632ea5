"""HF LLaMA directories: config.json + model.safetensors (or a sharded index).

HF checkpoints already use the half-split RoPE layout, so reading is renaming only. Tensors are
read through `safe_open`, which memory-maps the file and copies out one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig, UnsupportedModelError
from ..hf_names import hf_to_ours, ours_to_hf
from . import Checkpoint, CheckpointError, read_json

# Tensors some exports carry that the model recomputes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(path: Path) -> ModelConfig:
    raw = read_json(path / "config.json")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise UnsupportedModelError(f"{path}: LLaMA variants with attention/MLP biases are not supported")
    try:
        return ModelConfig.from_hf_config(raw)
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'}: missing field {e}") from e


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors weights are supported)")
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"{path}: shard(s) listed in the index are missing: {absent}")
    return files


def read_checkpoint(path: Path) -> Checkpoint:
    config = read_config(path)
    files = weight_files(path)

    def tensors():
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        ours = hf_to_ours(key)
                        if ours is None:
                            if key.endswith(_IGNORED_SUFFIXES):
                                continue
                            raise UnsupportedModelError(
                                f"{file}: tensor {key!r} has no place in a LLaMA model")
                        yield ours, f.get_tensor(key)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: corrupt safetensors file ({e})") from e

    return Checkpoint("hf", path, path.name, config, tensors)


def write_checkpoint(out_dir: Path, config: ModelConfig, state: dict[str, torch.Tensor],
                     bos_id: int | None = None, eos_id: int | None = None) -> None:
    """config.json + model.safetensors (HF names) from a state dict under our names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf_config(bos_token_id=bos_id, eos_token_id=eos_id)
    hf_config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tensors = {ours_to_hf(name): t.contiguous() for name, t in state.items()
               if not (config.tie_embeddings and name == "output.weight")}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes through a private (0600) temp file; a shared cache (e.g. a Docker image
    # built as root, run as a user) must stay readable.
    (out_dir / "model.safetensors").chmod(0o644)
