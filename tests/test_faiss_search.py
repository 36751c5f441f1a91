"""pipeline/faiss_search.py: every fast path against an exact oracle, on planted cluster structure."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from faiss_data import D, K, build, normalize
from pipeline import cell_assign, faiss_build, faiss_search


def numpy_top_k(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ database.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


# ---------------------------------------------------------------------------------------------
# exact search, recall
# ---------------------------------------------------------------------------------------------


def test_exact_search_matches_numpy_brute_force(data, tmp_path):
    database, queries, rows = data["database"][:3000], data["queries"][:50], data["rows"][:3000]
    path = tmp_path / "db.f16"
    on_disk = np.memmap(path, dtype=np.float16, mode="w+", shape=database.shape)
    on_disk[:] = database
    as_f16 = np.asarray(on_disk, dtype=np.float32)
    sims, ids = faiss_search.exact_search(on_disk, queries, K, ids=rows, block_size=700)  # blocks merged
    ref_sims, ref_positions = numpy_top_k(as_f16, queries, K)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids == rows[ref_positions]).mean() > 0.999  # ties in float16 may swap equal sims
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_exact_search_pads_when_k_exceeds_database(data):
    sims, ids = faiss_search.exact_search(data["database"][:5], data["queries"][:3], 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(sims[:, 5:]).all()
    assert sorted(ids[0, :5]) == [0, 1, 2, 3, 4]


def test_recall_at_k():
    true = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 9, 1], [-1, -1, -1]])
    assert faiss_search.recall_at_k(found, true, 3) == pytest.approx(2 / 6)
    assert faiss_search.recall_at_k(found, true, 1) == 0.0
    assert faiss_search.recall_at_k(np.array([[1, 0], [4, 0]]), true, 1) == 1.0
    assert faiss_search.recall_at_k(true, true, 3) == 1.0


# ---------------------------------------------------------------------------------------------
# approximate indexes against the oracle
# ---------------------------------------------------------------------------------------------


def test_tuned_ivf_reaches_target_recall_with_smallest_nprobe(data, ivf_flat):
    tuning = faiss_search.tune_nprobe(ivf_flat, data["queries"], data["true_ids"], K, target_recall=0.95)
    print(f"IVF128,Flat: {tuning}")
    assert tuning.param == "nprobe" and tuning.reached
    assert tuning.recall >= 0.95 and 1 < tuning.value < 128
    assert faiss.extract_index_ivf(ivf_flat).nprobe == tuning.value  # left set
    faiss_search.set_nprobe(ivf_flat, tuning.value - 1)
    found = faiss_search.search(ivf_flat, data["queries"], K)[1]
    assert faiss_search.recall_at_k(found, data["true_ids"], K) < 0.95
    faiss_search.set_nprobe(ivf_flat, tuning.value)


def test_ivfpq_reaches_target_with_refinement_only(data, ivf_pq):
    plain = faiss_search.tune_nprobe(ivf_pq, data["queries"], data["true_ids"], K, 0.95)
    refined = faiss_search.tune_nprobe(
        ivf_pq, data["queries"], data["true_ids"], K, 0.95, embeddings=data["embeddings"]
    )
    print(f"IVF128,PQ8 plain: {plain}\nIVF128,PQ8 refined: {refined}")
    # 8-byte codes reorder close neighbours: even every cell stays under target, and says so.
    assert not plain.reached and plain.value == 128 and plain.recall < 0.95
    assert refined.reached and refined.recall >= 0.95 and refined.value < 128


def test_refine_recovers_text_query_recall(data, ivf_pq):
    text, truth = data["text_queries"], data["text_true_ids"]
    tuning = faiss_search.tune_nprobe(ivf_pq, text, truth, K, 0.9, embeddings=data["embeddings"])
    assert tuning.reached and tuning.value < 128
    plain = faiss_search.recall_at_k(faiss_search.search(ivf_pq, text, K)[1], truth, K)
    sims, rows = faiss_search.refine_search(ivf_pq, data["embeddings"], text, K, k_factor=4)
    refined = faiss_search.recall_at_k(rows, truth, K)
    print(f"text-like queries at nprobe {tuning.value}: plain recall@10 {plain:.3f}, refined {refined:.3f}")
    assert refined >= 0.9 and refined > plain + 0.1
    assert (np.diff(sims, axis=1) <= 0).all()
    exact = data["embeddings"][rows[:, 0]].astype(np.float32)
    np.testing.assert_allclose(sims[:, 0], np.einsum("ij,ij->i", exact, text), rtol=1e-5, atol=1e-6)


def test_results_are_rows(data, ivf_flat):
    rows = data["rows"]
    probe = data["database"][[0, 17, 4242]]
    sims, ids = faiss_search.search(ivf_flat, probe, K)
    assert list(ids[:, 0]) == list(rows[[0, 17, 4242]])
    assert np.isin(ids, rows).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)


def test_flat_and_hnsw_keep_rows_and_tune_ef(data):
    database, rows, queries = data["database"][:3000], data["rows"][:3000] + 5, data["queries"][:200]
    truth_sims, truth = faiss_search.exact_search(database, queries, K, ids=rows)
    flat = build("Flat", database, rows)
    assert isinstance(flat, faiss.IndexIDMap) and faiss_search.search_param_name(flat) is None
    sims, ids = faiss_search.search(flat, queries, K)
    np.testing.assert_allclose(sims, truth_sims, atol=1e-5)
    assert faiss_search.recall_at_k(ids, truth, K) > 0.999
    assert faiss_search.tune_nprobe(flat, queries, truth, K) == (None, None, pytest.approx(1.0, abs=1e-3), True)
    hnsw = build("HNSW32", database, rows)
    tuning = faiss_search.tune_nprobe(hnsw, queries, truth, K, 0.99)
    assert tuning.param == "efSearch" and tuning.reached and tuning.value >= K
    assert faiss.downcast_index(hnsw.index).hnsw.efSearch == tuning.value
    assert np.isin(faiss_search.search(hnsw, queries, K)[1], rows).all()


def test_set_nprobe_rejects_non_ivf():
    with pytest.raises(ValueError, match="not an IVF index"):
        faiss_search.set_nprobe(faiss_build.make_index("Flat", D), 8)


def test_gpu_support_rules():
    reason = faiss_search.gpu_unsupported_reason
    assert reason(faiss_build.make_index("IVF16,Flat", 64)) is None
    assert reason(faiss_build.make_index("Flat", 64)) is None
    assert reason(faiss_build.make_index("OPQ64_256,IVF16,PQ64", 256)) is None
    assert "256" in reason(faiss_build.make_index("OPQ256_512,IVF16,PQ256", 512))
    assert "HNSW" in reason(faiss_build.make_index("HNSW32", 64))
    index = faiss_build.make_index("IVF16,Flat", 64)
    if not faiss_build.gpu_available():
        assert faiss_search.index_for_search(index) is index
        with pytest.raises(RuntimeError, match="no GPU"):
            faiss_search.index_for_search(index, use_gpu=True)


# ---------------------------------------------------------------------------------------------
# re-ranking, dropping the query itself
# ---------------------------------------------------------------------------------------------


def test_refine_handles_missing_candidates():
    embeddings = normalize(np.random.default_rng(1).standard_normal((10, 4)))
    candidates = np.array([[3, -1, 7, -1], [-1, -1, -1, -1]])
    sims, rows = faiss_search.rerank(embeddings, embeddings[[7, 0]], candidates, 3)
    assert list(rows[0]) == [7, 3, -1] and list(rows[1]) == [-1, -1, -1]
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-6) and np.isneginf(sims[0, 2])


def test_drop_self():
    sims = np.array([[1.0, 0.9, 0.8], [0.95, 0.9, 0.1]], dtype=np.float32)
    rows = np.array([[10, 11, 12], [10, 13, -1]])
    kept_sims, kept_rows = faiss_search.drop_self(sims, rows, np.array([10, 20]), 2)
    assert kept_rows.tolist() == [[11, 12], [10, 13]]
    np.testing.assert_allclose(kept_sims, [[0.9, 0.8], [0.95, 0.9]])


# ---------------------------------------------------------------------------------------------
# bulk search (the neighbours stage), the HNSW quantizer's efSearch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64_HNSW32,Flat"])
def test_bulk_search_equals_search_on_ivf_flat(data, factory, monkeypatch):
    """List by list (big_batch_search) must give what index.search gives: same rows, same sims, same
    -1 / -inf padding when k exceeds what the probed cells hold; rows are ids, not positions."""
    index = build(factory, data["database"], data["rows"], n_train=5000)
    faiss_search.set_nprobe(index, 4)
    queries = data["database"][:2000]  # 2000 x 4 probes over 64 cells: the bulk path is taken
    blocks = count_block_searches(monkeypatch)
    for k in (10, 2000):
        want_sims, want_rows = faiss_search.search(index, queries, k)
        sims, rows = faiss_search.bulk_search(index, queries, k)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-6)
    assert len(blocks) > 64  # list by list: each probed list scored once per call, for both k
    assert (rows == -1).any() and np.isneginf(sims[rows == -1]).all()
    assert set(rows[rows >= 0].ravel()) <= set(data["rows"])


def count_block_searches(monkeypatch) -> list:
    """Every list scored by the list-by-list path appends to the returned list."""
    from faiss.contrib.big_batch_search import BlockComputer

    blocks, real = [], BlockComputer.block_search
    monkeypatch.setattr(BlockComputer, "block_search", lambda self, *a, **k: blocks.append(1) or real(self, *a, **k))
    return blocks


class CountingAssigner:
    """A coarse assigner (a flat index of the centroids) that counts its searches."""

    def __init__(self, index: faiss.Index):
        self.index, self.calls = index, 0

    def search(self, x, k):
        self.calls += 1
        return self.index.search(x, k)


def test_bulk_search_with_exact_coarse_probes_the_exact_nearest_cells(data):
    """With exact_coarse, the queries go to their truly nearest cells: the same results as the same
    lists searched through a flat quantizer of the same centroids, where the HNSW graph (searched
    shallowly here) misses some cells."""
    index = build("IVF512_HNSW32,Flat", data["database"], data["rows"], n_train=20_000)
    ivf = faiss.extract_index_ivf(index)
    faiss_search.set_nprobe(index, 4)
    faiss.downcast_index(ivf.quantizer).hnsw.efSearch = 4  # a shallow graph search: some cells missed
    flat = faiss_search.exact_coarse(index)
    assert flat is not None and flat.ntotal == 512
    oracle = faiss.IndexIVFFlat(flat, ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    oracle.replace_invlists(ivf.invlists, False)  # the same lists, not owned
    oracle.is_trained, oracle.ntotal, oracle.nprobe = True, ivf.ntotal, 4
    queries = data["database"][:2000]
    want_sims, want_rows = oracle.search(queries, K)
    sims, rows = faiss_search.bulk_search(index, queries, K, flat)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-6)
    assert (faiss_search.bulk_search(index, queries, K)[1] != want_rows).any()  # the graph alone differs
    assert faiss_search.exact_coarse(build("IVF64,Flat", data["database"], data["rows"], n_train=5000)) is None


def test_bulk_search_falls_back_where_it_cannot_help(data, ivf_pq, monkeypatch):
    """PQ codes (big_batch_search scores IP residuals wrongly) and small batches use index.search."""
    faiss_search.set_nprobe(ivf_pq, 8)
    many = data["queries"][:500]  # 500 x 8 probes over 128 cells: large enough for the list-by-list path
    assert len(many) * 8 >= faiss_search.BULK_MIN_QUERIES_PER_LIST * faiss.extract_index_ivf(ivf_pq).nlist
    flat = build("IVF64,Flat", data["database"], data["rows"], n_train=5000)
    faiss_search.set_nprobe(flat, 4)
    few = data["queries"][:12]  # 12 x 4 probes over 64 cells: too few
    assert len(few) * 4 < faiss_search.BULK_MIN_QUERIES_PER_LIST * 64
    blocks = count_block_searches(monkeypatch)
    for index, queries in ((ivf_pq, many), (flat, few)):
        sims, rows = faiss_search.bulk_search(index, queries, K)
        want_sims, want_rows = faiss_search.search(index, queries, K)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(sims, want_sims)
    assert blocks == []  # neither went list by list


@pytest.mark.parametrize("factory, batch", [("OPQ8_32,IVF64,PQ8", 2000), ("IVF64,Flat", 12)])
def test_bulk_search_with_a_coarse_assigner_searches_its_cells_on_any_ivf(data, factory, batch):
    """Where the list-by-list path does not apply (OPQ+IVF+PQ, the paper's factory; batches too small),
    a coarse assigner (on a GPU under neighbours.gpus_per_actor; a CPU flat copy here) still picks the
    cells, through faiss's search_preassigned: over a flat quantizer's own centroids that is exactly what
    index.search finds."""
    index = build(factory, data["database"], data["rows"], n_train=5000)
    faiss_search.set_nprobe(index, 8)
    queries = data["database"][:batch]
    assert batch * 8 < faiss_search.BULK_MIN_QUERIES_PER_LIST * 64 or factory.startswith("OPQ")  # not list by list
    coarse = CountingAssigner(faiss_build.centroid_index(faiss.extract_index_ivf(index)))
    want_sims, want_rows = faiss_search.search(index, queries, K)
    sims, rows = faiss_search.bulk_search(index, queries, K, coarse)
    assert coarse.calls == 1  # the assigner, not the index's own quantizer, picked the cells
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-6)
    assert (rows[:, 0] == data["rows"][:batch]).mean() > 0.5  # a database vector mostly finds itself first
    few = faiss.extract_index_ivf(index)
    few.nprobe = 1  # one cell: fewer than k found are padded as search pads them
    sims, rows = faiss_search.bulk_search(index, queries, 5000, coarse)
    assert (rows == -1).any() and np.isneginf(sims[rows == -1]).all()
    np.testing.assert_array_equal(rows, faiss_search.search(index, queries, 5000)[1])


def test_gpu_cell_assigner_says_what_is_missing(ivf_pq, monkeypatch):
    """Without faiss-gpu or a visible GPU (this machine), or with nprobe above what a GPU search returns,
    the GPU assigner stops with the cause, before any search."""
    with pytest.raises(RuntimeError, match="needs faiss-gpu and a GPU visible to each actor, but faiss here sees 0 GPUs"):
        faiss_search.exact_coarse(ivf_pq, use_gpu=True)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    ivf = faiss.extract_index_ivf(ivf_pq)
    before, ivf.nprobe = ivf.nprobe, 4096
    try:
        with pytest.raises(RuntimeError, match="nprobe 4096 exceeds the 2048 cells a GPU search returns"):
            faiss_search.exact_coarse(ivf_pq, use_gpu=True)
    finally:
        ivf.nprobe = before


def test_refine_search_with_a_coarse_assigner_equals_refine_search(data, ivf_pq):
    """An index built with index.refine: the candidates come from the coarse assigner's cells (the
    neighbours stage's bulk search), then the same exact re-ranking."""
    faiss_search.set_nprobe(ivf_pq, 8)
    queries, embeddings = data["queries"][:200], data["embeddings"]
    coarse = faiss_build.centroid_index(faiss.extract_index_ivf(ivf_pq))
    want = faiss_search.refine_search(ivf_pq, embeddings, queries, K)
    got = faiss_search.refine_search(ivf_pq, embeddings, queries, K, coarse=coarse)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert faiss_search.recall_at_k(got[1], data["true_ids"][:200], K) > 0.8


def test_nprobe_sets_the_hnsw_quantizer_search_depth(data):
    """faiss searches an HNSW quantizer with efSearch = max(efSearch, nprobe); its default 16 loses
    the right cells. Setting nprobe (also through the OPQ wrapper) raises it to max(64, 2 x nprobe)."""
    for factory in ("IVF64_HNSW32,Flat", "OPQ8_32,IVF64_HNSW32,PQ8"):
        index = build(factory, data["database"], data["rows"], n_train=5000)
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        assert quantizer.hnsw.efSearch == 16  # faiss's default
        faiss_search.set_nprobe(index, 8)
        assert quantizer.hnsw.efSearch == faiss_search.QUANTIZER_EF_MIN == 64
        faiss_search.set_nprobe(index, 50)
        assert quantizer.hnsw.efSearch == 100


# ---------------------------------------------------------------------------------------------
# filtered search: faiss skips the rows outside a selector
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64,Flat", "OPQ8_32,IVF64,PQ8"])
def test_selector_keeps_only_allowed_rows_through_every_wrapper(data, factory):
    """Flat and IVF at nprobe = nlist search exhaustively: with the selector their top k must be brute
    force's top k over the allowed rows alone; HNSW and PQ (re-ranked) must find 95 % of it."""
    database, rows = data["database"], data["rows"]
    index = build(factory, database, rows, n_train=None if factory in ("Flat", "HNSW32") else 5000)
    rng = np.random.default_rng(3)
    allowed = np.zeros(int(rows.max()) + 1, dtype=bool)
    allowed[rng.choice(rows, len(rows) // 10, replace=False)] = True
    selector, bits = faiss_search.row_selector(allowed)
    value = 64 if "IVF" in factory else 512 if factory == "HNSW32" else None
    params = faiss_search.filtered_params(index, selector, value)
    queries = data["queries"][:100]
    mine = np.isin(rows, np.flatnonzero(allowed))
    want_sims, want = faiss_search.exact_search(database[mine], queries, K, ids=rows[mine])
    if "PQ" in factory:
        sims, found = faiss_search.refine_search(index, data["embeddings"], queries, K, params=params)
    else:
        sims, found = faiss_search.search(index, queries, K, params=params)
    assert allowed[found].all()
    if factory in ("HNSW32", "OPQ8_32,IVF64,PQ8"):  # a graph search, 8-byte codes: approximate
        assert faiss_search.recall_at_k(found, want, K) >= 0.95, faiss_search.recall_at_k(found, want, K)
    else:
        np.testing.assert_array_equal(found, want)
    assert not allowed[faiss_search.search(index, queries, K)[1]].all()  # unfiltered, others come first


@pytest.mark.parametrize("batch", [2000, 12])
def test_bulk_search_with_known_cells_searches_each_querys_own_list(data, batch):
    """At nprobe 1 the neighbours stage knows each indexed query's cell: the list it is stored in
    (cell_assign.cells_by_row), which a flat quantizer's add made its nearest centroid's. Searching
    those lists, list by list (2,000 queries) or through search_preassigned (12), gives exactly
    what index.search does; rows the index does not hold are -1; cells need an IndexIVFFlat and
    nprobe of them per query."""
    index = build("IVF64,Flat", data["database"], data["rows"], n_train=5000)
    faiss_search.set_nprobe(index, 1)
    ivf = faiss.extract_index_ivf(index)
    table = cell_assign.cells_by_row(ivf, int(data["rows"].max()) + 2)
    assert table[-1] == -1 and (table >= 0).sum() == len(data["rows"])
    for cell in (0, 33):
        assert set(np.flatnonzero(table == cell)) == set(faiss.rev_swig_ptr(ivf.invlists.get_ids(cell),
                                                                            ivf.invlists.list_size(cell)))
    queries, rows = data["database"][:batch], data["rows"][:batch]
    want_sims, want_rows = faiss_search.search(index, queries, K)
    sims, found = faiss_search.bulk_search(index, queries, K, cells=table[rows])
    np.testing.assert_array_equal(found, want_rows)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-6)
    assert (found[:, 0] == rows).mean() > 0.9  # a database vector finds itself first
    with pytest.raises(ValueError, match="nprobe of them per query"):
        faiss_search.bulk_search(index, queries, K, cells=np.stack([table[rows]] * 2, axis=1))
    with pytest.raises(ValueError, match=r"known cells must lie in \[0, 64\), got 0\.\.64"):
        faiss_search.bulk_search(index, queries, K, cells=np.where(np.arange(batch) == 1, 64, 0))
    pq_index = build("IVF64,PQ8", data["database"], data["rows"], n_train=5000)
    with pytest.raises(ValueError, match="known cells for an IndexIVFFlat"):
        faiss_search.bulk_search(pq_index, queries, K, cells=table[rows])
