"""Training image adapters (llama-adapter-visual) on a tiny model and a tiny CLIP tower: the
trained math is the served math (standardisation folded into the exported projection), the CLI
writes a valid file checked against the encoder, and mismatched data/method/encoder are named."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
import torch.nn.functional as F

from adapters.format import load_adapter
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from model.adapter import AdapterBatch, VisualAdapterWeights, compute_visual_adapter_kv
from model.vision import VisionTower
from training import cli
from training.data import IGNORE, DataError, collate, load_dataset
from training.model import LowerStates, TrainableVisualAdapter, image_features
from training.synthetic_images import COLOURS, SHAPES, draw
from tests.vision_helpers import save_tiny_clip_vision


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip_vision(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=1)


@pytest.fixture
def image_data(tmp_path):
    """24 image instructions in the tiny tokenizer's world: name the colour."""
    rng = random.Random(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(24):
        colour, shape = list(COLOURS)[i % 3], SHAPES[i % 4]
        draw(colour, shape, rng.randrange(9), rng, size=40).save(tmp_path / f"img/{i}.png")
        rows.append({"image": f"img/{i}.png", "instruction": "Say the colour.", "output": colour})
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def _served_loss(base, weights: VisualAdapterWeights, examples, features) -> float:
    total = 0.0
    for e, f in zip(examples, features):
        kv = compute_visual_adapter_kv(base, weights, f)
        with torch.no_grad():
            logits = base(torch.tensor([e.input_ids]), adapters=AdapterBatch.build([kv], base.config.n_layers))[0]
        total += float(F.cross_entropy(logits[:-1], torch.tensor(e.labels[1:]), ignore_index=IGNORE, reduction="sum"))
    return total


def test_training_loss_is_the_served_math(fresh_tiny_loaded, clip_dir, image_data):
    """summed_loss on standardised features == the exported adapter served on raw features."""
    base, tok = fresh_tiny_loaded.model, fresh_tiny_loaded.tokenizer
    tower = VisionTower.from_dir(clip_dir)
    data = load_dataset(image_data, tok, 200, 0.0, 0, 0)
    examples = data.train[:5]
    feats = image_features(tower, examples, (1, 3))
    assert feats.shape == (5, 2 * tower.width)
    adapter = TrainableVisualAdapter(base.config, 3, 2, "per_head", 0.5, 0, feats.mean(0) + 0.3, feats.std(0) * 2,
                                     (1, 3), tower.fingerprint)
    with torch.no_grad():
        adapter.gates.uniform_(0.3, 0.9)
        adapter.proj_weight.normal_(0, 0.3)
        adapter.proj_bias.normal_(0, 0.3)
    tokens, labels = collate(examples, tok.eos_id)
    states = LowerStates(adapter, base, examples, tok.eos_id, torch.device("cpu"),
                         torch.autocast("cpu", enabled=False), False, batch_size=5)
    loss = adapter.summed_loss(base, states.get(list(range(5)), tokens), labels, feats)
    loss.backward()
    assert adapter.proj_weight.grad.abs().sum() > 0 and adapter.prompts.grad.abs().sum() > 0
    served = _served_loss(base, adapter.export(), examples, feats)
    assert loss.item() == pytest.approx(served, rel=1e-5, abs=1e-4)


def test_cli_trains_an_image_adapter_checked_against_its_encoder(fresh_tiny_loaded, tiny_model_dir, clip_dir,
                                                                  image_data, tmp_path):
    base, tok = fresh_tiny_loaded.model, fresh_tiny_loaded.tokenizer
    out = tmp_path / "visual.safetensors"
    args = _args(["--data", str(image_data), "--model", str(tiny_model_dir), "--out", str(out),
                  "--method", "llama-adapter-visual", "--vision-model", str(clip_dir), "--adapter-len", "3",
                  "--adapter-layers", "2", "--batch-size", "4", "--max-steps", "12", "--lr", "0.05", "--eval-every", "0",
                  "--max-len", "200", "--seed", "3", "--name", "pic", "--store", str(tmp_path / "store")])
    assert cli.run(args) == 0
    weights, meta = load_adapter(out)
    tower = VisionTower.from_dir(clip_dir)
    assert meta.kind == "llama-adapter-visual" and isinstance(weights, VisualAdapterWeights)
    assert meta.encoder_fingerprint == tower.fingerprint and weights.feature_layers == (1, 2, 3)
    assert weights.proj_weight.shape == (base.config.dim, 3 * tower.width)
    data = load_dataset(image_data, tok, 200, 0.0, 0, 0)
    feats = image_features(tower, data.train, weights.feature_layers)
    unopened = VisualAdapterWeights(weights.layers, weights.prompts, torch.zeros_like(weights.gates),
                                    weights.proj_weight, weights.proj_bias, weights.feature_layers,
                                    weights.encoder_fingerprint)
    assert _served_loss(base, weights, data.train, feats) < _served_loss(base, unopened, data.train, feats) - 1.0
    # Stored with the encoder's check, like any upload; a registry without the encoder refuses it.
    store = AdapterStore(tmp_path / "store")
    assert store.resolve("pic").kind == "llama-adapter-visual"
    with pytest.raises(Exception, match="--vision-model"):
        AdapterRegistry(AdapterStore(tmp_path / "other"), base, fresh_tiny_loaded.fingerprint).upload(
            "pic", out.read_bytes())


def test_mismatched_method_data_and_encoder_are_named(tiny_model_dir, clip_dir, image_data, tmp_path):
    common = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "x.safetensors"), "--max-steps", "1"]
    with pytest.raises(ValueError, match="--method llama-adapter-visual --vision-model"):
        cli.run(_args(["--data", str(image_data), *common]))
    with pytest.raises(ValueError, match="needs --vision-model"):
        cli.run(_args(["--data", str(image_data), "--method", "llama-adapter-visual", *common]))
    with pytest.raises(ValueError, match="feature layers"):
        cli.run(_args(["--data", str(image_data), "--method", "llama-adapter-visual", "--vision-model",
                       str(clip_dir), "--feature-layers", "2,9", *common]))
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    with pytest.raises(ValueError, match="needs image-instruction data"):
        cli.run(_args(["--data", str(text), "--method", "llama-adapter-visual", "--vision-model", str(clip_dir),
                       *common]))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(image_data.read_text() + json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    with pytest.raises(DataError, match="needs one in every record"):
        cli.run(_args(["--data", str(mixed), "--method", "llama-adapter-visual", "--vision-model", str(clip_dir),
                       *common]))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nope.png", "instruction": "Say hi.", "output": "hi"}) + "\n")
    with pytest.raises(DataError, match="nope.png not found"):
        cli.run(_args(["--data", str(missing), "--method", "llama-adapter-visual", "--vision-model", str(clip_dir),
                       *common]))
