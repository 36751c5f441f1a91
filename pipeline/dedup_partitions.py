"""dedup's partitions: a coarse spherical k-means (faiss) trained on a sample cuts the embeddings into
about n / `dedup.partition_size` partitions; Ray tasks over the embed shards put every vector in the
partition of its nearest centroid (a *member*) and, as a *guest*, in those of its `dedup.nprobe`
next-nearest centroids. A partition's task (pipeline.dedup_pairs) then searches its members and its
guests against its members, so every vector is compared with its own partition and with the
partitions of its `nprobe` nearest other centroids: a duplicate just across a boundary is found.

    dedup/centroids.npy                  float32 [P, d] (written once: a resume reuses it; none when P = 1)
    dedup/parts/phash_{shard:05d}.npy    uint8 [rows, bytes]: the shard's pHashes, packed
    dedup/parts/offsets_{shard:05d}.npy  int64 [P + 1]: partition p's entries are entries[offsets[p]:offsets[p+1]]
    dedup/parts/entries_{shard:05d}.npy  int64: the shard's rows sorted by partition (stable: ascending rows in
                                         each), a member as its row, a guest as ~row (= -row - 1)

The entries file is renamed into place last: it marks the shard assigned (a resume skips it). The
per-partition member lists are the concatenation, over shards, of each file's slice for that
partition (`PartitionLists.entries`). A task reads those slices, its rows' vectors and pHashes with
plain file reads (`read_npy_rows`), not memory maps: it holds only its partition, whatever n.
"""
from __future__ import annotations

import resource
from pathlib import Path

import numpy as np

from pipeline.cluster import node_id
from pipeline.duplicates import phash_bits_from_hex
from pipeline.embeddings import REBUILD, Embeddings
from pipeline.files import StageError, atomic_path

SAMPLE_PER_PARTITION = 64  # k-means training points per centroid (faiss warns below 39)
KMEANS_ITERATIONS = 20
ASSIGN_BATCH = 65536


def partition_count(n: int, partition_size: int) -> int:
    return max(1, -(-n // partition_size))


def train_centroids(emb: Embeddings, parts: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (float32 [parts, d], unit norm) from a sample of the rows."""
    import faiss

    n, d = emb.shape
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, parts * SAMPLE_PER_PARTITION), replace=False))
    kmeans = faiss.Kmeans(d, parts, niter=KMEANS_ITERATIONS, seed=seed + 1, spherical=True,
                          max_points_per_centroid=SAMPLE_PER_PARTITION, min_points_per_centroid=1, verbose=False)
    kmeans.train(read_embedding_rows(emb, rows).astype(np.float32))  # not emb[rows]: see read_npy_rows
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def shard_file(parts_dir: Path, kind: str, shard: int) -> Path:
    return Path(parts_dir) / f"{kind}_{shard:05d}.npy"


def shard_assigned(parts_dir: Path, shard: int) -> bool:
    return shard_file(parts_dir, "entries", shard).exists()


def nearest_partitions(vectors: np.ndarray, centroids: np.ndarray | None, probes: int) -> np.ndarray:
    """int64 [len(vectors), probes]: each vector's nearest centroids by inner product, nearest first
    (all zeros with one partition)."""
    if centroids is None or len(centroids) == 1:
        return np.zeros((len(vectors), 1), np.int64)
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    out = []
    for start in range(0, len(vectors), ASSIGN_BATCH):
        _, parts = index.search(np.asarray(vectors[start:start + ASSIGN_BATCH], dtype=np.float32), probes)
        out.append(parts)
    return np.concatenate(out) if out else np.zeros((0, probes), np.int64)


def assign_shard(parts_dir: str, centroids_path: str, vectors_path: str, metadata_path: str, row_offset: int,
                 shard: int, parts: int, nprobe: int) -> dict:
    """One Ray task (or a call, for one partition): one embed shard's rows into partitions, and its
    pHashes packed, written under `parts_dir`. Returns {rows, node}."""
    import pyarrow.parquet as pq

    parts_dir = Path(parts_dir)
    vectors = np.load(vectors_path, mmap_mode="r")
    try:
        hashes = pq.read_table(metadata_path, columns=["phash"]).column("phash").to_pylist()
    except Exception as e:  # noqa: BLE001 - any read failure means the same fix
        raise StageError(f"{metadata_path} is missing or corrupt ({e}): {REBUILD}") from None
    centroids = np.load(centroids_path) if parts > 1 else None
    nearest = nearest_partitions(vectors, centroids, min(1 + nprobe, parts))
    rows = row_offset + np.arange(len(vectors), dtype=np.int64)
    entries = np.where(np.arange(nearest.shape[1]) == 0, rows[:, None], ~rows[:, None]).ravel()
    order = np.argsort(nearest.ravel(), kind="stable")
    offsets = np.searchsorted(nearest.ravel()[order], np.arange(parts + 1)).astype(np.int64)
    save_array(shard_file(parts_dir, "phash", shard), phash_bits_from_hex(hashes))
    save_array(shard_file(parts_dir, "offsets", shard), offsets)
    save_array(shard_file(parts_dir, "entries", shard), entries[order])  # last: marks the shard done
    return {"rows": len(rows), "node": node_id()}


def npy_layout(path) -> tuple[int, tuple, np.dtype]:
    """(byte offset of the data, shape, dtype) of a C-order .npy file, from its header."""
    from numpy.lib import format as npy

    with open(path, "rb") as f:
        version = npy.read_magic(f)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise ValueError(f"{path} is Fortran-ordered")
        return f.tell(), shape, dtype


def read_npy_rows(path, rows: np.ndarray) -> np.ndarray:
    """Rows (first-axis indices, any order, repeats allowed) of a .npy file by reading those bytes
    (one pread per run of consecutive rows): unlike a memory map, which the kernel reads ahead
    around every touched row and counts in the process's RSS, this holds only the rows asked for."""
    import os

    offset, shape, dtype = npy_layout(path)
    rows = np.asarray(rows, np.int64)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    out = np.empty((len(rows), *shape[1:]), dtype)
    if not len(rows) or not row_bytes:
        return out
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    breaks = np.nonzero(np.diff(ordered) != 1)[0] + 1
    with open(path, "rb", buffering=0) as f:
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)]):
            data = os.pread(f.fileno(), int(hi - lo) * row_bytes, offset + int(ordered[lo]) * row_bytes)
            out[order[lo:hi]] = np.frombuffer(data, dtype).reshape(int(hi - lo), *shape[1:])
    return out


class EmbedLayout:
    """Where the embed shards are (dir, shards, offsets, dim) from the manifest, opening no file:
    what a task needs to read rows with `read_embedding_rows` (an `Embeddings` works as well)."""

    def __init__(self, embed_dir, manifest: dict):
        self.dir, self.shards, self.dim = Path(embed_dir), manifest["shards"], int(manifest["dim"])
        self.offsets = np.array([s["row_offset"] for s in self.shards] + [manifest["rows"]], dtype=np.int64)


def read_embedding_rows(emb: Embeddings | EmbedLayout, rows: np.ndarray) -> np.ndarray:
    """emb[rows] (float16), read from the shard files instead of their memory maps (read_npy_rows)."""
    return gather(emb, rows, lambda s, local: read_npy_rows(emb.dir / emb.shards[s]["img_emb"], local),
                  (emb.dim,), np.float16)


def gather(emb: Embeddings | EmbedLayout, rows: np.ndarray, read, tail: tuple, dtype) -> np.ndarray:
    """Rows of a per-shard array: read(shard, local rows) for each embed shard the rows fall in."""
    rows = np.asarray(rows, np.int64)
    out = np.zeros((len(rows), *tail), dtype)
    shard_of = np.searchsorted(emb.offsets, rows, side="right") - 1
    for s in np.unique(shard_of):
        sel = np.nonzero(shard_of == s)[0]
        out[sel] = read(int(s), rows[sel] - emb.offsets[s])
    return out


class PartitionLists:
    """Read-side of the assignment: a partition's members and guests, and pHashes by row."""

    def __init__(self, parts_dir, emb: Embeddings | EmbedLayout):
        self.dir, self.emb = Path(parts_dir), emb
        self.shards = range(len(emb.shards))

    def entries(self, part: int) -> tuple[np.ndarray, np.ndarray]:
        """(members, guests) of partition `part`: sorted int64 rows."""
        chunks = []
        for s in self.shards:
            lo, hi = read_npy_rows(shard_file(self.dir, "offsets", s), np.array([part, part + 1]))
            if hi > lo:
                chunks.append(read_npy_rows(shard_file(self.dir, "entries", s), np.arange(lo, hi)))
        entries = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        return entries[entries >= 0], ~entries[entries < 0]

    def phash(self, rows: np.ndarray) -> np.ndarray:
        """Packed pHashes (uint8 [len(rows), bytes]) of any rows."""
        width = npy_layout(shard_file(self.dir, "phash", 0))[1][1] if len(self.shards) else 0
        return gather(self.emb, rows, lambda s, local: read_npy_rows(shard_file(self.dir, "phash", s), local),
                      (width,), np.uint8)


def peak_rss() -> int:
    """This process's peak resident bytes so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
