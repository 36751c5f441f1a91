"""What an index folder holds beside the faiss index, so that it can be moved and shared alone.

    image.index        the faiss index (ids are embed rows)
    rows.npy           int64 [n], sorted: the embed rows it holds
    vectors.npy        float16 [n, d], row-aligned with rows.npy: what search re-ranks with and
                       sampling conditions on (memory-mapped)
    metadata.parquet   row, key, url, caption (and download.extra_columns) of each indexed image, row-aligned
    thumbnails.npy     uint8 [n, T, T, 3] small pictures for reports and browsing (T = index.thumbnail_size)
    index_infos.json   factory, tuning, recall, and `clip`: the identity of the CLIP that embedded it

An index built before these files existed (or with `index.self_contained: false`) reads the same
things from the embed folder its infos name.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.files import StageError, UsageError, atomic_path

VECTORS, METADATA, THUMBNAILS = "vectors.npy", "metadata.parquet", "thumbnails.npy"
BLOCK = 65_536  # rows written per step: bounded memory at any n
INTERNAL_COLUMNS = {"row", "shard", "width", "height", "phash"}  # embed bookkeeping, not for display or filters


# --------------------------------------------------------------------------- CLIP identity


def clip_identity(spec: dict | None) -> dict | None:
    """{name, pretrained, weights_sha256, d} of the CLIP an embed manifest names (`model` field):
    a local weights file is identified by its sha256, a named tag by its name, no weights by
    "random init" (tests: a seeded random CLIP)."""
    if not spec:
        return None
    pretrained = spec.get("pretrained")
    sha = None
    if pretrained and Path(pretrained).is_file():
        digest = hashlib.sha256()
        with open(pretrained, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        sha, pretrained = digest.hexdigest(), Path(pretrained).name
    return {"name": spec.get("name") or Path(str(spec.get("model"))).stem, "pretrained": pretrained,
            "weights_sha256": sha, "d": spec.get("dim")}


def same_clip(a: dict, b: dict) -> bool:
    if a.get("weights_sha256") or b.get("weights_sha256"):
        return a.get("weights_sha256") == b.get("weights_sha256") and a.get("d") == b.get("d")
    return (a.get("name"), a.get("pretrained"), a.get("d")) == (b.get("name"), b.get("pretrained"), b.get("d"))


def describe_clip(identity: dict) -> str:
    sha = identity.get("weights_sha256")
    return (f"{identity.get('name')} ({identity.get('pretrained') or 'random init'}"
            f"{', sha256 ' + sha[:12] if sha else ''}, d={identity.get('d')})")


def check_same_clip(model_clip: dict | None, index_clip: dict | None, checkpoint, index_dir, allow: bool) -> None:
    """A model trained on one CLIP's embeddings, sampled against an index of another: refused unless
    `allow` (--allow-other-clip). Indexes or checkpoints that predate the identity pass."""
    if allow or not model_clip or not index_clip or same_clip(model_clip, index_clip):
        return
    raise UsageError(f"the model {checkpoint} was trained on embeddings of CLIP {describe_clip(model_clip)}, but the "
                     f"index {index_dir} holds embeddings of CLIP {describe_clip(index_clip)}: use an index built "
                     f"with the model's CLIP, or pass --allow-other-clip if they share one embedding space")


# --------------------------------------------------------------------------- writing


def write_index_files(out_dir: Path, embeddings, rows: np.ndarray, embed_dir: Path, thumbnail_size: int) -> dict:
    """vectors.npy, metadata.parquet and (thumbnail_size > 0) thumbnails.npy for the indexed rows;
    returns their names for index_infos.json."""
    import pyarrow.parquet as pq

    from pipeline.embeddings import metadata_schema, read_metadata_table

    n, d = len(rows), embeddings.dim
    with atomic_path(out_dir / VECTORS) as tmp:
        vectors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
        for start in range(0, n, BLOCK):
            vectors[start:start + BLOCK] = embeddings[rows[start:start + BLOCK]]
        vectors.flush()
        del vectors
    extra = [c for c in metadata_schema(embed_dir, embeddings.manifest).names if c not in INTERNAL_COLUMNS]
    meta = read_metadata_table(embed_dir, embeddings.manifest, extra).take(rows)
    with atomic_path(out_dir / METADATA) as tmp:
        pq.write_table(meta.add_column(0, "row", [rows]), tmp)
    files = {"vectors": VECTORS, "metadata": METADATA}
    if thumbnail_size:
        write_thumbnails(out_dir / THUMBNAILS, embed_dir, rows, thumbnail_size)
        files |= {"thumbnails": THUMBNAILS, "thumbnail_size": thumbnail_size}
    return files


def write_thumbnails(path: Path, embed_dir: Path, rows: np.ndarray, size: int) -> None:
    """uint8 [n, size, size, 3], decoded as the pack stage decodes training images; an image that no
    longer decodes stays white."""
    from pipeline.images import DatabaseImages

    database = DatabaseImages(embed_dir)
    with atomic_path(path) as tmp:
        thumbs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), size, size, 3))
        for start in range(0, len(rows), BLOCK):
            block = rows[start:start + BLOCK]
            images = database.load(block, size)
            thumbs[start:start + len(block)] = [images.get(int(r), np.full((size, size, 3), 255, np.uint8)) for r in block]
        thumbs.flush()
        del thumbs


# --------------------------------------------------------------------------- reading


class IndexVectors:
    """vectors.npy addressed by embed row, like pipeline.embeddings.Embeddings (rows the index holds)."""

    dtype = np.dtype(np.float16)

    def __init__(self, index_dir: Path, rows: np.ndarray):
        self.dir, self.rows = Path(index_dir), rows
        path = self.dir / VECTORS
        try:
            self.array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StageError(f"{path} is missing or corrupt ({e}): rebuild it with `knnd run index --force`") from None
        if self.array.ndim != 2 or len(self.array) != len(rows):
            raise StageError(f"{path} holds {self.array.shape}, but rows.npy names {len(rows)} rows: "
                             f"rebuild it with `knnd run index --force`")
        self.dim = int(self.array.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def positions(self, rows) -> np.ndarray:
        """Positions in the index files of embed rows (each must be one the index holds)."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.rows, rows), 0, len(self.rows) - 1)
        if len(self.rows) == 0 or not np.array_equal(self.rows[pos], rows):
            missing = rows[self.rows[pos] != rows] if len(self.rows) else rows
            raise StageError(f"row {int(missing.reshape(-1)[0])} is not in the index {self.dir}")
        return pos

    def __getitem__(self, rows) -> np.ndarray:
        pos = self.positions(rows)
        return np.asarray(self.array[pos.reshape(-1)]).reshape(pos.shape + (self.dim,))
