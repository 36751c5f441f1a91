"""Files every stage and the model code write and read: one atomic write, JSON, the two errors, a stage
folder set aside for its rebuild; and the CPUs this process may use.

Nothing here imports a stage, torch or faiss, so any module (Ray workers included) can use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

# Runner bookkeeping lives in <stage>/_run/ so that it never mixes with a stage's own outputs
# (img2dataset, for one, treats every top-level *.json in its folder as a finished shard).
STATE = "_run/state.json"  # a stage's run state (pipeline.runner)
SET_ASIDE = ".replaced"  # a rebuilt stage's previous output, `.<stage>.replaced` beside it, until the rebuild ends


class UsageError(Exception):
    """Bad usage or missing inputs: nothing was written (CLI exit code 2)."""


class StageError(Exception):
    """The stage itself failed (corrupt input, missing file): message names the file and the fix (exit 1)."""


@contextlib.contextmanager
def atomic_path(path, fsync: bool = False):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds
    (with `fsync`, flushed to disk first). The temporary file never outlives the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path, rebuild_hint: str = "") -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is corrupt ({e}). {rebuild_hint}".strip()) from None


def file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


CGROUP_CPU_FILES = ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v2, v1


def usable_cpus(cgroup_files=CGROUP_CPU_FILES) -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), capped by a cgroup CPU quota
    (`docker run --cpus 2` on a 64-core host is 2, where os.cpu_count() says 64); at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for path in map(Path, cgroup_files):
        try:
            if path.name == "cpu.max":  # "max 100000" or "<quota> <period>"
                quota, period = path.read_text().split()[:2]
            else:
                quota, period = path.read_text().strip(), (path.parent / "cpu.cfs_period_us").read_text().strip()
        except (OSError, ValueError):
            continue
        if quota not in ("max", "-1") and int(period) > 0:
            return max(1, min(cpus, int(quota) // int(period)))
    return max(1, cpus)


def set_aside(out: Path) -> Path | None:
    """Move a stage's output out of the way of its rebuild (`.<stage>.replaced` beside it); a folder that is
    a symlink or a mount point is emptied in place instead (no way back then), as rebuilds always did."""
    if out.is_symlink() or os.path.ismount(out):
        empty(out)
        return None
    return out.rename(out.with_name(f".{out.name}{SET_ASIDE}"))


def discard(out: Path) -> None:
    """Delete a stage's output before its rebuild (`--discard-old`: outputs too large to keep twice).
    Renamed away first (a kill while deleting leaves `.<stage>.replaced`, which the next run drops)."""
    if (aside := set_aside(out)) is not None:
        shutil.rmtree(aside)


def only_state(out: Path) -> bool:
    """Whether this run wrote nothing but its run state (stages keep partial work, e.g. trained centroids,
    for a re-run to resume from, before any shard is done)."""
    return all(p == out / STATE for p in out.rglob("*") if not p.is_dir())


def put_back(out: Path, aside: Path | None) -> None:
    """Undo a run that was refused before it wrote anything: the folder it made goes, the set-aside output
    comes back. Renamed away first, so a straggling worker writing into it cannot block either step."""
    if out.is_symlink() or os.path.ismount(out):
        empty(out)
        return
    refused = out.rename(out.with_name(f".{out.name}.refused-{os.getpid()}"))
    if aside is not None:
        aside.rename(out)
    shutil.rmtree(refused, ignore_errors=True)


def empty(folder: Path) -> None:
    """Delete a folder's contents, its completion records first: a kill half-way leaves a stage that
    is pending (or resuming from nothing), never one that says done over missing files."""
    (folder / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(folder / "_run", ignore_errors=True)
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def drop_set_aside(out: Path) -> None:
    """Delete the output a rebuild set aside: run_stage keeps it until the rebuild finishes, and a run that
    finds one left by a rebuild that died (after passing its checks) drops it."""
    aside = out.with_name(f".{out.name}{SET_ASIDE}")
    if aside.exists():
        shutil.rmtree(aside)


def sweep_temporaries(out: Path) -> None:
    """Files a killed run was writing (atomic_path's `.name.tmp-PID`): a resumed run writes them anew."""
    for path in out.rglob(".*.tmp-*"):
        if path.is_file():
            path.unlink()
