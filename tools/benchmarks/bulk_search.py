"""bulk_search: the neighbours stage's search of indexed vectors against faiss alone, one thread, in process.

On an ``IVF{nlist}_HNSW32,Flat`` index (the auto factory's from 300k vectors): ours assigns cells by
brute force over the centroids (projected where that finds the same cells: pipeline/cell_assign.py)
and scores list by list, reading lists in place; the references are faiss's ``index.search`` (cells
through the HNSW graph) and ``contrib.big_batch_search`` (list by list, each list copied per batch),
at the same nprobe and batch size. ``--bulk-workdir`` names a workdir whose index stage is done (the
growth sets: work/grow/g1000000); without it the search workdir gets such an index of its own.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .common import Bench, clock, config, interleave, measured, run_stage_quietly
from .synthetic import ensure_done, kept_vectors, search_workdir

QUERIES = 20_000  # indexed vectors searched per repetition (--quick: 2,000)


def _index_workdir(b: Bench) -> Path:
    """The given workdir, or the search workdir's inputs indexed as IVF with an HNSW quantizer."""
    if getattr(b.args, "bulk_workdir", None):
        return Path(b.args.bulk_workdir)
    from pipeline.faiss_build import ivf_coarse

    wd = search_workdir(b)
    ensure_done(b, wd, ["dedup"])
    own = wd.parent / f"{wd.name}_bulk"
    own.mkdir(exist_ok=True)
    for name in ("embed", "dedup"):
        if not (own / name).exists():
            os.symlink(wd / name, own / name)
    factory = ivf_coarse(len(kept_vectors(wd)[0]), hnsw_above=0) + ",Flat"
    run_stage_quietly(b, "index", config(own, f"index.factory={factory}", "index.thumbnail_size=0"), force=False)
    return own


def _quiet(fn, *args):
    """big_batch_search prints a line per list even at verbose 0."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def section_bulk_search(b: Bench) -> None:
    import faiss
    from faiss.contrib.big_batch_search import big_batch_search

    from pipeline import faiss_search
    from pipeline.cell_assign import assigner_dims
    from pipeline.retrieval import Retriever

    wd = _index_workdir(b)
    retriever = Retriever(wd / "index")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(retriever.index))
    rows = retriever.index_rows()
    n = min(len(rows), 2_000 if b.args.quick else QUERIES)
    q = np.asarray(retriever.embeddings[np.sort(np.random.default_rng(0).choice(rows, n, replace=False))],
                   dtype=np.float32)
    cfg = config(wd)
    k, batch = cfg.neighbours.candidates, cfg.neighbours.batch_size
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # as in a neighbours actor
    try:
        build_s, coarse = clock(lambda: faiss_search.exact_coarse(retriever.index))
        found = {}

        def batched(name, fn):
            def run(i):
                seconds, ids = clock(lambda: np.concatenate([fn(q[s:s + batch])[1] for s in range(0, n, batch)]))
                found[name] = ids
                return n / seconds
            return run

        res = interleave(b.args.reps, {
            "ours": batched("ours", lambda x: faiss_search.bulk_search(retriever.index, x, k, coarse)),
            "search": batched("search", lambda x: ivf.search(x, k)),
            "contrib": batched("contrib", lambda x: _quiet(big_batch_search, ivf, x, k)),
            "assign": batched("assign", lambda x: coarse.search(x, ivf.nprobe)),
        }, warm_up=("ours",))  # the first pass over a memory-mapped index pays its page faults
    finally:
        faiss.omp_set_num_threads(threads)
    same = {name: float(np.mean(np.sort(found[name], 1) == np.sort(found["ours"], 1))) for name in ("search", "contrib")}
    note = (f"{json.loads((wd / 'index' / 'index_infos.json').read_text())['factory']}, nprobe {ivf.nprobe}, "
            f"{n:,} indexed vectors as queries, k={k}, batches of {batch}; cells assigned in "
            f"{assigner_dims(coarse) if coarse is not None else ivf.d} of {ivf.d} dimensions "
            f"(assigner built in {build_s:.1f} s); {res['assign'][0]:,.0f} assignments/s alone; "
            f"ids equal to ours: index.search {same['search']:.4f}, big_batch_search {same['contrib']:.4f}")
    includes = "both sides: search of the same queries on one faiss thread, index in RAM or memory-mapped"
    b.add(measured("bulk_search", "queries/s vs faiss index.search (graph assignment), 1 thread", "q/s",
                   res["ours"], res["search"], note=note, includes=includes))
    b.add(measured("bulk_search", "queries/s vs faiss contrib.big_batch_search, 1 thread", "q/s",
                   res["ours"], res["contrib"], note=note, includes=includes))
