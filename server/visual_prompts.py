"""Per-request prompt K/V of image-conditioned adapters (kind `llama-adapter-visual`).

A visual adapter's prompts depend on the request's image (arXiv 2303.16199 §4.3): its resident
form is its weights (`VisualAdapterWeights`), and each request gets its own `AdapterKV` from
(adapter version, image features) through `model.adapter.compute_visual_adapter_kv`, the one
implementation training uses too. From then on the row is an ordinary gated-adapter row of
the batch, beside base, text-adapter, LoRA and prefix-tuning rows.

Image features (the CLIP tower's multi-scale class tokens) are cached by (image sha256, feature
layers) in a bounded LRU, so a repeated image costs no tower forward. The images of all rows
that need features in one step are encoded together: one tower forward per distinct set of
feature layers (adapters made for one encoder normally share theirs, so usually one).

Runs on the engine's stepping thread (tensors); the checks run at submit.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch

from model.adapter import VisualAdapterWeights, compute_visual_adapter_kv
from model.batch_adapters import RowAdapters
from model.image_preprocess import preprocess

from .types import ImageInput, InvalidRequestError

log = logging.getLogger(__name__)

FeatureKey = tuple[str, tuple[int, ...]]    # (image sha256, feature layers)


class FeatureCache:
    """Image features by (content hash, layers), least recently used out first; 0 entries = off."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[FeatureKey, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: FeatureKey) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return features

    def put(self, key: FeatureKey, features: torch.Tensor) -> None:
        if self.max_entries < 1:
            return
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def visual_parts(parts: RowAdapters) -> list[VisualAdapterWeights]:
    return [r for r, _ in parts if isinstance(r, VisualAdapterWeights)]


class VisualPrompts:
    def __init__(self, model, vision, cache_entries: int):
        """`vision`: a model.vision.VisionTower, or None (then no request may carry an image)."""
        self.model = model
        self.vision = vision
        self.cache = FeatureCache(cache_entries)
        self.images_encoded = 0         # tower rows run (cache misses actually encoded)
        self.encode_seconds = 0.0       # preprocessing + tower forwards

    def check(self, parts: RowAdapters, images: tuple[ImageInput, ...], ref: str | None) -> None:
        """At submit: an image goes with a visual adapter, and a visual adapter with one image.
        (The registry refuses an adapter made for another encoder when it loads it.)"""
        visual = visual_parts(parts)
        if images and not visual:
            what = "the base model" if ref is None else f"adapter {ref} (not a llama-adapter-visual adapter)"
            raise InvalidRequestError("image", f"the request has an image but {what} takes none; "
                                      "images condition llama-adapter-visual adapters")
        if not visual:
            return
        if self.vision is None:
            raise InvalidRequestError("image", f"adapter {ref} is image-conditioned but this server has no "
                                      "vision model (--vision-model)")
        if len(images) != 1:
            raise InvalidRequestError("image", f"adapter {ref} is image-conditioned: send exactly one image "
                                      f"(got {len(images)})")

    def row_parts(self, rows: list[tuple[RowAdapters, tuple[ImageInput, ...]]]) -> list[RowAdapters | Exception]:
        """Each row's adapters with every visual adapter replaced by its K/V for the row's image
        (or the exception that stopped it: that row alone fails)."""
        features = self._features({(images[0].sha256, tuple(w.feature_layers)): images[0]
                                   for parts, images in rows for w in visual_parts(parts)})
        out: list[RowAdapters | Exception] = []
        for parts, images in rows:
            try:
                out.append(tuple((self._kv(r, features, images[0]), w) if isinstance(r, VisualAdapterWeights)
                                 else (r, w) for r, w in parts))
            except Exception as e:      # noqa: BLE001 — reported to that request alone
                log.warning("visual adapter prompts failed: %s: %s", type(e).__name__, e)
                out.append(e)
        return out

    def _kv(self, weights: VisualAdapterWeights, features: dict[FeatureKey, torch.Tensor | Exception],
            image: ImageInput):
        f = features[(image.sha256, tuple(weights.feature_layers))]
        if isinstance(f, Exception):
            raise f
        return compute_visual_adapter_kv(self.model, weights, f)

    def _features(self, wanted: dict[FeatureKey, ImageInput]) -> dict[FeatureKey, torch.Tensor | Exception]:
        """Cached features, and one tower forward per feature-layer set for the rest."""
        found: dict[FeatureKey, torch.Tensor | Exception] = {}
        missing: dict[tuple[int, ...], list[FeatureKey]] = {}
        for key in wanted:
            cached = self.cache.get(key)
            if cached is not None:
                found[key] = cached
            else:
                missing.setdefault(key[1], []).append(key)
        for layers, keys in missing.items():
            t0 = time.perf_counter()
            pixels, ok = [], []
            for key in keys:
                try:
                    pixels.append(preprocess([wanted[key].image], self.vision.config))
                    ok.append(key)
                except Exception as e:  # noqa: BLE001 — one bad image fails its own requests
                    found[key] = e
            if not ok:
                continue
            try:
                device = next(self.vision.parameters()).device
                batch = self.vision.global_features(torch.cat(pixels).to(device), layers)
            except Exception as e:      # noqa: BLE001 — a device error: these images' requests fail
                found.update((key, e) for key in ok)
                continue
            finally:
                self.encode_seconds += time.perf_counter() - t0
            self.images_encoded += len(ok)
            for key, f in zip(ok, batch):
                found[key] = f.clone()      # not a view: a cached row must not hold the whole batch
                self.cache.put(key, found[key])
        return found
