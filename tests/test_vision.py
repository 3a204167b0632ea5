"""The CLIP vision tower and preprocessing against transformers' CLIPVisionModel and
CLIPImageProcessor, on tiny random towers saved in HF layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.image_preprocess import preprocess
from model.vision import VisionModelError, VisionTower
from tests.vision_helpers import save_tiny_clip_vision


@pytest.mark.parametrize("full_clip,act", [(False, "quick_gelu"), (True, "gelu")])
def test_hidden_states_equal_transformers(tmp_path, full_clip, act):
    from transformers import CLIPModel, CLIPVisionModel
    path = save_tiny_clip_vision(tmp_path / "clip", seed=3, full_clip=full_clip, hidden_act=act)
    ref = (CLIPModel if full_clip else CLIPVisionModel).from_pretrained(path).eval()
    ref = ref.vision_model if full_clip else ref
    tower = VisionTower.from_dir(path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states
        got = tower.hidden_states(pixels)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    feats = tower.global_features(pixels, [1, 3])
    torch.testing.assert_close(feats, torch.cat([want[1][:, 0], want[3][:, 0]], -1), atol=1e-5, rtol=0)


def test_fingerprint_tracks_weights_not_checkpoint_layout(tmp_path):
    a = VisionTower.from_dir(save_tiny_clip_vision(tmp_path / "a", seed=1))
    a_full = VisionTower.from_dir(save_tiny_clip_vision(tmp_path / "a_full", seed=1, full_clip=True))
    b = VisionTower.from_dir(save_tiny_clip_vision(tmp_path / "b", seed=2))
    a_bf16 = VisionTower.from_dir(tmp_path / "a", dtype=torch.bfloat16)
    assert len(a.fingerprint) == 16 and a.fingerprint == a_bf16.fingerprint
    assert a.fingerprint != b.fingerprint
    # A full CLIPModel with the same seed draws other vision weights (the text tower is built too).
    assert a_full.fingerprint not in ("", a.fingerprint)


def test_loader_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(VisionModelError, match="config.json"):
        VisionTower.from_dir(tmp_path)
    path = save_tiny_clip_vision(tmp_path / "clip")
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(VisionModelError, match="safetensors"):
        VisionTower.from_dir(path)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = lambda w, h: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)   # noqa: E731
    return [Image.fromarray(rgb(50, 50)), Image.fromarray(rgb(97, 41)), Image.fromarray(rgb(33, 120)),
            Image.fromarray(rng.integers(0, 256, (60, 45, 4), dtype=np.uint8), "RGBA"),
            Image.fromarray(rng.integers(0, 256, (40, 70), dtype=np.uint8), "L"),
            Image.fromarray(rgb(20, 24))]    # smaller than the crop: upscaled


def test_preprocess_equals_clip_image_processor(tmp_path):
    from transformers import CLIPImageProcessor
    path = save_tiny_clip_vision(tmp_path / "clip")
    cfg = VisionTower.from_dir(path).config
    images = _images()
    want = CLIPImageProcessor.from_pretrained(path).preprocess(images, return_tensors="pt")["pixel_values"]
    got = preprocess(images, cfg)
    assert got.shape == want.shape == (len(images), 3, 32, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_preprocess_with_openai_clip_sizes():
    """CLIP-L's processor: shortest side 224, crop 224, OpenAI mean/std (defaults, no file)."""
    from transformers import CLIPImageProcessor
    from model.vision import VisionConfig
    cfg = VisionConfig.from_hf({"vision_config": {"image_size": 224, "patch_size": 14}})
    images = _images()[:3]
    want = CLIPImageProcessor().preprocess(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess(images, cfg), want, atol=1e-5, rtol=0)


def test_random_tower_saves_in_hf_layout(tmp_path):
    """A seeded random tower (the synthetic demo's encoder) written by us reads back identically,
    and transformers reads it as the same model."""
    from transformers import CLIPVisionModel
    from model.vision import VisionConfig
    cfg = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, resize_shortest=32, crop_size=32)
    tower = VisionTower.random(cfg, seed=4)
    assert tower.fingerprint == VisionTower.random(cfg, seed=4).fingerprint != VisionTower.random(cfg, 5).fingerprint
    path = tower.save(tmp_path / "random-clip")
    again = VisionTower.from_dir(path)
    assert again.fingerprint == tower.fingerprint and again.config == cfg
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = CLIPVisionModel.from_pretrained(path).eval()(pixel_values=pixels, output_hidden_states=True).hidden_states
    for g, w in zip(again.hidden_states(pixels), want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_load_vision_is_what_vision_model_flags_load(tmp_path):
    from model.vision import load_vision
    assert load_vision(None) is None and load_vision("") is None
    path = save_tiny_clip_vision(tmp_path / "clip", seed=2)
    tower = load_vision(path)
    assert tower.fingerprint == VisionTower.from_dir(path).fingerprint
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
    assert tower.class_embedding.dtype == torch.float32
