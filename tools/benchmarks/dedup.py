"""dedup: the stage against a bare faiss build and search of every row."""
from __future__ import annotations

import numpy as np

from .common import Bench, clock, config, interleave, measured, run_stage_quietly
from .synthetic import batched_search, raw_index, search_workdir


def section_dedup(b: Bench) -> None:
    from pipeline.embeddings import Embeddings

    wd = search_workdir(b)
    cfg = config(wd)
    x = Embeddings(wd / "embed")[np.arange(b.sizes.search_n)].astype(np.float32)
    factory = {}

    def stage(i):
        seconds, manifest = run_stage_quietly(b, "dedup", cfg)
        factory["name"] = manifest["candidate_index"]
        return len(x) / seconds

    def bare(i):
        import faiss

        def run():
            index = raw_index(factory["name"], x)
            if "IVF" in factory["name"]:
                faiss.extract_index_ivf(index).nprobe = 16  # pipeline.dedup.SEARCH_NPROBE
            batched_search(index, x, cfg.dedup.candidates + 1, cfg.dedup.batch_size)
        return len(x) / clock(run)[0]

    res = interleave(b.args.reps, {"stage": stage, "bare": bare})
    b.add(measured("dedup", f"images/s, N={len(x):,} synthetic d=512", "img/s", res["stage"], res["bare"],
                   note=f"{factory['name']}, k={cfg.dedup.candidates + 1}",
                   includes="ours: run_stage('dedup') = candidate index build + search of all rows + pHash test + "
                            "connected components + keep.parquet; reference: faiss index_factory/train/add + "
                            "search of all rows (vectors already in RAM)"))
