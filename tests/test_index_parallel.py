"""index stage, parallel build: partial indexes from Ray tasks (one per embed shard) merged into faiss
on-disk lists give the single-process index's lists and neighbours; a killed build resumes per shard."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from conftest import markers, run_and_kill
from pipeline.config import load_config
from pipeline.faiss_ondisk import is_on_disk
from pipeline.files import StageError
from pipeline.retrieval import Retriever
from pipeline.runner import run_stage
from pipeline.synthetic import clustered_unit_vectors, write_embed_output

N, D, SHARD = 8000, 32, 1000  # 8 embed shards
FACTORY = "IVF32,PQ8x4"  # flat coarse quantizer: its k-means is deterministic, so two builds train the same index
SETS = [f"index.factory={FACTORY}", "index.eval_queries=200", "index.thumbnail_size=0"]


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """Tiny indexes gain nothing from threads, and OpenMP spin-waiting on a loaded 2-core machine made
    PQ training ~30x slower."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    x = clustered_unit_vectors(N, D, n_clusters=100, spread=0.9, seed=3)
    write_embed_output(root, x, shard_size=SHARD)
    # dedup holds 2 % out of the index: the indexed rows are not 0..n-1, and some shards keep fewer
    run_stage("dedup", load_config(None, [f"workdir={root}", "dedup.holdout=0.02"]))
    return root, x


def workdir(root, path):
    shutil.copytree(root / "embed", path / "embed")
    shutil.copytree(root / "dedup", path / "dedup")
    return path


def lists(index):
    """Every inverted list's ids and codes, in order."""
    ivf = faiss.extract_index_ivf(index)
    out = []
    for cell in range(ivf.nlist):
        size = ivf.invlists.list_size(cell)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(cell), size).copy()
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(cell), size * ivf.code_size).copy()
        out.append((ids, codes))
    return out


@pytest.fixture(scope="module")
def single_and_parallel(database, tmp_path_factory, ray_local):
    root, _ = database
    single = workdir(root, tmp_path_factory.mktemp("single"))
    parallel = workdir(root, tmp_path_factory.mktemp("parallel"))
    run_stage("index", load_config(None, [f"workdir={single}", *SETS]))
    run_stage("index", load_config(None, [f"workdir={parallel}", *SETS, "index.parallel_min_vectors=0"]))
    return single / "index", parallel / "index"


def test_merged_on_disk_index_equals_single_process_build(database, single_and_parallel, tmp_path):
    _, x = database
    single_dir, parallel_dir = single_and_parallel
    infos = json.loads((parallel_dir / "index_infos.json").read_text())
    assert infos["parallel_build"]["shards"] == N // SHARD and infos["parallel_build"]["added"] == N // SHARD
    assert list(infos["parallel_build"]["nodes"].values()) == [N // SHARD]  # {the local Ray node: every shard}
    assert json.loads((parallel_dir / "manifest.json").read_text())["nodes"] == infos["parallel_build"]["nodes"]
    assert json.loads((single_dir / "manifest.json").read_text())["nodes"] == {}  # built in this process
    assert infos["ivfdata"] == "image.ivfdata"
    assert (parallel_dir / "image.ivfdata").exists() and not (parallel_dir / "parts").exists()
    assert not (single_dir / "image.ivfdata").exists()
    single, parallel = Retriever(single_dir), Retriever(parallel_dir)
    assert is_on_disk(parallel.index) and not is_on_disk(single.index)
    assert parallel.infos["nprobe"] == single.infos["nprobe"] and parallel.index.ntotal == single.index.ntotal
    # the same inverted lists, entry for entry (ids are embed rows; dedup removed some)
    for (ids_a, codes_a), (ids_b, codes_b) in zip(lists(single.index), lists(parallel.index), strict=True):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(codes_a, codes_b)
    assert sum(len(ids) for ids, _ in lists(parallel.index)) == parallel.index.ntotal < N - 100  # held out: not indexed
    # the same neighbours through the one retrieval path, also after moving the folder
    queries = x[::37].astype(np.float32)
    expected = single.search(queries, 10)
    moved = tmp_path / "elsewhere" / "index"
    shutil.copytree(parallel_dir, moved)
    for retriever in (parallel, Retriever(moved)):
        sims, rows = retriever.search(queries, 10)
        np.testing.assert_array_equal(rows, expected[1])
        np.testing.assert_array_equal(sims, expected[0])
    (moved / "image.ivfdata").rename(tmp_path / "image.ivfdata")  # the folder copied without its lists
    if (parallel_dir / "image.ivfdata").exists():  # the absolute path inside image.index would still find them
        (parallel_dir / "image.ivfdata").rename(tmp_path / "original.ivfdata")
    with pytest.raises(StageError, match=r"image.ivfdata, must sit beside it: copy the whole folder"):
        Retriever(moved)
    (tmp_path / "original.ivfdata").rename(parallel_dir / "image.ivfdata")
    for nprobe in (1, 32):
        faiss.extract_index_ivf(single.index).nprobe = faiss.extract_index_ivf(parallel.index).nprobe = nprobe
        a, b = single.search(queries, 10), parallel.search(queries, 10)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])


def test_killed_parallel_build_resumes_per_shard(database, single_and_parallel, tmp_path, ray_local):
    """A real SIGKILL mid-build; the re-run reuses the parts already written and adds only the rest,
    and its on-disk lists are byte-identical to an uninterrupted build's."""
    root, _ = database
    work = workdir(root, tmp_path / "killed")
    sets = [f"workdir={work}", *SETS, "index.parallel_min_vectors=0", "ray.num_cpus=1"]
    done = work / "index" / "_run" / "done"
    at_kill = run_and_kill("index", sets, markers(done), at_least=2)
    assert 2 <= at_kill < N // SHARD and not (work / "index" / "manifest.json").exists()  # some shards left to add
    stamps = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
    run_stage("index", load_config(None, sets))
    infos = json.loads((work / "index" / "index_infos.json").read_text())
    reused = min(at_kill, N // SHARD)
    assert infos["parallel_build"]["reused"] == reused and infos["parallel_build"]["added"] == N // SHARD - reused
    assert {p.name: p.stat().st_mtime_ns for p in done.glob("*.json") if p.name in stamps} == stamps  # not redone
    _, uninterrupted = single_and_parallel
    assert (work / "index" / "image.ivfdata").read_bytes() == (uninterrupted / "image.ivfdata").read_bytes()


def test_non_ivf_factory_builds_in_one_process_and_clears_leftovers(database, tmp_path, ray_local):
    root, _ = database
    work = workdir(root, tmp_path / "flat")
    (work / "index" / "parts").mkdir(parents=True)
    (work / "index" / "image.ivfdata").write_bytes(b"left by an interrupted parallel build")
    run_stage("index", load_config(None, [f"workdir={work}", "index.factory=HNSW32", "index.eval_queries=100",
                                          "index.thumbnail_size=0", "index.parallel_min_vectors=0"]))
    infos = json.loads((work / "index" / "index_infos.json").read_text())
    assert infos["parallel_build"] is None and infos["ivfdata"] is None
    assert not (work / "index" / "image.ivfdata").exists() and not (work / "index" / "parts").exists()
    assert Retriever(work / "index").index.ntotal == infos["n"]
