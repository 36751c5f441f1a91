"""`knnd search`: the printed neighbours equal brute force with the same CLIP text embedding."""
from __future__ import annotations

import os

import numpy as np
import torch

from conftest import TINY_CLIP
from model.clip import encode_texts, load_clip
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import run_stage
from pipeline.search import search
from pipeline.synthetic import clustered_unit_vectors, write_embed_output

TINY = os.path.abspath(TINY_CLIP)


def build(workdir, d: int):
    x = clustered_unit_vectors(400, d, 20, seed=0)
    captions = [f"sticker number {i}" for i in range(400)]
    write_embed_output(workdir, x, shard_size=100, captions=captions,
                       model={"model": TINY, "pretrained": None, "name": "tiny", "dim": d})
    cfg = load_config(None, [f"workdir={workdir}", "dedup.cosine_threshold=1.0", "index.factory=Flat"])
    run_stage("dedup", cfg)
    run_stage("index", cfg)
    return x, captions


def test_search_equals_brute_force(tmp_path, capsys):
    x, captions = build(tmp_path, 32)
    hits = search(tmp_path / "index", "red heart", k=5)
    torch.manual_seed(0)
    q = encode_texts(load_clip(TINY, None), ["red heart"])[0]
    x16 = x.astype(np.float16).astype(np.float32)
    expected = np.argsort(-(x16 @ q), kind="stable")[:5]
    assert [h["row"] for h in hits] == list(expected)
    assert [h["caption"] for h in hits] == [captions[r] for r in expected]
    np.testing.assert_allclose([h["similarity"] for h in hits], (x16 @ q)[expected], atol=1e-4)
    capsys.readouterr()
    assert main(["search", "red heart", "-k", "3", "--set", f"workdir={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 nearest images to 'red heart'") and len(lines) == 4
    assert lines[1].split()[2] == f"{expected[0]:09d}" and lines[1].endswith(captions[expected[0]])


def test_dimension_mismatch_is_a_clear_error(tmp_path, capsys):
    build(tmp_path, 16)  # an index of 16-d vectors, but its CLIP gives 32-d embeddings
    assert main(["search", "red heart", "--index", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err
    assert "gives 32-dimensional embeddings" in err and "holds 16-dimensional ones" in err


def test_not_an_index_directory(tmp_path, capsys):
    assert main(["search", "x", "--index", str(tmp_path)]) == 2
    assert "is not an index directory" in capsys.readouterr().err
