"""download stage: a URL list -> img2dataset webdataset shards in <workdir>/download/.

img2dataset does the work (HTTP, resizing, encoding, shard writing, per-shard `_stats.json`);
this module picks its arguments from `DownloadConfig`, runs it on Ray, follows its progress,
and sums its per-shard stats into the stage manifest. img2dataset's incremental mode is the
resume mechanism: a shard is done when its `_stats.json` exists, and an interrupted shard is
downloaded again from scratch. Each shard is one Ray task (img2dataset's own Ray distributor, wrapped
so that the task first writes `_run/nodes/{shard:05d}.txt`: the node it runs on, for the manifest's
`nodes`; a top-level file would count as a finished shard to img2dataset).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import Counter
from pathlib import Path

from pipeline.cluster import count_nodes, node_id
from pipeline.files import read_json, write_text
from pipeline.runner import StageError, StageRun, UsageError, ensure_ray

SUFFIX_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}

# img2dataset reports failures as free-text error messages; these patterns give them stable names.
REASONS = [
    (re.compile(r"HTTP Error (\d+)"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed? ?out", re.I), lambda m: "timeout"),
    (re.compile(r"Image decoding error|cannot identify|decod", re.I), lambda m: "not_an_image"),
    (re.compile(r"image area too large|exceeds limit|too large|pixels", re.I), lambda m: "too_large"),
    (re.compile(r"image too small", re.I), lambda m: "too_small"),
    (re.compile(r"noai|noimageai|X-Robots", re.I), lambda m: "opted_out"),
    (re.compile(r"Connection refused|Name or service|Errno", re.I), lambda m: "connection_error"),
]


def url_list_format(conf) -> str:
    if conf.input_format != "auto":
        return conf.input_format
    path = Path(conf.url_list)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    suffixes = {SUFFIX_FORMATS.get(f.suffix) for f in files if f.is_file()}
    if len(suffixes) != 1 or None in suffixes:
        raise UsageError(f"download.url_list {path}: cannot tell the format from the suffix; "
                         f"use .parquet/.csv/.tsv/.txt files or set download.input_format")
    return suffixes.pop()


def check(cfg) -> None:
    """Usage errors found before anything is written."""
    conf = cfg.download
    if not conf.url_list:
        raise UsageError("download.url_list is not set: pass --set download.url_list=PATH (parquet, csv, tsv or txt)")
    if not Path(conf.url_list).exists():
        raise UsageError(f"download.url_list {conf.url_list} does not exist: fix the path")
    taken = sorted(set(conf.extra_columns) & {"row", "key", "shard", "url", "caption", "width", "height", "phash"})
    if taken:
        raise UsageError(f"download.extra_columns {taken}: these names are the metadata's own columns; "
                         f"list only other columns of the URL list")
    fmt = url_list_format(conf)
    if fmt in ("parquet", "csv", "tsv"):
        columns = _columns(Path(conf.url_list), fmt)
        for key, col in (("url_col", conf.url_col), ("caption_col", conf.caption_col),
                         *(("extra_columns", c) for c in conf.extra_columns)):
            if col is not None and col not in columns:
                raise UsageError(f"download.{key}: column {col!r} is not in {conf.url_list} (columns: {', '.join(columns)}); "
                                 f"set download.{key} to one of them" + (" or null" if key == "caption_col" else ""))


def _files(path: Path, fmt: str) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == f".{fmt}") if path.is_dir() else [path]


def _columns(path: Path, fmt: str) -> list[str]:
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    first = _files(path, fmt)[0]
    if fmt == "parquet":
        return pq.ParquetFile(first).schema_arrow.names
    delimiter = "\t" if fmt == "tsv" else ","
    return pv.open_csv(first, parse_options=pv.ParseOptions(delimiter=delimiter)).schema.names


def count_urls(path: Path, fmt: str) -> list[int]:
    """Rows per input file (img2dataset numbers shards file after file)."""
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    counts = []
    for f in _files(path, fmt):
        if fmt == "parquet":
            counts.append(pq.ParquetFile(f).metadata.num_rows)
        elif fmt == "txt":
            counts.append(sum(1 for line in open(f, encoding="utf-8") if line.strip()))
        else:
            delimiter = "\t" if fmt == "tsv" else ","
            counts.append(pv.read_csv(f, parse_options=pv.ParseOptions(delimiter=delimiter)).num_rows)
    return counts


def config_inputs(cfg) -> list[str]:
    """The URL list is an input: editing it makes the download stale."""
    return [cfg.download.url_list] if cfg.download.url_list else []


def count_done_shards(out: Path) -> int:
    return len(list(out.glob("*_stats.json")))


def reason(message: str) -> str:
    for pattern, name in REASONS:
        m = pattern.search(message)
        if m:
            return name(m)
    return message.strip()[:80] or "unknown"


def run(stage: StageRun) -> dict:
    conf = stage.conf
    fmt = url_list_format(conf)
    n_shards = sum(math.ceil(n / conf.shard_size) for n in count_urls(Path(conf.url_list), fmt))
    stage.plan(n_shards)
    drop_broken_shards(stage.dir)
    ensure_ray(stage.cfg)
    progress = stage.progress(n_shards, unit="images")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(stage.dir, progress, stop), daemon=True)
    watcher.start()
    try:
        _img2dataset(conf, fmt, stage.dir)  # on Ray, one task per shard (ray_distributor below)
    finally:
        stop.set()
        watcher.join()
    # extra URL-list columns ride in each sample's json; embed copies them into its metadata
    return summarise(stage.dir, n_shards) | {"extra_columns": list(conf.extra_columns)}


def _img2dataset(conf, fmt: str, out: Path) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import importlib
    import signal

    from img2dataset import download
    main = importlib.import_module("img2dataset.main")  # the module (the package's `main` is a function)

    previous = signal.getsignal(signal.SIGINT)
    original = main.ray_distributor  # the one download() picks for distributor="ray"
    main.ray_distributor = ray_distributor(out / NODES)
    try:
        download(
            url_list=str(Path(conf.url_list).resolve()),
            output_folder=str(out.resolve()),
            input_format=fmt,
            url_col=conf.url_col,
            caption_col=conf.caption_col,
            save_additional_columns=list(conf.extra_columns) or None,
            image_size=conf.image_size,
            resize_mode=conf.resize_mode,
            encode_format=conf.encode_format,
            encode_quality=conf.encode_quality if conf.encode_quality is not None else (9 if conf.encode_format == "png" else 95),
            number_sample_per_shard=conf.shard_size,
            processes_count=conf.processes,
            thread_count=conf.threads,
            timeout=conf.timeout,
            retries=conf.retries,
            min_image_size=conf.min_image_size,
            max_image_area=conf.max_image_area or float("inf"),
            output_format="webdataset",
            distributor="ray",
            incremental_mode="incremental",
            enable_wandb=False,
            extract_exif=False,
            compute_hash="sha256",
        )
    except SystemExit:  # img2dataset's SIGINT handler exits with status 0: make it an interruption
        raise KeyboardInterrupt from None
    finally:
        main.ray_distributor = original
        signal.signal(signal.SIGINT, previous)


NODES = "_run/nodes"  # {shard:05d}.txt: the Ray node that downloaded the shard (its latest attempt)


def ray_distributor(nodes_dir: Path):
    """img2dataset's Ray distributor (one task per shard, waited for together), whose tasks also
    record their node in `nodes_dir` before downloading: `summarise` counts them into `nodes`."""
    def distribute(processes_count, downloader, reader, subjob_size, max_shard_retry):
        import ray

        task, shared = ray.remote(download_shard), ray.put(downloader)
        ray.get([task.remote(shared, row, str(nodes_dir.resolve())) for row in reader])
    return distribute


def download_shard(downloader, row, nodes_dir: str):
    """One Ray task: the node first (a shard with `_stats.json` then always has one), then the shard."""
    shard_id = row[0]
    write_text(Path(nodes_dir) / f"{shard_id:05d}.txt", node_id())
    return downloader(row)


def _watch(out: Path, progress, stop: threading.Event) -> None:
    seen: set[Path] = set(out.glob("*_stats.json"))
    while not stop.wait(1.0):
        new = set(out.glob("*_stats.json")) - seen
        items = 0
        for p in new:
            try:
                items += json.loads(p.read_text()).get("successes", 0)
            except (OSError, json.JSONDecodeError):
                continue
        seen |= new
        if new:
            progress.update(shards=len(new), items=items)


def missing_shards(out: Path, manifest: dict) -> str | None:
    """For the runner: the finished download's shards whose tar or _stats.json was deleted since (e.g. a
    corrupt one, as embed's error says to), so that `knnd run download` fetches them again."""
    gone = [s["shard"] for s in manifest.get("shards", [])
            if not (out / s["tar"]).exists() or not (out / f"{s['shard']:05d}_stats.json").exists()]
    return f"{len(gone)} shard(s) deleted (first: {gone[0]:05d})" if gone else None


def drop_broken_shards(out: Path) -> None:
    """Before img2dataset resumes: a shard is done when its _stats.json exists, so one whose tar was
    deleted (a corrupt shard, as embed's error asks) loses its _stats.json and parquet too, to be redone."""
    for stats in out.glob("*_stats.json"):
        shard = stats.name.removesuffix("_stats.json")
        if not (out / f"{shard}.tar").exists():
            (out / f"{shard}.parquet").unlink(missing_ok=True)
            stats.unlink()


def summarise(out: Path, n_shards: int) -> dict:
    """Sum img2dataset's per-shard stats; every planned shard must have finished."""
    shards, failures, messages = [], Counter(), Counter()
    totals = Counter()
    missing, nodes = [], []
    for shard in range(n_shards):
        stats_path = out / f"{shard:05d}_stats.json"
        if not stats_path.exists():
            missing.append(shard)
            continue
        stats = read_json(stats_path, f"Delete it with {shard:05d}.tar and re-run `knnd run download` to fetch that shard again.")
        for message, count in stats.get("status_dict", {}).items():
            if message != "success":
                failures[reason(message)] += count
                messages[message] += count
        totals.update(count=stats["count"], success=stats["successes"],
                      failed_download=stats["failed_to_download"], failed_resize=stats["failed_to_resize"])
        shards.append({"shard": shard, "tar": f"{shard:05d}.tar", "parquet": f"{shard:05d}.parquet",
                       "count": stats["count"], "successes": stats["successes"]})
        node_file = out / NODES / f"{shard:05d}.txt"
        nodes.append(node_file.read_text().strip() if node_file.exists() else "")
    if missing:
        raise StageError(f"download: {len(missing)} of {n_shards} shards did not finish (first: {missing[0]:05d}); "
                         f"re-run `knnd run download` to retry them")
    return {
        "items": totals["success"],
        "counts": {"urls": totals["count"], "images": totals["success"], "failed": totals["count"] - totals["success"],
                   "shards": n_shards},
        "failures": dict(sorted(failures.items())),
        "failure_messages": dict(messages.most_common(50)),
        "shards": shards,
        "nodes": count_nodes(nodes),  # {Ray node id: shards it downloaded}
        "format": "webdataset",
    }
