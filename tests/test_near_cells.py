"""near_cells: indexed queries assigned to cells by a graph search from their own cell, against exact answers."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
from faiss.contrib.ivf_tools import add_preassigned

from faiss_data import K, build, clustered_unit_vectors, ivf_flat_index, planted_data
from pipeline import faiss_build, faiss_search
from pipeline.near_cells import NearCells, cell_of_ids, near_cell_map


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return planted_data(tmp_path_factory.mktemp("near_cells"))


@pytest.fixture(scope="module")
def ivf(data):
    """IVF128 over an HNSW graph of its centroids, 20k rows."""
    index = build("IVF128_HNSW32,Flat", data["database"], data["rows"], n_train=20_000)
    index.nprobe = 8
    return index


def exact_cells(ivf, x, nprobe):
    return faiss_build.centroid_index(ivf).search(np.ascontiguousarray(x, dtype=np.float32), nprobe)[1]


def test_cell_of_ids_names_the_list_each_row_was_added_to(data, ivf):
    own = cell_of_ids(ivf, int(data["rows"].max()) + 10)
    np.testing.assert_array_equal(own[data["rows"]], exact_cells(ivf, data["database"], 1)[:, 0])
    outside = np.setdiff1d(np.arange(len(own)), data["rows"])
    assert (own[outside] == -1).all()


def test_indexed_queries_reach_their_exact_cells_and_neighbours(data, ivf):
    """From its own cell, a level-0 search at efSearch 32 finds each query's 8 nearest cells (exact:
    brute force over the centroids), and with them the exact assignment's neighbours."""
    assigner = NearCells(ivf, near_cell_map(ivf, int(data["rows"].max()) + 1, min_nlist=0)).for_rows(data["rows"])
    _, assign = assigner.search(data["database"], 8)
    exact = exact_cells(ivf, data["database"], 8)
    assert (assign[:, 0] == exact[:, 0]).all()  # the own cell, which the graph search leaves out, is put back
    assert np.mean(np.sort(assign, axis=1) == np.sort(exact, axis=1)) >= 0.995
    assert np.mean((assign == exact).all(axis=1)) >= 0.97  # in the same order, too
    found = faiss_search.bulk_search(ivf, data["database"], K, assigner)[1]
    reference = faiss_search.bulk_search(ivf, data["database"], K, faiss_build.centroid_index(ivf))[1]
    assert np.mean(found == reference) >= 0.995


def test_a_one_step_beam_is_worse_so_the_search_does_walk_the_graph(data, ivf):
    """ef 1 stops at the first cells it meets: the assignment the default beam gets right it misses."""
    own = near_cell_map(ivf, int(data["rows"].max()) + 1, min_nlist=0)
    exact = exact_cells(ivf, data["database"], 8)
    _, narrow = NearCells(ivf, own, ef=1).for_rows(data["rows"]).search(data["database"], 8)
    assert np.mean(np.sort(narrow, axis=1) == np.sort(exact, axis=1)) < 0.99


def test_queries_outside_the_index_are_scored_against_every_centroid(data, ivf):
    assigner = NearCells(ivf, near_cell_map(ivf, int(data["rows"].max()) + 1, min_nlist=0)).for_rows(
        np.array([-1, 10**9, data["rows"][0] + 1, *data["rows"][:2]]))
    x = np.concatenate([data["queries"][:3], data["database"][:2]])
    _, assign = assigner.search(x, 5)
    np.testing.assert_array_equal(assign[:3], exact_cells(ivf, data["queries"][:3], 5))
    np.testing.assert_array_equal(assign[3:, 0], exact_cells(ivf, data["database"][:2], 1)[:, 0])


def test_l2_indexes_rank_cells_by_distance():
    rng = np.random.default_rng(3)
    x = clustered_unit_vectors(rng, 8000, 16) * rng.uniform(0.5, 2.0, (8000, 1)).astype(np.float32)
    quantizer = faiss.IndexHNSWFlat(16, 16, faiss.METRIC_L2)
    index = faiss.IndexIVFFlat(quantizer, 16, 64, faiss.METRIC_L2)
    index.train(x)
    flat = faiss_build.centroid_index(index)
    exact = flat.search(x, 4)[1]
    ids = np.arange(len(x), dtype=np.int64)  # held here: add_preassigned keeps only a pointer to it
    add_preassigned(index, x, np.ascontiguousarray(exact[:, 0]), ids=ids)  # every vector in its nearest cell
    _, assign = NearCells(index, cell_of_ids(index, len(x))).for_rows(np.arange(len(x))).search(x, 4)
    assert (assign[:, 0] == exact[:, 0]).all()
    assert np.mean(np.sort(assign, axis=1) == np.sort(exact, axis=1)) >= 0.995


def test_only_an_ivf_over_a_graph_of_enough_cells_gets_a_map(data):
    rows, n = data["rows"][:3000], int(data["rows"].max()) + 1
    assert near_cell_map(faiss.IndexFlatIP(8), n, min_nlist=0) is None
    assert near_cell_map(ivf_flat_index(data), n, min_nlist=0) is None  # IVF128,Flat: a flat quantizer is exact
    assert near_cell_map(build("IVF16,PQ4", data["database"][:3000], rows, n_train=3000), n, min_nlist=0) is None
    graph = build("IVF16_HNSW32,Flat", data["database"][:3000], rows, n_train=3000)
    assert near_cell_map(graph, n, min_nlist=0) is not None
    assert near_cell_map(graph, n, min_nlist=17) is None and near_cell_map(graph, n, min_nlist=16) is not None


@pytest.fixture(scope="module")
def opq(data):
    index = build("OPQ8_32,IVF128_HNSW32,PQ8", data["database"], data["rows"], n_train=5000)
    faiss.extract_index_ivf(index).nprobe = 8
    return index


@pytest.mark.parametrize("which, batch", [("opq", 4000), ("ivf", 50)])
def test_opq_ivf_pq_and_small_batches_search_the_cells_found_from_the_own_cell(data, ivf, opq, which, batch):
    """OPQ in front of an IVF-PQ (the paper's factory), and IVF,Flat batches too small to score list by list:
    bulk_search searches each query's cells from near_cells (faiss's search_preassigned), and finds what
    the same index finds with exact assignment over every centroid."""
    index = opq if which == "opq" else ivf
    queries, rows = data["database"][:batch], data["rows"][:batch]
    inner = faiss.extract_index_ivf(index)
    near = NearCells(index, near_cell_map(index, int(data["rows"].max()) + 1, min_nlist=0)).for_rows(rows)
    found = faiss_search.bulk_search(index, queries, K, near)
    exact = faiss_search.preassigned_search(index, queries, K, faiss_build.centroid_index(inner))
    graph = faiss.downcast_index(inner.quantizer).hnsw
    before, graph.efSearch = graph.efSearch, 1024  # the graph searched exhaustively: exact assignment
    plain = faiss_search.search(index, queries, K)
    graph.efSearch = before
    np.testing.assert_array_equal(exact[1], plain[1])
    np.testing.assert_allclose(exact[0], plain[0], rtol=1e-5)
    assert faiss_search.recall_at_k(found[1], exact[1], K) >= 0.99
