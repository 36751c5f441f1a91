"""index stage: tuned recall against exact search, refine for text-like queries, infos, mmap load."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.faiss_build import choose_factory
from pipeline.runner import run_stage
from pipeline.sizes import parse_bytes
from pipeline.synthetic import clustered_unit_vectors, write_embed_output


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """Clustered image embeddings plus caption embeddings shifted off their distribution."""
    root = tmp_path_factory.mktemp("db")
    n, d = 12000, 32
    x = clustered_unit_vectors(n, d, n_clusters=150, spread=0.9, seed=0)
    rng = np.random.default_rng(1)
    offset = unit(rng.standard_normal(d))
    text = unit(x + 0.8 * offset + 0.3 * unit(rng.standard_normal((n, d))))  # text-like: a modality gap
    write_embed_output(root, x, shard_size=3000, text=text)
    run_stage("dedup", load_config(None, [f"workdir={root}", "dedup.holdout=0"]))
    return root, x, text


def build(root, tmp_path, *sets):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(root / "embed", work / "embed")
    shutil.copytree(root / "dedup", work / "dedup")
    return work, run_stage("index", load_config(None, [f"workdir={work}", *sets]))


def test_auto_exact_index_has_perfect_recall(database, tmp_path):
    root, x, _ = database
    work, m = build(root, tmp_path)
    infos = json.loads((work / "index" / "index_infos.json").read_text())
    assert infos["factory"] == choose_factory(len(x), x.shape[1], parse_bytes("4GB"))
    assert infos["n"] == len(x) and infos["d"] == 32 and infos["bytes_per_vector"] > 0
    assert infos["recall"]["image"]["recall@10"] == 1.0 and infos["recall"]["text"]["recall@10"] == 1.0
    assert {"build_seconds", "nprobe", "memory_budget", "embed_dir", "model"} <= set(infos)
    index = faiss.read_index(str(work / "index" / "image.index"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    assert index.ntotal == len(x)
    sims, rows = index.search(x[:5], 1)
    assert list(rows[:, 0]) == [0, 1, 2, 3, 4]  # ids are rows


def test_tuned_ivf_pq_reaches_target_and_refine_recovers_text_recall(database, tmp_path):
    root, _, _ = database
    work, m = build(root, tmp_path, "index.factory=IVF128,PQ16x4", "index.refine=true", "index.target_recall=0.9",
                    "index.eval_queries=300")
    infos = json.loads((work / "index" / "index_infos.json").read_text())
    r = infos["recall"]
    assert infos["factory"] == "IVF128,PQ16x4" and infos["bytes_per_vector"] < 32
    assert infos["nprobe_tuning"]["tuned"] and 1 <= infos["nprobe"] <= 128
    assert r["image_refined"]["recall@10"] >= 0.9
    assert r["text_refined"]["recall@10"] >= 0.9
    assert r["text_refined"]["recall@10"] > r["text"]["recall@10"] + 0.05  # PQ alone loses text recall


def test_auto_nprobe_reaches_target_on_text_queries_too(database, tmp_path):
    """Text-like queries sit off the image distribution and need more cells than image queries."""
    root, _, _ = database
    work, _ = build(root, tmp_path, "index.factory=IVF256,Flat", "index.target_recall=0.95", "index.eval_queries=300")
    infos = json.loads((work / "index" / "index_infos.json").read_text())
    by = infos["nprobe_tuning"]["by_queries"]
    assert by["image"]["reached"] and by["text"]["reached"] and by["text"]["value"] > by["image"]["value"]
    assert infos["nprobe"] == by["image"]["value"] and infos["nprobe_text"] == by["text"]["value"]
    assert infos["recall"]["text"]["recall@10"] >= 0.95 and infos["recall"]["image"]["recall@10"] >= 0.95
    # neighbours (image queries) and search/sampling (text) each search with their own value
    from pipeline.retrieval import Retriever

    for queries, value in (("image", infos["nprobe"]), ("text", infos["nprobe_text"])):
        index = faiss.extract_index_ivf(Retriever(work / "index", queries=queries).index)
        assert index.nprobe == value


def test_fixed_nprobe_is_used(database, tmp_path):
    root, _, _ = database
    work, _ = build(root, tmp_path, "index.factory=IVF64,Flat", "index.nprobe=3", "index.eval_queries=100")
    infos = json.loads((work / "index" / "index_infos.json").read_text())
    assert infos["nprobe"] == 3 and not infos["nprobe_tuning"]["tuned"]


def test_bad_factory_and_budget_exit_2(database, tmp_path, capsys):
    root, _, _ = database
    import shutil

    work = tmp_path / "w"
    shutil.copytree(root / "embed", work / "embed")
    shutil.copytree(root / "dedup", work / "dedup")
    assert main(["run", "index", "--set", f"workdir={work}", "--set", "index.factory=IVF12,Flatt"]) == 2
    assert "index.factory 'IVF12,Flatt' is not a faiss factory string" in capsys.readouterr().err
    assert main(["run", "index", "--set", f"workdir={work}", "--set", "index.memory_budget=10KB"]) == 2
    assert "index.memory_budget 10KB" in capsys.readouterr().err
    # the auto factory's cells come from index.cell_size and its quantizer from index.hnsw_quantizer_above
    assert main(["run", "index", "--set", f"workdir={work}", "--set", "index.memory_budget=10KB",
                 "--set", "index.cell_size=1000", "--set", "index.hnsw_quantizer_above=0", "--force"]) == 2
    assert "'OPQ16_32,IVF12_HNSW32,PQ16'" in capsys.readouterr().err  # 12,000 vectors / 1,000
    assert not (work / "index" / "image.index").exists()


def test_text_recall_from_captions_when_the_embed_stage_wrote_no_text(tmp_path, monkeypatch, capsys):
    """Without embed.text, the index embeds captions of sampled indexed images with the embed stage's CLIP
    (here a random-init tiny one, rebuilt from its seed) and tunes and reports text-like recall on them; a
    CLIP that cannot be loaded here (a synthetic set) leaves image queries only, saying why."""
    from conftest import TINY_CLIP
    from model import clip
    from pipeline.runner import write_json

    n = 300
    x = clustered_unit_vectors(n, 32, n_clusters=20, spread=0.9, seed=3)
    captions = [f"item {i}" for i in range(n)]
    manifest = write_embed_output(tmp_path, x, shard_size=100, captions=captions)
    write_json(tmp_path / "embed" / "manifest.json", {**manifest, "model": {"model": TINY_CLIP, "pretrained": None,
                                                                            "name": "tiny", "dim": 32}})
    sets = [f"workdir={tmp_path}", "dedup.holdout=0", "index.eval_queries=50"]
    run_stage("dedup", load_config(None, sets))
    encoded, real = [], clip.encode_texts

    def spy(bundle, texts, **kw):
        encoded.append((list(texts), real(bundle, texts, **kw)))
        return encoded[-1][1]

    monkeypatch.setattr(clip, "encode_texts", spy)
    capsys.readouterr()
    run_stage("index", load_config(None, sets))
    assert "index: 3/3 embed shards added, 300 vectors (" in capsys.readouterr().err  # built in this process
    infos = json.loads((tmp_path / "index" / "index_infos.json").read_text())
    (texts, used), = encoded
    assert len(texts) == 50 and len(set(texts)) == 50 and set(texts) <= set(captions)
    rebuilt = real(clip.load_clip_spec({"model": TINY_CLIP, "pretrained": None}), texts)  # the embed stage's CLIP
    np.testing.assert_array_equal(used, rebuilt)
    assert infos["recall"]["text"]["queries"] == 50 and infos["recall"]["text"]["recall@10"] == 1.0  # exact index

    write_json(tmp_path / "embed" / "manifest.json", {**manifest, "model": {"model": "synthetic", "pretrained": None,
                                                                            "name": "synthetic", "dim": 32}})
    capsys.readouterr()
    run_stage("index", load_config(None, sets), force=True)
    assert "index: no text-like queries: the embed stage's CLIP 'synthetic' cannot be loaded here" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "index" / "index_infos.json").read_text())["recall"]) == {"image"}
