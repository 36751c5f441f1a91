"""Point faiss's bundled OpenBLAS at the CPU's own matrix kernels.

faiss-cpu's PyPI wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu 1.15), older than Intel's
Sapphire and Emerald Rapids. On those it recognises no core and falls back to its generic Prescott
(SSE3) kernels, so every matrix product faiss makes (flat search, k-means, cell assignment, the
dedup candidates) runs several times slower than the CPU allows: ranking 22,930 centroids of 512
dimensions, 1,876 vectors/s on Prescott against 11,167/s on the SkylakeX kernels the CPU can run
(README, Performance). OpenBLAS takes ``OPENBLAS_CORETYPE`` when the library loads, so
``prefer_cpu_kernels`` sets it, from the CPU's flags, before faiss is imported; importing
``pipeline`` calls it. A value the user set is kept, and a CPU without AVX2 keeps OpenBLAS's choice.
Child processes (Ray workers started from here) inherit it.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

ENV = "OPENBLAS_CORETYPE"
# Best OpenBLAS kernel family a CPU's flags allow, first match wins. SkylakeX's single-precision
# kernels are also what OpenBLAS uses for the newer Cooperlake / Sapphire Rapids targets.
KERNELS = (
    ("SkylakeX", frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})),
    ("Haswell", frozenset({"avx2", "fma"})),
)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (Linux x86); empty where there is no such file."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def kernel_for(flags: frozenset[str]) -> str | None:
    """The OpenBLAS core type for these CPU flags, None for none better than its own detection."""
    return next((name for name, needs in KERNELS if needs <= flags), None)


def prefer_cpu_kernels(environ: MutableMapping[str, str] = os.environ,
                       flags: frozenset[str] | None = None) -> str | None:
    """Set ``OPENBLAS_CORETYPE`` in ``environ`` unless it is set; returns the value in force (None:
    unset). Too late for a faiss already imported in this process (its children still get it)."""
    if ENV not in environ:
        kernel = kernel_for(cpu_flags() if flags is None else flags)
        if kernel is not None:
            environ[ENV] = kernel
    return environ.get(ENV)
