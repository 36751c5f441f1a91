"""cell_assign: brute-force cell assignment, through a projection only where it finds the same cells."""
import faiss
import numpy as np
import pytest

from pipeline import cell_assign, faiss_build, faiss_search

D = 256
IP = faiss.METRIC_INNER_PRODUCT


def near_subspace(rng: np.random.Generator, n: int, rank: int, noise: float, basis: np.ndarray) -> np.ndarray:
    """Unit vectors in D dimensions whose structure lies in ``basis``'s ``rank`` directions, plus noise."""
    x = rng.standard_normal((n, rank)) @ basis.T + noise * rng.standard_normal((n, D)) / np.sqrt(D)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def low_rank():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((D, 24)))[0]
    return {"centroids": near_subspace(rng, 1000, 24, 0.0, basis),
            "vectors": near_subspace(rng, 3000, 24, 0.3, basis)}


def ivf_over(centroids: np.ndarray, metric: int = IP, hnsw: bool = False) -> faiss.IndexIVFFlat:
    quantizer = faiss.IndexHNSWFlat(D, 32, metric) if hnsw else faiss.IndexFlat(D, metric)
    quantizer.add(centroids)
    ivf = faiss.IndexIVFFlat(quantizer, D, len(centroids), metric)
    ivf.is_trained = True
    ivf.own_fields = True
    quantizer.this.disown()
    return ivf


@pytest.mark.parametrize("metric", [IP, faiss.METRIC_L2])
def test_centroids_in_few_dimensions_are_ranked_projected_and_give_brute_forces_cells(low_rank, metric):
    """Centroids spanning 24 of 256 dimensions: the assigner ranks them in 32 and re-scores in full,
    and finds for vectors it was not checked on the cells brute force does, with the same scores (up
    to float rounding, which swaps 3 near-ties of 20,000 cells)."""
    ivf = ivf_over(low_rank["centroids"], metric)
    vectors = low_rank["vectors"]
    assigner = cell_assign.cell_assigner(ivf, vectors[:500], 8)
    assert isinstance(assigner, faiss.IndexRefine) and cell_assign.assigner_dims(assigner) == 32
    sims, cells = assigner.search(vectors[500:], 8)
    want_sims, want_cells = cell_assign.centroid_index(ivf).search(vectors[500:], 8)
    assert cell_assign.cell_agreement(cells, want_cells) >= 0.9995
    np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-6)


def test_centroids_that_need_every_dimension_keep_brute_force():
    """Centroids spread over all 256 dimensions: no projection agrees, so the flat index is returned."""
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((1000, D)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    ivf = ivf_over(centroids)
    assigner = cell_assign.cell_assigner(ivf, centroids[:300] + 0.1 * centroids[300:600], 8)
    assert type(assigner) is faiss.IndexFlat and assigner.ntotal == 1000


def test_cell_agreement_counts_each_rows_cells_as_a_set():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert cell_assign.cell_agreement(np.array([[3, 2, 1], [4, 5, 6]]), truth) == 1.0
    assert cell_assign.cell_agreement(np.array([[3, 2, 9], [7, 8, 6]]), truth) == 3 / 6


def test_stored_sample_takes_stored_vectors_one_per_list(low_rank):
    ivf = ivf_over(low_rank["centroids"][:200])
    vectors = low_rank["vectors"]
    ivf.add_with_ids(vectors, np.arange(len(vectors)))
    sample = cell_assign.stored_sample(ivf, 50)
    assert sample.shape == (50, D)
    _, nearest = faiss.knn(sample, vectors, 1, metric=IP)
    np.testing.assert_array_equal(vectors[nearest[:, 0]], sample)  # each one is a stored vector
    _, cells = ivf.quantizer.search(sample, 1)
    assert len(set(cells[:, 0])) == 50  # from 50 different lists
    assert len(cell_assign.stored_sample(ivf, 10_000)) == sum(ivf.invlists.list_size(i) > 0 for i in range(200))


def test_exact_assigner_allows_more_cells_when_projected(low_rank, monkeypatch):
    """Brute force replaces an HNSW quantizer up to EXACT_COARSE_MAX_NLIST centroids of D dimensions;
    projected to 32 dimensions, D / 32 times as many. A flat quantizer is left alone."""
    hnsw = ivf_over(low_rank["centroids"], hnsw=True)  # 1,000 cells, projected to 32 dimensions
    sample = low_rank["vectors"][:500]
    monkeypatch.setattr(cell_assign, "EXACT_COARSE_MAX_NLIST", 1000 * 32 // D)
    assert isinstance(faiss_build.exact_assigner(hnsw, sample, 4), faiss.IndexRefine)
    monkeypatch.setattr(cell_assign, "EXACT_COARSE_MAX_NLIST", 1000 * 32 // D - 1)
    assert faiss_build.exact_assigner(hnsw, sample, 4) is None
    assert faiss_build.exact_assigner(ivf_over(low_rank["centroids"]), sample, 4) is None


def test_adds_and_bulk_search_through_the_projection_match_an_exact_quantizer(low_rank):
    """add_batches and the neighbours stage's bulk search on an HNSW-quantized IVF: every vector lands
    in its nearest centroid's list, and the bulk search returns what the same lists give searched
    through a flat quantizer."""
    vectors = low_rank["vectors"]
    index = ivf_over(low_rank["centroids"], hnsw=True)
    faiss.downcast_index(index.quantizer).hnsw.efSearch = 2  # a graph that misses cells on its own
    faiss_build.add_batches(index, [(np.arange(1500), vectors[:1500]), (np.arange(1500, 3000), vectors[1500:])])
    oracle = ivf_over(low_rank["centroids"])
    oracle.add_with_ids(vectors, np.arange(len(vectors)))
    for cell in range(index.nlist):
        assert sorted(faiss.rev_swig_ptr(index.invlists.get_ids(cell), index.invlists.list_size(cell))) == \
            sorted(faiss.rev_swig_ptr(oracle.invlists.get_ids(cell), oracle.invlists.list_size(cell)))
    index.nprobe = oracle.nprobe = 3
    coarse = faiss_search.exact_coarse(index)
    assert isinstance(coarse, faiss.IndexRefine)
    want_sims, want_rows = oracle.search(vectors, 10)
    want_sims[want_rows < 0] = -np.inf  # fewer than 10 vectors in the 3 cells
    sims, rows = faiss_search.bulk_search(index, vectors, 10, coarse)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-6)
    assert (faiss_search.bulk_search(index, vectors, 10)[1] != want_rows).any()  # the graph alone differs


@pytest.mark.parametrize("mmap", [False, True])
def test_list_in_place_reads_what_faiss_copies_out(low_rank, tmp_path, mmap):
    """Every list (some empty) read in place equals contrib.inspect_tools' copy, from memory and from a
    memory-mapped index file."""
    from faiss.contrib.inspect_tools import get_invlist

    index = ivf_over(low_rank["centroids"][:300])
    index.add_with_ids(low_rank["vectors"][:500], np.arange(1000, 1500))
    if mmap:
        faiss.write_index(index, str(tmp_path / "ivf.index"))
        index = faiss.read_index(str(tmp_path / "ivf.index"), faiss.IO_FLAG_MMAP)
    sizes = [index.invlists.list_size(cell) for cell in range(index.nlist)]
    assert 0 in sizes and sum(sizes) == 500
    for cell in range(index.nlist):
        want_ids, want_codes = get_invlist(index.invlists, cell)
        with cell_assign.list_in_place(index, cell) as (ids, vectors):
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(vectors, want_codes.view(np.float32).reshape(-1, D))


def _ids_by_list(index) -> list:
    ivf = faiss.extract_index_ivf(index)
    return [sorted(faiss.rev_swig_ptr(ivf.invlists.get_ids(c), ivf.invlists.list_size(c))) for c in range(ivf.nlist)]


def test_parallel_build_tasks_use_the_assigner_the_driver_chose(low_rank, tmp_path):
    """The index stage's parallel build chooses the assigner once (parts/assigner.npy, faiss-serialized)
    and every task reads it back unchecked: each vector still lands in its nearest centroid's list.
    A flat quantizer records nothing: the tasks add through the index itself."""
    from pipeline.faiss_ondisk import write_partial
    from pipeline.index_parallel import _assigner

    vectors, rows = low_rank["vectors"], np.arange(len(low_rank["vectors"]))
    oracle = ivf_over(low_rank["centroids"])
    oracle.add_with_ids(vectors, rows)
    for hnsw in (True, False):
        parts = tmp_path / f"parts_{hnsw}"
        parts.mkdir()
        trained = ivf_over(low_rank["centroids"], hnsw=hnsw)
        faiss.write_index(trained, str(parts / "trained.index"))
        blob = np.load(_assigner(parts, parts / "trained.index", vectors, rows))
        assert (blob.size > 0) == hnsw
        assert np.array_equal(np.load(_assigner(parts, parts / "trained.index", vectors[:0], rows[:0])), blob)  # kept
        assigner = cell_assign.from_bytes(blob)
        assert (assigner is not None and cell_assign.assigner_dims(assigner) == 32) == hnsw
        written = write_partial(parts / "trained.index", [(rows, vectors)], parts / "part.index", assigner)
        assert written == len(vectors)
        assert _ids_by_list(faiss.read_index(str(parts / "part.index"))) == _ids_by_list(oracle)


def blobs(rng: np.random.Generator, n_blobs: int, per_blob: int, spread: float) -> np.ndarray:
    """Unit vectors in ``n_blobs`` tight groups of ``per_blob`` around random directions of D."""
    centres = rng.standard_normal((n_blobs, D))
    x = np.repeat(centres, per_blob, axis=0) + spread * rng.standard_normal((n_blobs * per_blob, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("metric", [IP, faiss.METRIC_L2])
def test_grouped_centroids_are_ranked_by_group_and_give_brute_forces_cells(monkeypatch, metric):
    """1,600 centroids in 40 tight blobs: above GROUPED_MIN_NLIST the assigner scores the 40 group
    centres and the centroids of the fewest groups that agree with brute force (4 here), a tenth of
    the scores brute force spends (under two thirds of its cost, a scanned score costing
    GROUPED_SCAN_FACTOR), and finds brute force's cells for vectors it was not checked on.
    Serialized (a parallel build's tasks), it finds the same cells."""
    monkeypatch.setattr(cell_assign, "GROUPED_MIN_NLIST", 1000)
    rng = np.random.default_rng(2)
    centroids = blobs(rng, 40, 40, 0.3)
    vectors = centroids[rng.integers(0, len(centroids), 3000)] + 0.02 * rng.standard_normal((3000, D)).astype(np.float32)
    assigner = cell_assign.centroid_assigner(centroids, metric, vectors[:1000], 2)
    groups = cell_assign.groups_of(assigner)
    assert groups is not None and (groups.nlist, groups.nprobe) == (40, 4)
    dims = cell_assign.assigner_dims(assigner)
    assert cell_assign.assigner_cost(assigner, 1600) == (40 + cell_assign.GROUPED_SCAN_FACTOR * 4 * 1600 / 40) * dims
    assert cell_assign.assigner_cost(assigner, 1600) < 0.67 * 1600 * dims
    flat = faiss.IndexFlat(D, metric)
    flat.add(centroids)
    want_sims, want_cells = flat.search(vectors[1000:], 2)
    sims, cells = assigner.search(vectors[1000:], 2)
    assert cell_assign.cell_agreement(cells, want_cells) >= 0.998
    same = (cells == want_cells).all(1)
    np.testing.assert_allclose(sims[same], want_sims[same], rtol=1e-5, atol=1e-5)  # re-scored in full
    np.testing.assert_array_equal(cell_assign.from_bytes(cell_assign.to_bytes(assigner)).search(vectors, 2)[1],
                                  assigner.search(vectors, 2)[1])


def test_a_grouping_that_costs_more_than_ranking_all_is_not_kept(monkeypatch):
    """The blobs above group well, but if a scanned score cost 20 flat ones, the 4 groups that agree
    (40 + 20 x 160 scores) would cost more than ranking all 1,600: every centroid is ranked."""
    monkeypatch.setattr(cell_assign, "GROUPED_MIN_NLIST", 1000)
    rng = np.random.default_rng(2)
    centroids = blobs(rng, 40, 40, 0.3)
    vectors = centroids[rng.integers(0, len(centroids), 1000)] + 0.02 * rng.standard_normal((1000, D)).astype(np.float32)
    assert cell_assign.groups_of(cell_assign.centroid_assigner(centroids, IP, vectors, 2)) is not None
    monkeypatch.setattr(cell_assign, "GROUPED_SCAN_FACTOR", 20)
    assert cell_assign.groups_of(cell_assign.centroid_assigner(centroids, IP, vectors, 2)) is None


def test_centroids_that_do_not_group_are_ranked_all(monkeypatch):
    """Centroids spread evenly: no number of probed groups the assigner may try finds brute force's
    cells, so every centroid is ranked (no grouping), unless the caller accepts less agreement."""
    monkeypatch.setattr(cell_assign, "GROUPED_MIN_NLIST", 1000)
    monkeypatch.setattr(cell_assign, "GROUPED_NPROBES", (2, 4))
    rng = np.random.default_rng(3)
    centroids = blobs(rng, 1200, 1, 0.0)
    sample = centroids[rng.integers(0, 1200, 1000)] + 0.05 * rng.standard_normal((1000, D)).astype(np.float32)
    assert cell_assign.groups_of(cell_assign.centroid_assigner(centroids, IP, sample, 1)) is None
    loose = cell_assign.centroid_assigner(centroids, IP, sample, 1, grouped_agreement=0.0)
    assert cell_assign.groups_of(loose).nprobe == 2


