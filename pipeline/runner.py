"""The stage runner shared by every stage.

A stage is a module `pipeline/<name>.py` with `run(stage: StageRun) -> dict` and one line in the
stage table (`pipeline.stages.TABLE`: its upstream stages, checks and progress unit). The runner:
- reads the upstream manifests (never globs), refusing to start when one is missing;
- decides between "up to date", resume, rebuild (stale input) and refusal (changed config);
- hands the stage shard markers, atomic writes and a progress line;
- writes `manifest.json` last: resolved config and globals, input hash, counts, the outputs' schema
  (pipeline.outputs_schema), seconds, versions.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config, fingerprint_hash, legacy_fingerprint, output_fingerprint, section, to_dict
# Errors, atomic writes and JSON live in pipeline.files (no stage owns them); re-exported for callers.
from pipeline.files import StageError, UsageError, atomic_path, file_hash, read_json, usable_cpus, write_json  # noqa: F401
from pipeline.files import STATE, discard, drop_set_aside, only_state, put_back, set_aside, sweep_temporaries
from pipeline.outputs_schema import describe_outputs

VERSIONED_PACKAGES = ["torch", "open_clip_torch", "faiss-cpu", "faiss-gpu", "ray", "img2dataset", "webdataset",
                      "diffusers", "numpy", "pyarrow", "imagehash", "knn-diffusion"]



def package_versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- progress


def auto_count(setting: str | int, cpus: int, budget_bytes: float, unit_bytes: float, extra_in_flight: int = 0) -> int:
    """A worker-count setting: a number, or "auto" = `cpus` workers, no more than `budget_bytes` holds
    at `unit_bytes` each (with `extra_in_flight` units held beyond one per worker); at least 1."""
    if setting != "auto":
        return int(setting)
    fit = int(budget_bytes // max(unit_bytes, 1)) - extra_in_flight
    return max(1, min(cpus, fit))


class RunClock:
    """A stage's fixed start-up and its throughput after it, for the manifest (bench reads both)."""

    def __init__(self):
        self.started, self.ready_at, self.items = time.perf_counter(), None, 0

    def ready(self, wall: float | None = None) -> None:
        """Now, or when the workers reported ready (`wall`: their `time.time()`; they start while work is queued).
        Not before the clock started: the wall clock can step (a VM syncing it), perf_counter does not."""
        now = time.perf_counter()
        self.ready_at = now if wall is None else max(self.started, now - max(0.0, time.time() - wall))

    def report(self, workers: str) -> dict:
        after = time.perf_counter() - self.ready_at
        return {f"{workers}_start_s": round(self.ready_at - self.started, 3), "images_this_run": self.items,
                "images_per_s_after_start": round(self.items / after, 2) if self.items else None}


class Progress:
    """One progress line: work units (shards; dedup's partitions) done / total, items/s and ETA, at most
    once a second."""

    def __init__(self, stage: str, total: int, done: int = 0, unit: str = "items", stream=None, parts: str = "shards"):
        self.stage, self.total, self.done, self.unit, self.parts = stage, total, done, unit, parts
        self.items, self.start, self.last = 0, time.monotonic(), 0.0
        self.stream = stream or sys.stderr
        self.start_done = done

    def update(self, shards: int = 0, items: int = 0) -> None:
        self.done += shards
        self.items += items
        now = time.monotonic()
        if now - self.last >= 1.0 or self.done >= self.total:
            self.last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def rate(self) -> float:
        return self.items / max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        new = self.done - self.start_done
        eta = "?" if new == 0 else hms(elapsed / new * (self.total - self.done))
        return (f"{self.stage}: {self.done}/{self.total} {self.parts}, {self.items} {self.unit} "
                f"({self.rate():.1f} {self.unit}/s), ETA {eta}")


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS, the format of every progress line's ETA."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------- the run


@dataclass
class StageRun:
    """What a stage function gets: its config, its folder, its inputs, and shard bookkeeping."""

    name: str
    cfg: Config
    dir: Path
    inputs: dict[str, dict]
    input_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def conf(self):
        return section(self.cfg, self.name)

    def marker(self, shard: int) -> Path:
        return self.dir / "_run" / "done" / f"{shard:05d}.json"

    def shard_done(self, shard: int) -> bool:
        return self.marker(shard).exists()

    def mark_done(self, shard: int, stats: dict) -> None:
        """Record a finished shard: call only after its outputs were renamed into place."""
        write_json(self.marker(shard), stats)

    def done_stats(self) -> dict[int, dict]:
        folder = self.dir / "_run" / "done"
        if not folder.exists():
            return {}
        return {int(p.stem): read_json(p) for p in sorted(folder.glob("*.json"))}

    def plan(self, total_shards: int) -> None:
        """Record how many shards this run will write, for `knnd status`."""
        state = read_json(self.dir / STATE)
        state["total_shards"] = total_shards
        write_json(self.dir / STATE, state)

    def progress(self, total: int, unit: str | None = None) -> Progress:
        stage = table()[self.name]
        return Progress(self.name, total, done=count_done(self.name, self.dir), unit=unit or stage.unit)

    def device(self) -> str:
        return resolve_device(self.cfg)


def resolve_device(cfg: Config) -> str:
    """The `device` global: auto means cuda when available, else cpu; cuda without a CUDA device here is
    a UsageError (on a cluster, `cluster.work_device` checks the cluster's GPUs instead)."""
    if cfg.device == "cpu":
        return "cpu"
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device is cuda, but torch sees no CUDA device on this machine: set device=auto (or cpu), "
                         "or run where a GPU is visible")
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_globals(cfg: Config) -> dict:
    """The global settings a stage ran under, for its manifest (not its config hash: moving the workdir
    or switching device or cluster does not change what a stage writes)."""
    out = {"workdir": str(Path(cfg.workdir).resolve()), "device": cfg.device, "ray": to_dict(cfg.ray)}
    # What `device` resolved to, only where asking is free and the answer is the stage's: not on a
    # cluster (its GPUs decide, cluster.work_device), not by importing torch for a stage that never
    # did, and not by raising for device=cuda without CUDA in a stage that never needed a device.
    if cfg.device == "cpu" or (cfg.ray.address is None and "torch" in sys.modules):
        try:
            out["device_resolved"] = resolve_device(cfg)
        except UsageError:
            pass
    return out


def stage_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.workdir) / name


def load_inputs(cfg: Config, name: str) -> tuple[dict[str, dict], dict[str, Path]]:
    """The upstream manifests of stage `name`; a missing one is a usage error naming the stage to run."""
    manifests, dirs = {}, {}
    for up in table()[name].upstream:
        path = stage_dir(cfg, up) / "manifest.json"
        if not path.exists():
            raise UsageError(f"{name} needs the output of {up}, and {path} does not exist: run `knnd run {up}` first")
        manifests[up] = read_json(path, f"Rebuild it with `knnd run {up} --force`.")
        dirs[up] = stage_dir(cfg, up)
    return manifests, dirs


def input_hash(cfg: Config, name: str, manifests: dict[str, dict]) -> str:
    from pipeline.stages import config_input_paths

    h = hashlib.sha256()
    for up in table()[name].upstream:
        h.update((stage_dir(cfg, up) / "manifest.json").read_bytes())
    for path in config_input_paths(cfg, name):  # files the config names (a URL list, a prompt file, ...)
        h.update(content_hash(path).encode())
    return h.hexdigest()[:16]


def content_hash(path: Path) -> str:
    """A file's hash, a folder's (of its files, in name order), or "missing"."""
    if path.is_dir():
        return hashlib.sha256("".join(file_hash(p) for p in sorted(path.iterdir()) if p.is_file()).encode()).hexdigest()
    return file_hash(path) if path.exists() else "missing"


def _changed_keys(old: dict, new: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """'key: old -> new' for each differing key; with `defaults` (config.legacy_fingerprint), a key
    the old fingerprint lacks (added to the config since) counts only when its new value is not what
    the key's absence meant (its `before` value, else its default), and one the new fingerprint lacks
    (made a runtime knob since) does not count."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        default = (defaults or {}).get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, default if isinstance(default, dict) else None, f"{prefix}{k}.")
        elif defaults is not None and (k not in new or (k not in old and k in defaults and b == default)):
            continue  # gone from the fingerprint (now a runtime knob), or new and at its default
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def clear_for_rebuild(name: str, out: Path, keep_old: bool, log) -> Path | None:
    """Make way for a rebuild: the old output set aside (returned; deleted when the rebuild finishes),
    or with keep_old=False deleted now."""
    drop_set_aside(out)  # an earlier rebuild's, which got past its checks and died: not coming back
    if keep_old:
        return set_aside(out)
    discard(out)
    log(f"{name}: the old output is deleted (--discard-old)")
    return None


def run_stage(name: str, cfg: Config, force: bool = False, log=print, keep_old: bool = True) -> dict:
    """Run one stage to completion (or report it up to date); return its manifest. A rebuild keeps the
    old output aside until it finishes (a refused rebuild puts it back); keep_old=False deletes it first."""
    stages = table()
    if name not in stages:
        raise UsageError(f"unknown stage {name!r}: choose from {', '.join(stages)} or all")
    out = stage_dir(cfg, name)
    manifests, dirs = load_inputs(cfg, name)
    if stages[name].check is not None:  # usage errors the stage can find before writing anything
        stages[name].check(cfg)
    in_hash = input_hash(cfg, name, manifests)
    conf = section(cfg, name)
    cfg_hash = fingerprint_hash(conf)
    state = {"config_hash": cfg_hash, "fingerprint": output_fingerprint(conf), "input_hash": in_hash}

    previous, aside = None, None
    if (out / "manifest.json").exists():
        previous = read_json(out / "manifest.json", f"Rebuild with `knnd run {name} --force`.")
    elif (out / STATE).exists():
        previous = read_json(out / STATE, f"Rebuild with `knnd run {name} --force`.")
    changed = []
    if previous is not None and previous.get("config_hash") != cfg_hash:
        changed = _changed_keys(previous.get("fingerprint", {}), state["fingerprint"], legacy_fingerprint(type(conf)))
        if not changed:  # only keys added since (at their defaults) or made runtime knobs since
            cfg_hash = state["config_hash"] = previous["config_hash"]
    finished = (out / "manifest.json").exists()
    current = finished and previous.get("config_hash") == cfg_hash and previous.get("input_hash") == in_hash
    if current and not force and (gone := stages[name].missing and stages[name].missing(out, previous)):
        log(f"{name}: {gone} since it finished: resuming to redo them")
        (out / "manifest.json").unlink()  # the run state beside it stays: the same config resumes
        finished = current = False
    if previous is not None:
        if previous.get("config_hash") != cfg_hash and not force:
            raise UsageError(f"{name} was {'built' if finished else 'started'} with a different config "
                             f"({'; '.join(changed) or 'config'}): "
                             f"re-run with --force to rebuild it, or restore the old values")
        if current and not force:
            log(f"{name}: up to date, nothing to do")
            return previous
        if force or finished or previous.get("config_hash") != cfg_hash or previous.get("input_hash") != in_hash:
            log(f"{name}: rebuilding ({'forced' if force else 'its input changed'})")
            aside = clear_for_rebuild(name, out, keep_old, log)
        else:
            log(f"{name}: resuming")
            sweep_temporaries(out)

    if aside is None:
        drop_set_aside(out)  # likewise, before resuming that rebuild (or starting afresh)
    fresh = not (out / STATE).exists()
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        write_json(out / STATE, state)
    start = time.time()
    try:
        body = stages[name].run(StageRun(name, cfg, out, manifests, dirs))
    except (UsageError, StageError):
        if fresh and only_state(out):  # refused before writing anything: as if never run, the old output back
            put_back(out, aside)
        raise
    manifest = {
        "stage": name,
        "config": to_dict(conf),
        "globals": run_globals(cfg),
        "config_hash": cfg_hash,
        "fingerprint": state["fingerprint"],
        "input_hash": in_hash,
        "inputs": {up: str(dirs[up] / "manifest.json") for up in dirs},
        "seconds": round(time.time() - start, 3),
        "versions": package_versions(),
        "outputs": describe_outputs(out),
        **body,
    }
    write_json(out / "manifest.json", manifest)
    drop_set_aside(out)
    return manifest


# --------------------------------------------------------------------------- status


def stage_status(cfg: Config, name: str) -> tuple[str, str]:
    """(state, detail) where state is done, stale, partial or pending."""
    out = stage_dir(cfg, name)
    if (out / "manifest.json").exists():
        manifest = read_json(out / "manifest.json")
        try:
            manifests, _ = load_inputs(cfg, name)
            current = input_hash(cfg, name, manifests)
        except UsageError:
            current = None
        counts = ", ".join(f"{k} {v}" for k, v in manifest.get("counts", {}).items() if not isinstance(v, dict))
        missing = table()[name].missing
        if missing is not None and (gone := missing(out, manifest)):
            return "partial", f"{gone} since it finished"
        state = "done" if current == manifest.get("input_hash") else "stale"
        return state, counts
    if (out / STATE).exists():
        total = read_json(out / STATE).get("total_shards", "?")
        return "partial", f"{count_done(name, out)} of {total} shards"
    return "pending", ""


def count_done(name: str, out: Path) -> int:
    """Finished units of a stage's run so far: its own count, else its shard markers."""
    stage = table()[name]
    if stage.count_done is not None:
        return stage.count_done(out)
    return len(list((out / "_run" / "done").glob("*.json")))


def table() -> dict:
    """The stage table (pipeline.stages), imported on first use: stage modules import this runner."""
    from pipeline.stages import TABLE

    return TABLE


# --------------------------------------------------------------------------- ray


def ensure_ray(cfg: Config) -> None:
    """Start a local Ray (default) or join the cluster at `ray.address`, once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level="warning", configure_logging=True)
    if cfg.ray.address:
        check_reachable(cfg.ray.address)
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or usable_cpus(), **kwargs)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A UsageError, at once, when `ray.address` names a host:port nothing answers on (ray.init would
    retry for minutes without saying why). "auto" and addresses without a port are left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or (":" in host and not host.startswith("[")):
        return  # "auto", no port, or an unbracketed IPv6 address: left to Ray
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"ray.address {address!r}: nothing answers at {host}:{port} ({e}): start the cluster "
                         "(`ray start --head` on its head node) or fix ray.address") from None
