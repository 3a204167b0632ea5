"""CLIP image preprocessing with Pillow, equal to HF `CLIPImageProcessor`: convert to RGB, resize
the shortest side (bicubic, the long side truncated as HF does), centre crop, /255, normalise."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .vision import VisionConfig


def resized_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shortest` and the longer scaled, truncated to int."""
    if width <= height:
        return shortest, int(shortest * height / width)
    return int(shortest * width / height), shortest


def preprocess_one(image: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """One image → [3, S, S] float32."""
    image = image.convert("RGB")
    image = image.resize(resized_size(*image.size, cfg.resize_shortest), resample=Image.Resampling.BICUBIC)
    w, h = image.size
    s = cfg.crop_size           # <= both sides: VisionConfig requires resize_shortest >= crop_size
    left, top = (w - s) // 2, (h - s) // 2
    pixels = np.asarray(image.crop((left, top, left + s, top + s)), dtype=np.float32) / 255.0
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())


def preprocess(images: list[Image.Image], cfg: VisionConfig) -> torch.Tensor:
    """Images → pixel values [B, 3, S, S] float32, as the vision tower takes them."""
    return torch.stack([preprocess_one(im, cfg) for im in images])
