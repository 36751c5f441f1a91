"""index: the stage against a bare faiss index_factory + train + add."""
from __future__ import annotations

from .common import Bench, clock, config, interleave, measured, run_stage_quietly
from .synthetic import ensure_done, kept_vectors, raw_index, search_workdir


def section_index(b: Bench) -> None:
    wd = search_workdir(b)
    ensure_done(b, wd, ["dedup"])
    cfg = config(wd)
    rows, x = kept_vectors(wd)
    factory = {}

    def stage(i):
        seconds, manifest = run_stage_quietly(b, "index", cfg)
        factory["name"] = manifest["factory"]
        return len(rows) / seconds

    res = interleave(b.args.reps, {"stage": stage, "bare": lambda i: len(rows) / clock(lambda: raw_index(factory["name"], x))[0]})
    b.add(measured("index", f"vectors/s, {len(rows):,} kept, factory auto", "vec/s", res["stage"], res["bare"],
                   note=f"{factory['name']}; ours also tunes nprobe/efSearch and measures recall",
                   includes="ours: run_stage('index') = sample + train + add from float16 shards + nprobe tuning + "
                            "exact ground truth and recall on held-out queries + save; reference: faiss "
                            "index_factory + train + add (vectors in RAM)"))
