"""What every section shares: sizes, result rows and the table, timing helpers, the run's context."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .loopback_images import LoopbackImages

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Sizes:
    """How much work each section does: --quick or full."""

    download_images: int
    download_shard: int
    corpus_images: int  # downloaded once; embed, train_input and the sample chain use it
    corpus_shard: int
    search_n: int  # synthetic rows for dedup, index, neighbours, quality
    quality_factories: list[str]
    growth_n: list[int]
    sample_batch: int
    sample_steps: int = 100


QUICK = Sizes(download_images=400, download_shard=200, corpus_images=600, corpus_shard=300, search_n=25_000,
              quality_factories=["auto", "IVF{nlist},SQ4"], growth_n=[5_000, 10_000], sample_batch=2, sample_steps=20)
FULL = Sizes(download_images=4000, download_shard=1000, corpus_images=3000, corpus_shard=1000, search_n=100_000,
             quality_factories=["auto", "IVF{nlist},SQ4", "OPQ64_256,IVF{nlist},PQ64"],
             growth_n=[100_000, 1_000_000], sample_batch=4)


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One figure: medians of ours and of the reference, and the ratio read against the SPEC target."""

    section: str
    figure: str
    unit: str = ""
    ours: float | None = None
    reference: float | None = None
    higher_is_better: bool = True
    target: float | None = None  # minimum ratio (SPEC); None: no target
    target_text: str = ""
    note: str = ""
    includes: str = ""  # what the two timings contain
    ours_reps: list = field(default_factory=list)
    reference_reps: list = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.reference is None or not self.ours or not self.reference:
            return None
        return self.ours / self.reference if self.higher_is_better else self.reference / self.ours

    @property
    def ok(self) -> bool | None:
        return None if self.target is None or self.ratio is None else self.ratio >= self.target

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "ok": self.ok}


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measured(section: str, figure: str, unit: str, ours: list, reference: list, **kw) -> Row:
    return Row(section, figure, unit, median(ours), median(reference), ours_reps=list(ours),
               reference_reps=list(reference), **kw)


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    head = ["section", "figure", "ours", "reference", "ratio", "target", "note"]
    lines = [[r.section, r.figure, fmt(r.ours, r.unit), fmt(r.reference, r.unit),
              "-" if r.ratio is None else f"{r.ratio:.2f}" + {True: " ok", False: " LOW", None: ""}[r.ok],
              r.target_text, r.note] for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head) - 1)]
    out = []
    for i, line in enumerate([head, *lines]):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(out)


def interleave(reps: int, runs: dict, warm_up: tuple = ()) -> dict[str, list]:
    """Call each named run `reps` times, rotating which goes first; {name: [results]}.

    The runs named in `warm_up` are called once first, untimed: Ray's pooled workers import their
    libraries on first use, which would otherwise land in one side's first repetition only."""
    for name in warm_up:
        runs[name](-1)
    names = list(runs)
    results = {name: [] for name in names}
    for i in range(reps):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            results[name].append(runs[name](i))
    return results


def clock(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


# --------------------------------------------------------------------------- the run's context


class Bench:
    """Workdirs, the log, quiet blocks, shared inputs (image server, corpus, synthetic data) and the rows."""

    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.root = Path(args.workdir or tempfile.mkdtemp(prefix="knnd-bench-")).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root.with_name(self.root.name + ".log")  # beside it: kept when the scratch goes
        self.log_path.write_text("")
        self.out = os.fdopen(os.dup(1), "w", buffering=1)  # the terminal, even inside quiet()
        self.rows: list[Row] = []
        self.server = None
        self.meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(),
                     "cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "python": sys.version.split()[0],
                     "args": vars(args), "sizes": asdict(sizes), "workdir": str(self.root)}
        self._done: dict = {}
        self.chain_done: set[str] = set()  # stages of the corpus chain run so far (see corpus.chain)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = "" if row.ratio is None else f"  ratio {row.ratio:.2f}" + ("" if row.ok is None else " ok" if row.ok else " LOW")
        self.say(f"  {row.figure}: ours {fmt(row.ours, row.unit)}, reference {fmt(row.reference, row.unit)}{ratio}"
                 + (f"  ({row.note})" if row.note else ""))

    def skip(self, section: str, figure: str, why: str) -> None:
        self.add(Row(section, figure, note=f"skipped: {why}"))

    @contextlib.contextmanager
    def quiet(self):
        """Send fds 1 and 2 (progress lines, img2dataset, Ray workers) to bench.log."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(self.log_path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])

    def fresh(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def once(self, key: str, make):
        """Build a shared input the first time it is asked for."""
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def images(self) -> LoopbackImages:
        if self.server is None:
            self.server = LoopbackImages(pool=min(max(self.sizes.download_images, self.sizes.corpus_images), 1000))
        return self.server

    def worker_threads(self) -> dict:
        """torch and faiss threads inside a Ray task with num_cpus=1, as the stages' workers get."""
        def probe():
            import ray

            @ray.remote(num_cpus=1)
            def threads():
                import faiss
                import torch

                return {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads(),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}

            return ray.get(threads.remote())
        return self.once("worker_threads", probe)

    def write(self) -> Path:
        self.meta["load_average_end"] = os.getloadavg()
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": self.meta, "rows": [r.as_dict() for r in self.rows]}, indent=2,
                                   default=str) + "\n")
        return path


def config(workdir: Path, *overrides: str):
    from pipeline.config import load_config

    return load_config(None, [f"workdir={workdir}", *overrides])


def run_stage_quietly(b: Bench, name: str, cfg, force: bool = True) -> tuple[float, dict]:
    """(seconds, manifest) of one stage run, its output sent to the log."""
    from pipeline.runner import run_stage

    with b.quiet():
        return clock(lambda: run_stage(name, cfg, force=force))


def stage_exists(name: str) -> bool:
    return importlib.util.find_spec(f"pipeline.{name}") is not None
