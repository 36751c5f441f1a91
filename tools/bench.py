"""Benchmarks: every pipeline stage against the bare library it wraps, in one run on one machine.

    python tools/bench.py --quick                 # a few minutes on 2 CPU cores
    python tools/bench.py                         # full: growth to 1M rows, well under an hour
    python tools/bench.py --only embed,neighbours --reps 5

Writes bench/results.json (every repetition, medians, what each figure includes, the machine) and
prints a table: section, figure, ours, reference, ratio, target (SPEC "Performance"), note.

- ratio is "ours relative to the reference, above 1 is better for us": rates and recall are
  ours / reference, seconds are reference / ours. Compare ratios across machines, not absolute figures.
- A stage and its reference alternate repetitions (ours, ref, ref, ours, ...), so load from other
  processes hits both alike; medians are reported. Inputs are built before timing starts; download
  and embed first run their stage once untimed, so Ray's pooled workers have imported their libraries.
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
import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SECTIONS = ["download", "embed", "dedup", "index", "neighbours", "quality", "train_input", "sampling", "train_step",
            "growth"]
RAY_SECTIONS = {"download", "embed", "neighbours", "train_input", "sampling"}  # sections whose stages use Ray
RAY_STAGES = {"download", "embed", "neighbours", "pack"}
DEMO_CLIP = ROOT / "model" / "configs" / "demo_clip.json"
K_EVAL = 10
EVAL_QUERIES = 1000
MAX_BYTES_PER_VECTOR = 264  # SPEC: recall@10 >= 0.95 of exact at <= 264 bytes/vector


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

    def images(self) -> "LoopbackImages":
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
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

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


# --------------------------------------------------------------------------- loopback images


def picture(seed: int, width: int = 320, height: int = 240) -> bytes:
    """A JPEG that compresses like a photo more than noise does: gradients, shapes, mild grain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = a * (x / width)[..., None] + b * (y / height)[..., None] * 0.5
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        img[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 160)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class LoopbackImages:
    """HTTP server on 127.0.0.1 serving /img/{i}.jpg (a pool of distinct JPEGs, i modulo the pool)."""

    def __init__(self, pool: int):
        from pipeline.loopback import LoopbackServer

        self.pool = [picture(i) for i in range(pool)]
        self.server = LoopbackServer(self.route)
        self.base = self.server.base

    def route(self, path: str):
        try:
            return 200, "image/jpeg", self.pool[int(path.split("/")[-1].split(".")[0]) % len(self.pool)], 0
        except ValueError:
            return 404, "text/plain", b"", 0

    def url_list(self, path: Path, n: int) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"url": [f"{self.base}/img/{i}.jpg" for i in range(n)],
                                 "caption": [f"picture number {i}" for i in range(n)]}), path)
        return path

    def close(self) -> None:
        self.server.close()


# --------------------------------------------------------------------------- download


@contextlib.contextmanager
def recording_img2dataset(store: dict):
    """Record the keyword arguments the stage passes to img2dataset.download."""
    import img2dataset

    real = img2dataset.download

    def spy(**kwargs):
        store["kwargs"] = dict(kwargs)
        return real(**kwargs)

    img2dataset.download = spy
    try:
        yield
    finally:
        img2dataset.download = real


def downloaded(folder: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in folder.glob("*_stats.json"))


def section_download(b: Bench) -> None:
    import signal

    import img2dataset

    n = b.sizes.download_images
    urls = b.images().url_list(b.root / "download_urls.parquet", n)
    overrides = [f"download.url_list={urls}", f"download.shard_size={b.sizes.download_shard}"]
    captured: dict = {}

    def stage(i):
        cfg = config(b.fresh(f"download_stage_{i}"), *overrides)
        with recording_img2dataset(captured):
            seconds, manifest = run_stage_quietly(b, "download", cfg)
        return manifest["counts"]["images"] / seconds

    def bare(i):
        folder = b.fresh(f"download_bare_{i}")
        kwargs = dict(captured["kwargs"], output_folder=str(folder))  # the stage ran first (rep 0)
        previous = signal.getsignal(signal.SIGINT)
        try:
            with b.quiet():
                seconds, _ = clock(lambda: img2dataset.download(**kwargs))
        finally:
            signal.signal(signal.SIGINT, previous)
        return downloaded(folder) / seconds

    res = interleave(b.args.reps, {"stage": stage, "bare": bare}, warm_up=("stage",))
    kw = captured["kwargs"]
    b.meta["download_kwargs"] = {k: v for k, v in kw.items() if k not in ("url_list", "output_folder")}
    b.add(measured("download", f"images/s, {n} URLs from loopback", "img/s", res["stage"], res["bare"], target=0.9,
                   target_text=">= 0.9", note=f"{kw['distributor']} distributor, {kw['processes_count']} proc x "
                   f"{kw['thread_count']} threads, {kw['image_size']} px {kw['encode_format']}",
                   includes="ours: run_stage('download') = plan, img2dataset.download, stats watcher, summary, manifest; "
                            "reference: img2dataset.download with the exact kwargs the stage passed; fresh folder each rep"))


# --------------------------------------------------------------------------- corpus and chain


def chain_overrides(b: Bench) -> list[str]:
    """Config of the corpus workdir: real download + embed, then the stages downstream of them.

    A random-init CLIP embeds every image alike (cosine > 0.99), so dedup is told to merge only exact
    copies (cosine above 1, identical pHash) and the chain keeps distinct pictures."""
    return [f"download.url_list={b.root / 'corpus_urls.parquet'}", f"download.shard_size={b.sizes.corpus_shard}",
            f"embed.model={b.args.embed_model}", "embed.pretrained=null",
            "dedup.cosine_threshold=1.0", "dedup.manhattan_threshold=0",
            "train.model=demo", "train.steps=2", "train.batch_size=8", "train.checkpoint_every=2", "train.warmup_steps=1",
            f"sample.steps={b.sizes.sample_steps}", "sample.prompts=[a red picture]",
            f"sample.images_per_prompt={b.sizes.sample_batch}"]


def corpus(b: Bench) -> Path:
    """<root>/corpus with the download stage done (untimed)."""
    def make():
        wd = b.root / "corpus"
        b.images().url_list(b.root / "corpus_urls.parquet", b.sizes.corpus_images)
        b.say(f"  (building the corpus: {b.sizes.corpus_images} images through the download stage)")
        run_stage_quietly(b, "download", config(wd, *chain_overrides(b)), force=False)
        return wd
    return b.once("corpus", make)


def chain(b: Bench, upto: str) -> Path:
    """The corpus workdir with every stage through `upto` done (untimed; up-to-date stages do nothing)."""
    from pipeline.runner import STAGES

    wd = corpus(b)
    cfg = config(wd, *chain_overrides(b))
    for name in STAGES[1:STAGES.index(upto) + 1]:
        if name not in b._done.get("chain", set()):
            run_stage_quietly(b, name, cfg, force=False)
            b._done.setdefault("chain", set()).add(name)
    return wd


def iter_download_images(download_dir: Path):
    """(key, image bytes) in manifest shard order, as the embed stage reads them."""
    from pipeline.embed import IMAGE_EXTS, iter_tar_samples
    from pipeline.runner import read_json

    for shard in read_json(download_dir / "manifest.json")["shards"]:
        for key, parts in iter_tar_samples(download_dir / shard["tar"]):
            data = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if data is not None:
                yield key, data


# --------------------------------------------------------------------------- embed


def section_embed(b: Bench) -> None:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from model.clip import flatten_alpha, load_clip

    wd = corpus(b)
    cfg = config(wd, *chain_overrides(b))
    batch = cfg.embed.batch_size
    torch.manual_seed(0)
    bundle = load_clip(cfg.embed.model, None)
    pixels = torch.stack([bundle.preprocess(flatten_alpha(Image.open(io.BytesIO(data))))
                          for _, data in iter_download_images(wd / "download")])
    n = len(pixels)
    workers = b.worker_threads()
    default_threads = torch.get_num_threads()

    timings = []

    def stage(i):
        seconds, manifest = run_stage_quietly(b, "embed", cfg)
        b._done.get("chain", set()).difference_update({"dedup", "index", "neighbours", "pack", "train", "sample"})
        timings.append(manifest["timing"])
        return manifest["rows"] / seconds

    def bare(threads):
        def run(i):
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    bundle.model.encode_image(pixels[:2])  # warm-up
                    start = time.perf_counter()
                    for s in range(0, n, batch):
                        F.normalize(bundle.model.encode_image(pixels[s:s + batch]), dim=-1).numpy()
                    return n / (time.perf_counter() - start)
            finally:
                torch.set_num_threads(default_threads)
        return run

    res = interleave(b.args.reps, {"stage": stage, "same": bare(workers["torch"]), "all": bare(default_threads)},
                     warm_up=("stage",))
    model = Path(cfg.embed.model).name if cfg.embed.model.endswith(".json") else cfg.embed.model
    size = bundle.image_size
    includes = ("ours: run_stage('embed') = Ray decode task (JPEG decode, PIL transforms, pHash) streaming to a "
                "ClipEncoder actor (actor start + model init included), npy/parquet writes, row numbering, manifest; "
                "reference: open_clip model.encode_image + normalize over pre-decoded, pre-normalised tensors")
    note = f"{model} random init, {size} px, batch {batch}, {n} images"
    b.add(measured("embed", f"images/s vs bare loop, same threads ({workers['torch']})", "img/s", res["stage"],
                   res["same"], target=0.85, target_text=">= 0.85", note=note, includes=includes))
    b.add(measured("embed", f"images/s vs bare loop, bench threads ({default_threads})", "img/s", res["stage"],
                   res["all"], target=0.85, target_text=">= 0.85", note="the encoder actor runs torch on "
                   f"{workers['torch']} thread(s) (Ray num_cpus=1)", includes=includes))
    timings = timings[-len(res["stage"]):]  # the timed repetitions, not the warm-up
    start_s = median([t["encoder_start_s"] for t in timings])
    b.add(measured("embed", f"images/s after encoder start-up vs bare loop, same threads ({workers['torch']})", "img/s",
                   [t["images_per_s_after_start"] for t in timings], res["same"], target=0.85, target_text=">= 0.85",
                   note=f"encoder actor start-up (process, torch/open_clip import, model init) {start_s:.1f} s, "
                        "a fixed cost per run excluded here", includes=includes))


# --------------------------------------------------------------------------- dedup, index, neighbours


def synthetic(b: Bench, n: int, text: bool = True, name: str | None = None, shard_size: int = 10_000) -> Path:
    """A workdir whose embed/ holds n synthetic 512-d rows (tools/make_synthetic_embeddings.py)."""
    from make_synthetic_embeddings import make_synthetic_embeddings

    def make():
        wd = b.fresh(name or f"synthetic_{n}")
        seconds, _ = clock(lambda: make_synthetic_embeddings(wd, n, text=text, shard_size=shard_size))
        b.say(f"  (synthetic embeddings: {n:,} x 512 written in {seconds:.0f} s)")
        return wd
    return b.once(("synthetic", n, name), make)


def kept_vectors(wd: Path) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, their float32 vectors) of a workdir whose dedup is done."""
    from pipeline.dedup import read_keep
    from pipeline.embeddings import Embeddings

    rows = np.nonzero(read_keep(wd / "dedup"))[0].astype(np.int64)
    return rows, Embeddings(wd / "embed")[rows].astype(np.float32)


def raw_index(factory: str, x: np.ndarray, seed: int = 0):
    """faiss alone: index_factory, train on a random sample of the size the stage uses, add everything."""
    import faiss

    from pipeline.knn import training_sample_size

    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(x[np.sort(rng.choice(len(x), training_sample_size(factory, len(x)), replace=False))])
    index.add(x)
    return index


def batched_search(index, x: np.ndarray, k: int, batch: int) -> None:
    for s in range(0, len(x), batch):
        index.search(x[s:s + batch], k)


def search_workdir(b: Bench) -> Path:
    # shards of n/10 rows: enough work units for every neighbours actor (real shards: 10k images each)
    return synthetic(b, b.sizes.search_n, shard_size=max(1000, b.sizes.search_n // 10))


def ensure_done(b: Bench, wd: Path, names: list[str], *overrides: str) -> None:
    for name in names:
        run_stage_quietly(b, name, config(wd, *overrides), force=False)


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
    includes = ("ours: run_stage('neighbours') = actor start, index load (mmap), metadata, search of every kept row "
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


# --------------------------------------------------------------------------- index quality


def section_quality(b: Bench) -> None:
    """recall@1/@10 and queries/s of the stage's index against exact search, per factory."""
    import faiss

    from pipeline import knn
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
    nlist = knn.ivf_nlist(len(rows))
    for template in b.sizes.quality_factories:
        factory = template.format(nlist=nlist)
        build_seconds, manifest = run_stage_quietly(b, "index", config(wd, f"index.factory={factory}", "index.refine=true"))
        infos = json.loads((wd / "index" / "index_infos.json").read_text())
        index = knn.load_index(wd / "index" / "image.index", mmap=False)
        for kind, q in queries.items():
            for refine in (False, True):
                param = None
                if infos.get("search_param"):  # refined: the stage's value for this kind of query (tuned
                    # refined); plain: tuned here the same way without refine, as `refine: false` would
                    param = infos["nprobe_tuning"]["by_queries"][kind]["value"] if refine else \
                        knn.tune_nprobe(index, q, truth[kind][:, :K_EVAL], K_EVAL, 0.95).value
                    knn.set_search_param(index, infos["search_param"], int(param))
                quality_row(b, index, emb, infos, kind, q, truth[kind], q_rows if kind == "image" else None,
                            refine, exact_qps[kind], build_seconds, param)
        b.meta.setdefault("index_infos", {})[factory] = infos


def quality_row(b, index, emb, infos, kind, q, true_rows, q_rows, refine, exact_qps, build_seconds, param) -> None:
    from pipeline import knn

    extra = 1 if q_rows is not None else 0
    if refine:
        seconds, (sims, found) = clock(lambda: knn.refine_search(index, emb, q, K_EVAL + extra, infos.get("refine_k_factor", 4)))
    else:
        seconds, (sims, found) = clock(lambda: knn.search(index, q, K_EVAL + extra))
    true = true_rows[:, :K_EVAL + extra]
    if q_rows is not None:  # image queries are database items: leave the item itself out of both lists
        _, found = knn.drop_self(sims, found, q_rows, K_EVAL)
        _, true = knn.drop_self(np.zeros(true.shape, np.float32), true, q_rows, K_EVAL)
    r1, r10 = knn.recall_at_k(found, true, 1), knn.recall_at_k(found, true, K_EVAL)
    qps = len(q) / seconds
    bpv = infos["bytes_per_vector"]
    param = f", {infos['search_param']} {param}" if infos.get("search_param") else ""
    in_budget = bpv <= MAX_BYTES_PER_VECTOR
    b.add(Row("quality", f"recall@10 {kind}{' refined' if refine else ''}: {infos['factory']}", "", r10, 1.0,
              target=0.95 if in_budget else None, target_text=">= 0.95" if in_budget else f"(> {MAX_BYTES_PER_VECTOR} B/v)",
              note=f"{bpv} B/vector{param}; r@1 {r1:.3f}; {qps:,.0f} q/s vs exact {exact_qps:,.0f}; build {build_seconds:.0f} s",
              includes="ours: the index the stage saved (index.refine=true), searched with the nprobe/efSearch it "
                       "tuned for that kind of query (refined: knn.refine_search, k x 4 candidates re-ranked from the "
                       "float16 embeddings; plain: nprobe tuned to 0.95 without re-ranking); reference: "
                       "exact IndexFlatIP over the kept vectors; q/s single batch of 1000 queries",
              ours_reps=[{"recall@1": r1, "recall@10": r10, "queries_per_s": qps, "exact_queries_per_s": exact_qps}]))


# --------------------------------------------------------------------------- train input


def pack_shard_paths(pack_dir: Path, manifest: dict) -> list[Path]:
    return [pack_dir / s["tar"] for s in manifest["shards"] if s.get("samples", 1)]


def on_the_fly_batches(b: Bench, wd: Path, batch_size: int, image_size: int, k: int):
    """What a trainer without the pack stage does: decode raw download shards, resize, look up each
    image's embedding, retrieve its neighbours with faiss, gather theirs. Yields (images, cond)."""
    import torch

    from pipeline import knn
    from pipeline.embeddings import read_metadata
    from pipeline.pack import load_image
    from pipeline.retrieval import Retriever

    retriever = Retriever(wd / "index")
    emb = retriever.embeddings
    row_of = {key: row for key, row in zip(*read_metadata(emb.dir, emb.manifest, ["key", "row"]).values())}
    pending_images, pending_rows = [], []
    for key, data in iter_download_images(wd / "download"):
        if key not in row_of:
            continue
        pending_images.append(load_image(data, image_size))
        pending_rows.append(row_of[key])
        if len(pending_rows) == batch_size:
            rows = np.array(pending_rows)
            own = emb[rows].astype(np.float32)
            sims, found = retriever.search(own, k + 1)
            _, nbr = knn.drop_self(sims, found, rows, k)
            cond = np.concatenate([own[:, None], emb[np.maximum(nbr, 0)].astype(np.float32)], axis=1)
            image = torch.from_numpy(np.stack(pending_images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            yield image, torch.from_numpy(cond)
            pending_images, pending_rows = [], []


def section_train_input(b: Bench) -> None:
    from model.data import PackDataset

    if not stage_exists("pack"):
        b.skip("train_input", "samples/s: pack loader vs decode + retrieve on the fly", "pipeline/pack.py not present")
        return
    wd = chain(b, "neighbours")
    cfg = config(wd, *chain_overrides(b))
    seconds, manifest = run_stage_quietly(b, "pack", cfg)
    b.add(Row("train_input", "pack stage samples/s (once)", "samples/s", manifest["items"] / seconds,
              note=f"{manifest['counts']['shards']} shards at {manifest['image_size']} px",
              includes="run_stage('pack') wall time; no reference"))
    b._done.setdefault("chain", set()).add("pack")
    batch = cfg.train.batch_size
    paths = pack_shard_paths(wd / "pack", manifest)

    def ours(i):
        load_seconds, data = clock(lambda: PackDataset(paths, batch_size=batch, seed=i))
        samples, start = 0, time.perf_counter()
        for _ in data:
            samples += batch
            if samples >= 3 * len(data.images) and time.perf_counter() - start > 1.0:
                break
        b.meta.setdefault("pack_load_seconds", []).append(load_seconds)
        return samples / (time.perf_counter() - start)

    def reference(i):
        samples, start = 0, time.perf_counter()
        for image, _ in on_the_fly_batches(b, wd, batch, manifest["image_size"], manifest["k"]):
            samples += len(image)
        return samples / (time.perf_counter() - start)

    res = interleave(b.args.reps, {"ours": ours, "reference": reference})
    b.add(measured("train_input", f"samples/s, batch {batch}: PackDataset vs on the fly", "samples/s", res["ours"],
                   res["reference"], target=10.0, target_text=">= 10",
                   note=f"pack load {median(b.meta['pack_load_seconds']):.2f} s (not counted); "
                        f"{manifest['image_size']} px, k={manifest['k']}, d={manifest['d']}",
                   includes="ours: iterating model.data.PackDataset (gather + float conversion), shards already loaded; "
                            "reference: one process reading the download tars, JPEG decode + resize (pack.load_image), "
                            "embedding lookup by key, faiss search of the stage's index per batch, neighbour gather"))


# --------------------------------------------------------------------------- sampling


def bare_ddim(model, emb, steps: int, guidance: float, generator):
    """A plain diffusers DDIM loop with classifier-free guidance around the same U-Net, the condition
    encoded once (what model.diffusion.sample does, minus our wrappers)."""
    import torch
    from diffusers import DDIMScheduler

    from model.diffusion import make_scheduler

    config = model.config
    sched = DDIMScheduler.from_config(make_scheduler(config, "ddim").config)
    sched.set_timesteps(steps)
    batch = emb.shape[0]
    with torch.no_grad():
        drop = torch.arange(2 * batch) >= batch
        context, mask = model.condition(torch.cat([emb, emb]), drop)
        x = torch.randn((batch, config.in_channels, config.resolution, config.resolution), generator=generator)
        for t in sched.timesteps:
            out = model.unet(torch.cat([x, x]), t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
            cond, uncond = out.chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x, generator=generator).prev_sample
    return x


def section_sampling(b: Bench) -> None:
    import torch

    from model.denoiser import KnnDenoiser, ModelConfig
    from model.diffusion import sample

    steps, batch, guidance = b.sizes.sample_steps, b.sizes.sample_batch, 8.0

    def runs_for(model) -> dict:
        torch.manual_seed(0)
        emb = torch.nn.functional.normalize(torch.randn(batch, model.config.k + 1, model.config.clip_dim), dim=-1)
        sample(model, emb, steps=2, guidance=guidance)  # warm-up: first-call allocations and kernels
        bare_ddim(model, emb, 2, guidance, None)
        runs = {"ours": lambda i: clock(lambda: sample(model, emb, steps=steps, guidance=guidance,
                                                       generator=torch.Generator().manual_seed(i)))[0] / batch,
                "bare": lambda i: clock(lambda: bare_ddim(model, emb, steps, guidance, torch.Generator().manual_seed(i)))[0] / batch}
        return runs

    torch.manual_seed(0)
    model = KnnDenoiser(ModelConfig.demo()).eval()
    res = interleave(b.args.reps, runs_for(model))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    per_100 = "" if steps == 100 else f"; x{100 / steps:g} for 100 steps: {median(res['ours']) * 100 / steps:.2f} s"
    b.add(measured("sampling", f"s/image, {steps} DDIM steps, batch {batch}, guidance 8", "s", res["ours"], res["bare"],
                   higher_is_better=False, note=f"demo model {ModelConfig.demo().resolution} px, {params:.1f} M params, "
                   f"random weights, {torch.get_num_threads()} threads{per_100}",
                   includes="ours: model.diffusion.sample (guided batch of 2B, condition re-encoded every step); "
                            "reference: diffusers DDIMScheduler loop around the same U-Net, condition encoded once"))
    if not all(stage_exists(s) for s in ("pack", "train", "sample")):
        missing = [f"pipeline/{s}.py" for s in ("pack", "train", "sample") if not stage_exists(s)]
        b.skip("sampling", "sample stage s/image", f"{', '.join(missing)} not present")
        return
    from model.checkpoint import load_model

    wd = chain(b, "train")
    cfg = config(wd, *chain_overrides(b))
    trained = load_model(wd / "train" / json.loads((wd / "train" / "manifest.json").read_text())["checkpoint"])

    def stage(i):
        seconds, manifest = run_stage_quietly(b, "sample", cfg)
        return seconds / manifest["items"]

    res = interleave(b.args.reps, {"stage": stage, "bare": runs_for(trained)["bare"]})
    b.add(measured("sampling", f"sample stage s/image, batch {batch}", "s", res["stage"], res["bare"],
                   higher_is_better=False, note="includes loading checkpoint, CLIP and index each run",
                   includes="ours: run_stage('sample') wall time / images (1 prompt x batch); reference: the bare "
                            "diffusers loop with the stage's checkpoint (EMA weights)"))


# --------------------------------------------------------------------------- growth


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants (Ray's raylet and workers included)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [c for c, p in parent.items() if p == pid]
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakRss:
    """Samples tree_rss(pid) every `every` seconds in a thread; .peak after stop()."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every, self.peak = pid, every, tree_rss(pid)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_event.wait(self.every):
            self.peak = max(self.peak, tree_rss(self.pid))

    def stop(self) -> int:
        self.stop_event.set()
        self.thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))
        return self.peak


def child_stage(name: str, workdir: str) -> int:
    """--run-stage: one stage in this fresh process; prints a BENCH_RESULT json line."""
    import resource

    from pipeline.runner import ensure_ray, run_stage

    cfg = config(Path(workdir))
    ray_seconds = 0.0
    if name in RAY_STAGES:
        ray_seconds, _ = clock(lambda: ensure_ray(cfg))
    baseline = tree_rss(os.getpid())
    peak = PeakRss(os.getpid())
    seconds, _ = clock(lambda: run_stage(name, cfg, force=True))
    result = {"seconds": seconds, "ray_seconds": ray_seconds, "baseline_rss": baseline, "peak_rss": peak.stop(),
              "self_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(b: Bench, name: str, wd: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", name, "--workdir", str(wd)]
    if b.args.threads:
        cmd += ["--threads", str(b.args.threads)]
    with open(b.log_path, "ab") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        log.write(proc.stdout)
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name} on {wd} failed (exit {proc.returncode}); see {b.log_path}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def section_growth(b: Bench) -> None:
    sizes = b.sizes.growth_n
    results: dict[str, dict[int, dict]] = {}
    for n in sizes:
        wd = synthetic(b, n, text=False, name=f"growth_{n}")
        for name in ("dedup", "index", "neighbours"):
            r = run_child(b, name, wd)
            results.setdefault(name, {})[n] = r
            stage_mb = (r["peak_rss"] - r["baseline_rss"]) / 1e6
            factory = json.loads((wd / name / "manifest.json").read_text()).get("factory") if name == "index" else None
            b.add(Row("growth", f"{name} N={n:,}", "s", r["seconds"],
                      note=f"peak RSS {r['peak_rss'] / 1e6:,.0f} MB (+{stage_mb:,.0f} MB during the stage)"
                           + (f"; {factory}" if factory else ""),
                      includes="run_stage in a fresh process (Ray start excluded); RSS summed over the process "
                               "and its descendants (Ray workers), sampled every 0.25 s",
                      ours_reps=[r]))
        shutil.rmtree(wd, ignore_errors=True)  # 1M rows: ~3 GB of embeddings and index
    if len(sizes) < 2:
        return
    small, big = sizes[0], sizes[-1]
    for name, by_n in results.items():
        t_exp = math.log(by_n[big]["seconds"] / by_n[small]["seconds"]) / math.log(big / small)
        m_small = max(by_n[small]["peak_rss"] - by_n[small]["baseline_rss"], 1)
        m_big = max(by_n[big]["peak_rss"] - by_n[big]["baseline_rss"], 1)
        b.add(Row("growth", f"{name} cost exponent, N {small:,} -> {big:,}", "", t_exp,
                  target_text="~1 (linear)",
                  note=f"time x{by_n[big]['seconds'] / by_n[small]['seconds']:.1f}, stage memory x{m_big / m_small:.1f} "
                       f"for N x{big / small:.0f}; memory exponent {math.log(m_big / m_small) / math.log(big / small):.2f}",
                  includes="log(time ratio) / log(N ratio): 1 = linear, 2 = quadratic"))


# --------------------------------------------------------------------------- train step


def section_train_step(b: Bench) -> None:
    """Our training step vs a bare diffusers loop over the same U-Net (tools/bench_train.py), at the
    demo's old (32 px) and new (16 px) settings; random data of the demo's shapes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_train
    from model.denoiser import ModelConfig

    steps = 10 if b.args.quick else 30
    for name, (resolution, attention) in bench_train.VARIANTS.items():
        config = ModelConfig.demo(resolution=resolution, attention_resolutions=attention, clip_dim=256, k=10)
        runs = {"ours": lambda i: bench_train.ours(config, bench_train.batches(None, resolution), steps),
                "bare": lambda i: bench_train.bare(config, bench_train.batches(None, resolution), steps)}
        res = interleave(b.args.reps, runs)
        b.add(measured("train step", f"samples/s, demo U-Net, {name}", "samples/s", res["ours"], res["bare"], target=0.9,
                       target_text=">= 0.9", note=f"batch {bench_train.BATCH}, {steps} timed steps after 5 warm-up",
                       includes="ours: condition encoder, query dropout, masks; bare: UNet2DConditionModel + a linear "
                                "projection of the k + 1 embeddings, MSE, AdamW"))


# --------------------------------------------------------------------------- main


RUNNERS = {"download": section_download, "embed": section_embed, "dedup": section_dedup, "index": section_index,
           "neighbours": section_neighbours, "quality": section_quality, "train_input": section_train_input,
           "sampling": section_sampling, "train_step": section_train_step, "growth": section_growth}


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
    p.add_argument("--growth-n", default=None, help="comma-separated N for growth, e.g. 100000,1000000")
    p.add_argument("--quality-factories", default=None,
                   help='";"-separated factories for quality ("auto" and {nlist} allowed), e.g. '
                        '"auto;OPQ256_512,IVF{nlist},PQ256" (the paper\'s; OPQ training takes long on CPU)')
    p.add_argument("--threads", type=int, default=None,
                   help="torch and faiss threads in this process and its growth children (default: the "
                        "libraries' own, all cores); Ray workers keep their 1 thread either way")
    p.add_argument("--run-stage", default=None, help=argparse.SUPPRESS)  # growth: one stage in a child process
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


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.run_stage:
        return child_stage(args.run_stage, args.workdir)
    b = Bench(args, sizes_for(args))
    selected = args.only.split(",") if args.only else SECTIONS
    b.say(f"knnd bench ({'quick' if args.quick else 'full'}): {', '.join(selected)}; {args.reps} reps; "
          f"scratch {b.root}; log {b.log_path}")
    try:
        if RAY_SECTIONS & set(selected):
            from pipeline.runner import ensure_ray

            with b.quiet():
                seconds, _ = clock(lambda: ensure_ray(config(b.root)))
            b.add(Row("ray", "local Ray start-up (once; excluded from every figure)", "s", seconds))
            b.meta["worker_threads"] = b.worker_threads()
        for name in SECTIONS:
            if name in selected:
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
    finally:
        path = b.write()
        b.say("\n" + table(b.rows))
        b.say("\nWhat each figure includes:")
        for includes in dict.fromkeys((r.section, r.includes) for r in b.rows if r.includes):
            b.say(f"  [{includes[0]}] {includes[1]}")
        b.say(f"\nresults: {path}; load average {b.meta['load_average_start']} -> {b.meta['load_average_end']}")
        if b.server:
            b.server.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(b.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
