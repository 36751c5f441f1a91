"""Pack shards (the trainer's input) and the in-memory batch iterator over them.

A pack shard is a webdataset-compatible tar; per sample three members, written with np.save:
    {key}.image.npy  uint8 [H, W, 3]     the image at training resolution
    {key}.emb.npy    float16 [d]         its CLIP image embedding
    {key}.nbr.npy    float16 [k, d]      its k neighbours' embeddings, nearest first
and, in a pack for local manipulation (model.manipulation), three more:
    {key}.nbr_image.npy  uint8 [H, W, 3]   the first neighbour's image, ECC-aligned to the image
    {key}.boxes.npy      int16 [b, 4]      b boxes M (x0, y0, x1, y1) in pixels of the image
    {key}.box_emb.npy    float16 [b, d]    f_img(I * M) of each box: the CLIP embedding of its crop

PackDataset holds every shard in memory as one [N, k+1, d] float16 condition array and one
[N, H, W, 3] uint8 image array (the demo: ~15 MB; 1 M samples at 64 px with d = 512: ~23 GB), so a
batch is one fancy-index gather: no JPEG decoding, no CLIP, no FAISS. A pack that outgrows RAM is
read by model.stream.StreamDataset instead (`train.input: stream`), with the same batches.
"""
import io
import tarfile

import numpy as np
import torch

from pipeline.files import atomic_path
from pipeline.shards import iter_tar_samples

MEMBERS = ("image", "emb", "nbr")
MANIPULATION_MEMBERS = ("nbr_image", "boxes", "box_emb")
DTYPES = {"image": np.uint8, "emb": np.float16, "nbr": np.float16,
          "nbr_image": np.uint8, "boxes": np.int16, "box_emb": np.float16}


def write_pack_shard(path, samples) -> int:
    """Write samples (dicts with key, image, emb, nbr [, nbr_image, boxes, box_emb]) to a pack tar
    atomically; returns the count.

    The tar is byte-for-byte reproducible (fixed mtime/owner), so a re-run writes identical files.
    """
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = str(sample["key"])
            if not key or "." in key or "/" in key:
                raise ValueError(f"pack key {key!r} must be non-empty without '.' or '/'")
            names = MEMBERS + (MANIPULATION_MEMBERS if "nbr_image" in sample else ())
            arrays = {name: np.asarray(sample[name], dtype=DTYPES[name]) for name in names}
            _check_sample(key, arrays)
            for name in names:
                _add_member(tar, f"{key}.{name}.npy", arrays[name])
            count += 1
    return count


def _check_sample(key: str, arrays: dict):
    image, emb, nbr = arrays["image"], arrays["emb"], arrays["nbr"]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {key}: image shape {image.shape}, expected [H, W, 3]")
    if emb.ndim != 1 or nbr.ndim != 2 or nbr.shape[1] != emb.shape[0]:
        raise ValueError(f"sample {key}: emb {emb.shape} and nbr {nbr.shape}, expected [d], [k, d]")
    if "nbr_image" in arrays:
        boxes, box_emb = arrays["boxes"], arrays["box_emb"]
        if arrays["nbr_image"].shape != image.shape:
            raise ValueError(f"sample {key}: nbr_image shape {arrays['nbr_image'].shape}, expected {image.shape}")
        if boxes.ndim != 2 or boxes.shape[1] != 4 or box_emb.shape != (len(boxes), emb.shape[0]) or not len(boxes):
            raise ValueError(f"sample {key}: boxes {boxes.shape} and box_emb {box_emb.shape}, expected [b, 4], [b, d]")


def _add_member(tar: tarfile.TarFile, name: str, array: np.ndarray):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    info = tarfile.TarInfo(name)
    info.size = buffer.tell()
    info.mode, info.mtime = 0o644, 0
    buffer.seek(0)
    tar.addfile(info, buffer)


def read_pack_shard(path) -> dict:
    """{keys: list[str], image: uint8 [n,H,W,3], emb: float16 [n,d], nbr: float16 [n,k,d]} (and
    nbr_image, boxes, box_emb stacked likewise when the shard holds them).

    A corrupt or incomplete shard raises ValueError naming the file and how to rebuild it.
    """
    samples: dict = {}
    try:
        for key, parts in iter_tar_samples(path):
            samples[key] = {name.removesuffix(".npy"): np.load(io.BytesIO(data), allow_pickle=False)
                            for name, data in parts.items()}
        if not samples:  # a shard whose items all failed upstream: no shapes to report
            return {"keys": [], "image": None, "emb": None, "nbr": None}
        names = MEMBERS + (MANIPULATION_MEMBERS if "nbr_image" in next(iter(samples.values())) else ())
        missing = [key for key, arrays in samples.items() if set(arrays) != set(names)]
        if missing:
            raise ValueError(f"sample {missing[0]!r} lacks one of {names} or has others")
        arrays = {name: np.stack([s[name] for s in samples.values()]) for name in names}
    except (tarfile.TarError, ValueError, OSError, EOFError, AttributeError) as error:
        raise ValueError(f"corrupt pack shard {path}: {error}; delete it and rebuild it with "
                         f"`knnd run pack --force`") from error
    return {"keys": list(samples), **arrays}


class PackDataset:
    """Endless iterator of (image [B,3,H,W] float in [-1,1], emb [B,k+1,d] float32) batches.

    k (default: the pack's) keeps each sample's nearest k neighbours only.
    Order: one permutation of all samples per epoch, seeded by (seed, epoch); rank r of world_size
    takes every world_size-th sample of it (cut to equal length, so all ranks run the same number of
    steps, as DDP needs). Incomplete last batches are dropped. `position` = (epoch, index) is the
    next sample index in this rank's epoch order; pass it back in to resume exactly there.
    manipulation: batches are (image, emb, nbr_image, boxes, box_emb) from a pack written with
    pack.manipulation (model.manipulation builds the training input from them).
    """

    def __init__(self, shard_paths, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, position: tuple = (0, 0), k: int | None = None,
                 manipulation: bool = False):
        shards = [shard for shard in map(read_pack_shard, shard_paths) if shard["keys"]]
        if not shards:
            raise ValueError("no pack samples in the given shards; run `knnd run pack` first")
        self.keys = [key for s in shards for key in s["keys"]]
        self.manipulation = manipulation
        if manipulation:
            if not all("nbr_image" in s for s in shards):
                raise ValueError("the pack holds no aligned neighbour images and box embeddings (needed by "
                                 "train.mode=manipulate): re-run `knnd run pack --set pack.manipulation=true`")
            self.extra = [np.concatenate([s[name] for s in shards]) for name in ("nbr_image", "boxes", "box_emb")]
        self.images = np.concatenate([s["image"] for s in shards])
        # slot 0: the sample's own embedding, slots 1..k: its neighbours
        self.cond = np.concatenate([np.concatenate([s["emb"][:, None], s["nbr"]], axis=1)
                                    for s in shards])
        if k is not None:  # a model trained with fewer neighbours than were packed takes the nearest k
            if not 0 <= k <= self.cond.shape[1] - 1:
                raise ValueError(f"k={k} neighbours asked of a pack that holds {self.cond.shape[1] - 1}; "
                                 f"re-run `knnd run neighbours pack` with neighbours.k >= {k}")
            self.cond = np.ascontiguousarray(self.cond[:, :k + 1])
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.per_rank = len(self.images) // world_size
        if self.per_rank < batch_size:
            raise ValueError(f"pack has {len(self.images)} samples, fewer than batch_size "
                             f"{batch_size} x {world_size} workers; lower train.batch_size")
        self.epoch, self.index = position

    @property
    def position(self) -> tuple:
        return (self.epoch, self.index)

    @property
    def shapes(self) -> dict:
        """resolution, k, d of the packed data (checked against the model config)."""
        return {"resolution": self.images.shape[1], "k": self.cond.shape[1] - 1,
                "clip_dim": self.cond.shape[2]}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for an epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        return order[self.rank::self.world_size][:self.per_rank]

    def __iter__(self):
        while True:
            order = self.epoch_order(self.epoch)
            while self.index + self.batch_size <= len(order):
                rows = order[self.index:self.index + self.batch_size]
                self.index += self.batch_size  # position of the *next* batch, for checkpoints
                yield self.batch(rows)
            self.epoch, self.index = self.epoch + 1, 0

    def batch(self, rows: np.ndarray):
        extra = [array[rows] for array in self.extra] if self.manipulation else None
        return make_batch(self.images[rows], self.cond[rows], extra)


def make_batch(images: np.ndarray, cond: np.ndarray, extra: list | None = None):
    """Training tensors of stacked samples: (image [B,3,H,W] in [-1,1], emb [B,k+1,d] float32), and with
    extra = [nbr_image, boxes, box_emb] (manipulation) those three after them, as tensors."""
    image = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    emb = torch.from_numpy(cond.astype(np.float32))
    if extra is None:
        return image, emb
    nbr_image, boxes, box_emb = extra
    return (image, emb, torch.from_numpy(nbr_image).permute(0, 3, 1, 2).float() / 127.5 - 1.0,
            torch.from_numpy(boxes.astype(np.int64)), torch.from_numpy(box_emb.astype(np.float32)))
