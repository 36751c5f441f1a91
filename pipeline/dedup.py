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
row order, which img2dataset's threads do not fix; only the keys of images in a pair are read, and
keep.parquet is written shard by shard: pipeline.dedup_group): an item not yet removed is kept and removes
every later item it is a duplicate of, so each removed
item names a kept item it is itself similar to (no chains: A ~ B ~ C keeps C when A and C are not
duplicates).

Then `holdout` of the kept images (at most `holdout_max`), chosen by a hash of their key (salted by
`holdout_seed` for another draw: cross-validation folds), are held
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
from pipeline.dedup_group import REASONS, holdout_rows, rank_removals, write_keep
from pipeline.embeddings import Embeddings
from pipeline.runner import Progress, StageError, StageRun


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


def run(stage: StageRun) -> dict:
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
    manifest = stage.inputs["embed"]
    removal = rank_removals(embed_dir, manifest, pairs, sims, reasons)
    holdout = holdout_rows(embed_dir, manifest, removal, conf.holdout, conf.holdout_max, conf.holdout_seed)
    kept = write_keep(stage.dir / "keep.parquet", embed_dir, manifest, removal, holdout)
    shutil.rmtree(stage.dir / "parts", ignore_errors=True)
    if conf.holdout > 0 and len(holdout) < 2:
        print(f"dedup: only {len(holdout)} image(s) held out for evaluation (dedup.holdout {conf.holdout}): "
              f"`knnd run evaluate` needs at least 2; raise dedup.holdout or set evaluate.prompts")
    by_reason = {name: int((removal.reason == i).sum()) for i, name in enumerate(REASONS)}
    tasks = [stage.done_stats()[p] for p in range(parts)]
    return {
        "items": n,
        "counts": {"images": n, "kept": kept, "removed": len(removal.rows), "holdout": len(holdout),
                   "groups": len(np.unique(removal.duplicate_of)), **{f"removed_{k}": v for k, v in by_reason.items()}},
        "removed_by_reason": by_reason,
        "kept": kept,
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
