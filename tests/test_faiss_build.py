"""pipeline/faiss_build.py: the factory rule and its memory estimate, training, adding, index files."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from faiss_data import D, K, N, build
from pipeline import cell_assign, faiss_build, faiss_ondisk, faiss_search
from pipeline.sizes import parse_bytes


# ---------------------------------------------------------------------------------------------
# the factory rule
# ---------------------------------------------------------------------------------------------


# (n, d, budget, expected factory) -- the paper's case is 400M x 512 in a 128 GB server.
# IVF cells hold n / nlist = 128 vectors (index.cell_size); above 300k vectors the coarse quantizer is HNSW.
FACTORY_CASES = [
    (5_000, 64, "1GB", "Flat"),
    (100_000, 64, "1GB", "HNSW32"),
    (100_000, 512, "220MB", "IVF781,Flat"),  # HNSW (233 MB) no longer fits
    (1_000_000, 64, "1GB", "IVF7812_HNSW32,Flat"),
    (100_000, 512, "100MB", "OPQ256_512,IVF781,PQ256"),
    (3_000_000, 512, "4GB", "OPQ256_512,IVF23438_HNSW32,PQ256"),
    (400_000_000, 512, "128GB", "OPQ256_512,IVF3125000_HNSW32,PQ256"),
    (400_000_000, 512, "64GB", "OPQ128_512,IVF3125000_HNSW32,PQ128"),
    (400_000_000, 512, "20GB", "OPQ16_512,IVF3125000_HNSW32,PQ16"),
    (10_000, 64, "1MB", "OPQ64_64,IVF78,PQ64"),
    (50_000, 768, "20MB", "OPQ256_768,IVF391,PQ256"),
]


@pytest.mark.parametrize("n, d, budget, expected", FACTORY_CASES)
def test_choose_factory_picks_regime_within_budget(n, d, budget, expected):
    factory = faiss_build.choose_factory(n, d, budget)
    assert factory == expected
    assert faiss_build.estimate_index_bytes(factory, n, d) <= parse_bytes(budget)
    if "PQ" in factory:  # the bench target: at most 264 bytes per vector
        assert faiss_build.index_cost(factory, d)[1] <= 264


def test_choose_factory_budget_too_small_names_budget_and_need():
    with pytest.raises(ValueError, match=r"memory_budget=1\.0 GB.*'OPQ16_512,IVF3125000_HNSW32,PQ16'.*needs 16\.9 GB"):
        faiss_build.choose_factory(400_000_000, 512, "1GB")


@pytest.mark.parametrize("n, cell_size, hnsw_above, expected", [
    (500, 1024, 300_000, "IVF1"),  # fewer vectors than one cell: one cell
    (100_000, 1024, 300_000, "IVF98"),  # 100000 / 1024 = 97.7
    (300_000, 1024, 300_000, "IVF293"),
    (300_001, 1024, 300_000, "IVF293_HNSW32"),  # past the threshold: HNSW over the centroids
    (1_000_000, 1024, 300_000, "IVF977_HNSW32"),
    (3_000_000, 1024, 300_000, "IVF2930_HNSW32"),
    (400_000_000, 1024, 300_000, "IVF390625_HNSW32"),
    (400_000_000, 4096, 300_000, "IVF97656_HNSW32"),
    (20_000, 256, 0, "IVF78_HNSW32"),
])
def test_ivf_coarse_cells_of_constant_size(n, cell_size, hnsw_above, expected):
    assert faiss_build.ivf_coarse(n, cell_size, hnsw_above) == expected


def test_cells_stay_the_same_size_as_n_grows():
    """nlist grows with n, so the vectors a search of nprobe cells scans do not (the sqrt rule's grew as sqrt n)."""
    for n in np.geomspace(100_000, 400_000_000, 25).astype(int):
        factory = faiss_build.choose_factory(int(n), 512, "1TB")
        if factory == "HNSW32":
            continue
        nlist = int(factory.split(",")[0].removeprefix("IVF").split("_")[0])
        assert abs(n / nlist - faiss_build.CELL_SIZE) <= faiss_build.CELL_SIZE * 0.01, (n, factory)
        assert factory.endswith("_HNSW32,Flat") == (n > 300_000)
    with pytest.raises(ValueError, match="cell_size 30 is below faiss k-means' minimum of 39"):
        faiss_build.ivf_coarse(10_000, 30)


def test_hnsw_coarse_quantizer_reaches_recall_target_against_brute_force(data, tmp_path):
    """HNSW forced at a small n (cells of 256): nprobe tuned on half the queries reaches recall@10
    0.95 against brute force on the other half, also after a save and a memory-mapped load."""
    factory = faiss_build.ivf_coarse(N, cell_size=256, hnsw_above=0) + ",Flat"
    assert factory == "IVF78_HNSW32,Flat"
    index = build(factory, data["database"], data["rows"], n_train=faiss_build.training_sample_size(factory, N))
    ivf = faiss.extract_index_ivf(index)
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSWFlat) and ivf.nlist == 78
    queries, true = data["queries"], data["true_ids"]
    tuning = faiss_search.tune_nprobe(index, queries[:250], true[:250], K, target_recall=0.95)
    assert tuning.reached and tuning.value < ivf.nlist // 2  # not an exhaustive scan
    faiss_ondisk.save_index(index, tmp_path / "hnsw.index")
    loaded = faiss_ondisk.load_index(tmp_path / "hnsw.index", mmap=True)
    faiss_search.set_nprobe(loaded, tuning.value)
    for searched in (index, loaded):
        found = faiss_search.search(searched, queries[250:], K)[1]
        assert faiss_search.recall_at_k(found, true[250:], K) >= 0.95


def test_two_level_kmeans_above_threshold_reaches_recall(data, monkeypatch):
    """Over TWO_LEVEL_ABOVE cells the coarse centroids come from faiss's two-level k-means (linear in
    n, not quadratic); an IVF,Flat and an OPQ+IVF+PQ trained that way still reach recall@10 0.95."""
    import faiss.contrib.clustering as contrib  # faiss_build imports it where it clusters

    calls = []
    real = contrib.two_level_clustering
    monkeypatch.setattr(contrib, "two_level_clustering", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    monkeypatch.setattr(faiss_build, "TWO_LEVEL_ABOVE", 100)
    for factory in ("IVF156,Flat", "OPQ16_32,IVF156,PQ16"):
        index = build(factory, data["database"], data["rows"], n_train=156 * 39)
        assert faiss.extract_index_ivf(index).quantizer.ntotal == 156
        refine = data["embeddings"] if "PQ" in factory else None
        tuning = faiss_search.tune_nprobe(index, data["queries"], data["true_ids"], K, 0.95, embeddings=refine)
        assert tuning.reached and tuning.value < 156 // 2, (factory, tuning)
    assert calls == [(12, 156), (12, 156)]  # sqrt(156) groups, then 156 cells


def test_estimate_matches_written_index(ivf_flat, ivf_pq, tmp_path):
    for factory, index in (("IVF128,Flat", ivf_flat), ("IVF128,PQ8", ivf_pq)):
        path = tmp_path / "x.index"
        faiss_ondisk.save_index(index, path)
        estimate = faiss_build.estimate_index_bytes(factory, N, D)
        assert abs(os.path.getsize(path) - estimate) / estimate < 0.05, factory


# ---------------------------------------------------------------------------------------------
# training and adding
# ---------------------------------------------------------------------------------------------


def test_training_sample_size():
    assert faiss_build.training_sample_size("Flat", 10**6) == 0
    assert faiss_build.training_sample_size("HNSW32", 10**6) == 0
    assert faiss_build.training_sample_size("IVF1024,Flat", 10**6) == 64 * 1024
    assert faiss_build.training_sample_size("IVF1024,Flat", 20_000) == 20_000
    assert faiss_build.training_sample_size("OPQ16_64,IVF16,PQ16", 10**6) == 256 * 64
    assert faiss_build.ivf_nlist(400_000_000) == 65536  # dedup's candidate index keeps the sqrt rule
    assert faiss_build.ivf_nlist(100) == 2  # >= 39 training points per cell


def test_train_index_needs_enough_vectors(data):
    with pytest.raises(ValueError, match="at least 128 training vectors"):
        faiss_build.train_index("IVF128,Flat", D, data["database"][:100])


def test_opq_index_through_wrappers_and_gpu_style_add(data):
    """The OPQ+IVF+PQ family end to end, and add_batches' GPU path (assign elsewhere, append codes)."""
    database, rows = data["database"][:3000], data["rows"][:3000]
    index = faiss_build.make_index("OPQ4_32,IVF16,PQ4", D)
    faiss.downcast_VectorTransform(index.chain.at(0)).niter = 4  # OPQ's 50 rounds: slow, not ours
    index.train(database)
    twin = faiss.clone_index(index)
    faiss_build.add_batches(index, [(rows, database)])
    ivf = faiss.extract_index_ivf(twin)
    faiss_build._add_preassigned(twin, ivf, faiss_build.centroid_index(ivf), database, rows)  # GPU assigner on CPU
    assert twin.ntotal == index.ntotal == 3000
    for nprobe in (3, 16):
        faiss_search.set_nprobe(index, nprobe)
        faiss_search.set_nprobe(twin, nprobe)
        assert faiss.extract_index_ivf(index).nprobe == nprobe
        a, b = faiss_search.search(index, data["queries"][:50], K), faiss_search.search(twin, data["queries"][:50], K)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert np.isin(a[1], rows).all()


def test_kmeans_hook_used_for_gpu_training_gives_same_index(data):
    """train_index's GPU branch hands k-means a flat index; with a CPU one the result is unchanged."""
    train = data["database"][:5000]
    plain = faiss_build.train_index("IVF64,Flat", D, train, use_gpu=False)
    hooked = faiss_build.make_index("IVF64,Flat", D)
    kmeans_flat = faiss.IndexFlat(D, faiss.METRIC_INNER_PRODUCT)
    faiss_build._train_with_kmeans_index(hooked, train, kmeans_flat)
    assert kmeans_flat.ntotal > 0  # the hook did the assignment
    assert faiss.extract_index_ivf(hooked).clustering_index is None
    np.testing.assert_allclose(
        faiss.extract_index_ivf(hooked).quantizer.reconstruct_n(0, 64),
        faiss.extract_index_ivf(plain).quantizer.reconstruct_n(0, 64), atol=1e-5,
    )


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(data, ivf_flat, ivf_pq, tmp_path, mmap):
    flat = build("Flat", data["database"][:2000], data["rows"][:2000])
    queries = data["queries"][:100]
    for name, index in (("ivf_flat", ivf_flat), ("ivf_pq", ivf_pq), ("flat", flat)):
        path = tmp_path / f"{name}.index"
        faiss_ondisk.save_index(index, path)
        assert os.listdir(tmp_path).count(f"{name}.index") == 1
        assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
        loaded = faiss_ondisk.load_index(path, mmap=mmap)
        expected, got = faiss_search.search(index, queries, K), faiss_search.search(loaded, queries, K)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


def test_save_index_leaves_nothing_on_failure(ivf_flat, tmp_path, monkeypatch):
    def write_half_then_fail(index, path):
        with open(path, "wb") as f:
            f.write(b"half an index")
        raise RuntimeError("disk full")

    faiss_ondisk.save_index(ivf_flat, tmp_path / "image.index")
    before = (tmp_path / "image.index").read_bytes()
    monkeypatch.setattr(faiss, "write_index", write_half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        faiss_ondisk.save_index(ivf_flat, tmp_path / "image.index")
    assert os.listdir(tmp_path) == ["image.index"]  # no temporary file left beside it
    assert (tmp_path / "image.index").read_bytes() == before  # the previous index is untouched
    with pytest.raises(FileNotFoundError, match=r"no faiss index at .*nothing\.index"):
        faiss_ondisk.load_index(tmp_path / "nothing.index")


def _list_of_each_vector(ivf: faiss.IndexIVF, n: int) -> np.ndarray:
    owner = np.full(n, -1, dtype=np.int64)
    for cell in range(ivf.nlist):
        size = ivf.invlists.list_size(cell)
        if size:
            owner[faiss.rev_swig_ptr(ivf.invlists.get_ids(cell), size)] = cell
    return owner


@pytest.mark.parametrize("exact_max_nlist", [faiss_build.EXACT_COARSE_MAX_NLIST, 0])
def test_hnsw_quantizer_puts_vectors_in_their_nearest_cell(exact_max_nlist, monkeypatch):
    """Up to EXACT_COARSE_MAX_NLIST cells vectors are assigned by brute force (all in their nearest
    cell); above it through the graph, built and searched deeper than faiss's defaults (40, 16), with
    which 2.2 % of these vectors land in a cell that is not their nearest centroid's (22 % at 3M)."""
    from faiss_data import clustered_unit_vectors

    monkeypatch.setattr(cell_assign, "EXACT_COARSE_MAX_NLIST", exact_max_nlist)
    x = clustered_unit_vectors(np.random.default_rng(0), 40_000, 64, n_clusters=4_000)
    index = faiss_build.train_index("IVF2048_HNSW32,Flat", 64, x)
    ivf = faiss.extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer)
    assert quantizer.hnsw.efConstruction == faiss_build.QUANTIZER_EF_CONSTRUCTION
    search_ef = quantizer.hnsw.efSearch
    faiss_build.add_batches(index, [(np.arange(len(x)), x)])
    assert quantizer.hnsw.efSearch == search_ef  # the add's deeper search is not left behind
    _, nearest = faiss.knn(x, ivf.quantizer.reconstruct_n(0, ivf.nlist), 1, metric=faiss.METRIC_INNER_PRODUCT)
    assert (_list_of_each_vector(ivf, len(x)) == nearest[:, 0]).mean() >= (1.0 if exact_max_nlist else 0.99)
