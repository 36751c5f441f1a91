"""A small database for tests/test_serve.py: download shards of pictures, embeddings beside them, an index."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from conftest import TINY_CLIP, png_bytes, write_fake_download
from pipeline.config import load_config
from pipeline.runner import run_stage, write_json
from pipeline.synthetic import write_embed_output

SHARD = 10


def build_database(workdir: Path, prefix: str, n: int, seed: int, self_contained: bool) -> Path:
    """A download of n small pictures, embed output beside it (random unit vectors "embedded" by the
    tiny CLIP), dedup and index; a self-contained index carries thumbnails.npy, the other decodes
    its thumbnails from the download shards."""
    keys, captions = [f"{prefix}{i:08d}" for i in range(n)], [f"{prefix} item {i}" for i in range(n)]
    pictures = [(key, png_bytes(seed * 1000 + i, 24), caption) for i, (key, caption) in enumerate(zip(keys, captions))]
    download = write_fake_download(workdir, [pictures[s:s + SHARD] for s in range(0, n, SHARD)])
    vectors = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    manifest = write_embed_output(workdir, vectors, shard_size=SHARD, keys=keys, captions=captions)
    manifest["model"] = {"model": str(Path(TINY_CLIP).resolve()), "pretrained": None, "name": "tiny", "dim": 32}
    manifest["download_dir"] = str(download)
    write_json(workdir / "embed" / "manifest.json", manifest)
    settings = {"workdir": str(workdir), "device": "cpu", "dedup": {"manhattan_threshold": 0, "holdout": 0.0},
                "index": {"self_contained": self_contained},
                "train": {"model": "tiny", "steps": 2, "batch_size": 4, "warmup_steps": 1},
                "sample": {"k": 3, "guidance": 3.0, "steps": 2, "seed": 3, "images_per_prompt": 2}}
    path = workdir / "stages.yaml"
    path.write_text(yaml.safe_dump(settings))
    run_stage("dedup", load_config(path))
    run_stage("index", load_config(path))
    return path
