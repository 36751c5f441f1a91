"""download: the stage against img2dataset.download with the kwargs the stage passed."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .common import Bench, clock, config, interleave, measured, run_stage_quietly


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
