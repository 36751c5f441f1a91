"""neighbours: the stage against index.search over the same queries."""
from __future__ import annotations

import json

from .common import Bench, clock, config, interleave, measured, median, run_stage_quietly
from .synthetic import batched_search, ensure_done, kept_vectors, search_workdir


def section_neighbours(b: Bench) -> None:
    import faiss

    wd = search_workdir(b)
    ensure_done(b, wd, ["dedup", "index"])
    cfg = config(wd)
    rows, x = kept_vectors(wd)
    infos = json.loads((wd / "index" / "index_infos.json").read_text())
    index = faiss.read_index(str(wd / "index" / "image.index"))
    if infos.get("search_param"):
        faiss.ParameterSpace().set_index_parameter(index, infos["search_param"], int(infos["nprobe"]))
    workers = b.worker_threads()
    default_threads = faiss.omp_get_max_threads()
    k, batch = cfg.neighbours.candidates, cfg.neighbours.batch_size

    timings = []

    def stage(i):
        seconds, manifest = run_stage_quietly(b, "neighbours", cfg)
        timings.append(manifest["timing"])
        return len(rows) / seconds

    def bare(threads):
        def run(i):
            faiss.omp_set_num_threads(threads)
            try:
                return len(rows) / clock(lambda: batched_search(index, x, k, batch))[0]
            finally:
                faiss.omp_set_num_threads(default_threads)
        return run

    res = interleave(b.args.reps, {"stage": stage, "same": bare(workers["faiss"]), "all": bare(default_threads)})
    param = f"{infos.get('search_param')} {infos.get('nprobe')}" if infos.get("search_param") else "exact"
    includes = ("ours: run_stage('neighbours') = actor start, index load (mmap), metadata (shards queued on the "
                "actors at once, each starts when it is ready), search of every kept row "
                "with k=candidates, self/duplicate filtering, parquet writes; reference: index.search over the "
                "same queries, same k and batch size, index and queries already in RAM")
    b.add(measured("neighbours", f"images/s vs faiss search, same threads ({workers['faiss']})", "img/s", res["stage"],
                   res["same"], target=0.9, target_text=">= 0.9", includes=includes,
                   note=f"{infos['factory']} {param}, k={k}, {len(rows):,} queries"))
    actors = timings[0]["actors"]
    b.add(measured("neighbours", f"images/s vs faiss search, bench threads ({default_threads})", "img/s",
                   res["stage"], res["all"], target=0.9, target_text=">= 0.9", includes=includes,
                   note=f"{actors} actor(s) x {workers['faiss']} faiss thread(s)"))
    b.add(measured("neighbours", f"images/s after actor start-up vs faiss search, bench threads ({default_threads})",
                   "img/s", [t["images_per_s_after_start"] for t in timings], res["all"], target=0.9,
                   target_text=">= 0.9", includes=includes,
                   note=f"{actors} actor(s); actor start-up (process, imports, index mmap, metadata) "
                        f"{median([t['actor_start_s'] for t in timings]):.1f} s per run excluded here"))
