"""dedup: the stage against a bare faiss build and search of every row, and its pairs against brute force."""
from __future__ import annotations

import numpy as np

from .common import Bench, Row, clock, config, interleave, measured, run_stage_quietly
from .synthetic import batched_search, raw_index, search_workdir


def single_index_factory(n: int) -> str:
    """The one candidate index dedup used before it was partitioned (exact up to 50k rows, else IVF)."""
    from pipeline.faiss_build import ivf_nlist

    return "Flat" if n <= 50_000 else f"IVF{ivf_nlist(n)},Flat"


def section_dedup(b: Bench) -> None:
    from pipeline.embeddings import Embeddings

    wd = search_workdir(b)
    cfg = config(wd)
    x = Embeddings(wd / "embed")[np.arange(b.sizes.search_n)].astype(np.float32)
    factory = single_index_factory(len(x))
    manifest = {}

    def stage(i):
        seconds, manifest["last"] = run_stage_quietly(b, "dedup", cfg)
        return len(x) / seconds

    def bare(i):
        import faiss

        def run():
            index = raw_index(factory, x)
            if "IVF" in factory:
                faiss.extract_index_ivf(index).nprobe = 16  # what the single-index dedup searched
            batched_search(index, x, cfg.dedup.candidates + 1, cfg.dedup.batch_size)
        return len(x) / clock(run)[0]

    res = interleave(b.args.reps, {"stage": stage, "bare": bare})
    m = manifest["last"]
    b.add(measured("dedup", f"images/s, N={len(x):,} synthetic d=512", "img/s", res["stage"], res["bare"],
                   note=f"{m['partitions']} partition(s), nprobe {cfg.dedup.nprobe}; reference {factory}, "
                        f"k={cfg.dedup.candidates + 1}; partition task peak RSS {m['task_peak_rss_mb']:,.0f} MB",
                   includes="ours: run_stage('dedup') = k-means + assignment (Ray tasks) + exact search inside each "
                            "partition and its nprobe nearest (Ray tasks) + pHash test + row-order removal + "
                            "keep.parquet; reference: one faiss index over all rows (index_factory/train/add) + "
                            "search of all rows (vectors already in RAM), as dedup did before partitions"))
    section_dedup_recall(b, wd, cfg)


def section_dedup_recall(b: Bench, wd, cfg) -> None:
    """The fraction of the exact cosine pairs (brute force over all pairs) the last dedup run found."""
    from measure_dedup_recall import compare, exact_pairs, stage_pairs

    from pipeline.embeddings import Embeddings

    emb = Embeddings(wd / "embed")
    seconds, exact = clock(lambda: exact_pairs(emb, cfg.dedup.cosine_threshold, np.arange(len(emb))))
    r = compare(stage_pairs(wd / "dedup"), exact, None)
    b.add(Row("dedup", f"duplicate pairs found / exact, N={len(emb):,}", "", r["recall"], target_text=">= 0.99",
              note=f"{r['found_of_exact']:,} of {r['exact_pairs']:,} pairs above cosine {cfg.dedup.cosine_threshold}; "
                   f"{r['extra']} found that brute force lacks; brute force took {seconds:.0f} s",
              includes="exact: faiss IndexFlatIP range_search of every row against every embed shard "
                       "(tools/measure_dedup_recall.py)"))
