"""Retrieval maths for the dedup, index and neighbours stages: faiss indexes over CLIP embeddings.

Conventions, shared by every function here:

- Vectors are L2-normalised (float16 on disk, float32 in faiss); similarity is the inner product
  (``faiss.METRIC_INNER_PRODUCT``), so sims are cosine similarities, sorted descending.
- Indexes return *rows* (int64 positions in the concatenated embedding files, SPEC "Keys"), never
  positions inside the index: vectors are always added with explicit ids. IVF indexes keep ids in
  their inverted lists; other types (Flat, HNSW, PQ) cannot, so ``make_index`` wraps them in an
  ``IndexIDMap`` (8 bytes/vector). Not ``IndexIDMap2``: its extra id->position hash map (~40 B/vector)
  only serves ``reconstruct(row)``, and the float16 embeddings already hold every vector by row.
- A missing result (fewer than k vectors reachable) is id -1 with similarity -inf.
- GPU: when faiss sees a GPU, k-means (IVF training) and the coarse assignment of added vectors run
  there for any index. Search moves to the GPU only where faiss-gpu supports the index: IVFPQ codes of
  at most 48 bytes, or 56/64/96 with float16 lookup tables; the paper's 256 B codes are searched on CPU.
- Data bigger than memory arrives as blocks: ``add_batches`` takes an iterator of (rows, vectors),
  ``exact_search`` walks the database in blocks, ``search_batches`` yields one result per query block.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth
from faiss.contrib.ivf_tools import add_preassigned

METRIC = faiss.METRIC_INNER_PRODUCT

# choose_factory regimes (see its docstring for why).
EXACT_MAX_N = 20_000
HNSW_MAX_N = 500_000
HNSW_M = 32
PQ_BYTES = (256, 128, 64, 32, 16)  # bytes/vector tried for OPQ+IVF+PQ, best first
ID_BYTES = 8  # one int64 row id per vector

# Training sample: faiss k-means warns under 39 points per centroid and subsamples above 256.
KMEANS_MIN_POINTS_PER_CENTROID = 39
TRAIN_POINTS_PER_CELL = 64
PQ_TRAIN_POINTS = 256 * 64  # 256 centroids per sub-quantizer

# faiss-gpu IVFPQ limits (faiss/gpu/impl/IVFPQ.cu, PQScanMultiPassNoPrecomputed.cuh).
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_FLOAT16_LUT_ABOVE = 48  # 56, 64 and 96 bytes need float16 lookup tables
GPU_PQ_SUB_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
GPU_MAX_K = 2048  # largest k and nprobe a GPU search accepts

# ---------------------------------------------------------------------------------------------
# Sizes and the `factory: auto` rule
# ---------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """A memory size in bytes: ``4GB`` (powers of 1000), ``1.5GiB`` or ``16G`` (powers of 1024), or an int."""
    if isinstance(value, bool):
        raise ValueError(f"memory size {value!r} is not a size: write e.g. '4GB' or 4000000000")
    if isinstance(value, (int, float, np.integer, np.floating)):
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(
                f"cannot read {value!r} as a memory size: write a number with B, KB, MB, GB, TB "
                "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '4GB'"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {value!r} must be positive, e.g. '4GB'")
    return size


def format_bytes(size: int) -> str:
    """``size`` in bytes for messages, e.g. ``1.2 GB``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def ivf_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about 4·sqrt(n) as a power of two, >= 39 training points per cell."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    while nlist > 1 and nlist * KMEANS_MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


def make_index(factory: str, d: int) -> faiss.Index:
    """An empty inner-product index for ``factory``; non-IVF types get an IndexIDMap so ids are rows."""
    index = faiss.index_factory(d, factory, METRIC)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None and not isinstance(index, faiss.IndexIDMap):
        # Built through the factory so the map owns the wrapped index (no dangling sub-index).
        return faiss.index_factory(d, "IDMap," + factory, METRIC)
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ):
        # On by default, it only serves polysemous filtering (unused here) and costs more than
        # the whole PQ training: minutes at 8 bytes/vector, far more at 256.
        ivf.do_polysemous_training = False
    return index


def index_cost(factory: str, d: int) -> tuple[int, int]:
    """(fixed bytes, bytes per vector) in RAM of ``make_index(factory, d)`` once filled, ids included."""
    return _cost(make_index(factory, d))


def _cost(index: faiss.Index) -> tuple[int, int]:
    """Recursive (fixed, per-vector) bytes of an index and the indexes it wraps."""
    # downcast_index returns a proxy that does not own the C++ object: keep ``index`` referenced.
    concrete = faiss.downcast_index(index)
    if isinstance(concrete, faiss.IndexPreTransform):
        fixed, per_vector = _cost(concrete.index)
        for i in range(concrete.chain.size()):
            transform = concrete.chain.at(i)
            fixed += 4 * transform.d_out * (transform.d_in + 1)  # matrix and bias
        return fixed, per_vector
    if isinstance(concrete, faiss.IndexIDMap):
        fixed, per_vector = _cost(concrete.index)
        return fixed, per_vector + ID_BYTES
    if isinstance(concrete, faiss.IndexIVF):
        quantizer_fixed, quantizer_per_vector = _cost(concrete.quantizer)
        fixed = quantizer_fixed + quantizer_per_vector * concrete.nlist + _codebook_bytes(concrete)
        return fixed, concrete.code_size + ID_BYTES  # inverted lists hold codes and ids
    if isinstance(concrete, faiss.IndexHNSW):
        fixed, per_vector = _cost(concrete.storage)
        # Level 0 holds 2M int32 links, upper levels ~1 more on average; levels + offsets 12 B.
        return fixed, per_vector + 4 * (concrete.hnsw.nb_neighbors(0) + 1) + 12
    if isinstance(concrete, faiss.IndexFlatCodes):
        return _codebook_bytes(concrete), concrete.code_size
    raise ValueError(
        f"cannot estimate the memory of a {type(concrete).__name__}: use a Flat, HNSW, IVF or PQ "
        "factory string, optionally behind OPQ/PCA"
    )


def _codebook_bytes(index: faiss.Index) -> int:
    """Bytes of a PQ codebook when the index has one (M x 256 centroids of d/M floats)."""
    pq = getattr(index, "pq", None)
    return 0 if pq is None else 4 * pq.M * pq.ksub * pq.dsub


def estimate_index_bytes(factory: str, n: int, d: int) -> int:
    """RAM in bytes of ``factory`` holding ``n`` vectors of dimension ``d`` (codes, ids, centroids, graph)."""
    fixed, per_vector = index_cost(factory, d)
    return fixed + n * per_vector


def candidate_factories(n: int, d: int) -> list[str]:
    """The factories ``choose_factory`` considers for ``n`` x ``d``, most accurate first."""
    nlist = ivf_nlist(n)
    factories = []
    if n <= EXACT_MAX_N:
        factories.append("Flat")
    if n <= HNSW_MAX_N:
        factories.append(f"HNSW{HNSW_M}")
    factories.append(f"IVF{nlist},Flat")
    if n >= 256 * KMEANS_MIN_POINTS_PER_CENTROID:  # fewer cannot train 256-centroid codebooks
        for m in PQ_BYTES:
            d_opq = d // m * m  # OPQ rotates (and trims) to a multiple of m dimensions
            if d_opq:
                factories.append(f"OPQ{m}_{d_opq},IVF{nlist},PQ{m}")
    return factories


def choose_factory(n: int, d: int, memory_budget: int | str) -> str:
    """The ``factory: auto`` rule: the most accurate index for ``n`` x ``d`` vectors that fits the budget.

    In order: exact ``Flat`` for n <= 20k (brute force is cheap there and needs no tuning);
    ``HNSW32`` up to 500k (graph search, high recall, build time still minutes on CPU);
    ``IVF{nlist},Flat`` when the raw float32 vectors fit (exact distances inside the probed cells);
    then ``OPQ{m}_{d'},IVF{nlist},PQ{m}`` with the largest m of 256, 128, 64, 32, 16 bytes/vector that
    fits (paper: IVF + OPQ, 2048 B -> 256 B, i.e. 264 B/vector with the id). nlist ~ 4 sqrt(n).
    Raises ValueError naming the budget and the size needed when even the smallest does not fit.
    """
    budget = parse_bytes(memory_budget)
    factories = candidate_factories(n, d)
    for factory in factories:
        if estimate_index_bytes(factory, n, d) <= budget:
            return factory
    needed = estimate_index_bytes(factories[-1], n, d)
    raise ValueError(
        f"no index of {n} vectors of dimension {d} fits index.memory_budget={format_bytes(budget)}: "
        f"the smallest, {factories[-1]!r}, needs {format_bytes(needed)}; raise memory_budget or "
        "index fewer vectors"
    )


# ---------------------------------------------------------------------------------------------
# Building: train, add
# ---------------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when the installed faiss is faiss-gpu and sees at least one GPU."""
    return faiss.get_num_gpus() > 0


def _resolve_gpu(use_gpu: bool | None) -> bool:
    """``None`` means: use the GPU when there is one; ``True`` without one is an error."""
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss sees no GPU: install faiss-gpu or pass use_gpu=False")
    return bool(use_gpu)


def training_sample_size(factory: str, n: int) -> int:
    """How many vectors to sample for ``train_index``: 64 per IVF cell, >= 16k for PQ codebooks, <= n.

    Memory of the sample is size x d x 4 bytes (float32); Flat and HNSW need none (0).
    """
    match = re.search(r"IVF(\d+)", factory)
    wanted = TRAIN_POINTS_PER_CELL * int(match.group(1)) if match else 0
    if re.search(r"PQ\d+", factory):
        wanted = max(wanted, PQ_TRAIN_POINTS)
    return min(n, wanted)


def _min_training_points(index: faiss.Index) -> int:
    """Fewest training vectors faiss accepts: one per IVF cell and 256 per PQ codebook."""
    ivf = faiss.try_extract_index_ivf(index)
    inner = ivf if ivf is not None else _innermost(index)
    needed = ivf.nlist if ivf is not None else 1
    pq = getattr(inner, "pq", None)
    return max(needed, pq.ksub if pq is not None else 1)


def train_index(
    factory: str, d: int, train_vectors: np.ndarray | None, use_gpu: bool | None = None
) -> faiss.Index:
    """An empty, trained index for ``factory`` (see ``training_sample_size`` for the sample to pass).

    With a GPU the IVF k-means runs there for any code size (faiss's ``clustering_index`` hook); OPQ
    and PQ codebooks are small and train on CPU. Flat and HNSW need no training (``train_vectors`` unused).
    """
    index = make_index(factory, d)
    if index.is_trained:
        return index
    x = _as_float32(train_vectors, d)
    needed = _min_training_points(index)
    if len(x) < needed:
        raise ValueError(f"factory {factory!r} needs at least {needed} training vectors, got {len(x)}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not _resolve_gpu(use_gpu):
        index.train(x)
    else:
        gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
        _train_with_kmeans_index(index, x, gpu_flat)
    return index


def _train_with_kmeans_index(index: faiss.Index, x: np.ndarray, kmeans_index: faiss.Index) -> None:
    """Train ``index`` with its IVF k-means assigning points through ``kmeans_index`` (a GPU flat)."""
    ivf = faiss.extract_index_ivf(index)
    ivf.clustering_index = kmeans_index  # caller keeps kmeans_index alive; not serialized
    try:
        index.train(x)
    finally:
        ivf.clustering_index = None


def add_batches(
    index: faiss.Index, batches: Iterable[tuple[np.ndarray, np.ndarray]], use_gpu: bool | None = None
) -> int:
    """Add (rows int64 [n], vectors [n, d]) blocks with the rows as ids; returns how many were added.

    With a GPU, an IVF index's coarse assignment (the expensive part of adding) runs on the GPU and
    the codes are appended to the CPU index, which need not fit GPU memory.
    """
    ivf = faiss.try_extract_index_ivf(index)
    assigner = None
    if ivf is not None and _resolve_gpu(use_gpu):
        assigner = faiss.index_cpu_to_all_gpus(_centroid_index(ivf))
    added = 0
    for rows, vectors in batches:
        x = _as_float32(vectors, index.d)
        ids = np.ascontiguousarray(rows, dtype=np.int64)
        if ids.shape != (len(x),):
            raise ValueError(f"got {ids.shape} rows for {len(x)} vectors: pass one row id per vector")
        if assigner is None:
            index.add_with_ids(x, ids)
        else:
            _add_preassigned(index, ivf, assigner, x, ids)
        added += len(ids)
    return added


def _centroid_index(ivf: faiss.IndexIVF) -> faiss.IndexFlat:
    """A flat copy of an IVF's coarse centroids (whatever its quantizer type) to assign vectors with."""
    flat = faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type)
    flat.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    return flat


def _add_preassigned(
    index: faiss.Index, ivf: faiss.IndexIVF, assigner: faiss.Index, x: np.ndarray, ids: np.ndarray
) -> None:
    """Add to ``index`` what ``index.add_with_ids`` would, with the cell assignment done by ``assigner``."""
    transformed = x
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        wrapper = faiss.downcast_index(index)
        for i in range(wrapper.chain.size()):
            transformed = faiss.downcast_VectorTransform(wrapper.chain.at(i)).apply(transformed)
    _, cells = assigner.search(np.ascontiguousarray(transformed, dtype=np.float32), 1)
    add_preassigned(ivf, np.ascontiguousarray(transformed, dtype=np.float32), cells.ravel(), ids)
    index.ntotal = ivf.ntotal  # wrappers keep their own count


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def _as_float32(x: np.ndarray | None, d: int | None = None) -> np.ndarray:
    """C-contiguous float32 [n, d] (what faiss wants) from float16/memmap input."""
    if x is None:
        raise ValueError("this index needs training vectors; got None")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"expected vectors of shape [n, {d if d is not None else 'd'}], got {x.shape}")
    return x


def _innermost(index: faiss.Index) -> faiss.Index:
    """The index doing the work, through OPQ/IDMap/refine wrappers and GPU replicas/shards.

    The result does not own its C++ object: use it only while ``index`` is alive.
    """
    inner = faiss.downcast_index(index)
    while True:
        if isinstance(inner, (faiss.IndexPreTransform, faiss.IndexIDMap)):
            inner = faiss.downcast_index(inner.index)
        elif isinstance(inner, faiss.IndexRefine):
            inner = faiss.downcast_index(inner.base_index)
        elif isinstance(inner, (faiss.IndexReplicas, faiss.IndexShards)) and inner.count() > 0:
            inner = faiss.downcast_index(inner.at(0))
        else:
            return inner


def gpu_unsupported_reason(index: faiss.Index) -> str | None:
    """Why faiss-gpu cannot search ``index`` (a sentence), or None when it can."""
    inner = _innermost(index)
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
    if not _resolve_gpu(use_gpu) or gpu_unsupported_reason(index) is not None:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = faiss.get_num_gpus() > 1
    inner = _innermost(index)
    # IVFPQ over 48 bytes only fits shared memory with float16 lookup tables (useFloat16 means that
    # for IVFPQ; for Flat/IVFFlat it would mean float16 storage, which we leave off).
    options.useFloat16 = isinstance(inner, faiss.IndexIVFPQ) and inner.pq.M > GPU_PQ_FLOAT16_LUT_ABOVE
    return faiss.index_cpu_to_all_gpus(index, co=options)


def _on_gpu(index: faiss.Index) -> bool:
    """True when the index (or what it wraps) lives on a GPU."""
    return type(_innermost(index)).__name__.startswith("Gpu")


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sims float32 [nq, k] descending, rows int64 [nq, k]) of one faiss search; -1 / -inf if missing."""
    sims, ids = index.search(_as_float32(queries, index.d), k)
    sims[ids < 0] = -np.inf
    return sims, ids


def search_batches(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    batch_size: int = 16384,
    embeddings: np.ndarray | None = None,
    k_factor: int = 4,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (sims, rows) for each consecutive block of ``batch_size`` queries (a memmap is fine).

    With ``embeddings`` each block goes through ``refine_search`` (exact re-ranking).
    """
    for start in range(0, len(queries), batch_size):
        block = queries[start : start + batch_size]
        if embeddings is None:
            yield search(index, block, k)
        else:
            yield refine_search(index, embeddings, block, k, k_factor)


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
    q = _as_float32(queries)
    starts = range(0, len(database), block_size)
    blocks = (_as_float32(database[i : i + block_size], q.shape[1]) for i in starts)
    ngpu = faiss.get_num_gpus() if _resolve_gpu(use_gpu) else 0
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
) -> tuple[np.ndarray, np.ndarray]:
    """Search k·k_factor candidates, re-rank them exactly with the stored embeddings, keep the top k.

    Text queries sit off the image distribution, where PQ distance errors reorder neighbours; the
    exact re-ranking recovers the order the coarse cells already found (SPEC stage 4, ``refine``).
    """
    q = _as_float32(queries, index.d)
    sims = np.empty((len(q), k), dtype=np.float32)
    rows = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), batch_size):  # bounds the [batch, k·k_factor, d] gather
        block = q[start : start + batch_size]
        _, candidates = index.search(block, k * k_factor)
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
    inner = _innermost(index)
    if hasattr(inner, "nprobe") and hasattr(inner, "nlist"):  # CPU IndexIVF* and GpuIndexIVF*
        return "nprobe"
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch"
    return None


def set_search_param(index: faiss.Index, name: str, value: int) -> None:
    """Set ``name`` through OPQ/IDMap wrappers and GPU replicas (faiss's ParameterSpace does the walk)."""
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    space.set_index_parameter(index, name, int(value))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set the number of IVF cells searched (paper: 20), wrappers included."""
    if search_param_name(index) != "nprobe":
        raise ValueError(f"{type(_innermost(index)).__name__} is not an IVF index: it has no nprobe")
    set_search_param(index, "nprobe", nprobe)


def _param_range(index: faiss.Index, name: str, k: int, max_value: int | None) -> tuple[int, int]:
    """(first value to try, largest value allowed) for ``tune_nprobe``."""
    gpu_cap = GPU_MAX_K if _on_gpu(index) else None
    if name == "nprobe":
        high = _innermost(index).nlist
        start = 1
    else:
        high = 4096
        start = k
    for cap in (max_value, gpu_cap):
        if cap is not None:
            high = min(high, cap)
    return min(start, high), high


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
    q = _as_float32(queries, index.d)

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


# ---------------------------------------------------------------------------------------------
# Dedup: candidate pairs, duplicate groups, perceptual hashes
# ---------------------------------------------------------------------------------------------


def candidate_pairs(
    query_rows: np.ndarray, sims: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """kNN results as (pairs int64 [m, 2] of (query row, neighbour row), sims [m]); self and -1 dropped."""
    queries = np.broadcast_to(np.asarray(query_rows, dtype=np.int64)[:, None], rows.shape)
    valid = (rows >= 0) & (rows != queries)
    return np.stack([queries[valid], rows[valid]], axis=1), sims[valid]


def connected_components(n_or_ids: int | np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Label every node with the smallest node of its connected component (duplicate groups).

    ``n_or_ids``: an int n (nodes 0..n-1, pairs hold positions) or an array of unique ids (pairs hold
    ids; labels are ids, in the order given). Vectorised union-find: hook roots to the smaller root,
    compress paths by pointer jumping; O(log n) rounds, about a second for 1M nodes and 3M pairs.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if np.ndim(n_or_ids) == 0:
        n = int(n_or_ids)
        if len(pairs) and (pairs.min() < 0 or pairs.max() >= n):
            raise ValueError(f"pairs must hold node numbers in [0, {n}), got {pairs.min()}..{pairs.max()}")
        return _component_roots(n, pairs[:, 0], pairs[:, 1])
    ids = np.asarray(n_or_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if len(ids) > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
        raise ValueError("connected_components: ids must be unique")
    positions = np.searchsorted(sorted_ids, pairs)
    known = positions < len(ids)
    known[known] = sorted_ids[positions[known]] == pairs[known]
    if not known.all():
        raise ValueError(f"pairs mention ids not in the id list, e.g. {pairs[~known][0]}")
    roots = _component_roots(len(ids), positions[:, 0], positions[:, 1])
    labels = np.empty_like(ids)
    labels[order] = sorted_ids[roots]
    return labels


def _component_roots(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For nodes 0..n-1 and edges (a, b): each node's smallest component member."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            return parent
        # Edges already inside one component never matter again.
        a, b, root_a, root_b = a[differ], b[differ], root_a[differ], root_b[differ]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:  # pointer jumping until every node points at its root
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent


def representative_rows(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each item, the smallest row of its group (its ``duplicate_of``; itself when kept)."""
    groups, group_of = np.unique(np.asarray(labels), return_inverse=True)
    rows = np.asarray(rows, dtype=np.int64)
    smallest = np.full(len(groups), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, group_of.ravel(), rows)
    return smallest[group_of.ravel()]


def keep_representatives(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Boolean keep mask: one item per group, the one with the smallest row (deterministic)."""
    return np.asarray(rows, dtype=np.int64) == representative_rows(labels, rows)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def phash_bits_from_hex(hex_hashes: Iterable[str]) -> np.ndarray:
    """imagehash hex strings (all the same length) -> packed uint8 [n, bytes] for ``phash_distances``."""
    hashes = list(hex_hashes)
    if not hashes:
        return np.zeros((0, 0), dtype=np.uint8)
    return np.frombuffer(bytes.fromhex("".join(hashes)), dtype=np.uint8).reshape(len(hashes), -1)


def phash_distances(hash_bits_a: np.ndarray, hash_bits_b: np.ndarray) -> np.ndarray:
    """Hamming (= Manhattan on bits) distance between packed hashes, row by row (broadcasts).

    Accepts uint8 [..., bytes] or one unsigned integer per hash (e.g. uint64 for 64-bit pHash).
    """
    a, b = _hash_bytes(hash_bits_a), _hash_bytes(hash_bits_b)
    return _POPCOUNT[np.bitwise_xor(a, b)].sum(axis=-1, dtype=np.int64)


def _hash_bytes(hashes: np.ndarray) -> np.ndarray:
    """Packed hashes as uint8 [..., bytes]."""
    hashes = np.ascontiguousarray(hashes)
    if hashes.dtype == np.uint8:
        return hashes
    if hashes.dtype.kind != "u":
        raise ValueError(f"hashes must be unsigned integers (packed bits), got {hashes.dtype}")
    return hashes[..., None].view(np.uint8)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` atomically (temporary name, fsync, rename); GPU indexes go to CPU first."""
    path = os.fspath(path)
    if _on_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_index(path: str | os.PathLike, mmap: bool = True) -> faiss.Index:
    """Read an index; with ``mmap`` its codes stay in the page cache instead of being copied to RAM.

    faiss >= 1.10's IO_FLAG_MMAP_IFC maps Flat/PQ codes, HNSW graphs and IVF lists; older faiss only
    maps IVF lists (IO_FLAG_MMAP) and reads the rest. Index types the mapping reader rejects are read
    plainly. A mapped index is read-only: adding to it aborts the process, so pass mmap=False to modify.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no faiss index at {path}")
    if not mmap:
        return faiss.read_index(path)
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
    try:
        return faiss.read_index(path, flag | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return faiss.read_index(path)
