"""Read the embed stage's output through its manifest (memory-mapped float16 shards, by row) and
the dedup stage's keep.parquet (keep and hold-out masks, by row).

One reader for every stage downstream of embed (dedup, index, neighbours, pack, search,
sample, evaluate), so that "row" means the same thing everywhere and a corrupt file is reported
the same way everywhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.files import StageError, read_json

REBUILD = "rebuild it with `knnd run embed --force`"


def shard_files(shard: int, text: bool) -> dict[str, str]:
    """The embed layout (clip-retrieval's): a shard's files, relative to the embed folder, as its
    manifest entry names them."""
    files = {"img_emb": f"img_emb/img_emb_{shard:05d}.npy", "metadata": f"metadata/metadata_{shard:05d}.parquet"}
    return files | ({"text_emb": f"text_emb/text_emb_{shard:05d}.npy"} if text else {})


class Embeddings:
    """Rows [0, n) of the embedding matrix, stored as one float16 .npy per shard.

    `emb[rows]` gathers any int array of rows (float16 [len(rows), d]); `blocks()` streams shards.
    `kind` is "img" (image embeddings) or "text" (caption embeddings, when embed.text was on).
    """

    def __init__(self, embed_dir: Path, manifest: dict | None = None, kind: str = "img"):
        self.dir = Path(embed_dir)
        self.manifest = manifest or read_json(self.dir / "manifest.json", REBUILD)
        self.dim = int(self.manifest["dim"])
        self.kind = kind
        field = f"{kind}_emb"
        if any(field not in s for s in self.manifest["shards"]):
            raise StageError(f"{self.dir} has no {kind} embeddings (set embed.{'text' if kind == 'text' else 'model'} and re-run embed)")
        self.shards = self.manifest["shards"]
        self.offsets = np.array([s["row_offset"] for s in self.shards] + [self.manifest["rows"]], dtype=np.int64)
        self.arrays = [self._open(s, field) for s in self.shards]

    def _open(self, shard: dict, field: str) -> np.ndarray:
        path = self.dir / shard[field]
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StageError(f"{path} is missing or corrupt ({e}): {REBUILD}") from None
        if array.shape != (shard["rows"], self.dim) or array.dtype != np.float16:
            raise StageError(f"{path} holds {array.dtype} {array.shape}, the embed manifest says float16 "
                             f"({shard['rows']}, {self.dim}): {REBUILD}")
        return array

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    dtype = np.dtype(np.float16)

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        out = np.empty((len(flat), self.dim), np.float16)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            out[sel] = self.arrays[s][flat[sel] - self.offsets[s]]
        return out.reshape(rows.shape + (self.dim,))

    def blocks(self):
        """Yield (rows int64, float32 vectors) one shard at a time."""
        for s, array in enumerate(self.arrays):
            start = int(self.offsets[s])
            yield np.arange(start, start + len(array), dtype=np.int64), np.asarray(array, dtype=np.float32)


def read_metadata_table(embed_dir: Path, manifest: dict, columns: list[str]):
    """Columns of the embed metadata for every row, in row order, as one Arrow table (compact strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for shard in manifest["shards"]:
        path = Path(embed_dir) / shard["metadata"]
        try:
            tables.append(pq.read_table(path, columns=columns))
        except (OSError, pa.ArrowInvalid) as e:
            raise StageError(f"{path} is missing or corrupt ({e}): {REBUILD}") from None
    return pa.concat_tables(tables, promote_options="default")  # an all-NULL extra column in one shard


def metadata_files(embed_dir: Path, manifest: dict) -> list[Path]:
    return [Path(embed_dir) / shard["metadata"] for shard in manifest["shards"]]


def metadata_schema(embed_dir: Path, manifest: dict):
    """The embed metadata's columns (row, key, shard, url, caption, ..., and download.extra_columns)."""
    import pyarrow.parquet as pq

    files = metadata_files(embed_dir, manifest)
    try:
        return pq.read_schema(files[0])
    except (OSError, IndexError) as e:
        raise StageError(f"{Path(embed_dir)} has no readable metadata ({e}): {REBUILD}") from None


def read_metadata(embed_dir: Path, manifest: dict, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of the embed metadata for every row, in row order."""
    table = read_metadata_table(embed_dir, manifest, columns)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


# --------------------------------------------------------------------------- dedup's masks


def read_holdout(dedup_dir) -> np.ndarray:
    """Sorted rows held out of the index and training (evaluation's real images and prompts)."""
    return np.nonzero(read_flag(dedup_dir, "holdout", "is missing, corrupt or older than held-out evaluation"))[0]


def read_keep(dedup_dir) -> np.ndarray:
    """The keep mask (bool per row) from keep.parquet."""
    return read_flag(dedup_dir, "keep", "is missing or corrupt")


def read_flag(dedup_dir, column: str, problem: str) -> np.ndarray:
    """keep.parquet's boolean `column` as a mask indexed by row."""
    import pyarrow.parquet as pq

    path = Path(dedup_dir) / "keep.parquet"
    try:
        table = pq.read_table(path, columns=["row", column])
    except Exception as e:  # noqa: BLE001 - any read failure means the same fix
        raise StageError(f"{path} {problem} ({e}): rebuild it with `knnd run dedup --force`") from None
    mask = np.zeros(table.num_rows, bool)
    mask[table.column("row").to_numpy()] = table.column(column).to_numpy(zero_copy_only=False)
    return mask
