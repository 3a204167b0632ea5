"""The image-conditioned LLaMA-Adapter (kind llama-adapter-visual): equivalence with the paper's
visual branch re-stated here from the formula, the file format, validation against the loaded
image encoder, and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.format import AdapterFormatError, check_fits, load_adapter, metadata_for, save_adapter
from adapters.importers import AdapterImportError, adapter_file_bytes, export_peft
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from adapters.validation import AdapterValidationError, validate_adapter_file
from model.adapter import AdapterBatch, VisualAdapterWeights, compute_visual_adapter_kv
from model.fingerprint import base_fingerprint
from model.image_preprocess import preprocess
from model.vision import VisionTower
from tests.vision_helpers import random_visual_adapter, save_tiny_clip_vision, shape_image


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip_vision(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=5)


@pytest.fixture(scope="module")
def tower(clip_dir):
    return VisionTower.from_dir(clip_dir)


# ---- the paper's visual branch, re-stated from the formula (no project code) ------------------

def _reference_feature(clip_dir, image, feature_layers):
    """transformers' CLIP: class tokens of the chosen hidden states, concatenated."""
    from transformers import CLIPImageProcessor, CLIPVisionModel
    pixels = CLIPImageProcessor.from_pretrained(clip_dir)(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = CLIPVisionModel.from_pretrained(clip_dir).eval()(
            pixel_values=pixels, output_hidden_states=True).hidden_states
    return torch.cat([states[i][0, 0] for i in feature_layers])


def _reference_logprobs(sd, cfg, ids, visual_prompts, gates):
    """Plain LLaMA over the whole sequence (no cache); in adapted layer l every query also attends,
    with its own softmax, to the prompt keys/values (P_l + W f + b)·Wk/Wv, scaled by the gate."""
    t, h, hkv, d = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv).float()
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):                                    # [H, T, D], HF rotate_half layout
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = sd["tok_embeddings.weight"][torch.tensor(ids)]
    causal = torch.ones(t, t).triu(1).bool()
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}."
        a = rms(x, sd[p + "attention_norm.weight"])
        q = (a @ sd[p + "attention.wq.weight"].T).view(t, h, d).transpose(0, 1)
        k = (a @ sd[p + "attention.wk.weight"].T).view(t, hkv, d).transpose(0, 1)
        v = (a @ sd[p + "attention.wv.weight"].T).view(t, hkv, d).transpose(0, 1)
        q, k = rope(q), rope(k)
        rep = h // hkv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        out = s.masked_fill(causal, float("-inf")).softmax(-1) @ v                      # [H, T, D]
        if layer in visual_prompts:
            prompt = visual_prompts[layer]                                             # [K, dim]
            kp = (prompt @ sd[p + "attention.wk.weight"].T).view(-1, hkv, d).transpose(0, 1).repeat_interleave(rep, 0)
            vp = (prompt @ sd[p + "attention.wv.weight"].T).view(-1, hkv, d).transpose(0, 1).repeat_interleave(rep, 0)
            sp = ((q @ kp.transpose(-1, -2)) / math.sqrt(d)).softmax(-1)
            out = out + gates[layer].view(h, 1, 1) * (sp @ vp)
        x = x + out.transpose(0, 1).reshape(t, h * d) @ sd[p + "attention.wo.weight"].T
        f = rms(x, sd[p + "ffn_norm.weight"])
        gate_up = torch.nn.functional.silu(f @ sd[p + "feed_forward.w1.weight"].T) * (f @ sd[p + "feed_forward.w3.weight"].T)
        x = x + gate_up @ sd[p + "feed_forward.w2.weight"].T
    return (rms(x, sd["norm.weight"]) @ sd["output.weight"].T).log_softmax(-1)


def test_equals_the_papers_visual_branch(make_tiny_model, clip_dir, tower, greedy):
    model = make_tiny_model(seed=2)
    w = random_visual_adapter(model, tower, feature_layers=(1, 2, 3), k=4, layers=[1, 3], seed=7)
    image = shape_image()
    prompt = [5, 17, 42, 9, 120, 33]
    n_new = 8

    # Ours: preprocessing, tower, projection and K/V, then the model's own decode loop.
    features = tower.global_features(preprocess([image], tower.config), w.feature_layers)[0]
    kv = compute_visual_adapter_kv(model, w, features)
    got_ids, got_lps = greedy(model, prompt, n_new, adapters=AdapterBatch.build([kv], model.config.n_layers))

    # The formula: f from transformers' CLIP; P_l + W f + b in every adapted layer.
    f = _reference_feature(clip_dir, image, w.feature_layers)
    torch.testing.assert_close(features, f, atol=1e-5, rtol=0)
    g = f @ w.proj_weight.T + w.proj_bias
    prompts = {layer: w.prompts[i] + g for i, layer in enumerate(w.layers)}
    gates = {layer: w.gates[i] for i, layer in enumerate(w.layers)}
    sd = model.state_dict()
    ids, ref_ids, ref_lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n_new):
            lp = _reference_logprobs(sd, model.config, ids, prompts, gates)[-1]
            ref_ids.append(int(lp.argmax()))
            ref_lps.append(float(lp.max()))
            ids.append(ref_ids[-1])
    assert got_ids == ref_ids
    assert max(abs(a - b) for a, b in zip(got_lps, ref_lps)) < 1e-4
    # The image matters: another image gives other log-probs.
    other = tower.global_features(preprocess([shape_image(colour=(20, 200, 40))], tower.config), w.feature_layers)[0]
    _, other_lps = greedy(model, prompt, n_new,
                          adapters=AdapterBatch.build([compute_visual_adapter_kv(model, w, other)], model.config.n_layers))
    assert other_lps != got_lps


def test_zero_gates_give_the_base_model(make_tiny_model, tower, greedy):
    model = make_tiny_model()
    w = random_visual_adapter(model, tower)
    w.gates.zero_()
    feats = tower.global_features(preprocess([shape_image()], tower.config), w.feature_layers)[0]
    kv = compute_visual_adapter_kv(model, w, feats)
    assert greedy(model, [3, 4, 5], 5, adapters=AdapterBatch.build([kv], 4)) == greedy(model, [3, 4, 5], 5)
    with pytest.raises(ValueError, match="image feature"):
        compute_visual_adapter_kv(model, w, feats[:-1])


# ---- file format, validation, registry -------------------------------------------------------

def _file(tmp_path, model, w, fingerprint=None):
    meta = metadata_for(w, model, "trained", fingerprint=fingerprint or base_fingerprint(model))
    path = tmp_path / "visual.safetensors"
    save_adapter(path, w, meta)
    return path, meta


def test_file_round_trip(tmp_path, make_tiny_model, tower):
    model = make_tiny_model()
    w = random_visual_adapter(model, tower)
    path, _ = _file(tmp_path, model, w)
    got, meta = load_adapter(path)
    assert isinstance(got, VisualAdapterWeights) and meta.kind == "llama-adapter-visual"
    assert got.feature_layers == (1, 3) and got.encoder_fingerprint == tower.fingerprint == meta.encoder_fingerprint
    for name in ("prompts", "gates", "proj_weight", "proj_bias"):
        assert torch.equal(getattr(got, name), getattr(w, name))
    assert got.param_count() == w.param_count() == 2 * 3 * 64 + 2 * 4 + 64 * 64 + 64
    check_fits(meta, model, base_fingerprint(model), weights=got, vision=tower)


def test_validation_against_the_image_encoder(tmp_path, make_tiny_model, tower, clip_dir):
    model = make_tiny_model()
    fp = base_fingerprint(model)
    path, _ = _file(tmp_path, model, random_visual_adapter(model, tower))
    with pytest.raises(AdapterValidationError, match="no image encoder is loaded"):
        validate_adapter_file(path, model, fp)
    other = VisionTower.from_dir(save_tiny_clip_vision(tmp_path / "other", seed=99))
    with pytest.raises(AdapterValidationError, match="image-encoder fingerprint mismatch"):
        validate_adapter_file(path, model, fp, vision=other)
    validate_adapter_file(path, model, fp, vision=other, allow_fingerprint_mismatch=True)   # admin override
    wider = VisionTower.from_dir(save_tiny_clip_vision(tmp_path / "wider", hidden_size=48, num_attention_heads=4))
    with pytest.raises(AdapterValidationError, match="takes 64 features; this image encoder gives 96"):
        validate_adapter_file(path, model, fp, vision=wider, allow_fingerprint_mismatch=True)
    shallow = VisionTower.from_dir(save_tiny_clip_vision(tmp_path / "shallow", num_hidden_layers=2))
    with pytest.raises(AdapterValidationError, match="go past the image encoder's 2 layers"):
        validate_adapter_file(path, model, fp, vision=shallow, allow_fingerprint_mismatch=True)
    weights, meta = validate_adapter_file(path, model, fp, vision=tower)
    assert meta.kind == "llama-adapter-visual"


def test_malformed_visual_files(tmp_path, make_tiny_model, tower):
    model = make_tiny_model()
    w = random_visual_adapter(model, tower)
    bad_proj = VisualAdapterWeights(w.layers, w.prompts, w.gates, w.proj_weight[:, :63], w.proj_bias,
                                    w.feature_layers, tower.fingerprint)
    path, _ = _file(tmp_path, model, bad_proj)
    with pytest.raises(AdapterFormatError, match="multiple of the 2 feature layers"):
        load_adapter(path)
    w.proj_bias[3] = float("nan")
    path, _ = _file(tmp_path, model, w)
    with pytest.raises(AdapterFormatError, match="NaN"):
        load_adapter(path)
    no_encoder = random_visual_adapter(model, tower)
    no_encoder.encoder_fingerprint = ""
    path, _ = _file(tmp_path, model, no_encoder)
    with pytest.raises(AdapterFormatError, match="encoder_fingerprint"):
        load_adapter(path)


def test_registry_keeps_image_adapters_as_weights_and_refuses_peft_export(tmp_path, make_tiny_model, tower):
    model = make_tiny_model()
    fp = base_fingerprint(model)
    w = random_visual_adapter(model, tower)
    data = adapter_file_bytes(w, metadata_for(w, model, "uploaded", fingerprint=fp))
    without = AdapterRegistry(AdapterStore(tmp_path / "a"), model, fp)
    with pytest.raises(AdapterValidationError, match="--vision-model"):
        without.upload("pic", data)
    registry = AdapterRegistry(AdapterStore(tmp_path / "b"), model, fp, vision=tower)
    info = registry.upload("pic", data)
    assert info.kind == "llama-adapter-visual" and info.param_count == w.param_count()
    with registry.acquire("pic") as lease:
        assert isinstance(lease.kv, VisualAdapterWeights) and torch.equal(lease.kv.proj_weight, w.proj_weight)
    fresh = AdapterRegistry(registry.store, model, fp, vision=tower)    # loads from disk
    with fresh.acquire("pic@1") as lease:
        assert isinstance(lease.kv, VisualAdapterWeights) and lease.kv.nbytes() == 4 * w.param_count()
    with pytest.raises(AdapterImportError, match="PEFT has no image-conditioned adapter"):
        export_peft(w, metadata_for(w, model, "uploaded"), tmp_path / "peft")
