"""neighbours: the stage against index.search over the same queries."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from .common import Bench, clock, config, interleave, measured, median, run_stage_quietly
from .synthetic import batched_search, ensure_done, kept_vectors, search_workdir


# What a user would write without the stage, run as its own process: import faiss, read the index, load
# the kept queries (one float32 .npy, prepared untimed), set the tuned nprobe/efSearch, search in batches on
# every thread, save the ids and similarities. No self or near-duplicate filtering, no keys, no Parquet.
BARE_SCRIPT = """
import sys, time
start = time.perf_counter()
import faiss, numpy as np
index_path, queries_path, param, value, k, batch, out = sys.argv[1:8]
index = faiss.read_index(index_path)
if param != "-":
    faiss.ParameterSpace().set_index_parameter(index, param, int(value))
x = np.load(queries_path)
sims, ids = [], []
for s in range(0, len(x), int(batch)):
    d, i = index.search(x[s:s + int(batch)], int(k))
    sims.append(d)
    ids.append(i)
np.savez(out, sims=np.concatenate(sims), ids=np.concatenate(ids))
print(time.perf_counter() - start)
"""


def bare_script(b: Bench, index_path, queries_path, param, value, k: int, batch: int) -> float:
    """Seconds of BARE_SCRIPT in a fresh Python process, from its first line to its results saved."""
    result = subprocess.run([sys.executable, "-c", BARE_SCRIPT, str(index_path), str(queries_path), param or "-",
                             str(value or 0), str(k), str(batch), str(b.root / "bare_neighbours.npz")],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def section_neighbours(b: Bench) -> None:
    import faiss

    from pipeline.config import with_values

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
    on_actors = with_values(cfg, {"neighbours.ray_min_rows": 0})  # Ray actors at any size

    def stage(i):
        seconds, manifest = run_stage_quietly(b, "neighbours", cfg)
        timings.append(manifest["timing"])
        return len(rows) / seconds

    def stage_actors(i):
        return len(rows) / run_stage_quietly(b, "neighbours", on_actors)[0]

    def bare(threads):
        def run(i):
            faiss.omp_set_num_threads(threads)
            try:
                return len(rows) / clock(lambda: batched_search(index, x, k, batch))[0]
            finally:
                faiss.omp_set_num_threads(default_threads)
        return run

    queries = b.root / "neighbours_queries.npy"
    np.save(queries, x)

    def script(i):
        return len(rows) / bare_script(b, wd / "index" / "image.index", queries, infos.get("search_param"),
                                       infos.get("nprobe"), k, batch)

    res = interleave(b.args.reps, {"stage": stage, "actors": stage_actors, "same": bare(workers["faiss"]),
                                   "all": bare(default_threads), "script": script}, warm_up=("stage", "actors"))
    timings = timings[-len(res["stage"]):]  # the timed repetitions, not the warm-up
    param = f"{infos.get('search_param')} {infos.get('nprobe')}" if infos.get("search_param") else "exact"
    includes = ("ours: run_stage('neighbours') = below neighbours.ray_min_rows one thread per CPU in the driver, "
                "else actor start (shards queued on the actors at once, each starts when it is ready); index "
                "load (mmap), metadata, search of every kept row "
                "with k=candidates, self/duplicate filtering, parquet writes; reference: index.search over the "
                "same queries, same k and batch size, index and queries already in RAM")
    b.add(measured("neighbours", f"images/s vs faiss search, same threads ({workers['faiss']})", "img/s", res["stage"],
                   res["same"], target=0.9, target_text=">= 0.9", includes=includes,
                   note=f"{infos['factory']} {param}, k={k}, {len(rows):,} queries"))
    actors = timings[0]["actors"]
    workers_text = f"{actors} actor(s)" if actors else f"{timings[0].get('threads')} thread(s) in the driver"
    start = median([t.get("actor_start_s", t.get("worker_start_s", 0.0)) for t in timings])
    b.add(measured("neighbours", f"images/s vs faiss search, bench threads ({default_threads})", "img/s",
                   res["stage"], res["all"], target=0.9, target_text=">= 0.9", includes=includes,
                   note=f"{workers_text} x {workers['faiss']} faiss thread(s)"))
    b.add(measured("neighbours", f"images/s after start-up vs faiss search, bench threads ({default_threads})",
                   "img/s", [t["images_per_s_after_start"] for t in timings], res["all"], target=0.9,
                   target_text=">= 0.9", includes=includes,
                   note=f"{workers_text}; start-up (actors: process, imports; index mmap, metadata) "
                        f"{start:.1f} s per run excluded here"))
    b.add(measured("neighbours", f"images/s end to end vs a bare script, bench threads ({default_threads})", "img/s",
                   res["stage"], res["script"], target=0.9, target_text=">= 0.9",
                   note=f"{infos['factory']} {param}, k={k}, {len(rows):,} queries",
                   includes="ours: as above; reference: a fresh Python process that imports faiss, reads the index "
                            "into RAM, loads the kept queries from one float32 .npy, sets the tuned search parameter, "
                            "searches in batches of neighbours.batch_size on every thread and saves ids and "
                            "similarities (tools/benchmarks/neighbours.py BARE_SCRIPT): start-up included on both sides"))
    b.add(measured("neighbours", f"images/s end to end on Ray actors (ray_min_rows 0) vs a bare script, bench threads "
                   f"({default_threads})", "img/s", res["actors"], res["script"], target=0.9, target_text=">= 0.9",
                   note=f"{infos['factory']} {param}, k={k}, {len(rows):,} queries; the path from "
                        f"neighbours.ray_min_rows ({cfg.neighbours.ray_min_rows:,}) rows on, and on a cluster",
                   includes="ours: the stage with neighbours.ray_min_rows 0 (one single-threaded Ray actor per CPU, "
                            "started by the stage); reference: the bare script above"))
