"""Tiny random CLIP vision towers for tests, saved by transformers in HF layout (CLIPVisionModel or
full CLIPModel), so our loader reads what real checkpoints look like."""

from __future__ import annotations

from pathlib import Path

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def save_tiny_clip_vision(path: Path, seed: int = 0, full_clip: bool = False, **overrides) -> Path:
    """A random CLIP vision model (and its CLIPImageProcessor config) written to `path`."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig,
                              CLIPVisionModel)

    torch.manual_seed(seed)
    vision = {**TINY_VISION, **overrides}
    if full_clip:
        cfg = CLIPConfig(vision_config=vision, text_config=dict(hidden_size=16, intermediate_size=32,
                                                               num_hidden_layers=1, num_attention_heads=2,
                                                               vocab_size=50), projection_dim=8)
        model = CLIPModel(cfg)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    _randomise_norms(model)
    model.save_pretrained(path, safe_serialization=True)
    s = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(path)
    return path


def _randomise_norms(model) -> None:
    """LayerNorms start at 1/0; random ones make a wrong norm wiring visible."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.2, 0.2)
            elif "class_embedding" in name:
                p.normal_(0, 1)


def shape_image(size: int = 48, colour=(220, 30, 30), background=(30, 60, 200)):
    """A filled circle on a plain background (a fixed, recognisable test image)."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse((size // 4, size // 5, 3 * size // 4, 7 * size // 10), fill=colour)
    return image


def random_visual_adapter(model, tower, feature_layers=(1, 3), k: int = 3, layers=None, seed: int = 0):
    """Random prompts, per-head gates well away from zero and a random projection."""
    import torch

    from model.adapter import VisualAdapterWeights
    cfg = model.config
    layers = layers if layers is not None else list(range(cfg.n_layers - 2, cfg.n_layers))
    g = torch.Generator().manual_seed(seed)
    n_feat = len(feature_layers) * tower.width
    return VisualAdapterWeights(
        layers, torch.randn(len(layers), k, cfg.dim, generator=g),
        torch.rand(len(layers), cfg.n_heads, generator=g) * 0.8 + 0.2,
        torch.randn(cfg.dim, n_feat, generator=g) / n_feat ** 0.5, torch.randn(cfg.dim, generator=g) * 0.5,
        tuple(feature_layers), tower.fingerprint)
