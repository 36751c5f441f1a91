"""pipeline/sample.py: `knnd sample` and the sample stage on a tiny trained model and tiny random CLIP:
same seed -> same PNG bytes, a wrong-dimension index is exit 2 naming both dimensions, swapping the
index swaps the neighbours, --no-knn, --init-image (f_img(ref) in slot 1, noised start), records."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import model.diffusion
from conftest import TINY_CLIP
from model.clip import encode_images, load_clip, preprocess_images
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.shards import load_image
from pipeline.runner import run_stage, write_json
from pipeline.synthetic import write_embed_output
from test_train_stage import write_pack

TINY = os.path.abspath(TINY_CLIP)
RECORD_FIELDS = {"prompt", "prompt_index", "index_in_prompt", "seed", "image", "guidance", "neighbour_guidance", "steps", "scheduler", "k", "no_knn",
                 "neighbours_only",
                 "neighbour_keys", "neighbour_captions", "similarities", "init_image", "strength", "index_dir",
                 "checkpoint"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared cores


def settings(workdir) -> dict:
    return {"workdir": str(workdir), "device": "cpu",
            "dedup": {"manhattan_threshold": 0},
            "neighbours": {"k": 3, "candidates": 4},
            "train": {"model": "tiny", "steps": 2, "batch_size": 4, "warmup_steps": 1},
            "sample": {"prompts": ["red heart", "rocket"], "k": 3, "guidance": 3.0, "steps": 2, "images_per_prompt": 2}}


def build_index(workdir, prefix: str, n: int, d: int, seed: int):
    """Embed output (random unit vectors, "embedded" by the tiny CLIP) -> dedup -> index."""
    vectors = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    manifest = write_embed_output(workdir, vectors, shard_size=10, keys=[f"{prefix}{i:08d}" for i in range(n)],
                                  captions=[f"{prefix} item {i}" for i in range(n)])
    manifest["model"] = {"model": TINY, "pretrained": None, "name": "tiny", "dim": d}
    write_json(workdir / "embed" / "manifest.json", manifest)
    path = workdir / "stages.yaml"
    path.write_text(yaml.safe_dump(settings(workdir)))
    cfg = load_config(path)
    run_stage("dedup", cfg)
    run_stage("index", cfg)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Workdir a: index + tiny model trained 2 steps; b: another 32-d index; c: a 16-d index."""
    root = tmp_path_factory.mktemp("sample")
    config = build_index(root / "a", "a", 24, 32, seed=0)
    write_pack(root / "a")
    run_stage("train", load_config(config))
    build_index(root / "b", "b", 20, 32, seed=1)
    build_index(root / "c", "c", 20, 16, seed=2)
    return {"root": root, "config": str(config), "a": root / "a", "b": root / "b" / "index", "c": root / "c" / "index"}


def knnd_sample(work, out, *args) -> int:
    return main(["sample", "red heart", "green apple", "-k", "3", "--steps", "2", "--seed", "3",
                 "--out", str(out), "-c", work["config"], *args])


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]



def test_same_seed_gives_the_same_pngs_and_full_records(work, tmp_path, capsys):
    assert knnd_sample(work, tmp_path / "one") == 0
    assert f"grid: {tmp_path / 'one' / 'grid.png'}" in capsys.readouterr().out
    assert knnd_sample(work, tmp_path / "two") == 0
    names = ["red-heart_0.png", "red-heart_1.png", "green-apple_0.png", "green-apple_1.png"]
    for name in names + ["grid.png"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (tmp_path / "one" / names[0]).read_bytes() != (tmp_path / "one" / names[1]).read_bytes()  # seed + i
    assert np.asarray(Image.open(tmp_path / "one" / names[0])).shape == (16, 16, 3)
    rows = records(tmp_path / "one")
    assert [r["image"] for r in rows] == names and [r["seed"] for r in rows] == [3, 4, 3, 4]
    for r in rows:
        assert set(r) == RECORD_FIELDS
        assert len(r["neighbour_keys"]) == 3 and all(key.startswith("a") for key in r["neighbour_keys"])
        assert r["neighbour_captions"][0].startswith("a item") and r["similarities"] == sorted(r["similarities"], reverse=True)
        assert (r["guidance"], r["steps"], r["index_dir"]) == (3.0, 2, str((work["a"] / "index").resolve()))
        assert r["checkpoint"].endswith("step_0000002.pt")
    grid = Image.open(tmp_path / "one" / "grid.png")
    assert grid.height > 2 * 128 and grid.width > 2 * 128


def test_without_out_each_call_writes_a_new_timestamped_folder(work, capsys):
    import re
    from pathlib import Path

    args = ["sample", "red heart", "-k", "3", "--steps", "2", "--seed", "3", "-c", work["config"]]
    grids = []
    for _ in range(2):
        assert main(args) == 0
        grids += [Path(line.removeprefix("grid: ")) for line in capsys.readouterr().out.splitlines()
                  if line.startswith("grid: ")]
    assert len(grids) == 2 and grids[0].parent != grids[1].parent, grids
    for grid in grids:
        assert grid.name == "grid.png" and grid.is_file()
        assert grid.parent.parent == work["a"] / "sample_cli"
        assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", grid.parent.name), grid
        assert len(records(grid.parent)) == 2  # this call's images only


def test_index_of_another_dimension_is_a_usage_error_naming_both(work, tmp_path, capsys):
    assert knnd_sample(work, tmp_path / "out", "--index", str(work["c"])) == 2
    err = capsys.readouterr().err
    assert "32-dimensional" in err and "16-dimensional" in err and str(work["c"]) in err
    assert not (tmp_path / "out").exists()


def test_swapping_the_index_swaps_the_neighbours(work, tmp_path):
    assert knnd_sample(work, tmp_path / "a") == 0
    assert knnd_sample(work, tmp_path / "b", "--index", str(work["b"])) == 0
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert all(key.startswith("a") for r in a for key in r["neighbour_keys"])
    assert all(key.startswith("b") for r in b for key in r["neighbour_keys"])
    assert b[0]["index_dir"] == str(work["b"].resolve())


def test_no_knn_conditions_on_the_text_alone(work, tmp_path, spy):
    assert knnd_sample(work, tmp_path, "--no-knn") == 0
    assert all(call["emb"].shape[1:] == (1, 32) for call in spy)
    assert all(r["no_knn"] and r["k"] == 0 and r["neighbour_keys"] == [] for r in records(tmp_path))


def test_init_image_takes_the_first_neighbour_slot_and_the_noised_start(work, tmp_path, spy):
    reference = tmp_path / "ref.png"
    rgba = np.random.default_rng(5).integers(0, 256, (40, 56, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(reference)
    assert knnd_sample(work, tmp_path / "out", "--init-image", str(reference), "--strength", "0.5") == 0
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the random-init CLIP of the index, as the embed stage built it
        clip = load_clip(TINY, None)
    with Image.open(reference) as im:
        f_img = encode_images(clip, preprocess_images(clip, [im]))[0]
    call = spy[0]
    assert call["emb"].shape[1:] == (4, 32)  # f_txt, f_img(ref), d_2, d_3 (one row per image of the prompt)
    assert all(torch.equal(row, call["emb"][0]) for row in call["emb"])
    assert np.allclose(call["emb"][0, 1].numpy(), f_img, atol=1e-6)
    assert call["strength"] == 0.5 and all(np.array_equal(im, load_image(reference, 16)) for im in call["init_image"])
    rows = records(tmp_path / "out")
    assert all(len(r["neighbour_keys"]) == 2 and r["strength"] == 0.5 and r["init_image"] == str(reference.resolve())
               for r in rows)
    # the paper keeps d_2 .. d_k: the nearest neighbour gives its slot to the reference
    assert knnd_sample(work, tmp_path / "plain") == 0
    plain = next(r for r in records(tmp_path / "plain") if r["prompt"] == "red heart")
    edited = next(r for r in rows if r["prompt"] == "red heart")
    assert edited["neighbour_keys"] == plain["neighbour_keys"][1:3]
    assert edited["similarities"] == plain["similarities"][1:3]


def test_k_beyond_the_model_and_missing_checkpoint_are_usage_errors(work, tmp_path, capsys):
    assert main(["sample", "x", "-k", "4", "--out", str(tmp_path / "o"), "-c", work["config"]]) == 2
    assert "k=4 exceeds the 3 neighbours" in capsys.readouterr().err
    assert knnd_sample(work, tmp_path / "o", "--checkpoint", str(tmp_path / "none.pt")) == 2
    assert not (tmp_path / "o").exists()


def test_sample_stage_writes_grid_and_records_and_resumes_by_prompt(work):
    cfg = load_config(work["config"])
    manifest = run_stage("sample", cfg)
    out = work["a"] / "sample"
    assert manifest["counts"] == {"prompts": 2, "images": 4}
    assert manifest["images"] == ["red-heart_0.png", "red-heart_1.png", "rocket_0.png", "rocket_1.png"]
    assert len(records(out)) == 4 and (out / "grid.png").exists()
    first = {name: ((out / name).read_bytes(), (out / name).stat().st_ino) for name in manifest["images"]}
    # killed while sampling the second prompt: its marker is gone, no manifest yet
    (out / "manifest.json").unlink()
    (out / "_run" / "done" / "00001.json").unlink()
    (out / "rocket_1.png").unlink()
    logs = []
    run_stage("sample", cfg, log=logs.append)
    assert logs == ["sample: resuming"]
    again = {name: ((out / name).read_bytes(), (out / name).stat().st_ino) for name in manifest["images"]}
    assert again["red-heart_0.png"] == first["red-heart_0.png"]  # not redone
    assert again["rocket_1.png"][0] == first["rocket_1.png"][0]  # redone identically
    logs.clear()
    run_stage("sample", cfg, log=logs.append)
    assert logs == ["sample: up to date, nothing to do"]


def test_neighbours_only_masks_the_text_slot_and_depends_on_the_neighbours(work, tmp_path, monkeypatch):
    """--neighbours-only: the text retrieves, the neighbours alone condition (slot 0 masked)."""
    seen = []
    real = model.diffusion.sample

    def spy_sample(model_, emb, **kwargs):
        seen.append((emb.clone(), kwargs.get("neighbour_mask")))
        return real(model_, emb, **kwargs)

    monkeypatch.setattr(model.diffusion, "sample", spy_sample)
    assert knnd_sample(work, tmp_path / "nbo", "--neighbours-only") == 0
    emb, mask = seen[-1]
    assert mask is not None and not mask[:, 0].any() and mask[:, 1:].all() and emb.shape[1] == 4
    assert all(r["neighbours_only"] and r["k"] == 3 for r in records(tmp_path / "nbo"))
    assert knnd_sample(work, tmp_path / "both", "--neighbours-only", "--no-knn") == 2


def test_neighbour_guidance_reaches_the_sampler_and_needs_text_and_neighbours(work, tmp_path, monkeypatch, capsys):
    """--neighbour-guidance goes to diffusion.sample and into the records; with --no-knn or
    --neighbours-only (no neighbours, or no text, to scale) it is a usage error naming both flags."""
    seen = []
    real = model.diffusion.sample

    def spy_sample(model_, emb, **kwargs):
        seen.append(kwargs.get("neighbour_guidance"))
        return real(model_, emb, **kwargs)

    monkeypatch.setattr(model.diffusion, "sample", spy_sample)
    assert knnd_sample(work, tmp_path / "ng", "--neighbour-guidance", "6") == 0
    assert seen and set(seen) == {6.0}
    assert {r["neighbour_guidance"] for r in records(tmp_path / "ng")} == {6.0}
    for flag in ("--no-knn", "--neighbours-only"):
        assert knnd_sample(work, tmp_path / "bad", "--neighbour-guidance", "6", flag) == 2
        assert "--neighbour-guidance (sample.neighbour_guidance) scales what the neighbours add" in capsys.readouterr().err
    assert knnd_sample(work, tmp_path / "bad", "--neighbour-guidance", "nan") == 2
    assert "neighbour_guidance must be a finite number of at least 0, got nan" in capsys.readouterr().err


def test_a_copied_index_folder_samples_with_its_workdir_deleted(tmp_path, capsys):
    """The index folder holds what search and sampling need (vectors, keys, captions, CLIP identity):
    `cp -r index/ elsewhere` and `knnd sample --index elsewhere` give the same images and neighbours
    after the workdir it came from is deleted; the checkpoint records the CLIP it was trained on."""
    import shutil

    from pipeline.embeddings import Embeddings

    config = build_index(tmp_path / "w", "w", 24, 32, seed=4)
    pack = write_pack(tmp_path / "w")
    pack["clip"] = {"model": TINY, "pretrained": None, "name": "tiny", "dim": 32}
    write_json(tmp_path / "w" / "pack" / "manifest.json", pack)
    run_stage("train", load_config(config))
    index, checkpoint = tmp_path / "w" / "index", tmp_path / "w" / "train" / "checkpoints" / "step_0000002.pt"
    rows = np.load(index / "rows.npy")
    assert np.array_equal(np.load(index / "vectors.npy"), Embeddings(tmp_path / "w" / "embed")[rows])
    infos = json.loads((index / "index_infos.json").read_text())
    identity = {"name": "tiny", "pretrained": None, "weights_sha256": None, "d": 32}
    assert infos["clip"] == identity and torch.load(checkpoint, weights_only=True)["clip"] == identity
    assert not (index / "thumbnails.npy").exists()  # synthetic embeddings: no pictures behind them

    args = ["sample", "red heart", "rocket", "-k", "3", "--steps", "2", "--seed", "5", "-c", str(config)]
    assert main([*args, "--out", str(tmp_path / "before")]) == 0
    shutil.copytree(index, tmp_path / "elsewhere" / "index")
    shutil.copy(checkpoint, tmp_path / "elsewhere" / "model.pt")
    shutil.copy(config, tmp_path / "elsewhere" / "stages.yaml")  # the same sample: settings
    shutil.rmtree(tmp_path / "w")
    moved = ["--index", str(tmp_path / "elsewhere" / "index"), "--checkpoint", str(tmp_path / "elsewhere" / "model.pt"),
             "-c", str(tmp_path / "elsewhere" / "stages.yaml")]
    assert main(["sample", "red heart", "rocket", "-k", "3", "--steps", "2", "--seed", "5", *moved,
                 "--out", str(tmp_path / "after")]) == 0
    before, after = records(tmp_path / "before"), records(tmp_path / "after")
    assert [r["neighbour_keys"] for r in after] == [r["neighbour_keys"] for r in before]
    assert [r["neighbour_captions"] for r in after] == [r["neighbour_captions"] for r in before]
    for r in before:
        assert (tmp_path / "after" / r["image"]).read_bytes() == (tmp_path / "before" / r["image"]).read_bytes()

    # an index embedded by another CLIP (same dimension) is refused, naming both, unless allowed
    other = tmp_path / "elsewhere" / "index" / "index_infos.json"
    other.write_text(json.dumps({**infos, "clip": {**identity, "name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}}))
    capsys.readouterr()
    assert main(["sample", "red heart", "-k", "3", "--steps", "2", *moved, "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "trained on embeddings of CLIP tiny (random init, d=32)" in err
    assert "embeddings of CLIP ViT-B-32 (laion2b_s34b_b79k, d=32)" in err and "--allow-other-clip" in err
    assert not (tmp_path / "other").exists()
    assert main(["sample", "red heart", "-k", "3", "--steps", "2", *moved, "--allow-other-clip",
                 "--out", str(tmp_path / "other")]) == 0


def test_unconditional_samples_database_images_conditioned_on_their_neighbours(work, tmp_path, spy, capsys):
    """RDM's unconditional mode: N random indexed images (seeded) are the queries; each is conditioned on
    its own embedding and its k nearest other images."""
    from pipeline.embeddings import Embeddings

    args = ["sample", "--unconditional", "3", "-k", "3", "--steps", "2", "--seed", "7", "-c", work["config"]]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    rows = records(tmp_path / "one")
    labels = list(dict.fromkeys(r["prompt"] for r in rows))
    assert len(labels) == 3 and all(label.startswith("pseudo-query a") for label in labels)
    embeddings = Embeddings(work["a"] / "embed")
    indexed = np.load(work["a"] / "index" / "rows.npy")  # a flat index at 24 items: exact, brute force agrees
    vectors = embeddings[indexed].astype(np.float32)
    for record in rows:
        key = record["prompt"].removeprefix("pseudo-query ")
        row = int(key.removeprefix("a"))
        sims = vectors @ embeddings[[row]][0].astype(np.float32)
        sims[indexed == row] = -np.inf  # other images only
        nearest = [f"a{r:08d}" for r in indexed[np.argsort(-sims, kind="stable")[:3]]]
        assert record["neighbour_keys"] == nearest and key not in nearest
    for call, label in zip(spy, labels):  # slot 0 holds the pseudo-query image's own embedding
        row = int(label.removeprefix("pseudo-query a"))
        assert np.allclose(call["emb"][0, 0].numpy(), embeddings[[row]][0].astype(np.float32), atol=1e-6)
    assert Image.open(tmp_path / "one" / "grid.png").height > 3 * 128
    assert main([*args, "--out", str(tmp_path / "two")]) == 0  # the same seed draws the same queries
    assert [r["prompt"] for r in records(tmp_path / "two")] == [r["prompt"] for r in rows]
    capsys.readouterr()
    assert main([*args, "--no-knn", "--out", str(tmp_path / "bad")]) == 2
    assert "--unconditional" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("guidance", ["nan", "inf", "-1"])
def test_guidance_must_be_finite_and_non_negative(tmp_path, capsys, guidance):
    """nan passed the `guidance < 0` check (every comparison with nan is False) and reached the sampler;
    refused before any checkpoint is looked for."""
    assert main(["sample", "x", "--guidance", guidance, "--set", f"workdir={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert f"guidance must be a finite number of at least 0, got {float(guidance)}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
