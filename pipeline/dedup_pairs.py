"""dedup's partition tasks: the duplicate pairs of one partition (pipeline.dedup_partitions).

The task loads only its partition: its members' vectors into an exact faiss flat index (float32,
d x 4 bytes a member), its queries (members and guests) a batch at a time. Per query it takes
 - every member above `cosine_threshold` (all of them: the `candidates + 1` nearest from a k-NN
   search, and a range search for the queries whose k-th neighbour is still above the threshold), and
 - among its `candidates` nearest members (self excluded), those whose pHash is within
   `manhattan_threshold` bits (pHash alone is not applied to all pairs: unrelated 64 px emoji often
   sit within 8 bits of each other).
Pairs are written as (a < b, similarity, reason 0 cosine / 1 pHash), sorted, one per (a, b, reason),
to dedup/pairs/pairs_{part:05d}.npy (a structured array, PAIR), renamed into place: a re-run skips the partitions that have one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cluster import node_id
from pipeline.dedup_partitions import EmbedLayout, PartitionLists, peak_rss, read_embedding_rows, save_array
from pipeline.duplicates import near_duplicates

PAIR = np.dtype([("a", np.int64), ("b", np.int64), ("similarity", np.float32), ("reason", np.int8)])
EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8))


def pairs_path(pairs_dir, part: int) -> Path:
    return Path(pairs_dir) / f"pairs_{part:05d}.npy"


def partition_pairs(embed_dir: str, manifest: dict, parts_dir: str, pairs_dir: str, part: int, thresholds: dict,
                    candidates: int, batch_size: int) -> dict:
    """One Ray task (or a call): partition `part`'s duplicate pairs to pairs_dir. thresholds:
    {cosine, manhattan}. Returns {members, queries, pairs, node, peak_rss}."""
    import faiss

    emb = EmbedLayout(embed_dir, manifest)
    lists = PartitionLists(parts_dir, emb)
    members, guests = lists.entries(part)
    queries = np.concatenate([members, guests])
    found = [EMPTY]
    if len(members) and (len(members) > 1 or len(guests)):
        index = faiss.IndexFlatIP(emb.dim)
        index.add(read_embedding_rows(emb, members).astype(np.float32))
        member_bits = lists.phash(members)
        for start in range(0, len(queries), batch_size):
            rows = queries[start:start + batch_size]
            found.append(query_pairs(index, members, member_bits, rows, read_embedding_rows(emb, rows).astype(np.float32),
                                     lists.phash(rows), thresholds, candidates))
    a, b, sims, reasons = (np.concatenate(column) for column in zip(*found))
    a, b, sims, reasons = unique_pairs(a, b, sims, reasons)
    table = np.empty(len(a), PAIR)
    table["a"], table["b"], table["similarity"], table["reason"] = a, b, sims, reasons
    save_array(pairs_path(pairs_dir, part), table)
    return {"partition": part, "members": len(members), "queries": len(queries), "pairs": len(a),
            "node": node_id(), "peak_rss": peak_rss()}


def query_pairs(index, members: np.ndarray, member_bits: np.ndarray, rows: np.ndarray, vectors: np.ndarray,
                bits: np.ndarray, thresholds: dict, candidates: int):
    """(a, b, similarity, reason) of one batch of queries (`rows`, their `vectors` and pHash `bits`)
    against the partition's members (`index`, `members` rows and `member_bits`)."""
    cos_thr, man_thr = thresholds["cosine"], thresholds["manhattan"]
    k = min(candidates + 1, len(members))
    sims, ids = index.search(vectors, k)
    neighbours = members[ids]
    other = neighbours != rows[:, None]
    by_cosine, by_phash = near_duplicates(sims, bits[:, None, :], member_bits[ids], cos_thr, man_thr)
    nearest = other & (np.cumsum(other, axis=1) <= candidates)  # the `candidates` nearest, self excluded
    saturated = (sims[:, -1] > cos_thr) & (k < len(members))  # more members above the threshold than k
    keep_cos = by_cosine & other & ~saturated[:, None]
    keep_ph = by_phash & nearest
    q = np.broadcast_to(rows[:, None], neighbours.shape)
    a = [q[keep_cos], q[keep_ph]]
    b = [neighbours[keep_cos], neighbours[keep_ph]]
    s = [sims[keep_cos], sims[keep_ph]]
    r = [np.zeros(int(keep_cos.sum()), np.int8), np.ones(int(keep_ph.sum()), np.int8)]
    if saturated.any():
        lims, range_sims, range_ids = index.range_search(vectors[saturated], cos_thr)
        range_q = np.repeat(rows[saturated], np.diff(lims).astype(np.int64))
        range_rows = members[range_ids]
        mine = (range_rows != range_q) & (range_sims > cos_thr)
        a.append(range_q[mine])
        b.append(range_rows[mine])
        s.append(range_sims[mine])
        r.append(np.zeros(int(mine.sum()), np.int8))
    return np.concatenate(a), np.concatenate(b), np.concatenate(s).astype(np.float32), np.concatenate(r)


def unique_pairs(a, b, sims, reasons):
    """Pairs as (min, max), sorted by (a, b, reason), one per (a, b, reason): the first found."""
    if not len(a):
        return a, b, sims, reasons
    a, b = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((reasons, b, a))
    a, b, sims, reasons = a[order], b[order], sims[order], reasons[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1]) | (reasons[1:] != reasons[:-1])]
    return a[first], b[first], sims[first], reasons[first]


def read_pairs(pairs_dir, parts: int):
    """Every partition's pairs, concatenated in partition order: (pairs int64 [m, 2], sims, reasons)."""
    table = np.concatenate([np.load(pairs_path(pairs_dir, part)) for part in range(parts)])
    return np.stack([table["a"], table["b"]], axis=1), table["similarity"], table["reason"]
