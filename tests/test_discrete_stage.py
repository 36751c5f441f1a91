"""pipeline/tokens.py, pipeline/train_discrete.py and `knnd sample` with a discrete checkpoint: pack.tokens
writes token grids and the VQ report, train.backbone=discrete trains through the train stage, and
every `knnd sample` flag works (same seed -> same bytes, -k, --guidance, --steps, --no-knn, --index,
--init-image); train refuses a pack without tokens (exit 2, naming the fix)."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import yaml
from PIL import Image

from model.checkpoint import load_model
from model.discrete import DiscreteDenoiser
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import read_json, run_stage, write_json
from pipeline.tokens import run_tokens
from test_sample import build_index, settings
from test_train_stage import write_pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PACK = {"tokens": True, "image_size": 16, "vq_downsample": 2, "vq_codes": 16, "vq_channels": 16, "vq_embed_dim": 4,
        "vq_steps": 3, "vq_batch_size": 4}


def discrete_settings(workdir) -> dict:
    base = settings(workdir)
    base["pack"] = PACK
    base["train"] = {**base["train"], "backbone": "discrete", "steps": 3}
    return base


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("discrete")
    build_index(root / "a", "a", 24, 32, seed=0)
    config = root / "a" / "stages.yaml"
    config.write_text(yaml.safe_dump(discrete_settings(root / "a")))
    cfg = load_config(config)
    pack = write_pack(root / "a")
    embed = read_json(root / "a" / "embed" / "manifest.json")
    stage = types.SimpleNamespace(conf=cfg.pack, dir=root / "a" / "pack", input_dirs={"embed": root / "a" / "embed"},
                                  device=lambda: "cpu")
    pack["tokens"] = run_tokens(stage, pack["shards"], embed)
    write_json(root / "a" / "pack" / "manifest.json", pack)
    train = run_stage("train", cfg)
    build_index(root / "b", "b", 20, 32, seed=1)
    return {"root": root, "config": str(config), "a": root / "a", "b": root / "b" / "index", "pack": pack, "train": train}


def test_pack_tokens_and_the_train_stage(work):
    tokens = work["pack"]["tokens"]
    assert tokens["grid"] == [8, 8] and tokens["codes"] == 16 and tokens["vq_step"] == 3
    quality = tokens["quality"]
    assert quality["used"] + quality["dead"] == 16 and quality["psnr"] > 0 and quality["fd_clip"] is not None
    with np.load(work["a"] / "pack" / tokens["tokens"]) as stored:
        assert stored["tokens"].shape == (8, 8, 8) and stored["keys"].tolist() == [f"{i:09d}" for i in range(8)]
    train = work["train"]
    assert train["backbone"] == "discrete" and train["step"] == 3 and np.isfinite(train["loss"])
    model = load_model(work["a"] / "train" / train["checkpoint"])
    assert isinstance(model, DiscreteDenoiser) and train["parameters"] == model.num_parameters()
    assert run_stage("train", load_config(work["config"]))["step"] == 3  # up to date: not retrained


def sample(work, out, *args) -> int:
    return main(["sample", "red heart", "green apple", "-k", "3", "--steps", "3", "--seed", "3",
                 "--out", str(out), "-c", work["config"], *args])


def lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_knnd_sample_flags_with_a_discrete_checkpoint(work, tmp_path):
    assert sample(work, tmp_path / "x") == 0 and sample(work, tmp_path / "y") == 0
    names = sorted(p.name for p in (tmp_path / "x").glob("*.png"))
    assert len(names) == 5  # 2 prompts x 2 images + the grid
    for name in names:
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()
    assert Image.open(tmp_path / "x" / "red-heart_0.png").size == (16, 16)
    assert sample(work, tmp_path / "seed", "--seed", "4") == 0  # image 1 of seed 3 is image 0 of seed 4
    assert (tmp_path / "x" / "red-heart_1.png").read_bytes() == (tmp_path / "seed" / "red-heart_0.png").read_bytes()
    assert sample(work, tmp_path / "noknn", "--no-knn", "--guidance", "1") == 0
    assert all(r["k"] == 0 and r["no_knn"] and r["guidance"] == 1.0 for r in lines(tmp_path / "noknn"))
    assert pixels(tmp_path / "noknn" / "red-heart_0.png") != pixels(tmp_path / "x" / "red-heart_0.png")
    assert sample(work, tmp_path / "swap", "--index", str(work["b"]), "-k", "2") == 0
    assert all(key.startswith("b") and r["k"] == 2 for r in lines(tmp_path / "swap") for key in r["neighbour_keys"])
    reference = tmp_path / "x" / "red-heart_0.png"
    assert sample(work, tmp_path / "edit", "--init-image", str(reference), "--strength", "0.5", "--steps", "4") == 0
    edits = lines(tmp_path / "edit")
    assert all(r["strength"] == 0.5 and r["steps"] == 4 for r in edits)
    assert sample(work, tmp_path / "plain", "--steps", "4") == 0  # the same noise and steps, no reference (which
    # sets the start and the first neighbour slot: test_discrete checks the start alone)
    assert pixels(tmp_path / "edit" / "red-heart_0.png") != pixels(tmp_path / "plain" / "red-heart_0.png")


def pixels(path) -> bytes:
    return np.asarray(Image.open(path)).tobytes()


def test_discrete_train_without_tokens_is_a_usage_error(tmp_path, capsys):
    write_pack(tmp_path)
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump({"workdir": str(tmp_path), "device": "cpu",
                                      "train": {"model": "tiny", "backbone": "discrete", "steps": 2, "batch_size": 4}}))
    assert main(["run", "train", "-c", str(config)]) == 2
    assert "pack.tokens=true" in capsys.readouterr().err



def test_evaluate_samples_a_discrete_checkpoint_unchanged(work, tmp_path):
    """evaluate's sampling (batched, per-image seeds, slot masks) through a discrete checkpoint; the
    metrics need nothing of the backbone (the whole stage ran in a tiny `knnd demo --backbone discrete`)."""
    import dataclasses

    from pipeline.evaluate import EvalSetup, generate
    from pipeline.generation import Sampler

    cfg = load_config(work["config"])
    sampler = Sampler(work["a"] / "train" / work["train"]["checkpoint"], work["a"] / "index", "cpu")
    setup = EvalSetup(checkpoint=sampler.checkpoint, index_dir=sampler.index_dir, out=tmp_path, k=2)
    conf = dataclasses.replace(cfg.evaluate, steps=2, images_per_prompt=2, batch_size=3)
    prompts = ["a item 1", "a item 2"]
    first = generate(sampler, prompts, setup, conf)
    again = generate(sampler, prompts, dataclasses.replace(setup, out=tmp_path / "again"), conf)  # not the saved batches
    assert first["images"].shape == (4, 16, 16, 3) and first["prompt_of"].tolist() == [0, 0, 1, 1]
    assert np.array_equal(first["images"], again["images"])
    one_batch = generate(sampler, prompts, setup, dataclasses.replace(conf, batch_size=4))
    assert np.array_equal(first["images"], one_batch["images"])  # the batching does not change an image


def test_vq_settings_that_do_not_fit_are_usage_errors(tmp_path):
    from pipeline.runner import UsageError
    from pipeline.tokens import check

    cfg = load_config(None, [f"workdir={tmp_path}", "pack.tokens=true", "pack.image_size=12", "pack.vq_downsample=8"])
    with pytest.raises(UsageError, match="pack.image_size 12 is not divisible by pack.vq_downsample 8"):
        check(cfg)
    cfg = load_config(None, [f"workdir={tmp_path}", "pack.tokens=true", "pack.vq_channels=40"])
    with pytest.raises(UsageError, match="pack.vq_channels 40 must be a multiple of 16"):
        check(cfg)
    check(load_config(None, [f"workdir={tmp_path}", "pack.vq_channels=40"]))  # no tokens: not checked


def test_continuous_only_keys_are_refused_with_the_discrete_backbone(work):
    from pipeline.runner import UsageError
    from pipeline.train_discrete import discrete_config

    cfg = load_config(work["config"], ["train.loss_weighting=min_snr"])
    with pytest.raises(UsageError, match="train.loss_weighting applies to the continuous backbone only"):
        discrete_config("tiny", work["pack"], cfg.train)
