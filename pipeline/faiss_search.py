"""Searching faiss indexes built by ``faiss_build``: plain, exact and re-ranked search, recall, nprobe tuning.

Same conventions as ``faiss_build`` (inner product on normalised vectors, results are rows), plus:

- A missing result (fewer than k vectors reachable) is id -1 with similarity -inf.
- GPU: search moves to the GPU only where faiss-gpu supports the index: IVFPQ codes of at most
  48 bytes, or 56/64/96 with float16 lookup tables; the paper's 256 B codes are searched on CPU.
- ``exact_search`` walks a database bigger than memory in blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import faiss
import numpy as np
from faiss.contrib.big_batch_search import BigBatchSearcher, BlockComputer
from faiss.contrib.exhaustive_search import knn_ground_truth

from pipeline.cell_assign import PROJECTED_SAMPLE, list_in_place, stored_sample
from pipeline.faiss_assign import GPU_MAX_K, gpu_centroid_index, preassigned_search
from pipeline.faiss_build import METRIC, as_float32, exact_assigner, innermost_index, on_gpu, resolve_gpu

# faiss-gpu IVFPQ limits (faiss/gpu/impl/IVFPQ.cu, PQScanMultiPassNoPrecomputed.cuh).
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_FLOAT16_LUT_ABOVE = 48  # 56, 64 and 96 bytes need float16 lookup tables
GPU_PQ_SUB_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
HNSW_MAX_EF = 4096  # the largest efSearch tried (tune_nprobe, filtered search)
QUANTIZER_EF_MIN = 64  # efSearch of an HNSW coarse quantizer: at least this, and 2 x nprobe
# bulk_search goes list by list when a batch sends this many queries to an average list; below it,
# faiss's search_preassigned over the same cells (at 3M, 2.5 queries per list: 1.19x the stage).
BULK_MIN_QUERIES_PER_LIST = 4


# ---------------------------------------------------------------------------------------------
# Where an index is searched: GPU when faiss-gpu supports it
# ---------------------------------------------------------------------------------------------


def gpu_unsupported_reason(index: faiss.Index) -> str | None:
    """Why faiss-gpu cannot search ``index`` (a sentence), or None when it can."""
    inner = innermost_index(index)
    if isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
        return None
    if isinstance(inner, faiss.IndexIVFPQ):
        pq = inner.pq
        if pq.nbits != 8:
            return f"faiss-gpu IVFPQ needs 8-bit codes, this index has {pq.nbits}"
        if pq.M not in GPU_PQ_BYTES:
            return f"faiss-gpu IVFPQ supports codes of {GPU_PQ_BYTES} bytes, this index has {pq.M}"
        if pq.dsub not in GPU_PQ_SUB_DIMS:
            return f"faiss-gpu IVFPQ supports {GPU_PQ_SUB_DIMS} dims per sub-quantizer, this has {pq.dsub}"
        return None
    return f"faiss-gpu has no {type(inner).__name__}"


def index_for_search(index: faiss.Index, use_gpu: bool | None = None) -> faiss.Index:
    """A GPU copy of ``index`` (sharded over all GPUs) when a GPU can search it, else ``index`` itself."""
    if not resolve_gpu(use_gpu) or gpu_unsupported_reason(index) is not None:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = faiss.get_num_gpus() > 1
    inner = innermost_index(index)
    # IVFPQ over 48 bytes only fits shared memory with float16 lookup tables (useFloat16 means that
    # for IVFPQ; for Flat/IVFFlat it would mean float16 storage, which we leave off).
    options.useFloat16 = isinstance(inner, faiss.IndexIVFPQ) and inner.pq.M > GPU_PQ_FLOAT16_LUT_ABOVE
    return faiss.index_cpu_to_all_gpus(index, co=options)


# ---------------------------------------------------------------------------------------------
# Search: approximate, exact, re-ranked; recall
# ---------------------------------------------------------------------------------------------


def search(index: faiss.Index, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """(sims float32 [nq, k] descending, rows int64 [nq, k]) of one faiss search; -1 / -inf if missing.
    ``params``: faiss SearchParameters (``filtered_params``)."""
    sims, ids = index.search(as_float32(queries, index.d), k, params=params)
    sims[ids < 0] = -np.inf
    return sims, ids


def row_selector(allowed: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """A faiss selector of the rows where the bool mask ``allowed`` is True, and the packed bitmap it
    points into (keep both referenced while searching: the selector does not own the bitmap)."""
    bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
    return faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits)), bits


def filtered_params(index: faiss.Index, selector: faiss.IDSelector, value: int | None = None):
    """SearchParameters that make faiss itself skip rows outside ``selector`` (through OPQ/IDMap wrappers),
    with nprobe (IVF) or efSearch (HNSW) = ``value``, or the index's current one."""
    name, current = search_param(index)
    if name == "nprobe":
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(value or current))
    if name == "efSearch":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(value or current))
    return faiss.SearchParameters(sel=selector)


def bulk_search(index: faiss.Index, queries: np.ndarray, k: int, coarse: faiss.Index | None = None,
                cells: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``search`` for large batches of queries on a CPU ``IVF,Flat``: the same results, list by list.

    faiss's contrib.big_batch_search groups the queries by the inverted lists they probe and scores
    each list against its queries in one matrix product, where ``index.search`` scans the list once per
    query. It pays when the batch is large next to nlist (the neighbours stage queries every indexed
    vector); other index types, GPU indexes and small batches go to ``search``, or, given a ``coarse``
    and an IVF, to ``preassigned_search``. PQ codes are left out on purpose: big_batch_search scores
    residuals, which is wrong for inner product. ``coarse`` (``exact_coarse``) assigns the queries to
    cells in place of the index's HNSW quantizer: the exact nearest cells, where the graph finds most
    of them, so the results can only be nearer. ``cells`` (int [n, nprobe], an ``IVF,Flat`` only)
    are the queries' cells when the caller knows them: ``cell_assign.cells_by_row`` at nprobe 1.
    """
    inner = faiss.downcast_index(index)  # no wrapper: an OPQ or IDMap in front goes to search
    q = as_float32(queries, index.d)
    if not len(q):
        cells = None  # no queries: nothing to search
    if cells is not None:
        cells = np.ascontiguousarray(np.asarray(cells).reshape(len(q), -1), dtype=np.int64)
        if type(inner) is not faiss.IndexIVFFlat or cells.shape[1] != inner.nprobe:
            raise ValueError(f"bulk_search takes known cells for an IndexIVFFlat, nprobe of them per query "
                             f"(got {cells.shape[1]} for {type(inner).__name__})")
        if cells.size and (cells.min() < 0 or cells.max() >= inner.nlist):
            raise ValueError(f"bulk_search's known cells must lie in [0, {inner.nlist}), got "
                             f"{cells.min()}..{cells.max()}")
    if type(inner) is not faiss.IndexIVFFlat or len(q) * inner.nprobe < BULK_MIN_QUERIES_PER_LIST * inner.nlist:
        if (coarse is not None or cells is not None) and faiss.try_extract_index_ivf(index) is not None:
            return preassigned_search(index, q, k, coarse, cells)  # e.g. OPQ+IVF+PQ with a GPU assigning the cells
        return search(index, q, k)
    searcher = _QuietSearcher(inner, q, k)
    searcher.coarse, searcher.cells = coarse, cells
    computer = BlockComputer(inner)
    searcher.coarse_quantization()
    searcher.reorder_assign()
    lims = searcher.bucket_lims
    for cell in np.flatnonzero(lims[1:] > lims[:-1]):  # only the lists some query probes, read in place
        q_subset = searcher.query_ids[lims[cell]:lims[cell + 1]]
        with list_in_place(inner, int(cell)) as (cell_ids, xb_cell):
            sims, found = computer.block_search(q[q_subset], xb_cell, cell_ids, k)
            searcher.add_results_to_heap(q_subset, sims, cell_ids, found)
    searcher.rh.finalize()
    sims, ids = searcher.rh.D, searcher.rh.I
    sims[ids < 0] = -np.inf
    return sims, ids


def exact_coarse(index: faiss.Index, use_gpu: bool = False) -> faiss.Index | None:
    """For ``bulk_search``: brute force over a CPU IVF's centroids when its quantizer is an HNSW graph
    (``faiss_build.exact_assigner``, checked on vectors stored in the index; build it once per index).
    At 3M vectors, 4.5k against 2.3k queries/s through the graph on 2 threads, at recall@10 0.949
    against 0.944. ``use_gpu``: every IVF's centroids (any quantizer, any nlist, OPQ+IVF+PQ too) in a
    flat index on this process's GPUs (faiss-gpu; under Ray, those of the actor): brute force over
    millions of centroids is what a GPU does well, and the cost a CPU pays per query grows with nlist
    (README, Performance)."""
    if use_gpu:
        ivf = faiss.try_extract_index_ivf(index)
        return None if ivf is None else gpu_centroid_index(ivf)
    inner = faiss.downcast_index(index)
    if type(inner) is not faiss.IndexIVFFlat:
        return None
    return exact_assigner(inner, stored_sample(inner, PROJECTED_SAMPLE), inner.nprobe)


class _QuietSearcher(BigBatchSearcher):
    """big_batch_search's bookkeeping without its progress printing (it prints per list at verbose 0),
    with the queries' cells from ``coarse`` (a flat index of the centroids) when one is given."""

    coarse = cells = None

    def coarse_quantization(self):
        if self.cells is not None:
            self.q_assign = self.cells.astype("int32")
        elif self.coarse is None:
            return super().coarse_quantization()
        else:
            self.q_assign = self.coarse.search(self.xq, self.index.nprobe)[1].astype("int32")

    def report(self, l):
        pass

    def tic(self, name):
        pass

    def toc(self):
        return 0.0


def exact_search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    ids: np.ndarray | None = None,
    block_size: int = 65536,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product: the oracle the approximate indexes are measured against.

    ``database`` [N, d] may be a float16 memmap; it is read ``block_size`` rows at a time.
    Returns (sims, ids): ids are positions in ``database``, or ``ids[position]`` when ``ids`` is given.
    """
    q = as_float32(queries)
    starts = range(0, len(database), block_size)
    blocks = (as_float32(database[i : i + block_size], q.shape[1]) for i in starts)
    ngpu = faiss.get_num_gpus() if resolve_gpu(use_gpu) else 0
    sims, positions = knn_ground_truth(q, blocks, k, metric_type=METRIC, ngpu=ngpu)
    missing = positions < 0
    sims[missing] = -np.inf
    if ids is None:
        return sims, positions
    rows = np.asarray(ids, dtype=np.int64)[np.where(missing, 0, positions)]
    return sims, np.where(missing, -1, rows)


def rerank(
    embeddings: np.ndarray, queries: np.ndarray, candidate_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k among each query's candidate rows, scored with ``embeddings[row]`` (float16 is fine).

    ``embeddings`` is anything indexable by a sorted int64 array of rows (np.memmap [N, d]);
    rows are read once each, in order. Candidates of -1 are ignored.
    """
    valid = candidate_rows >= 0
    unique_rows, inverse = np.unique(candidate_rows[valid], return_inverse=True)
    vectors = np.asarray(embeddings[unique_rows], dtype=np.float32)
    query_of = np.nonzero(valid)[0]
    sims = np.full(candidate_rows.shape, -np.inf, dtype=np.float32)
    sims[valid] = np.einsum("ij,ij->i", vectors[inverse], queries[query_of])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top_sims = np.take_along_axis(sims, order, axis=1)
    return top_sims, np.take_along_axis(candidate_rows, order, axis=1)  # -1 candidates sort last


def refine_search(
    index: faiss.Index,
    embeddings: np.ndarray,
    queries: np.ndarray,
    k: int,
    k_factor: int = 4,
    batch_size: int = 1024,
    params=None,
    coarse: faiss.Index | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search k·k_factor candidates, re-rank them exactly with the stored embeddings, keep the top k.

    Text queries sit off the image distribution, where PQ distance errors reorder neighbours; the
    exact re-ranking recovers the order the coarse cells already found (SPEC stage 4, ``refine``).
    ``coarse`` (``exact_coarse``; not with ``params``) assigns the candidates' cells, as in ``bulk_search``.
    """
    q = as_float32(queries, index.d)
    sims = np.empty((len(q), k), dtype=np.float32)
    rows = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), batch_size):  # bounds the [batch, k·k_factor, d] gather
        block = q[start : start + batch_size]
        if coarse is not None and params is None:
            candidates = preassigned_search(index, block, k * k_factor, coarse)[1]
        else:
            _, candidates = index.search(block, k * k_factor, params=params)
        block_sims, block_rows = rerank(embeddings, block, candidates, k)
        sims[start : start + len(block)], rows[start : start + len(block)] = block_sims, block_rows
    return sims, rows


def drop_self(
    sims: np.ndarray, rows: np.ndarray, query_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its results and keep the first k (search k + 1 to call this).

    When the query's row is absent (an approximate search missed it) the last result is dropped.
    """
    is_self = rows == np.asarray(query_rows, dtype=np.int64)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(rows, order, axis=1)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int) -> float:
    """Fraction of the true top-k ids that appear in the found top-k (k=1: top-1 matches)."""
    found = np.asarray(found_ids)[:, :k]
    true = np.asarray(true_ids)[:, :k]
    if len(found) != len(true):
        raise ValueError(f"found ids for {len(found)} queries but true ids for {len(true)}")
    hits = 0
    for start in range(0, len(true), 8192):  # bounds the [chunk, k, k] comparison
        f, t = found[start : start + 8192], true[start : start + 8192]
        hits += int(((f[:, :, None] == t[:, None, :]).any(axis=1) & (t >= 0)).sum())
    total = int((true >= 0).sum())
    return hits / total if total else 1.0


# ---------------------------------------------------------------------------------------------
# Search parameters: nprobe (IVF), efSearch (HNSW)
# ---------------------------------------------------------------------------------------------


class Tuning(NamedTuple):
    """What ``tune_nprobe`` found."""

    param: str | None  # "nprobe" (IVF), "efSearch" (HNSW), None (exact: nothing to tune)
    value: int | None  # the smallest value reaching the target, or the largest tried
    recall: float  # recall@k measured at ``value``
    reached: bool  # False: even the largest value stays under the target


def search_param_name(index: faiss.Index) -> str | None:
    """The speed/recall knob of ``index``: "nprobe" for IVF, "efSearch" for HNSW, None for exact."""
    inner = innermost_index(index)
    if hasattr(inner, "nprobe") and hasattr(inner, "nlist"):  # CPU IndexIVF* and GpuIndexIVF*
        return "nprobe"
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch"
    return None


def search_param(index: faiss.Index) -> tuple[str | None, int | None]:
    """(``search_param_name``, its current value): ("nprobe", n), ("efSearch", ef) or (None, None)."""
    name, inner = search_param_name(index), innermost_index(index)
    return name, inner.nprobe if name == "nprobe" else inner.hnsw.efSearch if name == "efSearch" else None


def set_search_param(index: faiss.Index, name: str, value: int) -> None:
    """Set ``name`` through OPQ/IDMap wrappers and GPU replicas (faiss's ParameterSpace does the walk)."""
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    space.set_index_parameter(index, name, int(value))
    if name == "nprobe" and isinstance(quantizer := _coarse_quantizer(index), faiss.IndexHNSW):
        # faiss searches the centroid graph with efSearch = max(efSearch, nprobe); at 1M vectors the
        # default 16 misses the right cells so often that recall@10 stops near 0.9 at any nprobe.
        quantizer.hnsw.efSearch = max(QUANTIZER_EF_MIN, 2 * int(value))


def _coarse_quantizer(index: faiss.Index) -> faiss.Index | None:
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf.quantizer)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set the number of IVF cells searched (paper: 20), wrappers included."""
    if search_param_name(index) != "nprobe":
        raise ValueError(f"{type(innermost_index(index)).__name__} is not an IVF index: it has no nprobe")
    set_search_param(index, "nprobe", nprobe)


def _param_range(index: faiss.Index, name: str, k: int, max_value: int | None) -> tuple[int, int]:
    """(first value to try, largest value allowed) for ``tune_nprobe``: nprobe from 1 up to nlist,
    efSearch from k up to ``HNSW_MAX_EF``, both capped by ``max_value`` and on a GPU by faiss-gpu's k."""
    high = innermost_index(index).nlist if name == "nprobe" else HNSW_MAX_EF
    for cap in (max_value, GPU_MAX_K if on_gpu(index) else None):
        if cap is not None:
            high = min(high, cap)
    return min(1 if name == "nprobe" else k, high), high


def tune_nprobe(
    index: faiss.Index,
    queries: np.ndarray,
    true_ids: np.ndarray,
    k: int = 10,
    target_recall: float = 0.95,
    max_nprobe: int | None = None,
    embeddings: np.ndarray | None = None,
    k_factor: int = 4,
) -> Tuning:
    """Smallest nprobe (efSearch for HNSW) whose recall@k against ``true_ids`` reaches the target.

    Doubles from the smallest value until the target is met, then bisects between the last two
    values. Leaves the index set to the returned value; when the target is out of reach the value is
    the largest allowed (nlist, ``max_nprobe``, 2048 on GPU) and ``reached`` is False.
    With ``embeddings`` recall is measured after ``refine_search``, as the index will be used.
    """
    name = search_param_name(index)
    q = as_float32(queries, index.d)

    def recall_at(value: int | None) -> float:
        if name is not None:
            set_search_param(index, name, value)
        if embeddings is None:
            found = search(index, q, k)[1]
        else:
            found = refine_search(index, embeddings, q, k, k_factor)[1]
        return recall_at_k(found, true_ids, k)

    if name is None:
        recall = recall_at(None)
        return Tuning(None, None, recall, recall >= target_recall)
    value, high = _param_range(index, name, k, max_nprobe)
    failing, recall = None, recall_at(value)
    while recall < target_recall and value < high:
        failing, value = value, min(2 * value, high)
        recall = recall_at(value)
    if recall < target_recall:
        return Tuning(name, value, recall, False)
    while failing is not None and value - failing > 1:
        middle = (failing + value) // 2
        middle_recall = recall_at(middle)
        if middle_recall >= target_recall:
            value, recall = middle, middle_recall
        else:
            failing = middle
    set_search_param(index, name, value)
    return Tuning(name, value, recall, True)
