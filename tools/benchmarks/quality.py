"""quality: recall of the index stage's indexes against exact search, per factory and kind of query."""
from __future__ import annotations

import json

import numpy as np

from .common import Bench, Row, clock, config, run_stage_quietly
from .synthetic import ensure_done, kept_vectors, search_workdir

K_EVAL = 10
EVAL_QUERIES = 1000
MAX_BYTES_PER_VECTOR = 264  # SPEC: recall@10 >= 0.95 of exact at <= 264 bytes/vector


def section_quality(b: Bench) -> None:
    """recall@1/@10 and queries/s of the stage's index against exact search, per factory."""
    import faiss

    from pipeline import faiss_build, faiss_ondisk, faiss_search
    from pipeline.embeddings import Embeddings

    src = search_workdir(b)
    ensure_done(b, src, ["dedup"])
    wd = b.fresh("quality")
    for stage in ("embed", "dedup"):  # share the inputs; the index goes to a workdir of its own
        (wd / stage).symlink_to(src / stage)
    rows, x = kept_vectors(wd)
    emb = Embeddings(wd / "embed")
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    rng = np.random.default_rng(12345)
    q_rows = np.sort(rng.choice(rows, size=min(EVAL_QUERIES, len(rows)), replace=False))
    text = Embeddings(wd / "embed", kind="text")
    queries = {"image": emb[q_rows].astype(np.float32),
               "text": text[np.sort(rng.choice(len(text), size=min(EVAL_QUERIES, len(text)), replace=False))].astype(np.float32)}
    truth, exact_qps = {}, {}
    for kind, q in queries.items():
        seconds, (_, pos) = clock(lambda: exact.search(q, K_EVAL + 1))
        truth[kind], exact_qps[kind] = rows[pos], len(q) / seconds
    nlist = faiss_build.ivf_nlist(len(rows))
    for template in b.sizes.quality_factories:
        factory = template.format(nlist=nlist)
        build_seconds, manifest = run_stage_quietly(b, "index", config(wd, f"index.factory={factory}", "index.refine=true"))
        infos = json.loads((wd / "index" / "index_infos.json").read_text())
        index = faiss_ondisk.load_index(wd / "index" / "image.index", mmap=False)
        for kind, q in queries.items():
            for refine in (False, True):
                param = None
                if infos.get("search_param"):  # refined: the stage's value for this kind of query (tuned
                    # refined); plain: tuned here the same way without refine, as `refine: false` would
                    param = infos["nprobe_tuning"]["by_queries"][kind]["value"] if refine else \
                        faiss_search.tune_nprobe(index, q, truth[kind][:, :K_EVAL], K_EVAL, 0.95).value
                    faiss_search.set_search_param(index, infos["search_param"], int(param))
                quality_row(b, index, emb, infos, kind, q, truth[kind], q_rows if kind == "image" else None,
                            refine, exact_qps[kind], build_seconds, param)
        b.meta.setdefault("index_infos", {})[factory] = infos


def quality_row(b, index, emb, infos, kind, q, true_rows, q_rows, refine, exact_qps, build_seconds, param) -> None:
    from pipeline import faiss_search

    extra = 1 if q_rows is not None else 0
    if refine:
        seconds, (sims, found) = clock(lambda: faiss_search.refine_search(index, emb, q, K_EVAL + extra, infos.get("refine_k_factor", 4)))
    else:
        seconds, (sims, found) = clock(lambda: faiss_search.search(index, q, K_EVAL + extra))
    true = true_rows[:, :K_EVAL + extra]
    if q_rows is not None:  # image queries are database items: leave the item itself out of both lists
        _, found = faiss_search.drop_self(sims, found, q_rows, K_EVAL)
        _, true = faiss_search.drop_self(np.zeros(true.shape, np.float32), true, q_rows, K_EVAL)
    r1, r10 = faiss_search.recall_at_k(found, true, 1), faiss_search.recall_at_k(found, true, K_EVAL)
    qps = len(q) / seconds
    bpv = infos["bytes_per_vector"]
    param = f", {infos['search_param']} {param}" if infos.get("search_param") else ""
    in_budget = bpv <= MAX_BYTES_PER_VECTOR
    b.add(Row("quality", f"recall@10 {kind}{' refined' if refine else ''}: {infos['factory']}", "", r10, 1.0,
              target=0.95 if in_budget else None, target_text=">= 0.95" if in_budget else f"(> {MAX_BYTES_PER_VECTOR} B/v)",
              note=f"{bpv} B/vector{param}; r@1 {r1:.3f}; {qps:,.0f} q/s vs exact {exact_qps:,.0f}; build {build_seconds:.0f} s",
              includes="ours: the index the stage saved (index.refine=true), searched with the nprobe/efSearch it "
                       "tuned for that kind of query (refined: faiss_search.refine_search, k x 4 candidates re-ranked from the "
                       "float16 embeddings; plain: nprobe tuned to 0.95 without re-ranking); reference: "
                       "exact IndexFlatIP over the kept vectors; q/s single batch of 1000 queries",
              ours_reps=[{"recall@1": r1, "recall@10": r10, "queries_per_s": qps, "exact_queries_per_s": exact_qps}]))
