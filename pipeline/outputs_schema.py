"""What a stage wrote, described for its manifest's `outputs`: the stage folder's files grouped into
kinds by name pattern (each run of digits becomes `*`: `img_emb/img_emb_*.npy`), each kind with its
file count and bytes and, where it is cheap to read, its schema. The runner calls `describe_outputs`
after a stage's `run` returns and before it writes `manifest.json`.

Cheap means headers only: Parquet footers (columns from the first file, rows from every file's
footer), .npy headers (dtype and shape of the first, rows summed over all), the first few members of
the first tar, the first PNG's header. Anything else, and faiss indexes (the index stage records its
factory and vector count in its manifest already; an index can be many GB), is counted and sized only.
"""
from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

MAX_KINDS = 32  # beyond it (sample's PNGs are named by prompt) the rest is one "(other)" entry
TAR_MEMBERS = 12  # members read from the first tar: enough to see every suffix of a few samples
SKIP_FILES = {"manifest.json"}
SKIP_DIRS = {"_run"}  # the runner's bookkeeping (run state, shard markers), at the stage folder's top
DIGITS = re.compile(r"\d+")


def describe_outputs(folder: Path) -> dict:
    """{pattern: {"files", "bytes", ...schema}} for the files under `folder`; never raises for a file
    it cannot read (that kind gets an "error" instead of its schema)."""
    kinds: dict[str, list[Path]] = {}
    for path in _files(Path(folder)):
        kinds.setdefault(DIGITS.sub("*", path.relative_to(folder).as_posix()), []).append(path)
    names = sorted(kinds)
    out = {name: describe_kind(kinds[name]) for name in names[:MAX_KINDS]}
    rest = [p for name in names[MAX_KINDS:] for p in kinds[name]]
    if rest:
        out["(other)"] = {"kinds": len(names) - MAX_KINDS, "files": len(rest), "bytes": _bytes(rest)}
    return out


def _files(folder: Path) -> list[Path]:
    """Every file under `folder` but the runner's bookkeeping and hidden ones (atomic_path's
    temporaries, `.name.tmp-PID`), in name order."""
    found = []
    for root, dirs, files in os.walk(folder):
        top = Path(root) == folder
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (top and d in SKIP_DIRS)]
        found += [Path(root) / f for f in files if not f.startswith(".") and not (top and f in SKIP_FILES)]
    return sorted(found)


def describe_kind(paths: list[Path]) -> dict:
    """Count, bytes and the schema the suffix allows; an unreadable file is an "error", not a crash."""
    out = {"files": len(paths), "bytes": _bytes(paths)}
    reader = READERS.get(paths[0].suffix.lower())
    if reader is not None:
        try:
            out.update(reader(paths))
        except Exception as e:  # a manifest describes what is there; a broken file is reported, not fatal
            out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def _bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:  # gone since the walk (a stage's stray background writer): not ours to fail on
            pass
    return total


def _parquet(paths: list[Path]) -> dict:
    import pyarrow.parquet as pq

    schema = pq.read_schema(paths[0])
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)  # footers only, no data read
    return {"columns": {f.name: str(f.type) for f in schema}, "rows": rows}


def _npy(paths: list[Path]) -> dict:
    import numpy as np

    def header(p: Path):
        array = np.load(p, mmap_mode="r", allow_pickle=False)  # the header, and a map nothing reads
        return str(array.dtype), list(array.shape)

    dtype, shape = header(paths[0])
    out = {"dtype": dtype, "shape": shape}
    if shape:
        out["rows"] = sum(header(p)[1][0] for p in paths)
    return out


def _tar(paths: list[Path]) -> dict:
    """The member suffixes of the first tar's first members: webdataset's, everything after the first
    dot of the name ("{key}.jpg", "{key}.nbr.npy")."""
    suffixes = set()
    with tarfile.open(paths[0], mode="r:") as tar:  # headers in order, data skipped by seeking
        for i, member in enumerate(tar):
            if i >= TAR_MEMBERS:
                break
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and "." in base:
                suffixes.add(base.split(".", 1)[1])
    return {"member_suffixes": sorted(suffixes)}


def _png(paths: list[Path]) -> dict:
    from PIL import Image

    with Image.open(paths[0]) as image:  # lazy: reads the header, not the pixels
        return {"size": list(image.size), "mode": image.mode}


READERS = {".parquet": _parquet, ".npy": _npy, ".tar": _tar, ".png": _png}
