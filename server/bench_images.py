"""Bench rows for image-conditioned adapters (part of `adapter-server bench`, same run as its rows):

(q) the engine: the requests of (b), each with its own image through `llama-adapter-visual`
    adapters, the vision encoding included (feature cache off: every image goes through the
    tower, the images admitted in one step in one batched forward), against (b);
(r) the same requests with every image's features already cached (a warm-up pass on the same
    engine, prefix cache off so only the features are warm), against (b).
Also reported: the tower's time per image within (q), and decoding one 640×480 PNG as the routes
do (server/images.py, off the event loop, not part of (q)/(r)).

The tower is a random CLIP ViT-B/32-shaped encoder (224 px, 12 layers, width 768: its speed does
not depend on its weights) unless `bench --vision-model DIR` names a real one; `--quick` uses a
tiny one.
"""

from __future__ import annotations

import io
import time

import torch
from PIL import Image

from model.vision import VisionConfig, VisionTower

QUICK_VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, resize_shortest=32, crop_size=32)
IMAGE_SIZE = (640, 480)
GOALS = {"r_over_b": 0.9}


def bench_tower(quick: bool) -> VisionTower:
    return VisionTower.random(QUICK_VISION if quick else VisionConfig(), seed=0)


def random_visual_adapters(model, tower: VisionTower, n: int, adapter_len: int, n_layers: int):
    """Random image adapters over the top layers, fed by three scales of the tower (a third of
    its depth, two thirds, the last layer), as the paper's multi-scale global feature."""
    from model.adapter import VisualAdapterWeights  # noqa: PLC0415

    cfg, depth = model.config, tower.config.num_hidden_layers
    feature_layers = tuple(sorted({max(1, depth // 3), max(1, 2 * depth // 3), depth}))
    n_layers = min(n_layers, cfg.n_layers)
    layers = list(range(cfg.n_layers - n_layers, cfg.n_layers))
    g = torch.Generator().manual_seed(2)
    f = len(feature_layers) * tower.width
    return [VisualAdapterWeights(layers, torch.randn(n_layers, adapter_len, cfg.dim, generator=g) * 0.02,
                                 torch.rand(n_layers, 1, generator=g) * 0.2,
                                 torch.randn(cfg.dim, f, generator=g) * f ** -0.5 * 0.02,
                                 torch.zeros(cfg.dim), feature_layers, tower.fingerprint)
            for _ in range(n)]


def random_pngs(n: int) -> list[bytes]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        pixels = (torch.rand(IMAGE_SIZE[1], IMAGE_SIZE[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def measure_images(loaded, registry, prompts, sizes, engine_run, batch_config, base_tok_s: float,
                   tower: VisionTower) -> dict:
    from adapters.format import metadata_for  # noqa: PLC0415
    from adapters.importers import adapter_file_bytes  # noqa: PLC0415
    from adapters.registry import AdapterRegistry  # noqa: PLC0415

    from .images import decode_image  # noqa: PLC0415

    model, n, new_tokens = loaded.model, len(prompts), sizes.new_tokens
    images_registry = AdapterRegistry(registry.store, model, loaded.fingerprint, vision=tower)
    refs = []
    for i, w in enumerate(random_visual_adapters(model, tower, min(sizes.adapters, 4), sizes.adapter_len,
                                                 sizes.adapter_layers)):
        meta = metadata_for(w, model, "uploaded", fingerprint=loaded.fingerprint)
        refs.append(images_registry.upload(f"image{i}", adapter_file_bytes(w, meta)).ref)
    per_request = [refs[i % len(refs)] for i in range(n)]
    pngs = random_pngs(n)
    start = time.perf_counter()
    images = [decode_image(png, "image/png", IMAGE_SIZE[0] * IMAGE_SIZE[1], "bench") for png in pngs]
    decode_ms = (time.perf_counter() - start) / n * 1e3
    o = engine_run(loaded, images_registry, prompts, per_request, new_tokens,
                   batch_config(loaded, len(prompts), image_feature_cache=0), vision=tower, images=images)
    p = engine_run(loaded, images_registry, prompts, per_request, new_tokens,
                   batch_config(loaded, len(prompts), prefix_caching=False), vision=tower, images=images,
                   warm_up=True)
    c = tower.config
    return {"tower": f"{c.num_hidden_layers} layers, width {c.hidden_size}, {c.image_size} px / {c.patch_size}",
            "image_adapters": len(refs), "images_tok_s": o["tok_s"], "cached_images_tok_s": p["tok_s"],
            "q_over_b": o["tok_s"] / base_tok_s, "r_over_b": p["tok_s"] / base_tok_s,
            "encode_ms_per_image": o["image_encode_s"] / n * 1e3, "cached_encode_s": p["image_encode_s"],
            "decode_png_ms": decode_ms}


def format_images(r: dict, sizes: dict) -> list[str]:
    goal = GOALS["r_over_b"]
    verdict = "ok" if r["r_over_b"] >= goal else "BELOW GOAL"
    return [f"{'(q) engine: the requests of (b), each with its own image':70s} {r['images_tok_s']:9.1f}   "
            f"(q)/(b) = {r['q_over_b']:.2f}",
            f"{'(r) engine: the same, image features already cached':70s} {r['cached_images_tok_s']:9.1f}   "
            f"(r)/(b) = {r['r_over_b']:.2f} (goal ≥ {goal:g}: {verdict})",
            f"    {r['image_adapters']} image adapters; vision tower ({r['tower']}): "
            f"{r['encode_ms_per_image']:.1f} ms per image within (q); "
            f"decoding a {IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} PNG: {r['decode_png_ms']:.1f} ms"]
