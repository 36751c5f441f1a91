"""The dedup stage's duplicate pairs against the exact answer (every pair above the cosine threshold,
by brute force), and the peak memory of its partition tasks.

    python tools/measure_dedup_recall.py --n 100000 --workdir work/recall100k
    python tools/measure_dedup_recall.py --n 1000000 --workdir work/recall1m --queries 20000

Writes synthetic embeddings (tools/make_synthetic_embeddings.py, in a child process) unless
<workdir>/embed exists, runs `knnd run dedup --force` there (this process), then computes the exact
pairs block by block (faiss IndexFlatIP range_search of the query rows against each embed shard,
float32 from the stored float16, as the stage reads them). With --queries Q, only Q random query
rows are checked (every pair with an endpoint among them, against all rows): an unbiased estimate of
the fraction found, at Q/n of the brute-force cost (the exact pairs are cached in the workdir, so
other settings, `--set dedup.nprobe=1`, are compared against the same answer). Prints one JSON line: recall (found / exact
cosine pairs), extra (pairs found that brute force does not have), coverage_by_nprobe (the recall
other nprobe values would give on the same partitions), the partition count and sizes,
each partition task's peak RSS (the largest) and the driver's.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import pipeline  # noqa: E402,F401  sets OPENBLAS_CORETYPE before faiss loads (pipeline/openblas.py)


def exact_pairs(emb, threshold: float, queries: np.ndarray, block: int = 8192) -> np.ndarray:
    """Every pair (a < b, int64 [m, 2]) with cosine above `threshold` and an endpoint in `queries`."""
    import faiss

    found = []
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        x = emb[rows].astype(np.float32)
        for s, shard in enumerate(emb.arrays):
            index = faiss.IndexFlatIP(emb.dim)
            index.add(np.asarray(shard, dtype=np.float32))
            lims, sims, ids = index.range_search(x, threshold)
            q = np.repeat(rows, np.diff(lims).astype(np.int64))
            other = ids.astype(np.int64) + emb.offsets[s]
            keep = (other != q) & (sims > threshold)
            found.append(np.stack([np.minimum(q, other)[keep], np.maximum(q, other)[keep]], axis=1))
    return unique_rows(np.concatenate(found) if found else np.zeros((0, 2), np.int64))


def unique_rows(pairs: np.ndarray) -> np.ndarray:
    return np.unique(pairs.astype(np.int64), axis=0) if len(pairs) else pairs.reshape(0, 2).astype(np.int64)


def stage_pairs(dedup_dir: Path) -> np.ndarray:
    """The cosine pairs the stage found (a < b), from its per-partition files."""
    pairs = []
    for path in sorted((dedup_dir / "pairs").glob("pairs_*.npy")):
        table = np.load(path)
        cosine = table[table["reason"] == 0]
        pairs.append(np.stack([cosine["a"], cosine["b"]], axis=1))
    return unique_rows(np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))


def compare(found: np.ndarray, exact: np.ndarray, queries: np.ndarray | None) -> dict:
    """Recall of `exact` by `found`, both restricted to pairs with an endpoint in `queries` (None: all)."""
    if queries is not None:
        mask = np.zeros(int(max(found.max(initial=0), exact.max(initial=0), queries.max(initial=0))) + 1, bool)
        mask[queries] = True
        found = found[mask[found[:, 0]] | mask[found[:, 1]]]
    as_set = {tuple(p) for p in exact.tolist()}
    hit = sum(tuple(p) in as_set for p in found.tolist())
    return {"exact_pairs": len(exact), "found_pairs": len(found), "found_of_exact": hit,
            "recall": hit / len(exact) if len(exact) else 1.0, "extra": len(found) - hit}


def coverage_by_nprobe(emb, centroids: np.ndarray, exact: np.ndarray, probes=(0, 1, 2, 3, 4, 6, 8)) -> dict:
    """The fraction of the exact pairs the stage would find at each nprobe: a task is exact within what it
    searches, so a pair is found when one image's nearest centroid is among the other's 1 + nprobe nearest."""
    if not len(exact):
        return {}
    a = np.argsort(-(emb[exact[:, 0]].astype(np.float32) @ centroids.T), axis=1)
    b = np.argsort(-(emb[exact[:, 1]].astype(np.float32) @ centroids.T), axis=1)
    return {p: round(float(((b[:, :1] == a[:, :1 + p]).any(1) | (a[:, :1] == b[:, :1 + p]).any(1)).mean()), 4)
            for p in probes}


def measure(workdir: Path, queries: int | None, seed: int, overrides: list[str]) -> dict:
    from pipeline.config import load_config
    from pipeline.embeddings import Embeddings
    from pipeline.runner import run_stage

    cfg = load_config(None, [f"workdir={workdir}", *overrides])
    manifest = run_stage("dedup", cfg, force=True)
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    emb = Embeddings(workdir / "embed")
    rows = None
    if queries and queries < len(emb):
        rows = np.sort(np.random.default_rng(seed).choice(len(emb), queries, replace=False))
    cache = workdir / f"exact_pairs_{cfg.dedup.cosine_threshold}_{queries or 'all'}_{seed}.npy"  # reused by later runs
    if cache.exists():
        exact = np.load(cache)
    else:
        exact = exact_pairs(emb, cfg.dedup.cosine_threshold, rows if rows is not None else np.arange(len(emb)))
        np.save(cache, exact)
    return {"n": len(emb), "queries": len(rows) if rows is not None else len(emb),
            **compare(stage_pairs(workdir / "dedup"), exact, rows),
            "partitions": manifest["partitions"], "partition_members": manifest["partition_members"],
            "nprobe": cfg.dedup.nprobe, "partition_size": cfg.dedup.partition_size,
            "task_peak_rss_mb": manifest["task_peak_rss_mb"], "driver_peak_rss_mb": round(driver_rss / 1e6, 1),
            "nodes": len(manifest["nodes"]), "removed": manifest["counts"]["removed"],
            "coverage_by_nprobe": coverage_by_nprobe(emb, np.load(workdir / "dedup" / "centroids.npy"), exact)
            if manifest["partitions"] > 1 else None}


def task_rss(workdir: Path, tasks: int, overrides: list[str]) -> dict:
    """Peak RSS of `tasks` partition tasks, each alone in a fresh process (no Ray), on the partitions
    of the last dedup run (its centroids.npy), re-assigned into <workdir>/dedup_task_rss/."""
    from pipeline.config import load_config
    from pipeline.dedup_partitions import assign_shard, partition_count
    from pipeline.embeddings import Embeddings

    conf = load_config(None, [f"workdir={workdir}", *overrides]).dedup
    emb = Embeddings(workdir / "embed")
    parts = partition_count(len(emb), conf.partition_size)
    out = workdir / "dedup_task_rss"
    centroids = workdir / "dedup" / "centroids.npy"
    for s, shard in enumerate(emb.shards):
        assign_shard(str(out / "parts"), str(centroids), str(emb.dir / shard["img_emb"]), str(emb.dir / shard["metadata"]),
                     int(emb.offsets[s]), s, parts, conf.nprobe)
    code = ("import json, sys; from pipeline.dedup_pairs import partition_pairs; a = json.loads(sys.argv[1]); "
            "print('TASK ' + json.dumps(partition_pairs(*a)))")
    results = []
    for part in range(min(tasks, parts)):
        args = [str(emb.dir), emb.manifest, str(out / "parts"), str(out / "pairs"), part,
                {"cosine": conf.cosine_threshold, "manhattan": conf.manhattan_threshold}, conf.candidates, conf.batch_size]
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, capture_output=True, text=True,
                              cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        results.append(json.loads(proc.stdout.split("TASK ", 1)[1]))
    return {"n": len(emb), "partitions": parts, "tasks": [{k: r[k] for k in ("partition", "members", "queries")}
                                                           | {"peak_rss_mb": round(r["peak_rss"] / 1e6, 1)} for r in results]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=100_000, help="synthetic rows (when <workdir>/embed does not exist)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--queries", type=int, default=None, help="check only this many random query rows (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override, repeatable, e.g. --set dedup.nprobe=1")
    p.add_argument("--task-rss", type=int, default=0, metavar="K",
                   help="instead: the peak RSS of K partition tasks, each alone in a fresh process (needs a "
                        "finished dedup run in the workdir)")
    args = p.parse_args(argv)
    if args.task_rss:
        print(json.dumps(task_rss(args.workdir, args.task_rss, args.overrides)), flush=True)
        return 0
    if not (args.workdir / "embed" / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_embeddings.py"), "--n", str(args.n),
                        "--workdir", str(args.workdir)], check=True)
    print(json.dumps(measure(args.workdir, args.queries, args.seed, args.overrides)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
