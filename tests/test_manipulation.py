"""model/manipulation.py, pipeline/pack_manipulation.py and the trainer's manipulation mode: ECC
alignment against a known warp, boxes and masks against hand-computed ones, the pack stage's
aligned neighbours and crop embeddings against an independent decode, and exact resume."""
from __future__ import annotations

import io
import json
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import TINY_CLIP, jpg_bytes, write_fake_download
from model.checkpoint import latest_checkpoint, load_model
from model.data import PackDataset, read_pack_shard, write_pack_shard
from model.denoiser import KnnDenoiser, ModelConfig
from model.manipulation import (align_ecc, box_masks, choose_boxes, init_from_checkpoint, key_rng,
                                manipulation_batch, random_boxes)
from model.trainer import train
from pipeline.config import load_config
from pipeline.runner import UsageError, run_stage
from pipeline.synthetic import write_embed_output
from test_pack import DROPPED_ROW, neighbour_rows, write_neighbours
from test_trainer import make_samples, read_metrics, tiny_params

TINY = os.path.abspath(TINY_CLIP)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def textured(size: int = 32) -> np.ndarray:
    """Two blobs and a wave: enough texture for ECC to lock on at 32 px."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([np.exp(-((x - 0.4) ** 2 + (y - 0.5) ** 2) / 0.02),
                      np.exp(-((x - 0.65) ** 2 + (y - 0.35) ** 2) / 0.01),
                      0.5 + 0.5 * np.sin(6 * x) * np.cos(4 * y)], axis=-1)
    return (image * 255).clip(0, 255).astype(np.uint8)


def test_ecc_undoes_a_known_rotation_and_shift():
    image = textured()
    warp = cv2.getRotationMatrix2D((16, 16), 8, 1.0)
    warp[:, 2] += [2, -1.5]
    moved = cv2.warpAffine(image, warp, (32, 32), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    aligned, ok = align_ecc(moved, image)
    inner = (slice(4, 28), slice(4, 28))  # the borders were filled by replication, not image content
    error = lambda a: np.abs(a[inner].astype(float) - image[inner]).mean()  # noqa: E731
    assert ok and aligned.shape == image.shape and aligned.dtype == np.uint8
    assert error(moved) > 10 and error(aligned) < 0.1 * error(moved), (error(moved), error(aligned))
    flat = np.full_like(image, 200)  # nothing to correlate: ECC fails, the neighbour is kept as it is
    result, ok = align_ecc(flat, image)
    assert not ok and result is flat


def test_boxes_masks_and_the_per_step_choice():
    boxes = random_boxes(key_rng("000000007"), 50, 16, 0.25, 0.5)
    assert boxes.dtype == np.int16 and boxes.shape == (50, 4)
    sides = boxes[:, 2:] - boxes[:, :2]
    assert (sides >= 4).all() and (sides <= 8).all() and (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 16).all()
    assert np.array_equal(boxes, random_boxes(key_rng("000000007"), 50, 16, 0.25, 0.5))  # seeded by the key
    assert not np.array_equal(boxes, random_boxes(key_rng("000000008"), 50, 16, 0.25, 0.5))
    mask = box_masks(torch.tensor([[1, 2, 3, 5]]), 6)
    expected = np.zeros((6, 6))
    expected[2:5, 1:3] = 1  # rows y0..y1-1, columns x0..x1-1
    assert mask.shape == (1, 1, 6, 6) and np.array_equal(mask[0, 0].numpy(), expected)
    a, b = choose_boxes(64, 4, seed=0, rank=0, step=3), choose_boxes(64, 4, seed=0, rank=0, step=3)
    assert torch.equal(a, b) and set(a.tolist()) == {0, 1, 2, 3}
    assert not torch.equal(a, choose_boxes(64, 4, seed=0, rank=0, step=4))
    assert not torch.equal(a, choose_boxes(64, 4, seed=1, rank=0, step=3))


def test_manipulation_batch_pastes_the_neighbour_inside_the_chosen_box():
    g = torch.Generator().manual_seed(0)
    image, neighbour = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    emb, box_emb = torch.rand(3, 4, 5, generator=g), torch.rand(3, 2, 5, generator=g)
    boxes = torch.tensor([[[0, 0, 4, 4], [2, 2, 8, 6]]] * 3)
    manip, cond = manipulation_batch(image, emb, neighbour, boxes, box_emb, seed=0, rank=0, step=5)
    chosen = choose_boxes(3, 2, 0, 0, 5)
    for i in range(3):
        x0, y0, x1, y1 = boxes[i, chosen[i]].tolist()
        expected = image[i].clone()
        expected[:, y0:y1, x0:x1] = neighbour[i, :, y0:y1, x0:x1]
        assert torch.equal(manip[i], expected)
        assert torch.equal(cond[i, 0], box_emb[i, chosen[i]]) and torch.equal(cond[i, 1:], emb[i, 1:])


def test_manipulation_model_takes_the_image_as_extra_channels():
    model = KnnDenoiser(ModelConfig.tiny(manipulation=True))
    assert model.unet.config.in_channels == 6 and model.unet.config.out_channels == 3
    x, emb = torch.zeros(2, 3, 16, 16), torch.zeros(2, 4, 32)
    assert model(x, torch.tensor([1, 2]), emb, image_cond=torch.zeros(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="needs image_cond"):
        model(x, torch.tensor([1, 2]), emb)
    assert KnnDenoiser(ModelConfig.tiny(space_to_depth=2, manipulation=True)).unet.config.in_channels == 24


# --------------------------------------------------------------------------- the pack stage


def decode(data: bytes, size: int) -> np.ndarray:
    """Independent oracle of the pack's decode (centre square, Lanczos) for these opaque test JPEGs."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS))


@pytest.fixture
def upstream(tmp_path):
    """download (2 tars) + embed by the tiny CLIP (d = 32) + neighbours (k = 3) for 9 images, one dropped."""
    keys = [f"{i:09d}" for i in range(9)]
    images = [jpg_bytes(i) for i in range(9)]
    shard_rows = [range(0, 5), range(5, 9)]
    write_fake_download(tmp_path, [[(keys[r], images[r], f"caption {r}") for r in rows] for rows in shard_rows])
    vectors = np.random.default_rng(1).standard_normal((9, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_embed_output(tmp_path, vectors, shard_size=5, keys=keys,
                       model={"model": TINY, "pretrained": None, "name": "tiny", "dim": 32})
    write_neighbours(tmp_path, vectors, shard_rows, keys)
    return {"keys": keys, "images": images}


def test_pack_stores_aligned_neighbours_boxes_and_crop_embeddings(tmp_path, upstream, ray_local):
    from model.clip import encode_images, load_clip_spec, preprocess_images

    cfg = load_config(None, [f"workdir={tmp_path}", "pack.image_size=16", "pack.shard_size=3", "ray.num_cpus=2",
                             "pack.manipulation=true", "pack.boxes=3"])
    manifest = run_stage("pack", cfg)
    m = manifest["manipulation"]
    assert (m["boxes"], m["box_min"], m["box_max"]) == (3, 0.25, 0.5)
    assert m["aligned"] + m["unaligned"] == manifest["items"] == 8 and m["neighbour_missing"] == 0
    assert manifest["shapes"]["nbr_image"] == [16, 16, 3] and manifest["shapes"]["box_emb"] == [3, 32]
    clip = load_clip_spec({"model": TINY, "pretrained": None})
    keys, images, first = upstream["keys"], upstream["images"], {k: r[0] for k, r in neighbour_rows(tmp_path).items()}
    unaligned = 0
    for entry in manifest["shards"]:
        shard = read_pack_shard(tmp_path / "pack" / entry["tar"])
        for i, key in enumerate(shard["keys"]):
            own, nbr = decode(images[keys.index(key)], 16), decode(images[first[key]], 16)
            expected, ok = align_ecc(nbr, own)
            unaligned += not ok
            assert np.array_equal(shard["nbr_image"][i], expected), key
            boxes = random_boxes(key_rng(key), 3, 16, 0.25, 0.5)
            assert np.array_equal(shard["boxes"][i], boxes)
            source = decode(images[keys.index(key)], 32)  # the tiny CLIP's input size: boxes scale by 2
            crops = [ImageOps.pad(Image.fromarray(source[2 * y0:2 * y1, 2 * x0:2 * x1]), (2 * max(x1 - x0, y1 - y0),) * 2,
                                  color=(255, 255, 255)) for x0, y0, x1, y1 in boxes.tolist()]
            direct = encode_images(clip, preprocess_images(clip, crops))
            assert np.allclose(shard["box_emb"][i].astype(np.float32), direct, atol=2e-3), key
    assert unaligned == m["unaligned"]
    assert DROPPED_ROW not in [keys.index(k) for k in first]
    from pipeline import train as train_stage

    train_stage.check(load_config(None, [f"workdir={tmp_path}", "train.mode=manipulate", "train.batch_size=4"]))
    (tmp_path / "plain" / "pack").mkdir(parents=True)
    (tmp_path / "plain" / "pack" / "manifest.json").write_text(json.dumps({**manifest, "manipulation": None}))
    with pytest.raises(UsageError, match=r"train.mode is manipulate but the pack holds no aligned.*pack.manipulation=true"):
        train_stage.check(load_config(None, [f"workdir={tmp_path / 'plain'}", "train.mode=manipulate", "train.batch_size=4"]))
    with pytest.raises(UsageError, match=r"train.init_from .*missing.pt does not exist"):
        train_stage.check(load_config(None, [f"workdir={tmp_path}", f"train.init_from={tmp_path / 'missing.pt'}",
                                             "train.batch_size=4"]))


# --------------------------------------------------------------------------- training


def manipulation_samples(n: int, boxes: int = 2):
    samples = make_samples(n)
    rng = np.random.default_rng(3)
    for i, sample in enumerate(samples):
        sample["nbr_image"] = samples[(i + 1) % n]["image"]
        sample["boxes"] = random_boxes(key_rng(sample["key"]), boxes, 16, 0.25, 0.5)
        sample["box_emb"] = rng.standard_normal((boxes, 32)).astype(np.float16)
    return samples


@pytest.fixture
def manipulation_pack(tmp_path):
    paths = [tmp_path / "pack" / "00000.tar", tmp_path / "pack" / "00001.tar"]
    paths[0].parent.mkdir()
    samples = manipulation_samples(8)
    write_pack_shard(paths[0], samples[:5])
    write_pack_shard(paths[1], samples[5:])
    return paths, samples


def test_manipulation_pack_round_trip_and_dataset(manipulation_pack, tmp_path):
    paths, samples = manipulation_pack
    read = read_pack_shard(paths[0])
    for name in ("nbr_image", "boxes", "box_emb"):
        assert np.array_equal(read[name], np.stack([s[name] for s in samples[:5]]))
    image, emb, nbr_image, boxes, box_emb = next(iter(PackDataset(paths, 2, seed=5, manipulation=True)))
    assert nbr_image.shape == image.shape and boxes.shape == (2, 2, 4) and box_emb.shape == (2, 2, 32)
    write_pack_shard(tmp_path / "plain.tar", make_samples(4))
    with pytest.raises(ValueError, match=r"no aligned neighbour images .* pack.manipulation=true"):
        PackDataset([tmp_path / "plain.tar"], 2, manipulation=True)


def test_manipulation_training_resumes_exactly(manipulation_pack, tmp_path):
    paths, _ = manipulation_pack
    config = ModelConfig.tiny(manipulation=True)
    train(tiny_params(steps=8), config, paths, tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    train(tiny_params(steps=8, stop_at_step=6), config, paths, interrupted)
    (interrupted / "checkpoints" / "step_0000006.pt").unlink()  # killed after step 6, before its checkpoint
    train(tiny_params(steps=8), config, paths, interrupted)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(interrupted)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert [(m["loss"], m["lr"]) for m in resumed] == [(m["loss"], m["lr"]) for m in straight]
    final_a, final_b = (torch.load(latest_checkpoint(run / "checkpoints"), weights_only=True)
                        for run in (tmp_path / "straight", interrupted))
    assert final_a["model_config"]["manipulation"] is True
    for key in ("model", "ema"):
        assert all(torch.equal(final_a[key][name], final_b[key][name]) for name in final_a[key])


def test_init_from_a_text_to_image_checkpoint_starts_where_it_left_off(manipulation_pack, tmp_path):
    """The paper fine-tunes its model: the widened input convolution starts at zero for I_manip, so the
    started model computes what the source computed, whatever the manipulated image holds."""
    paths, samples = manipulation_pack
    plain = tmp_path / "plain.tar"
    write_pack_shard(plain, make_samples(8))
    train(tiny_params(steps=2), ModelConfig.tiny(), [plain], tmp_path / "source")
    source_path = latest_checkpoint(tmp_path / "source" / "checkpoints")
    source = load_model(source_path)
    model = KnnDenoiser(ModelConfig.tiny(manipulation=True)).eval()
    init_from_checkpoint(model, source_path)
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 4, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        expected = source(x, t, emb)
        for image_cond in (torch.zeros(2, 3, 16, 16), torch.rand(2, 3, 16, 16, generator=g) * 2 - 1):
            torch.testing.assert_close(model(x, t, emb, image_cond=image_cond), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"another model \(k differ\)"):
        init_from_checkpoint(KnnDenoiser(ModelConfig.tiny(manipulation=True, k=2)), source_path)
    result = train(tiny_params(steps=2, init_from=str(source_path)), ModelConfig.tiny(manipulation=True), paths,
                   tmp_path / "fine_tuned")
    assert result["step"] == 2
