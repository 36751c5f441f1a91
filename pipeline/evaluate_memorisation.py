"""Memorisation against every training image, through the training index.

evaluate's `memorisation` compares each sample with `evaluate.train_images` training images (5,000),
which at millions of images measures a sample's distance to a sample. The training index holds every
training image's embedding by the CLIP that embedded them, so where the evaluation encoder is that
CLIP (the default, `evaluate.encoder: null`), each sample's nearest training images are searched in
the whole index and its highest cosine is computed exactly from the stored vectors. The held-out real
images get the same search, as the reference: a new image's distance to the training set.

Samples and held-out images are embedded at the model's resolution, the index's images at the
download's, so both figures sit lower than the sampled `memorisation`; compare them with each other.
"""
from __future__ import annotations

import sys

import numpy as np

from pipeline.runner import stage_dir

SEARCH_K = 10  # candidates per query from the (possibly compressed) index, re-scored exactly


def training_index(cfg, evaluated_infos: dict):
    """A Retriever over the workdir's index when the evaluation encoder (the CLIP of the evaluated
    index, whose index_infos.json is `evaluated_infos`) embedded it, else None."""
    from pipeline.retrieval import Retriever

    index_dir = stage_dir(cfg, "index")
    if cfg.evaluate.encoder is not None or not (index_dir / "index_infos.json").exists():
        return None  # another encoder's space is not the index's
    retriever = Retriever(index_dir, queries="image")
    if retriever.infos.get("clip") != evaluated_infos.get("clip"):
        print(f"evaluate: {index_dir} was embedded by another CLIP than the evaluation encoder: memorisation "
              f"against the whole training index skipped", file=sys.stderr)
        return None
    return retriever


def nearest_cosine(retriever, feats: np.ndarray, k: int = SEARCH_K) -> np.ndarray:
    """Each row's highest cosine to a vector of the index: the index's candidates re-scored exactly
    (every candidate's stored vector read once)."""
    if len(feats) == 0:
        return np.zeros(0, np.float32)
    _, rows = retriever.search(feats, min(k, retriever.index.ntotal))
    found = rows >= 0
    if not found.any():
        return np.full(len(feats), -1.0, np.float32)
    unique = np.unique(rows[found])
    vectors = np.asarray(retriever.embeddings[unique], np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = np.einsum("qkd,qd->qk", vectors[np.searchsorted(unique, np.where(found, rows, unique[0]))], feats)
    return np.where(found, sims, -1.0).max(axis=1).astype(np.float32)


def index_memorisation(retriever, fake: np.ndarray, fake_prompt_of: np.ndarray, real: np.ndarray | None,
                       real_prompt_of: np.ndarray | None, n_boot: int) -> dict:
    """{images, index, generated, real}: each set's highest cosine to any training image, with intervals."""
    from model import bootstrap
    from pipeline.evaluate import interval

    out = {"images": int(retriever.index.ntotal), "index": str(retriever.dir.resolve()),
           "generated": interval(bootstrap.bootstrap_ci(nearest_cosine(retriever, fake), fake_prompt_of, n_boot=n_boot))}
    if real is not None:
        out["real"] = interval(bootstrap.bootstrap_ci(nearest_cosine(retriever, real), real_prompt_of, n_boot=n_boot))
    return out
