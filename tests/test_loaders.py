"""Checkpoint loaders: one tiny random LLaMA written as HF, Meta and GGUF loads to identical
logits; parity with transformers' LlamaForCausalLM; clear errors for bad checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.config import ModelConfig, UnsupportedModelError
from model.hf_names import ours_to_hf
from model.loaders import CheckpointError, build_model, read_checkpoint
from model.loaders.gguf import gguf_to_ours
from model.loading import load_model
from model.rope import apply_rope, permute_for_half_split, permute_for_interleaved, rope_table

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

_OURS_TO_GGUF_LAYER = {
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm", "attention.wq": "attn_q",
    "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
}


def _hf_llama(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items()
                                         if k not in ("architectures", "model_type", "torch_dtype")},
                                      initializer_range=0.1)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():   # non-trivial norms, so a swapped or dropped norm cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _gguf_name(ours: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if ours in top:
        return top[ours]
    _, i, rest = ours.split(".", 2)
    return f"blk.{i}.{_OURS_TO_GGUF_LAYER[rest.removesuffix('.weight')]}.weight"


def _to_interleaved(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if name.endswith("attention.wq.weight"):
        return permute_for_interleaved(t, cfg.n_heads)
    if name.endswith("attention.wk.weight"):
        return permute_for_interleaved(t, cfg.n_kv_heads)
    return t


def write_meta(path, model, n_shards: int = 1) -> None:
    """params.json + consolidated.NN.pth, split across ranks the way Meta's model parallelism does."""
    cfg = model.config
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(cfg.to_meta_params()))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in model.state_dict().items():
        t = _to_interleaved(name, t, cfg)
        if t.dim() == 1:
            pieces = [t] * n_shards
        else:
            dim = 1 if name.endswith(("wo.weight", "w2.weight")) or name == "tok_embeddings.weight" else 0
            pieces = t.chunk(n_shards, dim=dim)
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")


def write_gguf(path, model, types: dict[str, str] | None = None, tokenizer_meta=None) -> None:
    """A llama GGUF with interleaved q/k rows. `types` maps parts of GGUF tensor names to "Q8_0",
    "Q4_0", "Q4_1" or "F16"; the rest is F32."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer_meta:
        tokenizer_meta(w)
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        arr = _to_interleaved(name, t, cfg).numpy().astype(np.float32)
        gname = _gguf_name(name)
        kind = next((t for part, t in (types or {}).items() if part in gname), "F32")
        if kind in ("Q8_0", "Q4_0", "Q4_1"):
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr.astype(np.float16) if kind == "F16" else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 300, (2, 12))


@pytest.mark.parametrize("variant", ["plain", "tied", "llama3_rope", "sharded"])
def test_matches_transformers_llama(tmp_path, tiny_config_factory, tokens, variant):
    overrides = {"tied": {"tie_embeddings": True},
                 "llama3_rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8}},
                 "plain": {}, "sharded": {}}[variant]
    hf = _hf_llama(tiny_config_factory(**overrides))
    hf.save_pretrained(tmp_path, safe_serialization=True,
                       max_shard_size="100KB" if variant == "sharded" else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == (variant == "sharded")
    ours = build_model(read_checkpoint(tmp_path))
    assert ours.config == ModelConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    expected = hf(tokens).logits
    torch.testing.assert_close(_logits(ours, tokens), expected, atol=1e-5, rtol=0)


def test_three_formats_load_to_identical_logits(tmp_path, make_tiny_model, tokens):
    reference = make_tiny_model(seed=3)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    from model.loaders import hf

    hf.write_checkpoint(hf_dir, reference.config, reference.state_dict())
    write_meta(tmp_path / "meta", reference)
    write_meta(tmp_path / "meta2", reference, n_shards=2)
    write_gguf(tmp_path / "m.gguf", reference)
    expected = _logits(reference, tokens)
    for path, fmt in [(hf_dir, "hf"), (tmp_path / "meta", "meta"), (tmp_path / "meta2", "meta"),
                      (tmp_path / "m.gguf", "gguf")]:
        ckpt = read_checkpoint(path)
        assert ckpt.format == fmt
        # GGUF stores eps as float32; the model adds it to float32 values, so that is exact.
        assert ckpt.config.to_dict() | {"norm_eps": 0} == reference.config.to_dict() | {"norm_eps": 0}
        assert ckpt.config.norm_eps == pytest.approx(reference.config.norm_eps, rel=1e-6)
        assert torch.equal(_logits(build_model(ckpt), tokens), expected), path


def test_gguf_tied_and_quantized(tmp_path, make_tiny_model, tokens):
    reference = make_tiny_model(seed=4, tie_embeddings=True)
    types = {"ffn_gate": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "Q8_0", "attn_q": "Q8_0",
             "attn_k": "F16", "token_embd": "F16"}
    write_gguf(tmp_path / "q.gguf", reference, types)
    model = build_model(read_checkpoint(tmp_path / "q.gguf"))
    assert model.config.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    # Q8_0/F16 tensors come back dequantized in the right shape and layout, with a small error.
    for name, p in model.state_dict().items():
        ref = reference.state_dict()[name]
        if any(part in name for part in ("feed_forward", "attention.wq", "attention.wk", "tok_embeddings",
                                         "output")):   # output is tied to the F16 embedding
            assert 0 < (p - ref).abs().max() < 0.02 * ref.abs().max(), name
        else:
            assert torch.equal(p, ref), name
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens), atol=0.05, rtol=0.05)


def test_gguf_with_tokenizer_loads_end_to_end(tmp_path, tiny_model_dir, fresh_tiny_loaded, tokens):
    """A GGUF carrying the tiny model and its byte-BPE vocabulary loads like the HF directory."""
    vocab = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    ids = {**vocab["model"]["vocab"], **{t["content"]: t["id"] for t in vocab["added_tokens"]}}
    token_list = sorted(ids, key=ids.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["model"]["merges"]]
    special = {t["content"] for t in vocab["added_tokens"] if t["special"]}
    hf_tok = fresh_tiny_loaded.tokenizer

    def tokenizer_meta(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(token_list)
        w.add_token_merges(merges)
        w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                           for t in token_list])
        w.add_bos_token_id(hf_tok.bos_id)
        w.add_eos_token_id(hf_tok.eos_id)
        w.add_add_bos_token(False)
        w.add_chat_template(hf_tok.chat_template)

    write_gguf(tmp_path / "t.gguf", fresh_tiny_loaded.model, tokenizer_meta=tokenizer_meta)
    loaded = load_model(tmp_path / "t.gguf")
    assert loaded.name == "t" and loaded.fingerprint == fresh_tiny_loaded.fingerprint
    tokens = tokens % loaded.config.vocab_size
    assert torch.equal(_logits(loaded.model, tokens), _logits(fresh_tiny_loaded.model, tokens))
    tok = loaded.tokenizer
    for text in ["Hello, world!  2024 naïve 😀", "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x"]:
        assert tok.encode(text) == hf_tok.encode(text), text
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (hf_tok.bos_id, hf_tok.eos_id, hf_tok.stop_ids)
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == hf_tok.apply_chat_template(chat)


def _meta_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's interleaved RoPE (pairs of adjacent features as complex numbers), [T, H, D]."""
    t, _, d = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    rot = torch.polar(torch.ones(t, d // 2), torch.outer(torch.arange(t).float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(t, -1, d // 2, 2))
    return torch.view_as_real(xc * rot[:, None, :]).flatten(2)


def test_qk_permutation_round_trip_and_rope_equivalence():
    torch.manual_seed(0)
    n_heads, head_dim, dim, t = 3, 8, 24, 5
    w = torch.randn(n_heads * head_dim, dim)
    assert torch.equal(permute_for_half_split(permute_for_interleaved(w, n_heads), n_heads), w)
    assert torch.equal(permute_for_interleaved(permute_for_half_split(w, n_heads), n_heads), w)
    assert not torch.equal(permute_for_half_split(w, n_heads), w)
    # A Meta weight under Meta's interleaved RoPE gives the same attention scores as the permuted
    # weight under our half-split RoPE.
    x = torch.randn(t, dim)
    meta_q = _meta_rope((x @ w.T).view(t, n_heads, head_dim), 10000.0)
    cos, sin = rope_table(head_dim, t, 10000.0, None)
    ours = (x @ permute_for_half_split(w, n_heads).T).view(1, t, n_heads, head_dim).transpose(1, 2)
    ours_q = apply_rope(ours, cos[None, None], sin[None, None])[0].transpose(0, 1)
    meta_scores = torch.einsum("thd,shd->hts", meta_q, meta_q)
    ours_scores = torch.einsum("thd,shd->hts", ours_q, ours_q)
    torch.testing.assert_close(ours_scores, meta_scores, atol=1e-4, rtol=1e-5)


def test_gguf_names_cover_the_model(make_tiny_model):
    model = make_tiny_model()
    for name in model.state_dict():
        assert gguf_to_ours(_gguf_name(name)) == name
    assert gguf_to_ours("rope_freqs.weight") is None


def test_built_model_is_frozen_on_target_dtype(tmp_path, make_tiny_model):
    from model.loaders import hf

    reference = make_tiny_model()
    hf.write_checkpoint(tmp_path, reference.config, reference.state_dict())
    model = build_model(read_checkpoint(tmp_path), dtype=torch.bfloat16)
    assert not model.training
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and not p.requires_grad
               for p in model.parameters())
    assert model.rope_cos.device.type == "cpu" and model.rope_cos.dtype == torch.float32


# ---- bad input ----------------------------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path, make_tiny_model):
    from model.loaders import hf

    model = make_tiny_model()
    hf.write_checkpoint(tmp_path, model.config, model.state_dict())
    return tmp_path


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_model(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF"):
        load_model(tmp_path / "x.gguf")


def test_corrupt_safetensors(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        build_model(read_checkpoint(hf_dir))


def test_missing_and_misshapen_tensors(hf_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(hf_dir / "model.safetensors")
    del tensors[ours_to_hf("layers.1.feed_forward.w2.weight")]
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors.*layers.1.feed_forward.w2"):
        build_model(read_checkpoint(hf_dir))
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match="has shape"):
        build_model(read_checkpoint(hf_dir))


def test_unsupported_architectures(hf_dir, tmp_path, make_tiny_model):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"],
                                                    "model_type": "mistral"}))
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        read_checkpoint(hf_dir)
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        read_checkpoint(tmp_path / "g.gguf")


def test_corrupt_meta_shard(tmp_path, make_tiny_model):
    write_meta(tmp_path, make_tiny_model())
    (tmp_path / "consolidated.00.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        build_model(read_checkpoint(tmp_path))
