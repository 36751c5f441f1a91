"""Files every stage and the model code write and read: one atomic write, JSON, the two errors; and
the CPUs this process may use.

Nothing here imports a stage, torch or faiss, so any module (Ray workers included) can use it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


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
