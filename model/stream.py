"""The trainer's streaming input (`train.input: stream`): memory flat in the size of the pack.

PackDataset (model.data) loads every shard into RAM on every worker; StreamDataset keeps only a
shuffle buffer of raw samples and the tar it is reading:

- **shards dealt to ranks**: each epoch the non-empty shards are permuted with a generator seeded by
  (seed, epoch), the same on every rank, and rank r of w takes every w-th of them, so the ranks read
  disjoint shards that together cover the pack once. Samples are read in file order within a shard.
- **bounded shuffle**: webdataset's shuffle (a reservoir of `shuffle_buffer` samples: each new sample
  replaces a random one, which is emitted; the rest are emitted in random order at the end), with a
  generator seeded by (seed, rank, epoch). The buffer holds the samples' undecoded bytes.
- **equal steps on every rank** (DDP needs it): an epoch is the smallest rank's sample count that epoch,
  in whole batches; every rank stops there (the rest of a longer rank's stream is dropped, as PackDataset
  drops the remainder of its permutation). The counts come from the pack manifest (no reading).
- **exact resume**: the stream of an epoch is a function of (seed, rank, world_size, epoch) only, so the
  position is (epoch, samples this rank has consumed in it), the shape PackDataset's has. A resumed run
  rebuilds the epoch's stream and reads past the consumed samples (tar reads, no decoding, no training).

The reader is pipeline.shards' tarfile one (webdataset's own shuffle draws from a global `random`
whose state we would have to capture; ours is a pure function of the position).
"""
from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np

from model.data import MANIPULATION_MEMBERS, MEMBERS, make_batch
from pipeline.shards import iter_tar_samples

DRAWS = 4096  # buffer slots drawn per generator call (any fixed number keeps the stream reproducible)


def count_pack_samples(path) -> int:
    """Samples in a pack shard, from its tar headers (no member data read); prefer the manifest's count."""
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            keys.add(Path(member.name).name.partition(".")[0])
    return len(keys)


def deal_shards(sizes, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Per rank, the indices (into sizes) of the shards it reads this epoch, in reading order.
    Empty shards are left out; a seeded permutation of the rest is dealt round-robin."""
    nonempty = np.flatnonzero(np.asarray(sizes) > 0)
    order = nonempty[np.random.default_rng([seed, epoch]).permutation(len(nonempty))]
    return [order[rank::world_size].tolist() for rank in range(world_size)]


def shuffled(samples, buffer_size: int, rng: np.random.Generator):
    """webdataset's shuffle buffer over an iterator: at most buffer_size samples held; reproducible
    from the generator's seed alone."""
    buffer, draws = [], iter(())
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        slot = next(draws, None)
        if slot is None:
            draws = iter(rng.integers(0, buffer_size, DRAWS).tolist())
            slot = next(draws)
        out, buffer[slot] = buffer[slot], sample
        yield out
    for slot in rng.permutation(len(buffer)).tolist():
        yield buffer[slot]


def decode(path, key: str, parts: dict, members, names) -> dict:
    """{name: array} of one raw sample for the wanted names; a sample whose members are not the pack's
    (`members`) or a bad array names the shard."""
    if set(parts) != {f"{member}.npy" for member in members}:
        raise ValueError(f"corrupt pack shard {path}: sample {key!r} lacks one of {members} or has others; "
                         f"delete it and rebuild it with `knnd run pack --force`")
    try:
        return {name: np.load(io.BytesIO(parts[f"{name}.npy"]), allow_pickle=False) for name in names}
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"corrupt pack shard {path}: sample {key!r}: {error}; delete it and rebuild it "
                         f"with `knnd run pack --force`") from error


class StreamDataset:
    """Endless iterator of batches shaped as PackDataset's (same arguments, same `position` and
    `shapes`), reading this rank's shards through a shuffle buffer. shard_sizes: samples per shard
    (the pack manifest's; None: counted from the tar headers)."""

    def __init__(self, shard_paths, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 position: tuple = (0, 0), k: int | None = None, manipulation: bool = False,
                 shuffle_buffer: int = 5000, shard_sizes=None):
        self.paths = [Path(p) for p in shard_paths]
        self.sizes = [int(n) for n in (shard_sizes if shard_sizes is not None else map(count_pack_samples, self.paths))]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.buffer_size, self.manipulation = shuffle_buffer, manipulation
        self.epoch, self.index = position
        nonempty = sorted(n for n in self.sizes if n)
        if not nonempty:
            raise ValueError("no pack samples in the given shards; run `knnd run pack` first")
        if len(nonempty) < world_size:
            raise ValueError(f"train.input=stream deals pack shards to workers: {len(nonempty)} non-empty shards "
                             f"for {world_size} workers; use train.input=memory or pack into more shards")
        if sum(nonempty[:len(nonempty) // world_size]) < batch_size:  # the poorest deal any epoch can give
            raise ValueError(f"a worker may be dealt fewer than train.batch_size {batch_size * world_size} / "
                             f"{world_size} samples in an epoch: lower train.batch_size or use train.input=memory")
        self.names = self._member_names(k)
        self.read_count = 0  # samples read from tars so far (tests check the buffer's bound with it)

    def _member_names(self, k: int | None) -> tuple:
        """The members to decode, checked on the first sample: shapes, manipulation members, k."""
        path = self.paths[next(i for i, n in enumerate(self.sizes) if n)]
        samples = iter_tar_samples(path)
        try:
            key, parts = next(samples)
        except (tarfile.TarError, OSError, EOFError, StopIteration) as error:
            raise ValueError(f"corrupt pack shard {path}: {error!r}; delete it and rebuild it with "
                             f"`knnd run pack --force`") from error
        finally:
            samples.close()  # the tar is closed now, not when the generator is collected
        has_manipulation = "nbr_image.npy" in parts
        if self.manipulation and not has_manipulation:
            raise ValueError("the pack holds no aligned neighbour images and box embeddings (needed by "
                             "train.mode=manipulate): re-run `knnd run pack --set pack.manipulation=true`")
        self.members = MEMBERS + (MANIPULATION_MEMBERS if has_manipulation else ())
        first = decode(path, key, parts, self.members, self.members)
        packed_k = first["nbr"].shape[0]
        self.k = packed_k if k is None else k
        if not 0 <= self.k <= packed_k:
            raise ValueError(f"k={k} neighbours asked of a pack that holds {packed_k}; "
                             f"re-run `knnd run neighbours pack` with neighbours.k >= {k}")
        self._shapes = {"resolution": first["image"].shape[0], "k": self.k, "clip_dim": first["emb"].shape[0]}
        return MEMBERS + (MANIPULATION_MEMBERS if self.manipulation else ())  # a plain model skips the others

    @property
    def position(self) -> tuple:
        return (self.epoch, self.index)

    @property
    def shapes(self) -> dict:
        return dict(self._shapes)

    def epoch_length(self, epoch: int) -> int:
        """Samples every rank takes this epoch: the smallest rank's count, in whole batches."""
        smallest = min(sum(self.sizes[i] for i in shards)
                       for shards in deal_shards(self.sizes, self.world_size, self.seed, epoch))
        return smallest - smallest % self.batch_size

    def read(self, shards):
        """(key, {member: bytes}, shard path) of the given shards' samples, in order; one tar open at a time."""
        for i in shards:
            try:
                for key, parts in iter_tar_samples(self.paths[i]):
                    self.read_count += 1
                    yield key, parts, self.paths[i]
            except (tarfile.TarError, OSError, EOFError) as error:
                raise ValueError(f"corrupt pack shard {self.paths[i]}: {error}; delete it and rebuild it with "
                                 f"`knnd run pack --force`") from error

    def shards_of(self, epoch: int) -> list[int]:
        """The shards this rank reads in an epoch, in order."""
        return deal_shards(self.sizes, self.world_size, self.seed, epoch)[self.rank]

    def epoch_stream(self, epoch: int):
        """This rank's raw samples of an epoch, shuffled (the whole stream: __iter__ cuts it)."""
        shards = self.shards_of(epoch)
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        return shuffled(self.read(shards), self.buffer_size, rng)

    def __iter__(self):
        while True:
            length = self.epoch_length(self.epoch)
            if self.index + self.batch_size <= length:
                stream = self.epoch_stream(self.epoch)
                for _ in itertools.islice(stream, self.index):  # resume: read past what was consumed
                    pass
                while self.index + self.batch_size <= length:
                    samples = [decode(path, key, parts, self.members, self.names)
                               for key, parts, path in itertools.islice(stream, self.batch_size)]
                    if len(samples) < self.batch_size:  # a tar cut at a member boundary reads as a shorter one
                        raise ValueError(f"the pack shards {[str(self.paths[i]) for i in self.shards_of(self.epoch)]} "
                                         f"hold fewer samples than the pack manifest counts: one is truncated; "
                                         f"rebuild the pack with `knnd run pack --force`")
                    self.index += self.batch_size  # position of the *next* batch, for checkpoints
                    yield self.batch(samples)
                stream.close()  # closes the tar being read
            self.epoch, self.index = self.epoch + 1, 0

    def batch(self, samples: list[dict]):
        images = np.stack([s["image"] for s in samples])
        cond = np.stack([np.concatenate([s["emb"][None], s["nbr"][:self.k]]) for s in samples])
        extra = [np.stack([s[name] for s in samples]) for name in MANIPULATION_MEMBERS] if self.manipulation else None
        return make_batch(images, cond, extra)


def open_input(params, config: dict, rank: int, world_size: int, position: tuple, k: int, manipulation: bool):
    """The trainer's dataset for params.input: "memory" (PackDataset) or "stream" (StreamDataset);
    config holds shard_paths and, from the pack manifest, shard_sizes (else counted)."""
    from model.data import PackDataset

    if params.input == "memory":
        return PackDataset(config["shard_paths"], params.batch_size, params.seed, rank, world_size, position,
                           k=k, manipulation=manipulation)
    if params.input == "stream":
        return StreamDataset(config["shard_paths"], params.batch_size, params.seed, rank, world_size, position,
                             k=k, manipulation=manipulation, shuffle_buffer=params.shuffle_buffer,
                             shard_sizes=config.get("shard_sizes"))
    raise ValueError(f"train input {params.input!r} is not memory or stream")


def input_identity(params) -> dict:
    """What a checkpoint's data position depends on besides the seed, recorded in every checkpoint."""
    return {"input": params.input, **({"shuffle_buffer": params.shuffle_buffer} if params.input == "stream" else {})}


def check_resumed_input(path, checkpoint: dict, params) -> None:
    """A run resumes with the input its checkpoint was written with, or its data position means nothing.
    A checkpoint written before train.input existed read its pack in memory."""
    recorded = checkpoint.get("data_input", {"input": "memory"})
    if recorded != input_identity(params):
        raise ValueError(f"{path} was trained with input {recorded} but this run asks for {input_identity(params)}: "
                         f"resume with the same train.input and train.shuffle_buffer, or use a new train directory "
                         f"(`knnd run train --force`)")
