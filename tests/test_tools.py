"""tools/: make_synthetic_embeddings writes an embed output the pipeline reads; bench.py --help runs;
bench_stream's synthetic pack is one the trainer reads; gpu_check on a CPU machine skips every check."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.embeddings import Embeddings, read_metadata

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_synthetic_embeddings_writes_an_embed_output_the_reader_accepts(tmp_path):
    subprocess.run([sys.executable, str(TOOLS / "make_synthetic_embeddings.py"), "--n", "2000", "--workdir", str(tmp_path),
                    "--shard-size", "700", "--text"], check=True, capture_output=True)
    emb = Embeddings(tmp_path / "embed")
    assert emb.shape == (2000, 512) and len(emb.shards) == 3
    x = emb[np.arange(2000)].astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    meta = read_metadata(emb.dir, emb.manifest, ["key", "row", "phash"])
    assert list(meta["row"]) == list(range(2000)) and len(set(meta["key"])) == 2000
    text = Embeddings(tmp_path / "embed", kind="text")
    assert text.shape == (2000, 512)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    nearest = sims.max(axis=1)
    assert 0.01 < (nearest > 0.95).mean() < 0.1  # planted near-copies (2% of rows, and their originals)
    assert np.median(nearest) < 0.9  # the rest are neighbours, not duplicates (dedup keeps them)
    own = (text[np.arange(2000)].astype(np.float32) * x).sum(axis=1)
    assert 0.3 < np.median(own) < 0.8  # text-like queries sit off the image distribution


def test_synthetic_rows_do_not_depend_on_how_they_are_sliced():
    tool = load_tool("make_synthetic_embeddings")
    vectors = tool.SyntheticEmbeddings(2500, d=16, block_rows=1000, seed=3)
    whole = vectors[0:2500]
    np.testing.assert_array_equal(vectors[900:1100], whole[900:1100])
    np.testing.assert_array_equal(np.asarray(vectors), whole)
    np.testing.assert_array_equal(vectors.text[1999:2001], vectors.text[0:2500][1999:2001])


def test_bench_help_runs():
    out = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--help"], check=True, capture_output=True, text=True)
    assert "--quick" in out.stdout and "--only" in out.stdout


def test_bench_stream_writes_a_synthetic_pack_the_trainer_reads(tmp_path, monkeypatch):
    from model.data import read_pack_shard
    from model.stream import StreamDataset
    bench_stream = load_tool("bench_stream")
    monkeypatch.setattr(bench_stream, "SHARD", 10)
    assert bench_stream.write_pack(tmp_path / "pack", 25) == [10, 10, 5]
    paths = sorted((tmp_path / "pack").glob("*.tar"))
    shard = read_pack_shard(paths[2])
    assert shard["keys"] == [f"{i:09d}" for i in range(20, 25)]
    assert shard["image"].shape == (5, 32, 32, 3) and shard["nbr"].shape == (5, 10, 64)
    data = StreamDataset(paths, 4, shuffle_buffer=3, shard_sizes=[10, 10, 5])
    assert data.shapes == {"resolution": 32, "k": 10, "clip_dim": 64}
    assert bench_stream.write_pack(tmp_path / "pack", 25) == [10, 10, 5]  # sizes.json: written once


def test_measure_dedup_recall_exact_pairs_and_recall(tmp_path):
    from pipeline.synthetic import clustered_unit_vectors, write_embed_output

    tool = load_tool("measure_dedup_recall")
    x = clustered_unit_vectors(300, 8, n_clusters=30, spread=0.3, seed=0)
    write_embed_output(tmp_path, x, shard_size=70)
    emb = Embeddings(tmp_path / "embed")
    x32 = emb[np.arange(300)].astype(np.float32)
    sims = x32 @ x32.T
    truth = np.argwhere(np.triu(sims > 0.95, k=1))
    assert len(truth) > 100
    np.testing.assert_array_equal(tool.exact_pairs(emb, 0.95, np.arange(300), block=64), truth)
    queries = np.arange(0, 300, 7)
    touching = truth[np.isin(truth, queries).any(axis=1)]
    np.testing.assert_array_equal(tool.exact_pairs(emb, 0.95, queries), touching)
    found = np.concatenate([truth[::2], [[0, 299]]])  # half the pairs and one that is no pair
    r = tool.compare(found, touching, queries)
    expected = int(np.isin(truth[::2], queries).any(axis=1).sum())
    assert (r["found_of_exact"], r["exact_pairs"], r["extra"]) == (expected, len(touching), 1)


def test_neighbour_strata_bands_prompts_by_their_closest_indexed_image(tmp_path, capsys):
    """Each prompt's band is its held-out image's highest cosine to a kept image (brute force here), and
    a band's figure is neighbours - text alone over its prompts' images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.evaluate_compare import Graded, save_features
    from pipeline.synthetic import write_embed_output

    strata = load_tool("neighbour_strata")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    write_embed_output(tmp_path, base, shard_size=4)
    keep = np.array([True, True, True, True, False, False, False, False])
    (tmp_path / "dedup").mkdir()
    pq.write_table(pa.table({"row": np.arange(8), "keep": keep}), tmp_path / "dedup" / "keep.parquet")
    # prompts 0, 1: a held-out image that is a kept image (cosine 1); prompts 2, 3: orthogonal to all kept ones
    real = np.stack([base[0], base[1], np.zeros(16), np.zeros(16)]).astype(np.float32)
    kept_basis = np.linalg.svd(base[:4])[2]  # rows 4.. of vt span the complement of the kept images
    real[2], real[3] = kept_basis[4], kept_basis[5]
    text = np.eye(4, 16, dtype=np.float32)
    prompt_of = np.repeat(np.arange(4), 2)
    right, wrong = text[prompt_of], text[(prompt_of + 1) % 4]
    with_knn = np.where(prompt_of[:, None] < 2, right, wrong)  # the neighbours fix the prompts with a near twin
    for sub, generated in (("evaluate", with_knn), ("evaluate/no_knn", wrong)):
        (tmp_path / sub).mkdir(parents=True)
        save_features(tmp_path / sub, Graded(generated=generated, prompt_of=prompt_of, text=text, real=real))
        (tmp_path / sub / "metrics.json").write_text("{}")
    closest, _, _ = strata.fold_effects(tmp_path)
    np.testing.assert_allclose(closest, [1, 1, 0, 0], atol=1e-3)
    assert strata.main([str(tmp_path), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "closest cosine [0.00, 0.90): 2 prompts; neighbours - text alone: acc@5 +0.000" in out
    assert "closest cosine [0.98, 1.00): 2 prompts; neighbours - text alone: acc@5 +0.000" in out
    assert "acc@1 +1.000 [+1.000, +1.000]" in out and "acc@1 +0.000 [+0.000, +0.000]" in out


def project_imports(paths) -> list[tuple[str, str, str]]:
    """(file, module, name) of every ``from pipeline.X import name`` / ``from model.X import name`` in
    ``paths``, function-local imports included (the benchmarks import lazily)."""
    import ast

    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "model"):
                found += [(path.name, node.module, alias.name) for alias in node.names]
    return found


def test_every_project_name_the_tools_import_exists():
    # tools/benchmarks import pipeline modules inside functions, so a name moved in a refactor only
    # fails when that benchmark section runs (pipeline.runner.STAGES, moved to pipeline.stages, broke
    # bench.py's train_input and sampling sections this way)
    imports = project_imports(sorted(TOOLS.rglob("*.py")))
    assert len(imports) > 50  # the walk found the benchmarks' function-local imports too
    missing = [f"{file}: from {module} import {name}" for file, module, name in imports if not resolves(module, name)]
    assert missing == []


def resolves(module: str, name: str) -> bool:
    """``from module import name`` works: an attribute, or a submodule of a package."""
    imported = importlib.import_module(module)
    if name == "*" or hasattr(imported, name):
        return True
    return hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None


def test_bench_train_step_section_times_every_variant_of_bench_train(monkeypatch):
    # the section unpacks bench_train.VARIANTS; when a field was added there (space-to-depth) it
    # failed with "too many values to unpack" and the bench printed an error row instead of figures
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(TOOLS))
    import bench_train
    from benchmarks.train_step import section_train_step

    seen = []
    monkeypatch.setattr(bench_train, "ours", lambda config, data, steps: seen.append(("ours", config)) or 2.0)
    monkeypatch.setattr(bench_train, "bare", lambda config, data, steps: seen.append(("bare", config)) or 4.0)
    rows = []
    section_train_step(SimpleNamespace(args=SimpleNamespace(quick=True, reps=1), add=rows.append))
    assert [row.figure for row in rows] == [f"samples/s, demo U-Net, {name}" for name in bench_train.VARIANTS]
    assert [(row.ours, row.reference) for row in rows] == [(2.0, 4.0)] * len(bench_train.VARIANTS)
    variants = list(bench_train.VARIANTS.values())
    assert [(c.resolution, c.space_to_depth) for who, c in seen if who == "ours"] == [(v[0], v[2]) for v in variants]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the checks themselves run (minutes)")
def test_gpu_check_on_cpu_skips_every_check_and_only_limits_them(tmp_path, capsys):
    gpu_check = load_tool("gpu_check")
    assert gpu_check.main(["--out", str(tmp_path / "all")]) == 0
    report = json.loads((tmp_path / "all" / "gpu_check.json").read_text())
    assert report["device"] == "no CUDA" and list(report["checks"]) == gpu_check.NAMES
    assert all(entry == {"status": "skipped", "reason": "skipped: no CUDA"} for entry in report["checks"].values())
    assert gpu_check.main(["--out", str(tmp_path / "some"), "--only", "sample_cuda,faiss_gpu_build"]) == 0
    some = json.loads((tmp_path / "some" / "gpu_check.json").read_text())
    assert list(some["checks"]) == ["train_bf16", "sample_cuda", "faiss_gpu_build"]  # sample_cuda needs train_bf16
    assert "SKIP  faiss_gpu_build" in capsys.readouterr().out.splitlines()[-1]
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path / "bad"), "--only", "no_such_check"])


def test_gpu_check_records_a_traceback_and_skips_what_needs_a_failed_check(monkeypatch):
    gpu_check = load_tool("gpu_check")

    def broken(ctx):
        raise KeyError("checkpoint")

    entry = gpu_check.run_check(broken, ctx=None)
    assert entry["status"] == "fail" and entry["error"] == "KeyError: 'checkpoint'"
    assert any("broken" in line for line in entry["traceback"]) and len(entry["traceback"]) <= 15
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    assert gpu_check.skip_reason(("train_bf16",), (), {"train_bf16": {"status": "fail"}}) == "train_bf16 failed"
    assert gpu_check.skip_reason(("train_bf16",), (), {}) == "train_bf16 did not run"
    assert gpu_check.skip_reason((), ("no_such_package_xyz",), {}) == "no_such_package_xyz not installed"
