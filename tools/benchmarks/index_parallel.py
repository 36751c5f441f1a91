"""index_parallel: the index stage's parallel build (Ray tasks per embed shard, on-disk merge) against
its one-process build of the same IVF factory, on a copy of the search workdir's inputs."""
from __future__ import annotations

import json
import os

from .common import Bench, config, interleave, measured, run_stage_quietly
from .synthetic import ensure_done, kept_vectors, search_workdir


def section_index_parallel(b: Bench) -> None:
    from pipeline.faiss_build import ivf_coarse

    wd = search_workdir(b)
    ensure_done(b, wd, ["dedup"])
    rows, _ = kept_vectors(wd)
    # Its own workdir (inputs linked): the search workdir's index keeps its default config for neighbours.
    own = wd.parent / f"{wd.name}_index_parallel"
    own.mkdir(exist_ok=True)
    for name in ("embed", "dedup"):
        if not (own / name).exists():
            os.symlink(wd / name, own / name)
    factory = ivf_coarse(len(rows)) + ",Flat"  # the auto factory's IVF level at this N (auto may pick HNSW here)
    sets = (f"index.factory={factory}", "index.thumbnail_size=0")
    builds = {}

    def build(min_vectors: int):
        def run(i):
            seconds, _ = run_stage_quietly(b, "index", config(own, *sets, f"index.parallel_min_vectors={min_vectors}"))
            builds[min_vectors] = json.loads((own / "index" / "index_infos.json").read_text())
            return len(rows) / seconds
        return run

    res = interleave(b.args.reps, {"parallel": build(0), "one": build(10**12)}, warm_up=("parallel",))
    parts = builds[0]["parallel_build"]
    b.add(measured("index_parallel", f"vectors/s, {len(rows):,} kept: parallel build vs one process", "vec/s",
                   res["parallel"], res["one"], note=f"{factory}; {parts['shards']} shards, "
                   f"{len(parts['nodes'])} node(s); nprobe {builds[0]['nprobe']} vs {builds[10**12]['nprobe']}",
                   includes="both: run_stage('index') = sample + train + nprobe tuning + recall + save; parallel: "
                            "trained index written, one Ray task per embed shard adds its kept vectors into a "
                            "partial index, merge_ondisk into image.ivfdata; one process: add shard by shard"))
