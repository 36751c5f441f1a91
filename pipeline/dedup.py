"""dedup stage: embeddings -> dedup/keep.parquet (key, row, keep, duplicate_of, reason, similarity).

Two items are duplicates when their CLIP cosine similarity is above `cosine_threshold`, or,
among CLIP candidate pairs only, when their perceptual hashes differ in at most
`manhattan_threshold` bits (pHash alone cannot be applied to all pairs: unrelated 64 px emoji
often sit within 8 bits of each other).

Distributed and bounded: a coarse k-means cuts the embeddings into about n / `partition_size`
partitions; Ray tasks over the embed shards assign every vector to its partition and to those of
its `nprobe` next-nearest centroids (pipeline.dedup_partitions); one Ray task per partition finds
the duplicate pairs among the vectors assigned to it, holding only that partition
(pipeline.dedup_pairs), and writes them to its own file, so a re-run resumes per partition. With
one partition (up to `partition_size` images) and no Ray running or configured, both steps run in
this process. The pairs (few) are then grouped here by the paper's per-item rule, in key order (not
row order, which img2dataset's threads do not fix): an item not yet removed is kept and removes
every later item it is a duplicate of, so each removed
item names a kept item it is itself similar to (no chains: A ~ B ~ C keeps C when A and C are not
duplicates).

Then `holdout` of the kept images (at most `holdout_max`), chosen by a hash of their key, are held
out of the database and of training (`keep` false, `holdout` true, reason "holdout"): their captions
are `knnd evaluate`'s prompts and their pictures its real images. Their duplicates were already
removed, so no near-copy of a held-out image reaches training.

    dedup/keep.parquet               the stage's output
    dedup/pairs/pairs_{part:05d}.npy each partition's duplicate pairs (kept: they say why an item went)
    dedup/centroids.npy              the partitions' k-means centroids (none with one partition)
    dedup/parts/                     the assignments to partitions, deleted once keep.parquet is written
"""
from __future__ import annotations

import shutil
import sys

import numpy as np

from pipeline.cluster import count_nodes, ray_tasks
from pipeline.dedup_pairs import pairs_path, partition_pairs, read_pairs
from pipeline.dedup_partitions import assign_shard, partition_count, save_array, shard_assigned, train_centroids
from pipeline.duplicates import remove_in_row_order
from pipeline.embeddings import Embeddings, read_metadata
from pipeline.runner import Progress, StageError, StageRun, atomic_path


def run_tasks(stage: StageRun, distributed: bool, fn, calls: dict, what: str):
    """Yield (key, fn(*args)) for {key: args}: as Ray tasks (one CPU each) when `distributed`, else
    here, one after another. A failed task stops the stage with a StageError naming it."""
    if not distributed:
        for key, args in calls.items():
            yield key, fn(*args)
        return
    yield from ray_tasks(stage.cfg, fn, calls, lambda key, cause: StageError(
        f"dedup: {what} {key} failed ({str(cause)[:300]}); re-run `knnd run dedup` to resume (finished {what}s are kept)"))


def ray_wanted(stage: StageRun, parts: int) -> bool:
    """Ray tasks for more than one partition, on a configured cluster, or when Ray already runs here."""
    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return parts > 1 or bool(stage.cfg.ray.address) or running


def assign(stage: StageRun, emb: Embeddings, parts: int, distributed: bool) -> None:
    """Centroids (trained once) and every shard's assignment, skipping shards an earlier run assigned."""
    conf, parts_dir, centroids = stage.conf, (stage.dir / "parts").resolve(), (stage.dir / "centroids.npy").resolve()
    if parts > 1 and not centroids.exists():
        print(f"dedup: training {parts} partition centroids (k-means on a sample)")
        save_array(centroids, train_centroids(emb, parts))
    parts_dir.mkdir(parents=True, exist_ok=True)
    calls = {s: (str(parts_dir), str(centroids), str((emb.dir / shard["img_emb"]).resolve()), str((emb.dir / shard["metadata"]).resolve()),
                 int(emb.offsets[s]), s, parts, conf.nprobe)
             for s, shard in enumerate(emb.shards) if not shard_assigned(parts_dir, s)}
    for _ in run_tasks(stage, distributed, assign_shard, calls, "assigning embed shard"):
        pass


def find_pairs(stage: StageRun, emb: Embeddings, parts: int, todo: list[int], distributed: bool) -> None:
    conf = stage.conf
    progress = Progress("dedup", parts, done=parts - len(todo), unit="images", parts="partitions")
    thresholds = {"cosine": conf.cosine_threshold, "manhattan": conf.manhattan_threshold}
    calls = {p: (str(emb.dir.resolve()), emb.manifest, str((stage.dir / "parts").resolve()),
                 str((stage.dir / "pairs").resolve()), p, thresholds, conf.candidates, conf.batch_size) for p in todo}
    for part, stats in run_tasks(stage, distributed, partition_pairs, calls, "partition"):
        stage.mark_done(part, stats)  # after its pairs file was renamed into place
        progress.update(1, stats["members"])


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


def run(stage: StageRun) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    conf = stage.conf
    embed_dir = stage.input_dirs["embed"]
    emb = Embeddings(embed_dir, stage.inputs["embed"])
    n = len(emb)
    parts = partition_count(n, conf.partition_size)
    stage.plan(parts)
    todo = [p for p in range(parts) if not (stage.shard_done(p) and pairs_path(stage.dir / "pairs", p).exists())]
    distributed = ray_wanted(stage, parts)
    if todo:
        assign(stage, emb, parts, distributed)
        find_pairs(stage, emb, parts, todo, distributed)
    pairs, sims, reasons = read_pairs(stage.dir / "pairs", parts)
    keys = read_metadata(embed_dir, stage.inputs["embed"], ["key"])["key"]
    removed, duplicate_of, similarity, edge_reason = remove_in_key_order(keys, pairs, sims, reasons)
    representative = ~removed
    holdout = holdout_mask(keys, representative, conf.holdout, conf.holdout_max)
    keep = representative & ~holdout
    names = np.array(["cosine", "phash"])
    reason = np.where(removed, names[np.maximum(edge_reason, 0)], np.where(holdout, "holdout", ""))
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "keep": pa.array(keep),
        "duplicate_of": pa.array(duplicate_of, mask=representative),
        "reason": pa.array(reason, pa.string(), mask=keep),
        "similarity": pa.array(similarity, pa.float32(), mask=representative),
        "holdout": pa.array(holdout),
    })
    with atomic_path(stage.dir / "keep.parquet") as tmp:
        pq.write_table(table, tmp)
    shutil.rmtree(stage.dir / "parts", ignore_errors=True)
    if conf.holdout > 0 and holdout.sum() < 2:
        print(f"dedup: only {int(holdout.sum())} image(s) held out for evaluation (dedup.holdout {conf.holdout}): "
              f"`knnd run evaluate` needs at least 2; raise dedup.holdout or set evaluate.prompts")
    by_reason = {name: int((removed & (edge_reason == i)).sum()) for i, name in enumerate(names)}
    tasks = [stage.done_stats()[p] for p in range(parts)]
    return {
        "items": n,
        "counts": {"images": n, "kept": int(keep.sum()), "removed": int(removed.sum()), "holdout": int(holdout.sum()),
                   "groups": int(len(np.unique(duplicate_of[removed]))), **{f"removed_{k}": v for k, v in by_reason.items()}},
        "removed_by_reason": by_reason,
        "kept": int(keep.sum()),
        "partitions": parts,
        "partition_members": {"max": max(t["members"] for t in tasks), "min": min(t["members"] for t in tasks)},
        "queries": sum(t["queries"] for t in tasks),
        "duplicate_pairs": int(len(np.unique(pairs.min(axis=1) * n + pairs.max(axis=1)))),
        "resumed_partitions": parts - len(todo),
        "nodes": count_nodes(t.get("node") for t in tasks),
        "task_peak_rss_mb": round(max(t["peak_rss"] for t in tasks) / 1e6, 1),
        "search": f"exact inner product (faiss Flat) within each partition; each image also in its {conf.nprobe} "
                  f"next-nearest partitions",
        "thresholds": {"cosine": conf.cosine_threshold, "manhattan": conf.manhattan_threshold},
        "output": "keep.parquet",
    }


def holdout_mask(keys, representative: np.ndarray, fraction: float, most: int) -> np.ndarray:
    """The representatives whose key hashes (blake2b, 64 bits) below fraction * 2^64: about `fraction`
    of them, the same keys whatever the row order, and an item held out stays held out when the data
    grows. Beyond `most`, the `most` smallest hashes are kept (then growth can move a few back)."""
    import hashlib

    rows = np.nonzero(representative)[0]
    mask = np.zeros(len(representative), bool)
    if fraction <= 0 or most <= 0 or not len(rows):
        return mask
    digests = np.array([int.from_bytes(hashlib.blake2b(str(keys[r]).encode(), digest_size=8).digest(), "big")
                        for r in rows], dtype=np.uint64)
    below = np.nonzero(digests < np.uint64(min(int(fraction * 2 ** 64), 2 ** 64 - 1)))[0]
    if len(below) > most:
        below = below[np.argsort(digests[below], kind="stable")[:most]]
    mask[rows[below]] = True
    return mask
