"""One config dataclass for every LLaMA checkpoint flavour (Meta params.json, HF config.json, GGUF).

Kept free of torch so the CLI and the registry can read configs cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint is not a LLaMA-architecture decoder we can run."""


@dataclass
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim: int = field(default=0)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    # ---- Meta params.json --------------------------------------------------------------------
    @classmethod
    def from_meta_params(cls, p: dict[str, Any], vocab_size: int | None = None) -> "ModelConfig":
        dim = int(p["dim"])
        vocab = int(p.get("vocab_size", -1))
        if vocab <= 0:
            if vocab_size is None:
                raise UnsupportedModelError("params.json has no vocab_size and no tokenizer gave one")
            vocab = vocab_size
        return cls(
            dim=dim,
            n_layers=int(p["n_layers"]),
            n_heads=int(p["n_heads"]),
            n_kv_heads=int(p.get("n_kv_heads") or p["n_heads"]),
            vocab_size=vocab,
            ffn_dim=meta_ffn_dim(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier")),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            rope_scaling=_llama3_scaling_from_meta(p),
            max_seq_len=int(p.get("max_seq_len", 4096)),
            tie_embeddings=False,
        )

    def to_meta_params(self) -> dict[str, Any]:
        """params.json for this config (used to write test checkpoints and exports)."""
        mult = _meta_multiplier_for(self.dim, self.ffn_dim)
        out: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
            "multiple_of": mult[0], "norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if mult[1] is not None:
            out["ffn_dim_multiplier"] = mult[1]
        return out

    # ---- HF config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> "ModelConfig":
        archs = c.get("architectures") or []
        if c.get("model_type") not in ("llama", None) or (archs and "LlamaForCausalLM" not in archs):
            raise UnsupportedModelError(
                f"unsupported architecture {archs or c.get('model_type')!r}: only LlamaForCausalLM")
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {c.get('hidden_act')!r}")
        n_heads = int(c["num_attention_heads"])
        scaling = c.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise UnsupportedModelError(f"unsupported rope_scaling {scaling!r}")
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        return cls(
            dim=int(c["hidden_size"]),
            n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            vocab_size=int(c["vocab_size"]),
            ffn_dim=int(c["intermediate_size"]),
            norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rope_scaling=dict(scaling) if scaling else None,
            max_seq_len=int(c.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            head_dim=int(c.get("head_dim") or 0),
        )

    def to_hf_config(self, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size, "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "head_dim": self.head_dim, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        if bos_token_id is not None:
            out["bos_token_id"] = bos_token_id
        if eos_token_id is not None:
            out["eos_token_id"] = eos_token_id
        return out

    # ---- GGUF metadata -----------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tied: bool) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}: only 'llama'")
        n_heads = int(meta["llama.attention.head_count"])
        vocab = meta.get("llama.vocab_size")
        if vocab is None:
            vocab = len(meta["tokenizer.ggml.tokens"])
        return cls(
            dim=int(meta["llama.embedding_length"]),
            n_layers=int(meta["llama.block_count"]),
            n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            ffn_dim=int(meta["llama.feed_forward_length"]),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            max_seq_len=int(meta.get("llama.context_length", 4096)),
            tie_embeddings=tied,
            head_dim=int(meta.get("llama.attention.key_length") or 0),
        )

    # ---- derived numbers -------------------------------------------------------------------
    def param_count(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    def flops_per_token(self) -> int:
        """Matmul FLOPs for one token (2 per multiply-add), excluding attention over the cache."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        return 2 * (self.n_layers * (attn + mlp) + self.vocab_size * self.dim)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's hidden-size rule: 2/3 of 4·dim, times the optional multiplier, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(float(ffn_dim_multiplier) * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _meta_multiplier_for(dim: int, ffn_dim: int) -> tuple[int, float | None]:
    """Find (multiple_of, ffn_dim_multiplier) reproducing ffn_dim under Meta's rule."""
    for mult in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_dim(dim, mult, None) == ffn_dim:
            return mult, None
    base = int(2 * (4 * dim) / 3)
    m = ffn_dim / base
    while int(m * base) < ffn_dim:  # float rounding can land one below
        m = math.nextafter(m, math.inf)
    return 1, m


def _llama3_scaling_from_meta(p: dict[str, Any]) -> dict[str, Any] | None:
    if not p.get("use_scaled_rope"):
        return None
    return {"rope_type": "llama3", "factor": float(p.get("rope_scaling_factor", 8.0)),
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
