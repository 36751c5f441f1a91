"""Files every stage and the model code write and read: one atomic write, JSON, the two errors.

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
