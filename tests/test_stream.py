"""model/stream.py (train.input: stream): shards dealt disjointly to ranks, the bounded shuffle buffer
against exact oracles, deterministic order, exact resume (dataset and trainer, bit for bit), the
memory and stream paths side by side, manipulation members, and pipeline.train's choice of input."""
import itertools

import numpy as np
import pytest
import torch
from test_manipulation import manipulation_samples
from test_trainer import make_samples, read_metrics, tiny_params

from model.checkpoint import latest_checkpoint
from model.data import PackDataset, write_pack_shard
from model.denoiser import ModelConfig
from model.stream import StreamDataset, count_pack_samples, deal_shards
from model.trainer import train
from pipeline.config import TrainConfig
from pipeline.runner import UsageError
from pipeline.train import AUTO_STREAM_BYTES, check_input, resolve_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared cores


def write_pack(directory, sizes, samples=None):
    """Pack shards of the given sizes over make_samples (or the given samples); returns (paths, samples)."""
    samples = samples or make_samples(sum(sizes))
    directory.mkdir(exist_ok=True)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        paths.append(directory / f"{i:05d}.tar")
        write_pack_shard(paths[-1], samples[start:start + n])
        start += n
    return paths, samples


def keys_of_epoch(data: StreamDataset, epoch: int) -> list[str]:
    """The keys this rank trains on in an epoch, in order."""
    return [key for key, _, _ in itertools.islice(data.epoch_stream(epoch), data.epoch_length(epoch))]


def test_ranks_read_disjoint_shards_covering_every_sample_once_per_epoch(tmp_path):
    paths, samples = write_pack(tmp_path / "pack", [4] * 6 + [0])  # an empty shard is never dealt
    ranks = [StreamDataset(paths, 2, seed=3, rank=r, world_size=3, shuffle_buffer=3) for r in range(3)]
    deals = [deal_shards(ranks[0].sizes, 3, 3, epoch) for epoch in range(4)]
    for deal in deals:
        assert sorted(sum(deal, [])) == list(range(6)) and all(len(shards) == 2 for shards in deal)
    assert len({tuple(map(tuple, deal)) for deal in deals}) > 1  # re-dealt each epoch
    for epoch in range(2):
        per_rank = [keys_of_epoch(data, epoch) for data in ranks]
        assert all(len(keys) == 8 for keys in per_rank)
        assert sorted(sum(per_rank, [])) == [s["key"] for s in samples]  # each sample once
        for rank, keys in enumerate(per_rank):  # a rank's keys come from the shards it was dealt
            dealt = {samples[4 * shard + j]["key"] for shard in deals[epoch][rank] for j in range(4)}
            assert set(keys) == dealt
    # the batches are those samples' arrays, in that order
    data = ranks[1]
    batches = iter(data)
    order = keys_of_epoch(data, 0)
    by_key = {s["key"]: s for s in samples}
    for b in range(4):
        image, emb = next(batches)
        for row, key in enumerate(order[2 * b:2 * b + 2]):
            assert torch.equal(emb[row], torch.from_numpy(np.concatenate([by_key[key]["emb"][None], by_key[key]["nbr"]])
                                                          .astype(np.float32)))
            assert torch.equal(image[row], torch.from_numpy(by_key[key]["image"]).permute(2, 0, 1).float() / 127.5 - 1)
    assert data.position == (0, 8)


def test_unequal_deals_cut_every_rank_to_the_smallest_in_whole_batches(tmp_path):
    paths, _ = write_pack(tmp_path / "pack", [5, 3, 7])
    assert [count_pack_samples(p) for p in paths] == [5, 3, 7]
    data = StreamDataset(paths, 2, seed=0, world_size=2, shuffle_buffer=4)
    for epoch in range(5):
        totals = [sum([5, 3, 7][i] for i in shards) for shards in deal_shards([5, 3, 7], 2, 0, epoch)]
        assert data.epoch_length(epoch) == min(totals) // 2 * 2
    with pytest.raises(ValueError, match="2 non-empty shards for 3 workers; use train.input=memory"):
        StreamDataset(paths[:2], 2, world_size=3)
    with pytest.raises(ValueError, match=r"fewer than train.batch_size 8 / 2 samples"):
        StreamDataset(paths, 4, world_size=2)  # a rank dealt the 3-sample shard alone


def test_shuffle_buffer_is_bounded_and_matches_its_oracles(tmp_path):
    paths, samples = write_pack(tmp_path / "pack", [10, 10, 10])
    in_order = [samples[10 * i + j]["key"] for i in deal_shards([10] * 3, 1, 7, 0)[0] for j in range(10)]
    data = StreamDataset(paths, 2, seed=7, shuffle_buffer=5)
    out = []
    for key, _, _ in data.epoch_stream(0):
        out.append(key)
        assert data.read_count - len(out) <= 5  # never more than the buffer held back
    assert sorted(out) == sorted(in_order) and out != in_order
    # buffer 1: file order; a buffer holding everything: one permutation of it, seeded (seed, rank, epoch)
    assert keys_of_epoch(StreamDataset(paths, 2, seed=7, shuffle_buffer=1), 0) == in_order
    whole = StreamDataset(paths, 2, seed=7, shuffle_buffer=30)
    expected = [in_order[i] for i in np.random.default_rng([7, 0, 0]).permutation(30)]
    assert keys_of_epoch(whole, 0) == expected


def test_order_is_deterministic_for_a_seed(tmp_path):
    paths, _ = write_pack(tmp_path / "pack", [6, 6])
    runs = [keys_of_epoch(StreamDataset(paths, 2, seed=seed, shuffle_buffer=4), epoch)
            for seed, epoch in [(1, 0), (1, 0), (2, 0), (1, 1)]]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0] != runs[3]


@pytest.mark.parametrize("position", [(0, 4), (0, 12), (1, 8)], ids=["mid-epoch", "at-epoch-end", "second-epoch"])
def test_dataset_resumes_exactly_at_a_position(tmp_path, position):
    paths, _ = write_pack(tmp_path / "pack", [5, 4, 3])
    straight = StreamDataset(paths, 2, seed=4, shuffle_buffer=3)
    batches = iter(straight)
    while straight.position != position:
        next(batches)
    expected = [next(batches) for _ in range(8)]  # crosses at least one epoch boundary (6 batches an epoch)
    resumed = StreamDataset(paths, 2, seed=4, shuffle_buffer=3, position=position)
    for want, got in zip(expected, iter(resumed)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.parametrize("every,stop", [(3, 5), (4, 6)], ids=["resume-mid-epoch", "resume-at-epoch-boundary"])
def test_stream_training_resumes_bit_for_bit(tmp_path, every, stop):
    """8 samples in 2 shards, batch 2: 4 steps an epoch. Killed after step `stop`, before its checkpoint:
    the run resumes from step `every` (mid-epoch at 3, at the epoch's end at 4) and crosses epochs."""
    paths, _ = write_pack(tmp_path / "pack", [5, 3])
    params = dict(steps=10, batch_size=2, checkpoint_every=every, input="stream", shuffle_buffer=3)
    config = ModelConfig.tiny()
    train(tiny_params(**params), config, paths, tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    train(tiny_params(stop_at_step=stop, **params), config, paths, interrupted, shard_sizes=[5, 3])
    (interrupted / "checkpoints" / f"step_{stop:07d}.pt").unlink()
    train(tiny_params(**params), config, paths, interrupted)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(interrupted)
    assert [m["step"] for m in resumed] == list(range(1, 11))
    assert [(m["loss"], m["lr"]) for m in resumed] == [(m["loss"], m["lr"]) for m in straight]
    final_a, final_b = (torch.load(latest_checkpoint(run / "checkpoints"), weights_only=True)
                        for run in (tmp_path / "straight", interrupted))
    for key in ("model", "ema"):
        assert all(torch.equal(final_a[key][name], final_b[key][name]) for name in final_a[key])
    assert final_a["data_position"] == final_b["data_position"] == [2, 4]
    assert final_a["data_input"] == {"input": "stream", "shuffle_buffer": 3}


def test_memory_and_stream_inputs_both_train_the_model_and_a_run_keeps_its_input(tmp_path):
    paths, _ = write_pack(tmp_path / "pack", [5, 3])
    results = {name: train(tiny_params(steps=5, batch_size=2, input=name), ModelConfig.tiny(), paths, tmp_path / name)
               for name in ("memory", "stream")}
    assert results["memory"]["step"] == results["stream"]["step"] == 5
    states = {name: torch.load(result["checkpoint"], weights_only=True) for name, result in results.items()}
    assert states["memory"]["model_config"] == states["stream"]["model_config"]
    assert states["memory"]["data_position"] == [1, 2] and states["stream"]["data_position"] == [1, 2]
    assert all(np.isfinite(m["loss"]) for name in results for m in read_metrics(tmp_path / name))
    with pytest.raises(ValueError, match=r"trained with input \{'input': 'memory'\} but this run asks for "
                                         r"\{'input': 'stream', 'shuffle_buffer': 5000\}: resume with the same"):
        train(tiny_params(steps=8, batch_size=2, input="stream"), ModelConfig.tiny(), paths, tmp_path / "memory")


def test_stream_reads_manipulation_members_like_the_memory_path(tmp_path):
    paths, samples = write_pack(tmp_path / "pack", [5, 3], manipulation_samples(8))
    stream = StreamDataset(paths, 8, manipulation=True, shuffle_buffer=1)  # file order: shard deal, then in order
    memory = PackDataset(paths, 8, manipulation=True)
    order = [i for shard in deal_shards([5, 3], 1, 0, 0)[0] for i in range(5 * shard, 5 * shard + [5, 3][shard])]
    got = next(iter(stream))
    want = memory.batch(np.array(order))
    assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, want))
    plain_model = next(iter(StreamDataset(paths, 8, shuffle_buffer=1)))  # a text-to-image model on the same pack
    assert len(plain_model) == 2 and all(torch.equal(a, b) for a, b in zip(plain_model, want[:2]))
    plain, _ = write_pack(tmp_path / "plain", [4])
    with pytest.raises(ValueError, match=r"no aligned neighbour images .* pack.manipulation=true"):
        StreamDataset(plain, 2, manipulation=True)
    result = train(tiny_params(steps=2, batch_size=2, input="stream"), ModelConfig.tiny(manipulation=True), paths,
                   tmp_path / "train")
    assert result["step"] == 2


def test_corrupt_shard_and_wrong_k_name_the_fix(tmp_path):
    paths, _ = write_pack(tmp_path / "pack", [4, 4])
    with pytest.raises(ValueError, match=r"k=5 neighbours asked of a pack that holds 3"):
        StreamDataset(paths, 2, k=5)
    assert StreamDataset(paths, 2, k=1).shapes == {"resolution": 16, "k": 1, "clip_dim": 32}
    short = StreamDataset(paths, 2, shuffle_buffer=1, shard_sizes=[4, 6])  # a manifest counting more than the tars hold
    with pytest.raises(ValueError, match=r"hold fewer samples than the pack manifest counts: one is truncated"):
        list(itertools.islice(short, 5))
    paths[1].write_bytes(paths[1].read_bytes()[:3000])
    data = StreamDataset(paths, 2, shuffle_buffer=1, shard_sizes=[4, 4])
    batches = iter(data)
    with pytest.raises(ValueError, match=r"corrupt pack shard .*00001.tar.*knnd run pack --force"):
        for _ in range(4):
            next(batches)


def pack_manifest(items, shards, image_size=32, k=10, d=64):
    return {"items": items, "image_size": image_size, "k": k, "d": d,
            "shards": [{"tar": f"{i:05d}.tar", "samples": items // shards} for i in range(shards)]}


def test_pipeline_chooses_the_input_and_refuses_what_cannot_stream():
    per_sample = 32 * 32 * 3 + 11 * 64 * 2
    small, large = pack_manifest(1000, 4), pack_manifest(AUTO_STREAM_BYTES // per_sample + 1, 4)
    assert resolve_input(TrainConfig(), small) == "memory" and resolve_input(TrainConfig(), large) == "stream"
    assert resolve_input(TrainConfig(backbone="discrete"), large) == "memory"
    assert resolve_input(TrainConfig(num_workers=8, batch_size=64), large) == "memory"  # 4 shards for 8 workers
    assert resolve_input(TrainConfig(input="memory"), large) == "memory"
    with pytest.raises(UsageError, match="train.input=stream is not available for the discrete backbone"):
        check_input(TrainConfig(input="stream", backbone="discrete"), small)
    with pytest.raises(UsageError, match="4 non-empty shards for train.num_workers=8: set train.input=memory"):
        check_input(TrainConfig(input="stream", num_workers=8), small)
    with pytest.raises(UsageError, match="lower train.batch_size or set train.input=memory"):
        check_input(TrainConfig(input="stream", batch_size=2000), small)
    check_input(TrainConfig(input="stream", num_workers=2), small)


def test_auto_input_resumes_with_the_checkpoints_input(tmp_path):
    """A run begun in memory goes on in memory under auto, even once its pack would stream."""
    per_sample = 16 * 16 * 3 + 4 * 32 * 2
    paths, _ = write_pack(tmp_path / "pack", [4, 4])
    large = {**pack_manifest(AUTO_STREAM_BYTES // per_sample + 1, 2), "image_size": 16, "k": 3, "d": 32}
    run = tmp_path / "train"
    assert resolve_input(TrainConfig(), large, run) == "stream"  # no checkpoint yet
    train(tiny_params(steps=2, batch_size=2), ModelConfig.tiny(), paths, run)
    assert resolve_input(TrainConfig(), large, run) == "memory"
    assert resolve_input(TrainConfig(input="stream"), large, run) == "stream"  # set explicitly: the trainer refuses


def test_the_discrete_trainer_refuses_to_stream(tmp_path):
    from model.discrete import DiscreteConfig
    from model.discrete_trainer import train_discrete

    with pytest.raises(ValueError, match="the discrete backbone reads its pack in memory only: set train.input=memory"):
        train_discrete(tiny_params(input="stream"), DiscreteConfig.tiny(), [], tmp_path / "tokens.npz",
                       tmp_path / "vq.pt", tmp_path / "train")
