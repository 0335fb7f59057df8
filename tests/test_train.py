"""The shapes training recipe: drawn tiles, per-patch labels, and a two-step run that writes a loadable model."""

from __future__ import annotations

import json
import random

import numpy as np

from ficoco import vqa
from ficoco.models import load_model
from training import train as T


def test_drawn_tile_has_the_exact_colour_and_shape_labels() -> None:
    rng = random.Random(0)
    for shape in vqa.SHAPES:
        for color in ("red", "teal", "black"):
            im = T.draw_tile(rng, shape, color)
            assert im.size == (64, 64)
            assert vqa.tile_color(im) == color
            s, c = T.patch_labels(im, [(shape, color)])
            assert s.shape == (576,) and set(np.unique(s)) <= {0, vqa.SHAPES.index(shape) + 1}
            assert (s > 0).sum() > 0 and np.array_equal(s > 0, c > 0)


def test_mosaic_patch_labels_follow_quadrants() -> None:
    rng = random.Random(1)
    labels = [("circle", "red"), ("rectangle", "blue"), ("triangle", "green"), ("circle", "gray")]
    im = vqa.mosaic_image([T.draw_tile(rng, s, c) for s, c in labels])
    s, c = T.patch_labels(im, labels)
    grid = c.reshape(24, 24)
    for q, (_, color) in enumerate(labels):
        r, k = divmod(q, 2)
        quad = grid[r * 12:(r + 1) * 12, k * 12:(k + 1) * 12]
        assert set(np.unique(quad)) <= {0, list(vqa.COLORS).index(color) + 1}


def test_pixels_match_the_processor(tmp_path) -> None:
    from ficoco.models import clip_processor_config
    from ficoco.preprocess import preprocess_image

    im = vqa.load_tile_image("train", 3)
    ours = T.pixels(im)
    ref = preprocess_image(im, clip_processor_config())[0]
    assert float((ours - ref).abs().max()) < 1e-5


def test_two_step_training_writes_a_llava_hf_directory(tmp_path) -> None:
    cfg = T.TrainConfig(vision_steps=1, steps=1, images_per_step=2, questions_per_image=2, eval_every=10**6,
                        eval_images=1)
    out = tmp_path / "m"
    log = T.train(cfg, out)
    meta = json.loads((out / "training_log.json").read_text())
    assert meta["weights_sha256"] == T.state_sha256(out / "model.safetensors") == log["weights_sha256"]
    assert [e["step"] for e in log["evals"]] == [2] and 0.0 <= log["evals"][0]["easy-vqa"] <= 1.0
    loaded = load_model(str(out))
    assert loaded.config.text_config.num_hidden_layers == 8 and loaded.geometry.vision.seq_len == 577
