"""The synthetic colour-and-shape task stays honest: the test split is only the held-out
(colour, shape) pairs, training never holds one, and the demo encoder is pretrained on images of its own."""

from __future__ import annotations

from PIL import Image

from model.vision import VisionTower
from training.synthetic_images import (COLOURS, DEMO_FEATURE_LAYERS, IMAGE_SIZE, SHAPES, generate, held_out_pairs,
                                       pretrain_encoder, pretraining_set, probe, write_jsonl)


def test_held_out_pairs_leave_every_colour_and_shape_in_training(tmp_path):
    held = held_out_pairs()
    assert {c for c, _ in held} == set(COLOURS) and len(held) == len(COLOURS)
    train, test = generate(tmp_path, 36, 12, seed=3)
    train_pairs = {(r["colour"], r["shape"]) for r in train}
    assert not train_pairs & held
    assert {(r["colour"], r["shape"]) for r in test} == held
    assert {c for c, _ in train_pairs} == set(COLOURS) and {s for _, s in train_pairs} == set(SHAPES)
    assert all(r["output"] == f"{r['colour']} {r['shape']}" for r in train + test)
    assert all((tmp_path / r["image"]).is_file() for r in train + test)


def test_encoder_pretraining_names_every_pair_on_images_of_its_own(tmp_path):
    images, colour, shape = pretraining_set(96, seed=0)
    named = [(list(COLOURS)[c], SHAPES[s]) for c, s in zip(colour, shape) if c != -100]
    assert set(named) == {(c, s) for c in COLOURS for s in SHAPES}   # like a CLIP that knows them all
    assert len(named) == len(images) // 2    # the other half: random colours, shape name only
    assert {SHAPES[s] for c, s in zip(colour, shape) if c == -100} == set(SHAPES)
    assert all(im.size == (IMAGE_SIZE, IMAGE_SIZE) for im in images)
    train, test = generate(tmp_path, 48, 12, seed=0)
    task = {Image.open(tmp_path / r["image"]).convert("RGB").tobytes() for r in train + test}
    assert not {im.tobytes() for im in images} & task       # none is one of the task's images


def test_pretrained_encoder_saves_loads_and_probes(tmp_path):
    train, test = generate(tmp_path, 24, 6)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    encoder = pretrain_encoder(n_images=16, steps=2, batch=4).save(tmp_path / "encoder")
    assert VisionTower.from_dir(encoder).config.image_size == IMAGE_SIZE
    scores = probe(tmp_path, encoder, DEMO_FEATURE_LAYERS)
    assert set(scores) == {"colour", "shape"} and all(0 <= v <= 1 for v in scores.values())
