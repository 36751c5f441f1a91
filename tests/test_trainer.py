"""model/data.py, model/checkpoint.py, model/trainer.py: pack round trip, data order and resume,
weights-only checkpoints, overfitting, exact resume after an interruption."""
import dataclasses
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from model.checkpoint import latest_checkpoint, load_model
from model.data import PackDataset, read_pack_shard, write_pack_shard
from model.denoiser import ModelConfig
from model.trainer import TrainParams, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared cores


def make_samples(n, resolution=16, k=3, d=32, seed=0):
    """Smooth images (a colour and a gradient) and random unit-ish embeddings."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, resolution)
    samples = []
    for i in range(n):
        colour = rng.uniform(0, 255, 3)
        shade = (0.5 + 0.5 * ramp[:, None, None]) * (0.5 + 0.5 * ramp[None, :, None] ** (i % 3 + 1))
        image = colour * shade
        samples.append({"key": f"{i:09d}", "image": image.astype(np.uint8),
                        "emb": rng.standard_normal(d).astype(np.float16),
                        "nbr": rng.standard_normal((k, d)).astype(np.float16)})
    return samples


@pytest.fixture
def pack(tmp_path):
    paths = [tmp_path / "pack" / "00000.tar", tmp_path / "pack" / "00001.tar"]
    paths[0].parent.mkdir()
    samples = make_samples(8)
    write_pack_shard(paths[0], samples[:5])
    write_pack_shard(paths[1], samples[5:])
    return paths, samples


def test_pack_shard_round_trip_is_exact_and_reproducible(tmp_path):
    samples = make_samples(3)
    path = tmp_path / "00000.tar"
    assert write_pack_shard(path, samples) == 3
    read = read_pack_shard(path)
    assert read["keys"] == [s["key"] for s in samples]
    for name in ("image", "emb", "nbr"):
        assert np.array_equal(read[name], np.stack([s[name] for s in samples]))
        assert read[name].dtype == samples[0][name].dtype
    with tarfile.open(path) as tar:
        names = tar.getnames()[:3]
    assert names == ["000000000.image.npy", "000000000.emb.npy", "000000000.nbr.npy"]
    first = path.read_bytes()
    write_pack_shard(path, samples)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]  # no temporary left
    write_pack_shard(tmp_path / "00001.tar", [])
    assert read_pack_shard(tmp_path / "00001.tar")["keys"] == []


def test_corrupt_pack_shard_names_the_file(tmp_path):
    path = tmp_path / "00000.tar"
    write_pack_shard(path, make_samples(3))
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match="corrupt pack shard .*00000.tar"):
        read_pack_shard(path)


def test_pack_dataset_batches_epochs_and_ranks(pack):
    paths, samples = pack
    data = PackDataset(paths, batch_size=2, seed=5)
    batches = iter(data)
    seen = []
    for _ in range(4):  # one epoch: 8 samples, 4 batches
        image, emb = next(batches)
        assert image.shape == (2, 3, 16, 16) and emb.shape == (2, 4, 32)
        assert emb.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        for row in range(2):
            index = next(i for i, s in enumerate(samples)
                         if np.array_equal(s["emb"].astype(np.float32), emb[row, 0].numpy()))
            nbr, own_image = samples[index]["nbr"], samples[index]["image"]
            assert torch.equal(emb[row, 1:], torch.from_numpy(nbr.astype(np.float32)))
            expected = torch.from_numpy(own_image).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.equal(image[row], expected)
            seen.append(index)
    assert sorted(seen) == list(range(8)) and data.position == (0, 8)
    assert not np.array_equal(data.epoch_order(0), data.epoch_order(1))
    ranks = [PackDataset(paths, 2, seed=5, rank=r, world_size=3).epoch_order(0) for r in range(3)]
    assert all(len(order) == 2 for order in ranks)  # 8 // 3, equal for DDP
    assert len(set(np.concatenate(ranks))) == 6


def test_pack_dataset_resumes_at_a_position(pack):
    paths, _ = pack
    batches = iter(PackDataset(paths, batch_size=3, seed=1))
    for _ in range(3):  # 2 batches per epoch: this ends in epoch 1
        next(batches)
    resumed = PackDataset(paths, batch_size=3, seed=1, position=(1, 3))
    for expected, got in zip([next(batches) for _ in range(3)], iter(resumed)):
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def tiny_params(**overrides):
    base = dict(steps=12, batch_size=4, lr=1e-3, warmup_steps=3, checkpoint_every=4,
                log_every=1, seed=0)
    return TrainParams(**{**base, **overrides})


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_overfits_eight_samples(pack, tmp_path):
    paths, _ = pack
    params = tiny_params(steps=150, batch_size=8, lr=2e-3, warmup_steps=10, checkpoint_every=1000)
    result = train(params, ModelConfig.tiny(), paths, tmp_path / "train")
    losses = [m["loss"] for m in read_metrics(tmp_path / "train")]
    assert len(losses) == 150 and result["step"] == 150
    first, last = np.mean(losses[:10]), np.mean(losses[-25:])
    assert last < 0.3 * first, (first, last)


RECIPE = dict(query_drop_prob=0.5, query_noise=0.5, lr_schedule="constant", loss_weighting="min_snr")


@pytest.mark.parametrize("recipe", [{}, RECIPE], ids=["defaults", "demo-recipe"])
def test_resume_reproduces_the_uninterrupted_run(pack, tmp_path, recipe):
    paths, _ = pack
    config = ModelConfig.tiny()
    train(tiny_params(**recipe), config, paths, tmp_path / "straight")
    # interrupted: stops at 6 (checkpoints 4 and 6); then the step-6 checkpoint is lost, as if
    # killed after step 6 but before its checkpoint: resume from 4, metrics 5-6 must not double
    interrupted = tmp_path / "interrupted"
    train(tiny_params(stop_at_step=6, **recipe), config, paths, interrupted)
    (interrupted / "checkpoints" / "step_0000006.pt").unlink()
    train(tiny_params(**recipe), config, paths, interrupted)

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(interrupted)
    assert [m["step"] for m in resumed] == list(range(1, 13))
    assert [(m["loss"], m["lr"]) for m in resumed] == [(m["loss"], m["lr"]) for m in straight]
    final_a, final_b = (torch.load(latest_checkpoint(run / "checkpoints"), weights_only=True)
                        for run in (tmp_path / "straight", interrupted))
    for key in ("model", "ema"):
        assert all(torch.equal(final_a[key][name], final_b[key][name]) for name in final_a[key])
    assert final_a["data_position"] == final_b["data_position"] == [5, 8]


def test_checkpoints_load_weights_only_and_rebuild_the_model(pack, tmp_path):
    paths, _ = pack
    train(tiny_params(steps=4), ModelConfig.tiny(), paths, tmp_path / "train")
    checkpoints = tmp_path / "train" / "checkpoints"
    (checkpoints / "step_0000009.pt.tmp123").write_bytes(b"half-written")
    path = latest_checkpoint(checkpoints)
    assert path.name == "step_0000004.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and state["model_config"] == ModelConfig.tiny().to_dict()
    assert {"model", "ema", "optimizer", "lr_scheduler", "data_position", "rng"} <= set(state)
    model = load_model(path)
    assert dataclasses.asdict(model.config) == dataclasses.asdict(ModelConfig.tiny())
    assert all(torch.equal(p, state["ema"][n]) for n, p in model.state_dict().items())


def test_resume_accepts_a_checkpoint_written_before_a_model_key_existed(pack, tmp_path):
    """A checkpoint from an older release lacks keys added since (at their default): it resumes.
    A key that differs in value is still refused."""
    paths, _ = pack
    run = tmp_path / "train"
    train(tiny_params(steps=4), ModelConfig.tiny(), paths, run)
    path = latest_checkpoint(run / "checkpoints")
    state = torch.load(path, weights_only=True)
    del state["model_config"]["conditioning"]
    torch.save(state, path)
    assert train(tiny_params(steps=6), ModelConfig.tiny(), paths, run)["step"] == 6
    with pytest.raises(ValueError, match="was trained with another model config"):
        train(tiny_params(steps=8), ModelConfig.tiny(conditioning="concat"), paths, run)


def test_pack_and_model_mismatch_is_a_clear_error(pack, tmp_path):
    paths, _ = pack
    with pytest.raises(ValueError, match=r"k=10 neighbours asked of a pack that holds 3; re-run .*neighbours.k >= 10"):
        train(tiny_params(), ModelConfig.tiny(k=10), paths, tmp_path / "train")
    with pytest.raises(ValueError, match="clip_dim=32 but the model config has clip_dim=16"):
        train(tiny_params(), ModelConfig.tiny(clip_dim=16), paths, tmp_path / "train")


def test_a_model_with_fewer_neighbours_takes_the_nearest_k(pack, tmp_path):
    paths, _ = pack
    full, nearest = PackDataset(paths, 2, seed=5), PackDataset(paths, 2, seed=5, k=1)
    (_, emb_full), (_, emb_k1) = next(iter(full)), next(iter(nearest))
    assert emb_k1.shape == (2, 2, 32) and torch.equal(emb_k1, emb_full[:, :2])
    assert PackDataset(paths, 2, k=0).shapes["k"] == 0
    result = train(tiny_params(steps=2), ModelConfig.tiny(k=1), paths, tmp_path / "train")
    assert result["step"] == 2


@pytest.mark.skipif(not os.environ.get("KNND_RAY_TESTS"),
                    reason="starts a local Ray (~45 s on 2 cores); set KNND_RAY_TESTS=1")
@pytest.mark.parametrize("data_input", ["memory", "stream"])
def test_ray_train_two_cpu_workers_with_ddp(pack, tmp_path, data_input):
    paths, _ = pack
    result = train(tiny_params(steps=4, batch_size=2, num_workers=2, input=data_input), ModelConfig.tiny(), paths,
                   tmp_path / "train")
    assert result["step"] == 4
    assert [m["step"] for m in read_metrics(tmp_path / "train")] == [1, 2, 3, 4]
    state = torch.load(result["checkpoint"], weights_only=True)
    assert state["step"] == 4
    if data_input == "memory":
        assert state["data_position"] == [1, 4]  # 8 samples / 2 ranks / batch 2: 2 batches an epoch
    else:  # one shard a rank (5 and 3 samples): every rank takes 2 samples, 1 batch an epoch
        assert state["data_position"] == [3, 2]
