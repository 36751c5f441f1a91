"""Coarse assignment for queries that are themselves indexed (the neighbours stage sends every kept image).

An IVF query is first assigned to its nprobe nearest cells. Scoring it against every centroid costs
nlist x d, and with cells of constant size nlist grows with N, so the cost per query grows with N: the
3M growth run spent most of its neighbours time there. Searching the HNSW graph of the centroids from
its top level costs less per query but finds the right cells only at a high efSearch (64). A query that
is in the index already sits in the cell of its nearest centroid, so ``NearCellAssigner`` starts the
graph search there, on level 0 (faiss's ``search_level_0``), where a short beam (``NEAR_EF``) reaches
its other nearest cells: a cost per query that does not grow with nlist. Queries that are not in the
index keep exact assignment over every centroid, and so do indexes whose quantizer is not a graph or
holds fewer than ``NEAR_MIN_NLIST`` centroids: there brute force (one matrix product) is the cheaper.
"""
from __future__ import annotations

import faiss
import numpy as np

from pipeline.faiss_build import centroid_index

NEAR_EF = 32  # efSearch of the level-0 search from the query's own cell (at least 2 x nprobe)
NEAR_MIN_NLIST = 16_384  # below this many cells brute force is cheaper (one thread, d 512: 104 against 172 us
# per query at 7,604 cells)


def cell_of_ids(ivf: faiss.IndexIVF, n_ids: int) -> np.ndarray:
    """int32 [n_ids]: the inverted list holding each id (ids are embed rows), -1 for ids not indexed."""
    out = np.full(n_ids, -1, np.int32)
    invlists = ivf.invlists
    for cell in range(ivf.nlist):
        size = invlists.list_size(cell)
        if size:
            ptr = invlists.get_ids(cell)
            out[faiss.rev_swig_ptr(ptr, size)] = cell
            invlists.release_ids(cell, ptr)
    return out


def near_cell_map(index: faiss.Index, n_ids: int, min_nlist: int | None = None) -> np.ndarray | None:
    """``cell_of_ids`` for a CPU IVF (``IVF,Flat``, or ``OPQ,IVF,PQ`` through its wrapper) with an HNSW
    coarse quantizer of at least ``min_nlist`` cells (default ``NEAR_MIN_NLIST``); None for any other."""
    inner = faiss.try_extract_index_ivf(index)
    if inner is None or not isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexHNSW):
        return None
    if inner.nlist < (NEAR_MIN_NLIST if min_nlist is None else min_nlist):
        return None
    return cell_of_ids(inner, n_ids)


class NearCells:
    """One index's graph of centroids with ``near_cell_map``'s output; ``for_rows(rows)`` is the ``coarse``
    of ``faiss_search.bulk_search`` for queries that are these embed rows."""

    def __init__(self, index: faiss.Index, own_of_id: np.ndarray, ef: int = NEAR_EF):
        self.ivf = faiss.extract_index_ivf(index)
        self.graph = faiss.downcast_index(self.ivf.quantizer)
        self.own_of_id, self.ef = own_of_id, ef
        self.centroids = self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist)
        self.inner_product = self.ivf.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
        self._exact = None

    def for_rows(self, rows: np.ndarray) -> NearCellAssigner:
        rows = np.asarray(rows)
        inside = (rows >= 0) & (rows < len(self.own_of_id))
        return NearCellAssigner(self, np.where(inside, self.own_of_id[np.where(inside, rows, 0)], -1))

    def exact(self) -> faiss.Index:
        if self._exact is None:
            self._exact = centroid_index(self.ivf)
        return self._exact


class NearCellAssigner:
    """``search(xq, nprobe)``: each query's nprobe best cells, found from its own cell (-1: exactly), with
    their scores. ``xq`` in the IVF's space (after any OPQ in front of it)."""

    def __init__(self, cells: NearCells, own: np.ndarray):
        self.cells, self.own = cells, own

    def search(self, xq: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, cells) [n, nprobe] in faiss's convention: inner product descending or squared L2 ascending."""
        c = self.cells
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        nprobe = min(nprobe, c.ivf.nlist)
        dist = np.empty((len(xq), nprobe), np.float32)
        assign = np.empty((len(xq), nprobe), np.int64)
        known = np.flatnonzero(self.own >= 0)
        if len(known):
            dist[known], assign[known] = self._from_own(xq[known], self.own[known], nprobe)
        unknown = np.flatnonzero(self.own < 0)
        if len(unknown):
            dist[unknown], assign[unknown] = c.exact().search(xq[unknown], nprobe)
        return dist, assign

    def _from_own(self, xq: np.ndarray, own: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        c, n = self.cells, len(xq)
        diff = xq - c.centroids[own]
        own_d = np.einsum("nd,nd->n", xq, c.centroids[own]) if c.inner_product else np.einsum("nd,nd->n", diff, diff)
        dist = np.empty((n, nprobe), np.float32)
        found = np.empty((n, nprobe), np.int64)
        entry = np.ascontiguousarray(own, dtype=np.int32)
        entry_d = np.ascontiguousarray(own_d, dtype=np.float32)
        params = faiss.SearchParametersHNSW(efSearch=max(c.ef, 2 * nprobe))
        c.graph.search_level_0(n, faiss.swig_ptr(xq), nprobe, faiss.swig_ptr(entry), faiss.swig_ptr(entry_d),
                               faiss.swig_ptr(dist), faiss.swig_ptr(found), 1, 1, params)
        # the search leaves its entry point out of what it returns: put the own cell back in its place
        cand = np.concatenate([own[:, None].astype(np.int64), found], axis=1)
        value = np.concatenate([own_d[:, None], dist], axis=1).astype(np.float32)
        rank = value.astype(np.float64) if c.inner_product else -value.astype(np.float64)
        rank[:, 1:][(found < 0) | (found == own[:, None])] = -np.inf
        best = np.argsort(-rank, axis=1, kind="stable")[:, :nprobe]
        return np.take_along_axis(value, best, axis=1), np.take_along_axis(cand, best, axis=1)
