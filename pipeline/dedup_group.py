"""dedup's grouping and keep.parquet, in memory bounded by the duplicates and one embed shard.

Only an image in a duplicate pair can be removed, so only those images' keys are read to rank them
(`rank_removals`); every other image is kept. The hold-out draw (`holdout_rows`) and the output
(`write_keep`) then go through the embed metadata one shard at a time. So the `knnd` process holds
the pairs, the removed rows, the hold-out candidates and one shard's keys: never a column over every
image (at 400 M images, a key column alone would take tens of GB).

`remove_in_key_order` and `holdout_mask` are the same rules over in-memory arrays (every row at
once): the reference the streaming versions are tested against.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.duplicates import remove_in_row_order
from pipeline.embeddings import read_metadata_table
from pipeline.files import atomic_path

REASONS = np.array(["cosine", "phash"])  # dedup's edge reasons, by their code in the pairs files


@dataclass
class Removal:
    """The removed images, by global row (sorted), each with the kept image it duplicates."""
    rows: np.ndarray          # int64 [r], sorted
    duplicate_of: np.ndarray  # int64 [r]: a kept row
    similarity: np.ndarray    # float32 [r]: that pair's cosine
    reason: np.ndarray        # int8 [r]: 0 cosine, 1 pHash

    def slice(self, start: int, stop: int) -> tuple[slice, np.ndarray]:
        """(the entries for rows [start, stop), those rows minus start)."""
        lo, hi = np.searchsorted(self.rows, [start, stop])
        return slice(lo, hi), self.rows[lo:hi] - start


def shard_keys(embed_dir: Path, manifest: dict, rows: np.ndarray | None = None) -> Iterator[tuple[int, object]]:
    """(first row, the shard's `key` column as an Arrow array), one embed shard at a time; with `rows`
    (sorted), only the shards that hold one of them."""
    for shard in manifest["shards"]:
        start = int(shard["row_offset"])
        if rows is not None and np.searchsorted(rows, start) == np.searchsorted(rows, start + int(shard["rows"])):
            continue
        table = read_metadata_table(embed_dir, {"shards": [shard]}, ["key"])
        yield int(shard["row_offset"]), table.column("key").combine_chunks()


def rank_removals(embed_dir: Path, manifest: dict, pairs: np.ndarray, sims: np.ndarray,
                  reasons: np.ndarray) -> Removal:
    """`remove_in_key_order` over the images in `pairs` only, reading just their keys."""
    involved = np.unique(pairs)  # sorted global rows
    keys = np.empty(len(involved), object)
    for start, column in shard_keys(embed_dir, manifest, involved):  # only the shards with a paired image
        lo, hi = np.searchsorted(involved, [start, start + len(column)])
        keys[lo:hi] = column.take(involved[lo:hi] - start).to_numpy(zero_copy_only=False)
    compact = np.searchsorted(involved, pairs)
    removed, duplicate_of, similarity, reason = remove_in_key_order(keys, compact, sims, reasons)
    gone = np.nonzero(removed)[0]
    return Removal(involved[gone], involved[duplicate_of[gone]], similarity[gone], reason[gone])


def remove_in_key_order(keys, pairs: np.ndarray, sims: np.ndarray, reasons: np.ndarray):
    """remove_in_row_order with the items ranked by key instead of row: which of two duplicates is kept
    then depends on the images, not on the order img2dataset's threads wrote a shard in, so two
    downloads of one URL list (or a cluster and a single machine) dedup alike. Same return values,
    indexed by row."""
    n = len(keys)
    by_key = np.argsort(np.asarray(keys, dtype=object).astype(str), kind="stable")  # rows in key order
    rank = np.empty(n, np.int64)
    rank[by_key] = np.arange(n)
    removed, dup_rank, similarity, reason = remove_in_row_order(n, rank[pairs], sims, reasons)
    duplicate_of = np.where(dup_rank[rank] >= 0, by_key[np.maximum(dup_rank[rank], 0)], -1)
    return removed[rank], duplicate_of, similarity[rank], reason[rank]


# --------------------------------------------------------------------------- the hold-out draw


def key_digests(keys, seed: int = 0) -> np.ndarray:
    """blake2b (64 bits) of each key's text, as uint64: the hold-out draw's hash. A non-zero `seed`
    salts the hash (another, independent draw: cross-validation folds); 0 hashes the key alone."""
    salt = f"holdout-seed {seed}:".encode() if seed else b""
    return np.array([int.from_bytes(hashlib.blake2b(salt + str(k).encode(), digest_size=8).digest(), "big")
                     for k in keys], dtype=np.uint64)


def pick_holdout(rows: np.ndarray, digests: np.ndarray, fraction: float, most: int) -> np.ndarray:
    """Of the candidate `rows` (in row order) and their digests: those below fraction * 2^64, at most
    `most` (the smallest digests; ties by row). Returns the picked rows, sorted."""
    if fraction <= 0 or most <= 0:
        return np.zeros(0, np.int64)
    below = np.nonzero(digests < np.uint64(min(int(fraction * 2 ** 64), 2 ** 64 - 1)))[0]
    if len(below) > most:
        below = np.sort(below[np.argsort(digests[below], kind="stable")[:most]])
    return np.asarray(rows, np.int64)[below]


def holdout_mask(keys, representative: np.ndarray, fraction: float, most: int, seed: int = 0) -> np.ndarray:
    """The representatives whose key hashes (blake2b, 64 bits) below fraction * 2^64: about `fraction`
    of them, the same keys whatever the row order, and an item held out stays held out when the data
    grows. Beyond `most`, the `most` smallest hashes are kept (then growth can move a few back). `seed`
    salts the hash (key_digests)."""
    rows = np.nonzero(representative)[0]
    mask = np.zeros(len(representative), bool)
    if fraction > 0 and most > 0 and len(rows):
        mask[pick_holdout(rows, key_digests([keys[r] for r in rows], seed), fraction, most)] = True
    return mask


def holdout_rows(embed_dir: Path, manifest: dict, removal: Removal, fraction: float, most: int,
                 seed: int = 0) -> np.ndarray:
    """`holdout_mask` streamed: the held-out rows (sorted), hashing one shard's kept keys at a time and
    holding only the candidates below the fraction."""
    if fraction <= 0 or most <= 0:
        return np.zeros(0, np.int64)
    limit = np.uint64(min(int(fraction * 2 ** 64), 2 ** 64 - 1))
    found_rows, found_digests = [np.zeros(0, np.int64)], [np.zeros(0, np.uint64)]
    for start, column in shard_keys(embed_dir, manifest):
        kept = np.ones(len(column), bool)
        kept[removal.slice(start, start + len(column))[1]] = False
        local = np.nonzero(kept)[0]
        digests = key_digests(column.take(local).to_pylist(), seed)
        below = digests < limit
        found_rows.append(local[below] + start)
        found_digests.append(digests[below])
    return pick_holdout(np.concatenate(found_rows), np.concatenate(found_digests), fraction, most)


# --------------------------------------------------------------------------- keep.parquet


def keep_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("row", pa.int64()), ("keep", pa.bool_()), ("duplicate_of", pa.int64()),
                      ("reason", pa.string()), ("similarity", pa.float32()), ("holdout", pa.bool_())])


def shard_table(start: int, keys, removal: Removal, holdout: np.ndarray):
    """keep.parquet's rows [start, start + len(keys)): key, row, keep, duplicate_of (removed only),
    reason (not kept only: cosine, phash or holdout), similarity (removed only), holdout."""
    import pyarrow as pa

    n = len(keys)
    entries, local = removal.slice(start, start + n)
    removed, duplicate_of = np.zeros(n, bool), np.full(n, -1, np.int64)
    similarity, reason = np.full(n, np.nan, np.float32), np.full(n, -1, np.int8)
    removed[local], duplicate_of[local] = True, removal.duplicate_of[entries]
    similarity[local], reason[local] = removal.similarity[entries], removal.reason[entries]
    held = np.zeros(n, bool)
    lo, hi = np.searchsorted(holdout, [start, start + n])
    held[holdout[lo:hi] - start] = True
    keep = ~removed & ~held
    text = np.where(removed, REASONS[np.maximum(reason, 0)], np.where(held, "holdout", ""))
    return pa.table({
        "key": keys.cast(pa.string()),
        "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "keep": pa.array(keep),
        "duplicate_of": pa.array(duplicate_of, mask=~removed),
        "reason": pa.array(text, pa.string(), mask=keep),
        "similarity": pa.array(similarity, pa.float32(), mask=~removed),
        "holdout": pa.array(held),
    }, schema=keep_schema())


def write_keep(path: Path, embed_dir: Path, manifest: dict, removal: Removal, holdout: np.ndarray) -> int:
    """Write keep.parquet one embed shard (one row group) at a time; returns the number of kept images."""
    import pyarrow.parquet as pq

    kept = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, keep_schema()) as writer:
        for start, column in shard_keys(embed_dir, manifest):
            table = shard_table(start, column, removal, holdout)
            kept += int(np.count_nonzero(table.column("keep").to_numpy()))
            writer.write_table(table)
    return kept
