"""dedup in partitions (Ray tasks): pairs across partition boundaries equal brute force, resume per
partition gives identical output, and the manifest names the nodes that did the partition tasks."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import dedup
from pipeline.config import load_config
from pipeline.runner import run_stage
from pipeline.synthetic import write_embed_output

D, CLUSTERS, PER_CLUSTER, BOUNDARY_PAIRS = 16, 6, 80, 30


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def boundary_set(seed: int = 0) -> np.ndarray:
    """Six orthogonal clusters (cosine ~0.6 inside one), a few duplicates planted inside clusters, and
    near-identical pairs (cosine ~0.997) placed across the boundary of two clusters: one half a
    little nearer each centre, so the two halves fall into different partitions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(D, dtype=np.float32)[:CLUSTERS]
    x = [unit(c + 0.8 * unit(rng.standard_normal((PER_CLUSTER, D)))) for c in centres]
    x = np.concatenate(x)
    for _ in range(20):  # duplicates inside a cluster
        i, j = rng.integers(0, len(x), 2)
        x[j] = unit(x[i] + 0.05 * unit(rng.standard_normal(D)))
    pairs = []
    for _ in range(BOUNDARY_PAIRS):
        i, j = rng.choice(CLUSTERS, 2, replace=False)
        spread = np.zeros(D, np.float32)
        spread[CLUSTERS:] = unit(rng.standard_normal(D - CLUSTERS))  # orthogonal to every centre
        middle = centres[i] + centres[j] + spread
        pairs += [unit(middle + 0.05 * (centres[i] - centres[j])), unit(middle - 0.05 * (centres[i] - centres[j]))]
    x = np.concatenate([x, np.array(pairs, np.float32)])
    return x[rng.permutation(len(x))].astype(np.float32)


def brute_force_pairs(x16: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    x = x16.astype(np.float32)
    sims = x @ x.T
    a, b = np.nonzero(np.triu(sims > threshold, k=1))
    return set(zip(a.tolist(), b.tolist()))


def found_pairs(workdir) -> set[tuple[int, int]]:
    pairs = []
    for path in sorted((workdir / "dedup" / "pairs").glob("pairs_*.npy")):
        f = np.load(path)
        cosine = f["reason"] == 0
        pairs += list(zip(f["a"][cosine].tolist(), f["b"][cosine].tolist()))
    return set(pairs)


def stored(workdir) -> np.ndarray:
    from pipeline.embeddings import Embeddings

    emb = Embeddings(workdir / "embed")
    return emb[np.arange(len(emb))]


def primary_partitions(workdir, x16: np.ndarray) -> np.ndarray:
    centroids = np.load(workdir / "dedup" / "centroids.npy")
    return np.argmax(x16.astype(np.float32) @ centroids.T, axis=1)


def settings(workdir, *more):
    return load_config(None, [f"workdir={workdir}", "dedup.partition_size=100", "dedup.holdout=0",
                              "dedup.manhattan_threshold=0", *more])


@pytest.fixture(scope="module")
def boundary_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("boundary")
    write_embed_output(root, boundary_set(), shard_size=128)
    return root


def test_pairs_across_partition_boundaries_equal_brute_force(boundary_work, tmp_path, ray_local):
    import shutil

    import ray

    shutil.copytree(boundary_work / "embed", tmp_path / "embed")
    m = run_stage("dedup", settings(tmp_path, "dedup.nprobe=1"))
    x16 = stored(tmp_path)
    truth = brute_force_pairs(x16, 0.9)
    part = primary_partitions(tmp_path, x16)
    across = {(a, b) for a, b in truth if part[a] != part[b]}
    assert m["partitions"] == 6 and len(set(part.tolist())) == 6
    assert len(across) >= BOUNDARY_PAIRS // 2 and len(truth) > len(across)  # both kinds are there
    assert found_pairs(tmp_path) == truth
    assert m["duplicate_pairs"] == len(truth)
    assert m["nodes"] == {ray.get_runtime_context().get_node_id(): 6}
    assert 0 < m["task_peak_rss_mb"] < 4000


def test_without_probes_the_pairs_across_boundaries_are_missed(boundary_work, tmp_path, ray_local):
    """The oracle has teeth: nprobe=0 finds exactly the pairs inside one partition."""
    import shutil

    shutil.copytree(boundary_work / "embed", tmp_path / "embed")
    run_stage("dedup", settings(tmp_path, "dedup.nprobe=0"))
    x16 = stored(tmp_path)
    part = primary_partitions(tmp_path, x16)
    truth = brute_force_pairs(x16, 0.9)
    inside = {(a, b) for a, b in truth if part[a] == part[b]}
    assert found_pairs(tmp_path) == inside and len(inside) < len(truth)


def test_killed_run_resumes_per_partition_with_identical_output(boundary_work, tmp_path, ray_local, monkeypatch):
    import shutil

    for name in ("whole", "killed"):
        shutil.copytree(boundary_work / "embed", tmp_path / name / "embed")
    run_stage("dedup", settings(tmp_path / "whole"))

    real = dedup.run_tasks

    def dies_after_two(*args, **kwargs):  # the driver dies once two partitions are done
        for done, result in enumerate(real(*args, **kwargs)):
            if args[4] == "partition" and done == 2:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(dedup, "run_tasks", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_stage("dedup", settings(tmp_path / "killed"))
    monkeypatch.setattr(dedup, "run_tasks", real)
    out = tmp_path / "killed" / "dedup"
    assert not (out / "keep.parquet").exists() and len(list((out / "_run" / "done").glob("*.json"))) == 2
    kept = {p: p.stat().st_mtime_ns for p in (out / "pairs").glob("*.npy")}
    m = run_stage("dedup", settings(tmp_path / "killed"))
    assert m["resumed_partitions"] == 2
    unchanged = [p for p, t in kept.items() if p.stat().st_mtime_ns == t]
    assert len(unchanged) >= 2  # the finished partitions were not redone
    for name in ["keep.parquet", "centroids.npy"] + [f"pairs/pairs_{p:05d}.npy" for p in range(6)]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / "dedup" / name).read_bytes(), name
    assert not (out / "parts").exists()  # assignments are deleted once keep.parquet is written


def test_no_duplicates_removes_nothing(tmp_path):
    x = unit(np.random.default_rng(0).standard_normal((60, 32))).astype(np.float32)  # cosines ~0 +- 0.2
    write_embed_output(tmp_path, x, shard_size=25)
    m = run_stage("dedup", settings(tmp_path))
    assert m["counts"]["removed"] == 0 and m["duplicate_pairs"] == 0 and found_pairs(tmp_path) == set()


def test_read_npy_rows_equals_indexing(tmp_path):
    from pipeline.dedup_partitions import read_npy_rows, save_array

    rng = np.random.default_rng(1)
    for name, array in {"f16": rng.standard_normal((50, 7)).astype(np.float16), "i64": rng.integers(0, 99, 40),
                        "u8": rng.integers(0, 255, (30, 8), dtype=np.uint8)}.items():
        save_array(tmp_path / f"{name}.npy", array)
        rows = np.r_[rng.integers(0, len(array), 25), 3, 4, 5, 5, len(array) - 1]  # any order, runs, repeats
        np.testing.assert_array_equal(read_npy_rows(tmp_path / f"{name}.npy", rows), array[rows])
        assert read_npy_rows(tmp_path / f"{name}.npy", np.zeros(0, int)).shape == (0, *array.shape[1:])
