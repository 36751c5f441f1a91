"""pipeline/sizes.py: memory sizes as people write them, and config validation that needs no faiss."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.sizes import format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [("512MB", 512 * 10**6), ("4GB", 4 * 10**9), ("1.5GiB", 3 * 2**29), ("16G", 16 * 2**30),
     ("4 gb", 4 * 10**9), ("1000", 1000), (123456, 123456), ("2TiB", 2 * 2**40),
     (np.int64(2048), 2048), (1.5e9, 1_500_000_000)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["4 parsecs", "", "GB", "-1GB", "0", True, "1.2.3MB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_format_bytes():
    assert [format_bytes(s) for s in (999, 1500, 4 * 10**9, 12 * 10**12)] == ["999 B", "1.5 kB", "4.0 GB", "12.0 TB"]


def test_config_validation_imports_no_faiss():
    """Reading "4GB" in a config must not load faiss: the CLI validates before any stage runs."""
    code = ("import sys; from pipeline.config import check_config, load_config; "
            "check_config(load_config(None, ['index.memory_budget=2GB'])); "
            "print('faiss' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
