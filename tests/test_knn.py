"""Tests for pipeline/knn.py: every fast path against an exact oracle, on planted cluster structure."""

from __future__ import annotations

import os
from collections import deque

import faiss
import numpy as np
import pytest

from pipeline import knn

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


def numpy_top_k(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ database.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Database with non-contiguous rows, held-out image queries, text-like queries, float16 memmap."""
    rng = np.random.default_rng(0)
    x = clustered_unit_vectors(rng, N + N_QUERIES, D)
    database, queries = x[:N], x[N:]
    rows = np.sort(rng.choice(10 * N, N, replace=False)).astype(np.int64)
    # Text embeddings sit off the image distribution: a shared offset plus noise (the modality gap).
    offset = normalize(rng.standard_normal((1, D)))
    text_queries = normalize(queries + 0.8 * offset + 0.3 * rng.standard_normal(queries.shape) / np.sqrt(D))
    path = tmp_path_factory.mktemp("emb") / "img_emb.f16"
    embeddings = np.memmap(path, dtype=np.float16, mode="w+", shape=(int(rows.max()) + 1, D))
    embeddings[rows] = database
    embeddings.flush()
    true_ids = knn.exact_search(database, queries, K, ids=rows)[1]
    text_true_ids = knn.exact_search(database, text_queries, K, ids=rows)[1]
    return dict(
        database=database, queries=queries, text_queries=text_queries, rows=rows,
        embeddings=np.memmap(path, dtype=np.float16, mode="r", shape=embeddings.shape),
        true_ids=true_ids, text_true_ids=text_true_ids,
    )


def build(factory: str, database: np.ndarray, rows: np.ndarray, n_train: int | None = None) -> faiss.Index:
    train = None if n_train is None else database[:n_train]
    index = knn.train_index(factory, database.shape[1], train)
    blocks = ((rows[i : i + 4096], database[i : i + 4096]) for i in range(0, len(rows), 4096))
    added = knn.add_batches(index, blocks)
    assert added == index.ntotal == len(rows)
    return index


@pytest.fixture(scope="module")
def ivf_flat(data):
    n_train = knn.training_sample_size("IVF128,Flat", N)
    return build("IVF128,Flat", data["database"], data["rows"], n_train=n_train)


@pytest.fixture(scope="module")
def ivf_pq(data):
    # 8 bytes/vector for 128 bytes of float32: 16x, twice the paper's compression, cheap to train.
    return build("IVF128,PQ8", data["database"], data["rows"], n_train=5000)


# ---------------------------------------------------------------------------------------------
# sizes and the factory rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("512MB", 512 * 10**6), ("4GB", 4 * 10**9), ("1.5GiB", 3 * 2**29), ("16G", 16 * 2**30),
     ("4 gb", 4 * 10**9), ("1000", 1000), (123456, 123456), ("2TiB", 2 * 2**40)],
)
def test_parse_bytes(text, expected):
    assert knn.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["4 parsecs", "", "GB", "-1GB", "0", True, "1.2.3MB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="memory size"):
        knn.parse_bytes(text)


# (n, d, budget, expected factory) -- the paper's case is 400M x 512 in a 128 GB server.
FACTORY_CASES = [
    (5_000, 64, "1GB", "Flat"),
    (100_000, 64, "1GB", "HNSW32"),
    (100_000, 512, "220MB", "IVF1024,Flat"),  # HNSW (233 MB) no longer fits
    (1_000_000, 64, "1GB", "IVF4096,Flat"),
    (100_000, 512, "100MB", "OPQ256_512,IVF1024,PQ256"),
    (400_000_000, 512, "128GB", "OPQ256_512,IVF65536,PQ256"),
    (400_000_000, 512, "64GB", "OPQ128_512,IVF65536,PQ128"),
    (400_000_000, 512, "12GB", "OPQ16_512,IVF65536,PQ16"),
    (10_000, 64, "1MB", "OPQ64_64,IVF256,PQ64"),
    (50_000, 768, "20MB", "OPQ256_768,IVF1024,PQ256"),
]


@pytest.mark.parametrize("n, d, budget, expected", FACTORY_CASES)
def test_choose_factory_picks_regime_within_budget(n, d, budget, expected):
    factory = knn.choose_factory(n, d, budget)
    assert factory == expected
    assert knn.estimate_index_bytes(factory, n, d) <= knn.parse_bytes(budget)
    if "PQ" in factory:  # the bench target: at most 264 bytes per vector
        assert knn.index_cost(factory, d)[1] <= 264


def test_choose_factory_budget_too_small_names_budget_and_need():
    with pytest.raises(ValueError, match=r"memory_budget=1\.0 GB.*'OPQ16_512,IVF65536,PQ16'.*needs 9\.\d GB"):
        knn.choose_factory(400_000_000, 512, "1GB")


def test_estimate_matches_written_index(ivf_flat, ivf_pq, tmp_path):
    for factory, index in (("IVF128,Flat", ivf_flat), ("IVF128,PQ8", ivf_pq)):
        path = tmp_path / "x.index"
        knn.save_index(index, path)
        estimate = knn.estimate_index_bytes(factory, N, D)
        assert abs(os.path.getsize(path) - estimate) / estimate < 0.05, factory


def test_training_sample_size():
    assert knn.training_sample_size("Flat", 10**6) == 0
    assert knn.training_sample_size("HNSW32", 10**6) == 0
    assert knn.training_sample_size("IVF1024,Flat", 10**6) == 64 * 1024
    assert knn.training_sample_size("IVF1024,Flat", 20_000) == 20_000
    assert knn.training_sample_size("OPQ16_64,IVF16,PQ16", 10**6) == 256 * 64
    assert knn.ivf_nlist(400_000_000) == 65536
    assert knn.ivf_nlist(100) == 2  # >= 39 training points per cell


def test_train_index_needs_enough_vectors(data):
    with pytest.raises(ValueError, match="at least 128 training vectors"):
        knn.train_index("IVF128,Flat", D, data["database"][:100])


# ---------------------------------------------------------------------------------------------
# exact search, recall
# ---------------------------------------------------------------------------------------------


def test_exact_search_matches_numpy_brute_force(data, tmp_path):
    database, queries, rows = data["database"][:3000], data["queries"][:50], data["rows"][:3000]
    path = tmp_path / "db.f16"
    on_disk = np.memmap(path, dtype=np.float16, mode="w+", shape=database.shape)
    on_disk[:] = database
    as_f16 = np.asarray(on_disk, dtype=np.float32)
    sims, ids = knn.exact_search(on_disk, queries, K, ids=rows, block_size=700)  # blocks merged
    ref_sims, ref_positions = numpy_top_k(as_f16, queries, K)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids == rows[ref_positions]).mean() > 0.999  # ties in float16 may swap equal sims
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_exact_search_pads_when_k_exceeds_database(data):
    sims, ids = knn.exact_search(data["database"][:5], data["queries"][:3], 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(sims[:, 5:]).all()
    assert sorted(ids[0, :5]) == [0, 1, 2, 3, 4]


def test_recall_at_k():
    true = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 9, 1], [-1, -1, -1]])
    assert knn.recall_at_k(found, true, 3) == pytest.approx(2 / 6)
    assert knn.recall_at_k(found, true, 1) == 0.0
    assert knn.recall_at_k(np.array([[1, 0], [4, 0]]), true, 1) == 1.0
    assert knn.recall_at_k(true, true, 3) == 1.0


# ---------------------------------------------------------------------------------------------
# approximate indexes against the oracle
# ---------------------------------------------------------------------------------------------


def test_tuned_ivf_reaches_target_recall_with_smallest_nprobe(data, ivf_flat):
    tuning = knn.tune_nprobe(ivf_flat, data["queries"], data["true_ids"], K, target_recall=0.95)
    print(f"IVF128,Flat: {tuning}")
    assert tuning.param == "nprobe" and tuning.reached
    assert tuning.recall >= 0.95 and 1 < tuning.value < 128
    assert faiss.extract_index_ivf(ivf_flat).nprobe == tuning.value  # left set
    knn.set_nprobe(ivf_flat, tuning.value - 1)
    assert knn.recall_at_k(knn.search(ivf_flat, data["queries"], K)[1], data["true_ids"], K) < 0.95
    knn.set_nprobe(ivf_flat, tuning.value)


def test_ivfpq_reaches_target_with_refinement_only(data, ivf_pq):
    plain = knn.tune_nprobe(ivf_pq, data["queries"], data["true_ids"], K, 0.95)
    refined = knn.tune_nprobe(
        ivf_pq, data["queries"], data["true_ids"], K, 0.95, embeddings=data["embeddings"]
    )
    print(f"IVF128,PQ8 plain: {plain}\nIVF128,PQ8 refined: {refined}")
    # 8-byte codes reorder close neighbours: even every cell stays under target, and says so.
    assert not plain.reached and plain.value == 128 and plain.recall < 0.95
    assert refined.reached and refined.recall >= 0.95 and refined.value < 128


def test_refine_recovers_text_query_recall(data, ivf_pq):
    text, truth = data["text_queries"], data["text_true_ids"]
    tuning = knn.tune_nprobe(ivf_pq, text, truth, K, 0.9, embeddings=data["embeddings"])
    assert tuning.reached and tuning.value < 128
    plain = knn.recall_at_k(knn.search(ivf_pq, text, K)[1], truth, K)
    sims, rows = knn.refine_search(ivf_pq, data["embeddings"], text, K, k_factor=4)
    refined = knn.recall_at_k(rows, truth, K)
    print(f"text-like queries at nprobe {tuning.value}: plain recall@10 {plain:.3f}, refined {refined:.3f}")
    assert refined >= 0.9 and refined > plain + 0.1
    assert (np.diff(sims, axis=1) <= 0).all()
    exact = data["embeddings"][rows[:, 0]].astype(np.float32)
    np.testing.assert_allclose(sims[:, 0], np.einsum("ij,ij->i", exact, text), rtol=1e-5, atol=1e-6)


def test_results_are_rows(data, ivf_flat):
    rows = data["rows"]
    probe = data["database"][[0, 17, 4242]]
    sims, ids = knn.search(ivf_flat, probe, K)
    assert list(ids[:, 0]) == list(rows[[0, 17, 4242]])
    assert np.isin(ids, rows).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)


def test_flat_and_hnsw_keep_rows_and_tune_ef(data):
    database, rows, queries = data["database"][:3000], data["rows"][:3000] + 5, data["queries"][:200]
    truth_sims, truth = knn.exact_search(database, queries, K, ids=rows)
    flat = build("Flat", database, rows)
    assert isinstance(flat, faiss.IndexIDMap) and knn.search_param_name(flat) is None
    sims, ids = knn.search(flat, queries, K)
    np.testing.assert_allclose(sims, truth_sims, atol=1e-5)
    assert knn.recall_at_k(ids, truth, K) > 0.999
    assert knn.tune_nprobe(flat, queries, truth, K) == (None, None, pytest.approx(1.0, abs=1e-3), True)
    hnsw = build("HNSW32", database, rows)
    tuning = knn.tune_nprobe(hnsw, queries, truth, K, 0.99)
    assert tuning.param == "efSearch" and tuning.reached and tuning.value >= K
    assert faiss.downcast_index(hnsw.index).hnsw.efSearch == tuning.value
    assert np.isin(knn.search(hnsw, queries, K)[1], rows).all()


def test_opq_index_through_wrappers_and_gpu_style_add(data):
    """The OPQ+IVF+PQ family end to end, and add_batches' GPU path (assign elsewhere, append codes)."""
    database, rows = data["database"][:3000], data["rows"][:3000]
    index = knn.make_index("OPQ4_32,IVF16,PQ4", D)
    faiss.downcast_VectorTransform(index.chain.at(0)).niter = 4  # OPQ's 50 rounds: slow, not ours
    index.train(database)
    twin = faiss.clone_index(index)
    knn.add_batches(index, [(rows, database)])
    ivf = faiss.extract_index_ivf(twin)
    knn._add_preassigned(twin, ivf, knn._centroid_index(ivf), database, rows)  # GPU assigner on CPU
    assert twin.ntotal == index.ntotal == 3000
    for nprobe in (3, 16):
        knn.set_nprobe(index, nprobe)
        knn.set_nprobe(twin, nprobe)
        assert faiss.extract_index_ivf(index).nprobe == nprobe
        a, b = knn.search(index, data["queries"][:50], K), knn.search(twin, data["queries"][:50], K)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert np.isin(a[1], rows).all()


def test_kmeans_hook_used_for_gpu_training_gives_same_index(data):
    """train_index's GPU branch hands k-means a flat index; with a CPU one the result is unchanged."""
    train = data["database"][:5000]
    plain = knn.train_index("IVF64,Flat", D, train, use_gpu=False)
    hooked = knn.make_index("IVF64,Flat", D)
    kmeans_flat = faiss.IndexFlat(D, faiss.METRIC_INNER_PRODUCT)
    knn._train_with_kmeans_index(hooked, train, kmeans_flat)
    assert kmeans_flat.ntotal > 0  # the hook did the assignment
    assert faiss.extract_index_ivf(hooked).clustering_index is None
    np.testing.assert_allclose(
        faiss.extract_index_ivf(hooked).quantizer.reconstruct_n(0, 64),
        faiss.extract_index_ivf(plain).quantizer.reconstruct_n(0, 64), atol=1e-5,
    )


def test_set_nprobe_rejects_non_ivf():
    with pytest.raises(ValueError, match="not an IVF index"):
        knn.set_nprobe(knn.make_index("Flat", D), 8)


def test_gpu_support_rules():
    assert knn.gpu_unsupported_reason(knn.make_index("IVF16,Flat", 64)) is None
    assert knn.gpu_unsupported_reason(knn.make_index("Flat", 64)) is None
    assert knn.gpu_unsupported_reason(knn.make_index("OPQ64_256,IVF16,PQ64", 256)) is None
    assert "256" in knn.gpu_unsupported_reason(knn.make_index("OPQ256_512,IVF16,PQ256", 512))
    assert "HNSW" in knn.gpu_unsupported_reason(knn.make_index("HNSW32", 64))
    index = knn.make_index("IVF16,Flat", 64)
    if not knn.gpu_available():
        assert knn.index_for_search(index) is index
        with pytest.raises(RuntimeError, match="no GPU"):
            knn.index_for_search(index, use_gpu=True)


# ---------------------------------------------------------------------------------------------
# batching, neighbours helpers
# ---------------------------------------------------------------------------------------------


def test_search_batches_equal_one_search(data, ivf_pq):
    queries = data["queries"][:300].astype(np.float16)  # float16 input is cast
    whole = knn.search(ivf_pq, queries, K)
    parts = list(knn.search_batches(ivf_pq, queries, K, batch_size=128))
    assert len(parts) == 3
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])
    refined = knn.refine_search(ivf_pq, data["embeddings"], queries, K)
    parts = list(knn.search_batches(ivf_pq, queries, K, batch_size=128, embeddings=data["embeddings"]))
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), refined[1])


def test_refine_handles_missing_candidates():
    embeddings = normalize(np.random.default_rng(1).standard_normal((10, 4)))
    candidates = np.array([[3, -1, 7, -1], [-1, -1, -1, -1]])
    sims, rows = knn.rerank(embeddings, embeddings[[7, 0]], candidates, 3)
    assert list(rows[0]) == [7, 3, -1] and list(rows[1]) == [-1, -1, -1]
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-6) and np.isneginf(sims[0, 2])


def test_drop_self_and_candidate_pairs():
    sims = np.array([[1.0, 0.9, 0.8], [0.95, 0.9, 0.1]], dtype=np.float32)
    rows = np.array([[10, 11, 12], [10, 13, -1]])
    query_rows = np.array([10, 20])
    kept_sims, kept_rows = knn.drop_self(sims, rows, query_rows, 2)
    assert kept_rows.tolist() == [[11, 12], [10, 13]]
    np.testing.assert_allclose(kept_sims, [[0.9, 0.8], [0.95, 0.9]])
    pairs, pair_sims = knn.candidate_pairs(query_rows, sims, rows)
    assert pairs.tolist() == [[10, 11], [10, 12], [20, 10], [20, 13]]
    assert pair_sims.tolist() == pytest.approx([0.9, 0.8, 0.95, 0.9])


# ---------------------------------------------------------------------------------------------
# dedup helpers
# ---------------------------------------------------------------------------------------------


def bfs_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Reference: breadth-first search, label = smallest node of the component."""
    neighbours = [[] for _ in range(n)]
    for a, b in pairs:
        neighbours[a].append(b)
        neighbours[b].append(a)
    labels = np.full(n, -1)
    for start in range(n):  # ascending, so the first node reached is the smallest
        if labels[start] >= 0:
            continue
        labels[start] = start
        queue = deque([start])
        while queue:
            for nxt in neighbours[queue.popleft()]:
                if labels[nxt] < 0:
                    labels[nxt] = start
                    queue.append(nxt)
    return labels


@pytest.mark.parametrize("n, m", [(3000, 1500), (3000, 2900), (500, 5000), (10, 0)])
def test_connected_components_match_bfs(n, m):
    rng = np.random.default_rng(n + m)
    pairs = rng.integers(0, n, size=(m, 2))
    np.testing.assert_array_equal(knn.connected_components(n, pairs), bfs_components(n, pairs))


def test_connected_components_long_shuffled_chain():
    n = 5000
    perm = np.random.default_rng(3).permutation(n)
    pairs = np.stack([perm[:-1], perm[1:]], axis=1)[::-1]
    assert (knn.connected_components(n, pairs) == 0).all()


def test_connected_components_over_row_ids():
    ids = np.array([907, 12, 55, 300, 41])
    pairs = np.array([[907, 300], [55, 907], [12, 12]])
    assert knn.connected_components(ids, pairs).tolist() == [55, 12, 55, 55, 41]
    with pytest.raises(ValueError, match="not in the id list"):
        knn.connected_components(ids, np.array([[907, 1]]))
    with pytest.raises(ValueError, match="unique"):
        knn.connected_components(np.array([1, 1]), np.zeros((0, 2)))


def test_keep_representatives_keeps_smallest_row():
    labels = np.array([7, 3, 7, 3, 9, 7])
    rows = np.array([50, 8, 20, 4, 99, 31])
    assert knn.keep_representatives(labels, rows).tolist() == [False, False, True, True, True, False]
    assert knn.representative_rows(labels, rows).tolist() == [20, 4, 20, 4, 99, 20]


def test_phash_distances_match_bit_by_bit():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(200, 8), dtype=np.uint8)
    b = rng.integers(0, 256, size=(200, 8), dtype=np.uint8)
    reference = [sum(bin(x ^ y).count("1") for x, y in zip(ra, rb)) for ra, rb in zip(a, b)]
    assert knn.phash_distances(a, b).tolist() == reference
    as_u64 = a.view(np.uint64).ravel()  # one integer per 64-bit hash
    assert knn.phash_distances(as_u64, b.view(np.uint64).ravel()).tolist() == reference
    hex_hashes = [bytes(row).hex() for row in a[:3]]
    np.testing.assert_array_equal(knn.phash_bits_from_hex(hex_hashes), a[:3])
    assert knn.phash_distances(a[0], a[0]) == 0


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(data, ivf_flat, ivf_pq, tmp_path, mmap):
    flat = build("Flat", data["database"][:2000], data["rows"][:2000])
    queries = data["queries"][:100]
    for name, index in (("ivf_flat", ivf_flat), ("ivf_pq", ivf_pq), ("flat", flat)):
        path = tmp_path / f"{name}.index"
        knn.save_index(index, path)
        assert os.listdir(tmp_path).count(f"{name}.index") == 1
        assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
        loaded = knn.load_index(path, mmap=mmap)
        expected, got = knn.search(index, queries, K), knn.search(loaded, queries, K)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


def test_save_index_leaves_nothing_on_failure(ivf_flat, tmp_path):
    with pytest.raises(RuntimeError):
        knn.save_index(ivf_flat, tmp_path / "missing_dir" / "image.index")
    assert not (tmp_path / "missing_dir").exists()
    with pytest.raises(FileNotFoundError):
        knn.load_index(tmp_path / "nothing.index")
