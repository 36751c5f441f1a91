"""Synthetic embed-stage output: clustered unit vectors with metadata and a manifest.

Lets dedup, index and neighbours run (tests, benchmarks at 100k-1M rows) without images.
Used by tests and by tools/make_synthetic_embeddings.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.embeddings import shard_files
from pipeline.files import atomic_path, write_json


def clustered_unit_vectors(n: int, d: int, n_clusters: int, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    """n unit vectors around n_clusters random centres; `spread` is the noise norm relative to the centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_clusters, n)]
    x += rng.standard_normal((n, d)).astype(np.float32) * (spread / np.sqrt(d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_phashes(n: int, seed: int = 0, bits: int = 64) -> list[str]:
    rng = np.random.default_rng(seed + 7)
    raw = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    return [r.tobytes().hex() for r in raw]


def write_embed_output(workdir: Path, vectors: np.ndarray, shard_size: int, phash: list[str] | None = None,
                       captions: list[str] | None = None, text: np.ndarray | None = None,
                       keys: list[str] | None = None, model: dict | None = None, extra: dict | None = None) -> dict:
    """Write <workdir>/embed/ exactly as the embed stage lays it out; returns the manifest. `extra`:
    {column: values} metadata columns, as download.extra_columns carries them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(workdir) / "embed"
    n, d = vectors.shape
    phash = phash or random_phashes(n)
    keys = keys or [f"{i:09d}" for i in range(n)]
    captions = captions or [f"item {i}" for i in range(n)]
    import hashlib

    digest = hashlib.sha256()  # over the float16 shards as written: same digest as hashing it all at once
    shards = []
    for s, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        entry = {"shard": s, "rows": stop - start, "row_offset": start, **shard_files(s, text is not None)}
        block = np.ascontiguousarray(vectors[start:stop], dtype=np.float16)
        digest.update(block.tobytes())
        _save(out / entry["img_emb"], block)
        if text is not None:
            _save(out / entry["text_emb"], text[start:stop])
        table = pa.table({"key": keys[start:stop], "row": np.arange(start, stop, dtype=np.int64),
                          "shard": np.full(stop - start, s, np.int32), "url": [None] * (stop - start),
                          "caption": captions[start:stop], "width": np.zeros(stop - start, np.int32),
                          "height": np.zeros(stop - start, np.int32), "phash": phash[start:stop],
                          **{name: values[start:stop] for name, values in (extra or {}).items()}})
        with atomic_path(out / entry["metadata"]) as tmp:
            pq.write_table(table, tmp)
        shards.append(entry)
    manifest = {"stage": "embed", "config_hash": "synthetic", "input_hash": digest.hexdigest()[:16], "items": n, "rows": n, "dim": d,
                "dtype": "float16", "text_emb": text is not None, "shards": shards,
                "model": model or {"model": "synthetic", "pretrained": None, "name": "synthetic", "dim": d},
                "counts": {"images": n, "failed": 0, "shards": len(shards)}}
    write_json(out / "manifest.json", manifest)
    return manifest


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array, dtype=np.float16))
