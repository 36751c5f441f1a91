"""pipeline/edit.py: `knnd edit` on a tiny manipulation model and a tiny random-CLIP index: same seed ->
same PNGs, the condition (f_txt(edit), the image's own neighbours by brute force) and the image input
(the image itself; with --box, the ECC-aligned first neighbour pasted in the box), and the refusals
(a text-to-image checkpoint for edit, a manipulation checkpoint for sample, a bad box)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from model.checkpoint import latest_checkpoint
from model.clip import encode_images, encode_texts, load_clip_spec, preprocess_images
from model.data import write_pack_shard
from model.denoiser import ModelConfig
from model.manipulation import align_ecc
from model.trainer import train
from pipeline.cli import main
from pipeline.shards import load_image
from test_manipulation import TINY, manipulation_samples, textured
from test_sample import build_index
from test_trainer import make_samples, tiny_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """An index of 24 random tiny-CLIP vectors (with thumbnails), a manipulation model and a
    text-to-image model, both tiny and trained 2 steps."""
    root = tmp_path_factory.mktemp("edit")
    config = build_index(root, "a", 24, 32, seed=0)
    thumbs = np.stack([np.roll(textured(16), i, axis=1) for i in range(24)])
    np.save(root / "index" / "thumbnails.npy", thumbs)
    checkpoints = {}
    for name, samples, model_config in (("manipulate", manipulation_samples(8), ModelConfig.tiny(manipulation=True)),
                                        ("generate", make_samples(8), ModelConfig.tiny())):
        pack = root / f"pack_{name}" / "00000.tar"
        pack.parent.mkdir()
        write_pack_shard(pack, samples)
        train(tiny_params(steps=2, checkpoint_every=2), model_config, [pack], root / f"train_{name}")
        checkpoints[name] = str(latest_checkpoint(root / f"train_{name}" / "checkpoints"))
    image = root / "image.png"
    Image.fromarray(textured(40)).save(image)
    return {"root": root, "config": str(config), "image": image, "thumbs": thumbs, **checkpoints}


def knnd_edit(work, out, *args, checkpoint="manipulate") -> int:
    return main(["edit", str(work["image"]), "wearing a hat", "--checkpoint", work[checkpoint], "-k", "3",
                 "--steps", "2", "--seed", "3", "--images", "2", "--out", str(out), "-c", work["config"], *args])



def test_same_seed_same_pngs_and_the_paper_condition(work, tmp_path, spy, capsys):
    assert knnd_edit(work, tmp_path / "one") == 0
    assert f"grid: {tmp_path / 'one' / 'grid.png'}" in capsys.readouterr().out
    assert knnd_edit(work, tmp_path / "two") == 0
    names = ["before.png", "input.png", "after_0.png", "after_1.png", "grid.png"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (tmp_path / "one" / "after_0.png").read_bytes() != (tmp_path / "one" / "after_1.png").read_bytes()
    before = load_image(work["image"], 16)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / "before.png")), before)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / "input.png")), before)  # mask-free: the image itself

    # oracle: f_txt(edit) in slot 0, then the image's 3 nearest index vectors by brute force
    clip = load_clip_spec({"model": TINY, "pretrained": None})
    with Image.open(work["image"]) as im:
        f_img = encode_images(clip, preprocess_images(clip, [im]))[0]
    vectors = np.load(work["root"] / "index" / "vectors.npy").astype(np.float32)
    nearest = np.argsort(-(vectors @ f_img), kind="stable")[:3]
    call = spy[0]
    assert call["emb"].shape == (2, 4, 32)
    assert np.allclose(call["emb"][0, 0].numpy(), encode_texts(clip, ["wearing a hat"])[0], atol=1e-6)
    assert np.array_equal(call["emb"][0, 1:].numpy(), vectors[nearest])
    assert all(np.array_equal(im, before) for im in call["image_cond"])
    record = json.loads((tmp_path / "one" / "edit.json").read_text())
    keys = [f"a{int(i):08d}" for i in nearest]  # rows.npy holds all 24 rows in order
    assert record["neighbour_keys"] == keys and record["seeds"] == [3, 4] and record["box"] is None
    assert record["after"] == ["after_0.png", "after_1.png"] and record["ecc_aligned"] is None


def test_box_pastes_the_aligned_first_neighbour(work, tmp_path, spy):
    assert knnd_edit(work, tmp_path / "out", "--box", "0.25,0.5,0.75,1") == 0
    record = json.loads((tmp_path / "out" / "edit.json").read_text())
    first = int(record["neighbour_keys"][0][1:])
    before = load_image(work["image"], 16)
    aligned, ok = align_ecc(work["thumbs"][first], before)
    expected = before.copy()
    expected[8:16, 4:12] = aligned[8:16, 4:12]  # rows y0..y1 = 8..16, columns x0..x1 = 4..12
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "input.png")), expected)
    assert np.array_equal(spy[0]["image_cond"][0], expected) and record["ecc_aligned"] == ok
    assert record["box"] == [0.25, 0.5, 0.75, 1.0]


def test_refusals_exit_2_and_write_nothing(work, tmp_path, capsys):
    assert knnd_edit(work, tmp_path / "out", checkpoint="generate") == 2
    err = capsys.readouterr().err
    assert "is a text-to-image model (train.mode=generate)" in err and "train.mode=manipulate" in err
    assert main(["sample", "rocket", "--checkpoint", work["manipulate"], "-k", "3", "--steps", "2",
                 "--out", str(tmp_path / "out"), "-c", work["config"]]) == 2
    err = capsys.readouterr().err
    assert "was trained for local manipulation (train.mode=manipulate)" in err and "knnd edit" in err
    assert knnd_edit(work, tmp_path / "out", "--box", "0.5,0.5,0.2,0.9") == 2
    assert "0 <= x0 < x1 <= 1" in capsys.readouterr().err
    assert knnd_edit(work, tmp_path / "out", "--box", "a,b") == 2
    assert "four comma-separated fractions" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "missing.png"), "hat", "--checkpoint", work["manipulate"],
                 "-c", work["config"], "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "IMAGE" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("guidance", ["nan", "inf", "-1"])
def test_guidance_must_be_finite_and_non_negative(tmp_path, capsys, guidance):
    """nan passed the `guidance < 0` check (every comparison with nan is False); refused before any work."""
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    assert main(["edit", str(tmp_path / "in.png"), "a hat", "--guidance", guidance, "--set", f"workdir={tmp_path}",
                 "--out", str(tmp_path / "o")]) == 2
    assert f"--guidance must be a finite number of at least 0, got {float(guidance)}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
