"""Benchmarks: every pipeline stage against the bare library it wraps, in one run on one machine.

    python tools/bench.py --quick                 # a few minutes on 2 CPU cores
    python tools/bench.py                         # full: growth to 1M rows, well under an hour
    python tools/bench.py --only embed,neighbours --reps 5

Writes bench/results.json (every repetition, medians, what each figure includes, the machine) and
prints a table: section, figure, ours, reference, ratio, target (SPEC "Performance"), note.

- ratio is "ours relative to the reference, above 1 is better for us": rates and recall are
  ours / reference, seconds are reference / ours. Compare ratios across machines, not absolute figures.
- A stage and its reference alternate repetitions (ours, ref, ref, ours, ...), so load from other
  processes hits both alike; medians are reported. Inputs are built before timing starts; download,
  embed and neighbours first run their stage once untimed, so Ray's pooled workers have imported
  their libraries.
- One local Ray is started at the beginning and reused by every stage; its start-up is a line of its
  own and is excluded from every figure. Stage timings are the wall time of `run_stage(..., force=True)`:
  what `knnd run STAGE --force` costs minus interpreter start, Ray start and config parsing.
- Ray gives each stage task/actor `num_cpus=1`, so Ray sets OMP_NUM_THREADS=1 in it: torch and faiss
  run on one thread there. The embed and neighbours references are measured twice: with the thread
  count a stage worker gets ("same threads") and with this process's ("bench threads": the library
  default, all cores, unless --threads). On a machine shared with other jobs, OpenMP with every core
  busy can be several times slower than one thread: --threads 1 gives steadier figures there.

Sections (--only): download, embed, dedup, index, neighbours, quality, train_input, sampling, train_step, growth.
Pack/train/sample figures light up when pipeline/pack.py, train.py and sample.py exist.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # the benchmarks package beside this script, and the tools it calls
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pipeline  # noqa: E402,F401  sets OPENBLAS_CORETYPE before faiss loads, for the bare baselines' processes too

from benchmarks.bulk_search import section_bulk_search  # noqa: E402
from benchmarks.common import FULL, QUICK, Bench, Row, Sizes, clock, config, table  # noqa: E402
from benchmarks.dedup import section_dedup  # noqa: E402
from benchmarks.download import section_download  # noqa: E402
from benchmarks.embed import section_embed  # noqa: E402
from benchmarks.growth import child_stage, section_growth  # noqa: E402
from benchmarks.index import section_index  # noqa: E402
from benchmarks.index_parallel import section_index_parallel  # noqa: E402
from benchmarks.neighbours import section_neighbours  # noqa: E402
from benchmarks.quality import section_quality  # noqa: E402
from benchmarks.sampling import section_sampling  # noqa: E402
from benchmarks.train_input import section_train_input  # noqa: E402
from benchmarks.train_step import section_train_step  # noqa: E402

RUNNERS = {"download": section_download, "embed": section_embed, "dedup": section_dedup, "index": section_index,
           "index_parallel": section_index_parallel,
           "neighbours": section_neighbours, "bulk_search": section_bulk_search, "quality": section_quality, "train_input": section_train_input,
           "sampling": section_sampling, "train_step": section_train_step, "growth": section_growth}
SECTIONS = list(RUNNERS)  # in the order they run
RAY_SECTIONS = {"download", "embed", "dedup", "index_parallel", "neighbours", "train_input", "sampling"}  # sections whose stages use Ray
DEMO_CLIP = ROOT / "model" / "configs" / "demo_clip.json"


def set_threads(threads: int | None) -> None:
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small inputs: a few minutes on 2 CPU cores")
    p.add_argument("--only", default=None, help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each timed figure (medians reported)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="results file")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--embed-model", default=str(DEMO_CLIP),
                   help="open_clip name or model-config JSON for embed and the chain (random init); "
                        "default the demo's 64 px ViT; ViT-B-32 is the real one (~4 img/s per core)")
    p.add_argument("--search-n", type=int, default=None, help="synthetic rows for dedup/index/neighbours/quality")
    p.add_argument("--bulk-workdir", default=None,
                   help="bulk_search: a workdir whose index is done (e.g. a growth set); default: one of its own")
    p.add_argument("--growth-n", default=None, help="comma-separated N for growth, e.g. 100000,1000000")
    p.add_argument("--quality-factories", default=None,
                   help='";"-separated factories for quality ("auto" and {nlist} allowed), e.g. '
                        '"auto;OPQ256_512,IVF{nlist},PQ256" (the paper\'s; OPQ training takes long on CPU)')
    p.add_argument("--threads", type=int, default=None,
                   help="torch and faiss threads in this process and its growth children (default: the "
                        "libraries' own, all cores); Ray workers keep their 1 thread either way")
    p.add_argument("--run-stage", default=None, help=argparse.SUPPRESS)  # growth: one stage in a child process
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="with --run-stage: a config override (e.g. index.memory_budget=16GB)")
    args = p.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(SECTIONS)
        if unknown:
            p.error(f"unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def sizes_for(args) -> Sizes:
    sizes = Sizes(**asdict(QUICK if args.quick else FULL))
    if args.search_n:
        sizes.search_n = args.search_n
    if args.growth_n:
        sizes.growth_n = [int(n) for n in args.growth_n.split(",")]
    if args.quality_factories:
        sizes.quality_factories = args.quality_factories.split(";")
    return sizes


def start_ray(b: Bench) -> None:
    """One local Ray for every stage; its start-up is a row of its own, excluded from every figure."""
    from pipeline.runner import ensure_ray

    with b.quiet():
        seconds, _ = clock(lambda: ensure_ray(config(b.root)))
    b.add(Row("ray", "local Ray start-up (once; excluded from every figure)", "s", seconds))
    b.meta["worker_threads"] = b.worker_threads()


def run_section(b: Bench, name: str) -> None:
    b.say(f"[{name}]")
    start = time.time()
    try:
        RUNNERS[name](b)
    except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
        with open(b.log_path, "a") as log:
            traceback.print_exc(file=log)
        b.add(Row(name, "error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
    b.meta.setdefault("section_seconds", {})[name] = round(time.time() - start, 1)
    b.say(f"  ({name}: {time.time() - start:.0f} s)")


def finish(b: Bench) -> None:
    """Write results.json, print the table and what each figure includes, close the image server."""
    path = b.write()
    b.say("\n" + table(b.rows))
    b.say("\nWhat each figure includes:")
    for includes in dict.fromkeys((r.section, r.includes) for r in b.rows if r.includes):
        b.say(f"  [{includes[0]}] {includes[1]}")
    b.say(f"\nresults: {path}; load average {b.meta['load_average_start']} -> {b.meta['load_average_end']}")
    if b.server:
        b.server.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.run_stage:
        return child_stage(args.run_stage, args.workdir, args.sets)
    b = Bench(args, sizes_for(args))
    selected = args.only.split(",") if args.only else SECTIONS
    b.say(f"knnd bench ({'quick' if args.quick else 'full'}): {', '.join(selected)}; {args.reps} reps; "
          f"scratch {b.root}; log {b.log_path}")
    try:
        if RAY_SECTIONS & set(selected):
            start_ray(b)
        for name in SECTIONS:
            if name in selected:
                run_section(b, name)
    finally:
        finish(b)
        if not args.keep and not args.workdir:
            shutil.rmtree(b.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
