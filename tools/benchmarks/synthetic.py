"""Synthetic-embedding workdirs and bare-faiss helpers for the dedup, index, neighbours, quality and
growth sections."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import Bench, clock, config, run_stage_quietly


def synthetic(b: Bench, n: int, text: bool = True, name: str | None = None, shard_size: int = 10_000) -> Path:
    """A workdir whose embed/ holds n synthetic 512-d rows (tools/make_synthetic_embeddings.py)."""
    from make_synthetic_embeddings import make_synthetic_embeddings

    def make():
        wd = b.fresh(name or f"synthetic_{n}")
        seconds, _ = clock(lambda: make_synthetic_embeddings(wd, n, text=text, shard_size=shard_size))
        b.say(f"  (synthetic embeddings: {n:,} x 512 written in {seconds:.0f} s)")
        return wd
    return b.once(("synthetic", n, name), make)


def kept_vectors(wd: Path) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, their float32 vectors) of a workdir whose dedup is done."""
    from pipeline.embeddings import read_keep
    from pipeline.embeddings import Embeddings

    rows = np.nonzero(read_keep(wd / "dedup"))[0].astype(np.int64)
    return rows, Embeddings(wd / "embed")[rows].astype(np.float32)


def raw_index(factory: str, x: np.ndarray, seed: int = 0):
    """faiss alone: index_factory, train on a random sample of the size the stage uses, add everything."""
    import faiss

    from pipeline.faiss_build import training_sample_size

    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(x[np.sort(rng.choice(len(x), training_sample_size(factory, len(x)), replace=False))])
    index.add(x)
    return index


def batched_search(index, x: np.ndarray, k: int, batch: int) -> None:
    for s in range(0, len(x), batch):
        index.search(x[s:s + batch], k)


def search_workdir(b: Bench) -> Path:
    # shards of n/10 rows: enough work units for every neighbours actor (real shards: 10k images each)
    return synthetic(b, b.sizes.search_n, shard_size=max(1000, b.sizes.search_n // 10))


def ensure_done(b: Bench, wd: Path, names: list[str], *overrides: str) -> None:
    for name in names:
        run_stage_quietly(b, name, config(wd, *overrides), force=False)
