"""IVF cells found by brute force over the centroids, apart from the index's quantizer.

Brute force costs nlist x d per vector. IVF centroids often span far fewer than d dimensions, so
``cell_assigner`` first ranks the centroids in their top principal directions (nlist x d'), then
re-scores the best ``PROJECTED_K_FACTOR`` x k of them in full (faiss ``IndexRefine``). The projection
is kept only when it finds the same cells as brute force for a sample of the vectors to assign;
otherwise, and for centroids that need most of d, the assigner is the flat index.

Ranking every centroid still costs nlist per vector, so with cells of constant size assignment grows
as N^2. Above ``GROUPED_MIN_NLIST`` cells the centroids are grouped too (faiss ``IndexIVFFlat`` over
them, sqrt(nlist) groups, in the same space): a vector scores the group centres, then the centroids
of its ``nprobe`` nearest groups, about (1 + nprobe) sqrt(nlist) instead of nlist. The fewest probed
groups that agree with brute force on the sample, as for the projection, or no grouping. Those scores
come from faiss's IVF scanning loops, each several times the cost of one in the flat ranking's single
matrix product (``GROUPED_SCAN_FACTOR``), so a grouping is kept only where it is cheaper counted so.
"""
from __future__ import annotations

import contextlib
import math

import faiss
import numpy as np

PROJECTED_DIMS = (32, 64, 128)  # tried in order, each only if below d / 2
PROJECTED_K_FACTOR = 4  # centroids re-scored in full per cell wanted
PROJECTED_MIN_AGREEMENT = 0.998  # of the sample's (vector, cell) pairs that brute force also finds
PROJECTED_SAMPLE = 1000  # vectors checked

# Up to this many cells (d / d' times as many projected), vectors are added and the neighbours
# stage's queries assigned by brute force over the centroids instead of through an HNSW quantizer:
# exact, and at 3M vectors (22,893 cells, 2 threads, in full) 7.7k vectors/s against 7.0k (adds,
# efSearch 32) and 3.9k (queries, 64).
EXACT_COARSE_MAX_NLIST = 32_768

GROUPED_MIN_NLIST = 4096  # below it ranking every centroid costs little more than ranking groups
# A grouped ranking's multiply-add (faiss's IVF scan) against the flat ranking's (one BLAS product),
# measured on 2 threads with faiss on the CPU's own kernels (pipeline/openblas.py): 103-135 ps against
# 18 ps over 22,930 centroids, 87-171 against 25 over 7,604 (README, Performance, "faiss was running
# on generic kernels").
GROUPED_SCAN_FACTOR = 6
GROUPED_NPROBES = (4, 8, 16, 32, 64)  # groups probed, tried in order
GROUPED_SEED = 1234


def centroid_index(ivf: faiss.IndexIVF) -> faiss.IndexFlat:
    """A flat copy of an IVF's coarse centroids (whatever its quantizer type) to assign vectors with."""
    flat = faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type)
    flat.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    return flat


def cell_assigner(ivf: faiss.IndexIVF, sample: np.ndarray, k: int) -> faiss.Index:
    """An index over ``ivf``'s centroids whose ``search(x, k)`` gives each vector's k nearest cells:
    the projected one of the fewest dimensions that agrees with brute force on ``sample`` (vectors in
    the IVF's space, after any OPQ), grouped where that agrees too, else ``centroid_index``."""
    flat = centroid_index(ivf)
    return centroid_assigner(flat.reconstruct_n(0, ivf.nlist), flat.metric_type, sample, k)


def centroid_assigner(centroids: np.ndarray, metric: int, sample: np.ndarray, k: int,
                      grouped_agreement: float = PROJECTED_MIN_AGREEMENT) -> faiss.Index:
    """``cell_assigner`` for bare ``centroids`` [nlist, d] (e.g. k-means' own, between iterations).
    ``grouped_agreement``: what a grouping must find of brute force's cells (k-means iterations
    can take less than an add)."""
    nlist, d = centroids.shape
    flat = faiss.IndexFlat(d, metric)
    flat.add(centroids)
    x = np.ascontiguousarray(sample[:PROJECTED_SAMPLE], dtype=np.float32)
    k = min(k, nlist)
    if len(x) == 0:
        return flat
    _, truth = flat.search(x, k)
    agrees = lambda index, at=PROJECTED_MIN_AGREEMENT: cell_agreement(index.search(x, k)[1], truth) >= at  # noqa: E731
    directions = principal_directions(centroids)
    bases = [directions[:dims] for dims in PROJECTED_DIMS if dims < d / 2 and dims < nlist] + [None]
    for basis in bases:
        plain = flat if basis is None else projected_index(centroids, basis, metric)
        if plain is not flat and not agrees(plain):
            continue
        if nlist >= GROUPED_MIN_NLIST:
            grouped = projected_index(centroids, basis, metric, GROUPED_NPROBES[0])
            ranking_all = assigner_cost(plain, nlist)
            for nprobe in GROUPED_NPROBES:
                groups_of(grouped).nprobe = nprobe
                if assigner_cost(grouped, nlist) >= ranking_all:
                    break  # more probed groups only cost more
                if agrees(grouped, grouped_agreement):
                    return grouped
        return plain
    return flat


def exact_assigner(ivf: faiss.IndexIVF, sample: np.ndarray, k: int) -> faiss.Index | None:
    """Brute force over the centroids (``cell_assigner``, checked on ``sample`` for ``k``
    cells) where it beats the HNSW quantizer: ranking up to ``EXACT_COARSE_MAX_NLIST`` centroids of d
    dimensions a vector, proportionally more when a projection or grouping finds the same cells. None
    for a flat quantizer (already exact) or a graph too large for either."""
    hnsw = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
    if not hnsw or ivf.nlist > EXACT_COARSE_MAX_NLIST * ivf.d / 32:  # beyond: copies of GBs of centroids
        return None
    assigner = cell_assigner(ivf, sample, k)
    return assigner if assigner_cost(assigner, ivf.nlist) <= EXACT_COARSE_MAX_NLIST * ivf.d else None


def principal_directions(centroids: np.ndarray) -> np.ndarray:
    """[d, d] rows: the centroids' principal directions, uncentred (inner products and L2 ranks are
    kept for vectors near the span of the first rows), by decreasing energy."""
    _, vectors = np.linalg.eigh(centroids.T @ centroids)  # ascending eigenvalues; float32 gram: one BLAS call
    return np.ascontiguousarray(vectors[:, ::-1].T, dtype=np.float32)


def projected_index(centroids: np.ndarray, basis: np.ndarray | None, metric: int, nprobe: int = 0) -> faiss.IndexRefine:
    """Search over the centroids projected on ``basis`` (d' rows of d; None: all d dimensions), re-scored
    in full by an IndexFlat: flat, or with ``nprobe`` > 0 grouped (an IndexIVFFlat of sqrt(nlist)
    groups trained on the projected centroids, ``nprobe`` of them searched)."""
    nlist, d = centroids.shape
    dims = d if basis is None else len(basis)
    if nprobe:
        groups = max(1, int(math.sqrt(nlist)))
        quantizer = faiss.IndexFlat(dims, metric)
        low = faiss.IndexIVFFlat(quantizer, dims, groups, metric)
        low.own_fields = True
        quantizer.this.disown()
        low.cp.seed, low.cp.spherical = GROUPED_SEED, metric == faiss.METRIC_INNER_PRODUCT
        low.nprobe = min(nprobe, groups)
    else:
        low = faiss.IndexFlat(dims, metric)
    if basis is not None:
        transform = faiss.LinearTransform(d, dims, False)
        faiss.copy_array_to_vector(np.ascontiguousarray(basis, np.float32).ravel(), transform.A)
        transform.is_trained = True
        pre = faiss.IndexPreTransform(transform, low)
        pre.own_fields = True
        transform.this.disown(), low.this.disown()
        low = pre
    low.train(centroids)  # the groups (a flat or a transform has nothing to train)
    low.add(centroids)
    full = faiss.IndexFlat(d, metric)
    full.add(centroids)
    index = faiss.IndexRefine(low, full)
    index.own_fields = index.own_refine_index = True
    low.this.disown(), full.this.disown()
    index.k_factor = PROJECTED_K_FACTOR
    return index


def cell_agreement(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of ``truth``'s (row, cell) pairs that ``found`` holds too (each row's cells as a set)."""
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth))
    return hits / truth.size


def stored_sample(ivf: faiss.IndexIVFFlat, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` vectors stored in an ``IVF,Flat`` (the first of each of n random non-empty lists)."""
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    lists = np.random.default_rng(seed).permutation(np.flatnonzero(sizes))[:n]
    rows = []
    for cell in np.sort(lists):
        with list_in_place(ivf, int(cell)) as (_, vectors):
            rows.append(vectors[:1].copy())
    return np.concatenate(rows) if rows else np.zeros((0, ivf.d), np.float32)


def assigner_dims(assigner: faiss.Index) -> int:
    """Dimensions a ``cell_assigner`` ranks centroids in (the projection's, or d)."""
    return _ranking_index(assigner).d


def groups_of(assigner: faiss.Index) -> faiss.IndexIVF | None:
    """The IndexIVFFlat that groups a grouped ``cell_assigner``'s centroids, None for one that ranks all."""
    low = _ranking_index(assigner)
    return low if isinstance(low, faiss.IndexIVF) else None


def _ranking_index(assigner: faiss.Index) -> faiss.Index:
    """The index a ``cell_assigner`` ranks centroids with: inside its re-scoring and projection, if any."""
    low = faiss.downcast_index(assigner.base_index) if isinstance(assigner, faiss.IndexRefine) else assigner
    return faiss.downcast_index(low.index) if isinstance(low, faiss.IndexPreTransform) else low


def assigner_cost(assigner: faiss.Index, nlist: int) -> float:
    """Multiply-adds per vector a ``cell_assigner`` over ``nlist`` centroids spends ranking them, in
    units of the flat ranking's (about: a grouped one scores every group centre, then the centroids of
    the groups it probes at ``GROUPED_SCAN_FACTOR`` each)."""
    groups = groups_of(assigner)
    scored = groups.nlist + GROUPED_SCAN_FACTOR * groups.nprobe * nlist / groups.nlist if groups is not None else nlist
    return scored * assigner_dims(assigner)


@contextlib.contextmanager
def list_in_place(ivf: faiss.IndexIVFFlat, cell: int):
    """(ids int64 [n], vectors float32 [n, d]) of one inverted list as views of the index's memory (or
    its memory-mapped file), valid inside the block, where contrib.inspect_tools.get_invlist copies
    them: faiss_search.bulk_search reads every list for every batch of queries."""
    invlists, n = ivf.invlists, ivf.invlists.list_size(cell)
    ids_ptr, codes_ptr = invlists.get_ids(cell), invlists.get_codes(cell)
    try:
        ids = faiss.rev_swig_ptr(ids_ptr, n) if n else np.zeros(0, np.int64)
        codes = faiss.rev_swig_ptr(codes_ptr, n * invlists.code_size) if n else np.zeros(0, np.uint8)
        yield ids, codes.view(np.float32).reshape(n, ivf.d)
    finally:
        invlists.release_ids(cell, ids_ptr)
        invlists.release_codes(cell, codes_ptr)


def cells_by_row(ivf: faiss.IndexIVF, n_rows: int) -> np.ndarray:
    """int32 [n_rows]: the inverted list each id (row) below ``n_rows`` is stored in, -1 for rows the
    index does not hold: the cell the add assigned it, found without scoring a centroid. That is its
    nearest wherever the add used brute force (a flat quantizer, or ``exact_assigner``: projected, checked
    to agree on 99.8 % of a sample); through an HNSW quantizer, most often but not always."""
    cells = np.full(n_rows, -1, np.int32)
    invlists = ivf.invlists
    for cell in range(ivf.nlist):
        n = invlists.list_size(cell)
        if n:
            ids_ptr = invlists.get_ids(cell)
            try:
                ids = faiss.rev_swig_ptr(ids_ptr, n)
                cells[ids[ids < n_rows]] = cell
            finally:
                invlists.release_ids(cell, ids_ptr)
    return cells


def to_bytes(assigner: faiss.Index | None) -> np.ndarray:
    """uint8 [n]: a ``cell_assigner`` serialized (faiss), empty for None (the index's own quantizer)."""
    return np.zeros(0, np.uint8) if assigner is None else faiss.serialize_index(assigner)


def from_bytes(blob: np.ndarray) -> faiss.Index | None:
    """The assigner ``to_bytes`` wrote (unchecked: it was checked where it was chosen), or None."""
    return faiss.deserialize_index(np.ascontiguousarray(blob, np.uint8)) if blob.size else None
