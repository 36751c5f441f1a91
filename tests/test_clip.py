"""model/clip.py and model/clip_demo.py: loading, checkpoints, encoding, and the demo encoder trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import model.clip_demo as clip_demo
from model.clip import encode_images, encode_texts, flatten_alpha, load_clip, preprocess_images
from model.clip_demo import ClipTrainConfig, text_to_image_recall, train_demo_clip

TINY = str(Path(__file__).resolve().parents[1] / "model" / "configs" / "tiny_clip.json")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20),
    "purple": (140, 40, 180), "orange": (250, 130, 10), "black": (10, 10, 10), "cyan": (20, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")


def _sticker(colour: tuple[int, int, int], shape: str, size: int = 40) -> Image.Image:
    """A coloured shape on a transparent background, like a rendered emoji."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw, lo, hi = ImageDraw.Draw(image), size * 0.15, size * 0.85
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=colour + (255,))
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=colour + (255,))
    elif shape == "triangle":
        draw.polygon([(size / 2, lo), (hi, hi), (lo, hi)], fill=colour + (255,))
    else:
        bar = size * 0.12
        draw.rectangle([lo, size / 2 - bar, hi, size / 2 + bar], fill=colour + (255,))
        draw.rectangle([size / 2 - bar, lo, size / 2 + bar, hi], fill=colour + (255,))
    return image


@pytest.fixture(scope="module")
def stickers() -> tuple[list[Image.Image], list[str]]:
    pairs = [(_sticker(rgb, shape), f"{name} {shape}") for name, rgb in COLOURS.items() for shape in SHAPES]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY, None)


class NotATensor:
    """Any non-tensor object: a weights_only load must refuse to rebuild it."""


def test_load_clip_random_tiny_gives_normalised_embeddings(tiny, stickers):
    images, captions = stickers
    assert tiny.embed_dim == 32 and tiny.image_size == 32 and not tiny.model.training
    image_emb = encode_images(tiny, preprocess_images(tiny, images[:5]))
    text_emb = encode_texts(tiny, captions[:3])
    assert image_emb.shape == (5, 32) and text_emb.shape == (3, 32)
    assert image_emb.dtype == np.float32 and text_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1, atol=1e-5)
    # the same config registers once: a second load reuses the name instead of shadowing it
    assert load_clip(TINY, None).name == tiny.name


def test_flatten_alpha_puts_transparent_pixels_on_white():
    rgb = flatten_alpha(_sticker((220, 30, 30), "circle"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((20, 20)) == (220, 30, 30)


@pytest.mark.parametrize("wrapped", [False, True])
def test_checkpoint_round_trip_gives_identical_outputs(tiny, stickers, tmp_path, wrapped):
    images, captions = stickers
    state_dict = tiny.model.state_dict()
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": state_dict} if wrapped else state_dict, path)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = load_clip(TINY, str(path))
    batch = preprocess_images(tiny, images[:4])
    np.testing.assert_array_equal(encode_images(loaded, batch), encode_images(tiny, batch))
    np.testing.assert_array_equal(encode_texts(loaded, captions[:4]), encode_texts(tiny, captions[:4]))


def test_checkpoint_with_pickled_object_is_refused(tiny, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny.model.state_dict(), "payload": NotATensor()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_clip(TINY, str(path))


def test_bad_model_or_pretrained_names_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP model"):
        load_clip("ViT-NOPE-32", None)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor an open_clip tag"):
        load_clip(TINY, str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="lacks"):
        load_clip(str(bad), None)


def test_recall_counts_ties_against_the_model():
    emb = np.eye(3, dtype=np.float32)
    assert text_to_image_recall(emb, emb, ks=(1,))["recall@1"] == 1.0
    same = np.ones((3, 2), dtype=np.float32) / np.sqrt(2)  # collapsed embeddings retrieve nothing
    assert text_to_image_recall(same, same, ks=(1, 3)) == {
        "recall@1": 0.0, "chance@1": 1 / 3, "recall@3": 1.0, "chance@3": 1.0
    }


@pytest.fixture(scope="module")
def trained(stickers, tmp_path_factory):
    images, captions = stickers
    out_dir = tmp_path_factory.mktemp("encoder")
    kwargs = dict(out_dir=out_dir, config_json=Path(TINY), minutes=5.0, seed=0, holdout=0.0, max_steps=60,
                  train=ClipTrainConfig(batch_size=32, lr=2e-3, num_threads=1, precision="fp32"))
    return out_dir, kwargs, train_demo_clip(images, captions, **kwargs)


def test_trainer_learns_the_tiny_set(trained, stickers):
    out_dir, _, metrics = trained
    assert metrics["steps"] == 60 and metrics["n_train"] == 32 and metrics["eval_split"] == "train"
    assert metrics["final_loss"] < 0.6 * metrics["first_loss"], metrics
    assert metrics["recall@1"] >= 5 * metrics["chance@1"], metrics  # chance is 1/32
    assert metrics["recall@10"] > 0.6, metrics
    assert json.loads((out_dir / "encoder.json").read_text()) == metrics


def test_saved_encoder_loads_back_with_the_measured_recall(trained, stickers):
    out_dir, _, metrics = trained
    images, captions = stickers
    bundle = load_clip(str(out_dir / "encoder_config.json"), str(out_dir / "encoder.pt"))
    recall = text_to_image_recall(encode_texts(bundle, captions), encode_images(bundle, preprocess_images(bundle, images)))
    # the trainer evaluates from uint8 pixels recovered from the same preprocess: near-identical
    assert abs(recall["recall@1"] - metrics["recall@1"]) <= 2 / 32


def test_cache_returns_without_retraining(trained, stickers, monkeypatch):
    out_dir, kwargs, metrics = trained
    images, captions = stickers
    mtime = (out_dir / "encoder.pt").stat().st_mtime_ns

    def no_training(*args, **kw):
        raise AssertionError("the cached encoder was retrained")

    monkeypatch.setattr(clip_demo, "_train_loop", no_training)
    assert train_demo_clip(images, captions, **kwargs) == metrics
    assert (out_dir / "encoder.pt").stat().st_mtime_ns == mtime
    # a different seed is a different encoder: the cache must not answer for it
    with pytest.raises(AssertionError, match="retrained"):
        train_demo_clip(images, captions, **{**kwargs, "seed": 1})


def test_bf16_autocast_training_runs(stickers, tmp_path):
    images, captions = stickers
    train = ClipTrainConfig(batch_size=16, num_threads=1, precision="bf16")
    metrics = train_demo_clip(images[:16], captions[:16], tmp_path, Path(TINY), holdout=0.0, max_steps=3, train=train)
    assert metrics["precision"] == "bf16" and metrics["steps"] == 3
    assert np.isfinite(metrics["final_loss"]) and np.isfinite(metrics["recall@1"])
    with pytest.raises(ValueError, match="precision"):
        train_demo_clip(images[:16], captions[:16], tmp_path / "x", Path(TINY), holdout=0.0, max_steps=1,
                        train=ClipTrainConfig(precision="fp8"))


def test_training_prints_progress_lines_to_stderr(stickers, tmp_path, capsys):
    import re

    images, captions = stickers
    train = ClipTrainConfig(batch_size=16, num_threads=1, precision="fp32")
    kwargs = dict(holdout=0.0, max_steps=3, minutes=None, train=train)  # steps alone: no clock at all
    metrics = train_demo_clip(images[:16], captions[:16], tmp_path, Path(TINY), progress_every=0, **kwargs)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("encoder:")]
    pattern = r"encoder: step (\d+), loss \d+\.\d+, \d+ images/s, ETA \d+:\d\d:\d\d"
    assert len(lines) == 3 and all(re.fullmatch(pattern, line) for line in lines), lines
    assert [int(re.match(pattern, line).group(1)) for line in lines] == [1, 2, 3]
    assert lines[-1].endswith("ETA 0:00:00")  # max_steps reached
    # the interval is no part of the result: the cached encoder answers for any interval
    assert train_demo_clip(images[:16], captions[:16], tmp_path, Path(TINY), progress_every=10.0, **kwargs) == metrics
    with pytest.raises(ValueError, match="give the encoder a budget"):
        train_demo_clip(images[:16], captions[:16], tmp_path / "x", Path(TINY), minutes=None, max_steps=None)


def test_demo_encoder_keeps_a_fixed_logit_scale_and_refuses_a_cache_trained_with_another(stickers, tmp_path, monkeypatch):
    """`knnd demo --encoder-logit-scale 100`: the scale is held where it was fixed, and a cached encoder
    trained with another scale (a different embedding space) is an error naming the folder, not reused."""
    import math

    from pipeline import demo

    images, captions = stickers
    monkeypatch.setattr(demo, "downloaded_pairs", lambda cfg: (images[:16], captions[:16]))
    monkeypatch.setattr(demo, "ENCODER_CONFIG", Path(TINY))
    metrics = demo.train_encoder(None, tmp_path, steps=2, logit_scale=100.0)
    assert metrics["steps"] == 2 and metrics["cache_key"]["train"]["logit_scale"] == 100.0
    saved = torch.load(tmp_path / "encoder" / "encoder.pt", map_location="cpu", weights_only=True)
    scale = next(v for k, v in (saved.get("state_dict", saved)).items() if k.endswith("logit_scale"))
    assert math.isclose(float(scale), math.log(100.0), rel_tol=1e-6)  # trained, yet not moved
    assert demo.train_encoder(None, tmp_path, steps=2, logit_scale=100.0) == metrics  # same scale: reused
    with pytest.raises(ValueError, match=r"encoder holds a demo CLIP trained with logit scale 100, not learnt: "
                                         r"use another --workdir"):
        demo.train_encoder(None, tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"logit_scale=0.0: a fixed logit scale must be > 0"):
        ClipTrainConfig(logit_scale=0.0)
