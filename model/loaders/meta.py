"""Meta LLaMA directories: params.json + consolidated.NN.pth (one file per model-parallel rank).

Loaded with `torch.load(mmap=True, weights_only=True)`: no pickle code runs and the tensors stay
file-backed until converted. Meta stores wq/wk for interleaved RoPE; they are permuted here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..rope import permute_for_half_split
from . import Checkpoint, CheckpointError, read_json

# Row-parallel weights are split along their input dimension across ranks; everything else
# 2-D along its output dimension; 1-D norms are replicated.
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
_IGNORED = ("rope.freqs",)


def read_config(path: Path) -> ModelConfig:
    params = read_json(path / "params.json")
    vocab = None
    if int(params.get("vocab_size", -1)) <= 0 and (path / "tokenizer.model").is_file():
        import sentencepiece  # noqa: PLC0415

        vocab = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).vocab_size()
    try:
        return ModelConfig.from_meta_params(params, vocab_size=vocab)
    except KeyError as e:
        raise CheckpointError(f"{path / 'params.json'}: missing field {e}") from e


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:   # torch raises RuntimeError/UnpicklingError/... for a bad file
        raise CheckpointError(f"{file}: not a loadable checkpoint ({type(e).__name__}: {e})") from e


def read_checkpoint(path: Path) -> Checkpoint:
    config = read_config(path)
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: no consolidated.*.pth files")

    def tensors():
        parts = [_load_shard(f) for f in shards]
        for name in parts[0]:
            if name in _IGNORED:
                continue
            pieces = [p[name] for p in parts]
            t = pieces[0] if len(pieces) == 1 or pieces[0].dim() == 1 else torch.cat(
                pieces, dim=_concat_dim(name, pieces[0], config))
            if name.endswith("attention.wq.weight"):
                t = permute_for_half_split(t, config.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = permute_for_half_split(t, config.n_kv_heads)
            yield name, t

    return Checkpoint("meta", path, path.name, config, tensors)


def _concat_dim(name: str, shard: torch.Tensor, config: ModelConfig) -> int:
    if name.endswith(_ROW_PARALLEL):
        return 1
    if name == "tok_embeddings.weight":
        # Llama 1/2 split the embedding dimension, Llama 3 the vocabulary.
        return 0 if shard.shape[1] == config.dim else 1
    return 0
