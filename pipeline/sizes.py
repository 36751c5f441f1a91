"""Memory sizes written by people ("4GB", "1.5GiB") read as bytes, and bytes written back for messages.

Imports neither numpy nor faiss, so config validation can use it without loading an index library.
"""

from __future__ import annotations

import numbers
import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """A memory size in bytes: ``4GB`` (powers of 1000), ``1.5GiB`` or ``16G`` (powers of 1024), or an int."""
    if isinstance(value, bool):
        raise ValueError(f"memory size {value!r} is not a size: write e.g. '4GB' or 4000000000")
    if isinstance(value, numbers.Real):  # int, float and numpy scalars
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(
                f"cannot read {value!r} as a memory size: write a number with B, KB, MB, GB, TB "
                "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '4GB'"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {value!r} must be positive, e.g. '4GB'")
    return size


def format_bytes(size: int) -> str:
    """``size`` in bytes for messages, e.g. ``1.2 GB``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
