"""Planted cluster structure for test_faiss_build and test_faiss_search: vectors, exact answers, indexes."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from pipeline import faiss_build, faiss_search

D = 32
N = 20_000
N_QUERIES = 500
K = 10


def normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_unit_vectors(rng: np.random.Generator, n: int, d: int, n_clusters: int = 200) -> np.ndarray:
    """Unit vectors around random centres, each cluster varying along its own 6-dim subspace plus noise.

    Low intrinsic dimension like CLIP embeddings: near neighbours are meaningfully closer than the rest.
    """
    centers = normalize(rng.standard_normal((n_clusters, d)))
    bases = rng.standard_normal((n_clusters, 6, d)) / np.sqrt(d)
    cluster = rng.integers(0, n_clusters, n)
    latent = rng.standard_normal((n, 6))
    along = np.einsum("nk,nkd->nd", latent, bases[cluster])
    return normalize(centers[cluster] + 0.6 * along + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d))


def planted_data(folder: Path) -> dict:
    """Database with non-contiguous rows, held-out image queries, text-like queries, float16 memmap."""
    rng = np.random.default_rng(0)
    x = clustered_unit_vectors(rng, N + N_QUERIES, D)
    database, queries = x[:N], x[N:]
    rows = np.sort(rng.choice(10 * N, N, replace=False)).astype(np.int64)
    # Text embeddings sit off the image distribution: a shared offset plus noise (the modality gap).
    offset = normalize(rng.standard_normal((1, D)))
    text_queries = normalize(queries + 0.8 * offset + 0.3 * rng.standard_normal(queries.shape) / np.sqrt(D))
    path = folder / "img_emb.f16"
    embeddings = np.memmap(path, dtype=np.float16, mode="w+", shape=(int(rows.max()) + 1, D))
    embeddings[rows] = database
    embeddings.flush()
    true_ids = faiss_search.exact_search(database, queries, K, ids=rows)[1]
    text_true_ids = faiss_search.exact_search(database, text_queries, K, ids=rows)[1]
    return dict(
        database=database, queries=queries, text_queries=text_queries, rows=rows,
        embeddings=np.memmap(path, dtype=np.float16, mode="r", shape=embeddings.shape),
        true_ids=true_ids, text_true_ids=text_true_ids,
    )


def build(factory: str, database: np.ndarray, rows: np.ndarray, n_train: int | None = None) -> faiss.Index:
    """Train ``factory`` on the first ``n_train`` vectors and add them all in blocks, as the index stage does."""
    train = None if n_train is None else database[:n_train]
    index = faiss_build.train_index(factory, database.shape[1], train)
    blocks = ((rows[i : i + 4096], database[i : i + 4096]) for i in range(0, len(rows), 4096))
    added = faiss_build.add_batches(index, blocks)
    assert added == index.ntotal == len(rows)
    return index


def ivf_flat_index(data: dict) -> faiss.Index:
    n_train = faiss_build.training_sample_size("IVF128,Flat", N)
    return build("IVF128,Flat", data["database"], data["rows"], n_train=n_train)


def ivf_pq_index(data: dict) -> faiss.Index:
    # 8 bytes/vector for 128 bytes of float32: 16x, twice the paper's compression, cheap to train.
    return build("IVF128,PQ8", data["database"], data["rows"], n_train=5000)
