"""Parameter-name mapping between this package (Meta names) and HF `LlamaForCausalLM`.

HF checkpoints already use the half-split RoPE layout this package uses, so the mapping is a
pure renaming; Meta/GGUF checkpoints additionally need `rope.permute_for_half_split` on wq/wk.
"""

from __future__ import annotations

import re

_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_HF_TO_OURS_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_TO_OURS_TOP = {v: k for k, v in _TOP_MAP.items()}
_LAYER_RE = re.compile(r"^(model\.)?layers\.(\d+)\.(.+)\.weight$")


def ours_to_hf(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = re.match(r"^layers\.(\d+)\.(.+)\.weight$", name)
    if not m or m.group(2) not in _LAYER_MAP:
        raise KeyError(f"no HF name for parameter {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.weight"


def hf_to_ours(name: str) -> str | None:
    """Our name for an HF tensor name; None for tensors we do not use (e.g. rotary inv_freq)."""
    if name in _HF_TO_OURS_TOP:
        return _HF_TO_OURS_TOP[name]
    m = _LAYER_RE.match(name)
    if not m:
        return None
    inner = _HF_TO_OURS_LAYER.get(m.group(3))
    return f"layers.{m.group(2)}.{inner}.weight" if inner else None
