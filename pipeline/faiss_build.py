"""Building faiss indexes over CLIP embeddings: the ``factory: auto`` rule, training, adding, files.

Conventions shared with ``faiss_search``:

- Vectors are L2-normalised (float16 on disk, float32 in faiss); similarity is the inner product
  (``faiss.METRIC_INNER_PRODUCT``), so sims are cosine similarities, sorted descending.
- Indexes return *rows* (int64 positions in the concatenated embedding files, SPEC "Keys"), never
  positions inside the index: vectors are always added with explicit ids. IVF indexes keep ids in
  their inverted lists; other types (Flat, HNSW, PQ) cannot, so ``make_index`` wraps them in an
  ``IndexIDMap`` (8 bytes/vector; not ``IndexIDMap2``, whose ~40 B/vector only serve ``reconstruct``).
- GPU: when faiss sees a GPU, k-means (IVF training) and the coarse assignment of added vectors run
  there for any index (``faiss_search`` decides where an index is searched).
- Data bigger than memory arrives as blocks: ``add_batches`` takes an iterator of (rows, vectors).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable

import faiss
import numpy as np

from pipeline.cell_assign import EXACT_COARSE_MAX_NLIST, centroid_index, exact_assigner  # noqa: F401 - re-exported
from pipeline.coarse_train import coarse_centroids
from pipeline.config import KMEANS_REFINE
from pipeline.sizes import format_bytes, parse_bytes

METRIC = faiss.METRIC_INNER_PRODUCT
# choose_factory regimes (see its docstring for why).
EXACT_MAX_N = 20_000
HNSW_MAX_N = 500_000
HNSW_M = 32
CELL_SIZE = 128  # vectors per IVF cell of the auto factory, at any N
HNSW_QUANTIZER_ABOVE = 300_000  # above this many vectors the coarse quantizer is an HNSW graph of the centroids
# That graph's build and add-time search depths. With faiss's defaults (40, 16), at 3M vectors (22,893
# centroids) 22 % of vectors went to a cell other than their nearest centroid's, and recall@10 0.95
# took nprobe 59; with these, nprobe ~8 (README, Performance).
QUANTIZER_EF_CONSTRUCTION = 200
QUANTIZER_ADD_EF = 32
PQ_BYTES = (256, 128, 64, 32, 16)  # bytes/vector tried for OPQ+IVF+PQ, best first
ID_BYTES = 8  # one int64 row id per vector
# Training sample: faiss k-means warns under 39 points per centroid and subsamples above 256.
KMEANS_MIN_POINTS_PER_CENTROID = 39
TRAIN_POINTS_PER_CELL = 64
TWO_LEVEL_ABOVE = 1024  # IVF cells: above this the coarse k-means runs in two levels (sqrt(nlist) groups)
PQ_TRAIN_POINTS = 256 * 64  # 256 centroids per sub-quantizer

# ---------------------------------------------------------------------------------------------
# Helpers faiss_search shares: input vectors, wrapper walking, the GPU choice
# ---------------------------------------------------------------------------------------------


def as_float32(x: np.ndarray | None, d: int | None = None) -> np.ndarray:
    """C-contiguous float32 [n, d] (what faiss wants) from float16/memmap input."""
    if x is None:
        raise ValueError("this index needs training vectors; got None")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"expected vectors of shape [n, {d if d is not None else 'd'}], got {x.shape}")
    return x


def innermost_index(index: faiss.Index) -> faiss.Index:
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


def gpu_available() -> bool:
    """True when the installed faiss is faiss-gpu and sees at least one GPU."""
    return faiss.get_num_gpus() > 0


def resolve_gpu(use_gpu: bool | None) -> bool:
    """``None`` means: use the GPU when there is one; ``True`` without one is an error."""
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss sees no GPU: install faiss-gpu or pass use_gpu=False")
    return bool(use_gpu)


def on_gpu(index: faiss.Index) -> bool:
    """True when the index (or what it wraps) lives on a GPU."""
    return type(innermost_index(index)).__name__.startswith("Gpu")


# ---------------------------------------------------------------------------------------------
# Sizes and the `factory: auto` rule
# ---------------------------------------------------------------------------------------------


def ivf_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about 4·sqrt(n) as a power of two, >= 39 training points per cell.

    dedup's candidate index; the index stage's auto factory keeps cells constant (``ivf_coarse``)."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    while nlist > 1 and nlist * KMEANS_MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


def ivf_coarse(n: int, cell_size: int = CELL_SIZE, hnsw_above: int = HNSW_QUANTIZER_ABOVE) -> str:
    """The coarse level of the auto factory for ``n`` vectors: ``IVF{nlist}`` or ``IVF{nlist}_HNSW32``.

    nlist = n / cell_size (rounded, >= 1): a probed cell costs the same at any n (128 vectors: faiss's
    guideline of 65k-262k lists for 1M-100M). Above ``hnsw_above`` an HNSW graph finds the nearest
    centroids in ~log(nlist). The nprobe that reaches a recall target still grows with n (README).
    """
    if cell_size < KMEANS_MIN_POINTS_PER_CENTROID:
        raise ValueError(f"cell_size {cell_size} is below faiss k-means' minimum of "
                         f"{KMEANS_MIN_POINTS_PER_CENTROID} training points per centroid")
    nlist = max(1, round(n / cell_size))
    return f"IVF{nlist}_HNSW{HNSW_M}" if n > hnsw_above else f"IVF{nlist}"


def make_index(factory: str, d: int) -> faiss.Index:
    """An empty inner-product index for ``factory``; non-IVF types get an IndexIDMap so ids are rows."""
    index = faiss.index_factory(d, factory, METRIC)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None and not isinstance(index, faiss.IndexIDMap):
        # Built through the factory so the map owns the wrapped index (no dangling sub-index).
        return faiss.index_factory(d, "IDMap," + factory, METRIC)
    ivf = faiss.downcast_index(ivf)
    if isinstance(quantizer := faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        quantizer.hnsw.efConstruction = QUANTIZER_EF_CONSTRUCTION
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


def candidate_factories(n: int, d: int, cell_size: int = CELL_SIZE, hnsw_above: int = HNSW_QUANTIZER_ABOVE) -> list[str]:
    """The factories ``choose_factory`` considers for ``n`` x ``d``, most accurate first."""
    coarse = ivf_coarse(n, cell_size, hnsw_above)
    factories = []
    if n <= EXACT_MAX_N:
        factories.append("Flat")
    if n <= HNSW_MAX_N:
        factories.append(f"HNSW{HNSW_M}")
    factories.append(f"{coarse},Flat")
    if n >= 256 * KMEANS_MIN_POINTS_PER_CENTROID:  # fewer cannot train 256-centroid codebooks
        for m in PQ_BYTES:
            d_opq = d // m * m  # OPQ rotates (and trims) to a multiple of m dimensions
            if d_opq:
                factories.append(f"OPQ{m}_{d_opq},{coarse},PQ{m}")
    return factories


def choose_factory(
    n: int, d: int, memory_budget: int | str, cell_size: int = CELL_SIZE, hnsw_above: int = HNSW_QUANTIZER_ABOVE
) -> str:
    """The ``factory: auto`` rule: the most accurate index for ``n`` x ``d`` vectors that fits the budget.

    In order: exact ``Flat`` for n <= 20k (brute force is cheap there and needs no tuning);
    ``HNSW32`` up to 500k (graph search, high recall, build time still minutes on CPU);
    ``IVF{nlist},Flat`` when the raw float32 vectors fit (exact distances inside the probed cells);
    then ``OPQ{m}_{d'},IVF{nlist},PQ{m}`` with the largest m of 256, 128, 64, 32, 16 bytes/vector that
    fits (paper: IVF + OPQ, 2048 B -> 256 B, i.e. 264 B/vector with the id). nlist = n / cell_size,
    with an HNSW coarse quantizer above ``hnsw_above`` vectors (``ivf_coarse``).
    Raises ValueError naming the budget and the size needed when even the smallest does not fit.
    """
    budget = parse_bytes(memory_budget)
    factories = candidate_factories(n, d, cell_size, hnsw_above)
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
    inner = ivf if ivf is not None else innermost_index(index)
    needed = ivf.nlist if ivf is not None else 1
    pq = getattr(inner, "pq", None)
    return max(needed, pq.ksub if pq is not None else 1)


def train_index(
    factory: str, d: int, train_vectors: np.ndarray | None, use_gpu: bool | None = None,
    refine_iterations: int = KMEANS_REFINE,
) -> faiss.Index:
    """An empty, trained index for ``factory`` (see ``training_sample_size`` for the sample to pass).

    With a GPU the IVF k-means runs there for any code size (faiss's ``clustering_index`` hook); OPQ
    and PQ codebooks are small and train on CPU. Flat and HNSW need no training (``train_vectors`` unused).
    ``refine_iterations``: full k-means iterations after a two-level one (``coarse_train``).
    """
    index = make_index(factory, d)
    if index.is_trained:
        return index
    x = as_float32(train_vectors, d)
    needed = _min_training_points(index)
    if len(x) < needed:
        raise ValueError(f"factory {factory!r} needs at least {needed} training vectors, got {len(x)}")
    ivf = faiss.try_extract_index_ivf(index)
    gpu = resolve_gpu(use_gpu)
    if ivf is not None and ivf.nlist > TWO_LEVEL_ABOVE:
        _train_two_level(index, x, gpu, refine_iterations)
    elif ivf is None or not gpu:
        index.train(x)
    else:
        gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
        _train_with_kmeans_index(index, x, gpu_flat)
    return index


def _train_two_level(index: faiss.Index, x: np.ndarray, gpu: bool, refine_iterations: int) -> None:
    """Train ``index`` with IVF centroids from ``coarse_train.coarse_centroids`` (faiss's two-level
    k-means, then ``refine_iterations`` of full k-means): a flat k-means of 25 iterations costs
    sample x nlist each, quadratic in n (~20 min on 2 cores at 3M). OPQ in front is trained first, as
    contrib's train_ivf_index_with_2level does (which takes L2 indexes only; ours are inner product,
    hence the spherical k-means)."""
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):
        for i in range(outer.chain.size()):
            transform = outer.chain.at(i)
            transform.train(x)
            x = transform.apply(x)
        _train_two_level(outer.index, x, gpu, refine_iterations)
        outer.is_trained = True
        return
    ivf = faiss.extract_index_ivf(outer)
    centroids = coarse_centroids(x, ivf.nlist, ivf.metric_type, gpu, refine_iterations)
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(centroids)
    outer.train(x)  # the quantizer holds nlist centroids now: faiss trains only what remains (PQ codebooks)


def _train_with_kmeans_index(index: faiss.Index, x: np.ndarray, kmeans_index: faiss.Index) -> None:
    """Train ``index`` with its IVF k-means assigning points through ``kmeans_index`` (a GPU flat)."""
    ivf = faiss.extract_index_ivf(index)
    ivf.clustering_index = kmeans_index  # caller keeps kmeans_index alive; not serialized
    try:
        index.train(x)
    finally:
        ivf.clustering_index = None


def add_batches(
    index: faiss.Index, batches: Iterable[tuple[np.ndarray, np.ndarray]], use_gpu: bool | None = None,
    assigner: faiss.Index | None = None,
) -> int:
    """Add (rows int64 [n], vectors [n, d]) blocks with the rows as ids; returns how many were added.

    With a GPU, an IVF index's coarse assignment (the expensive part of adding) runs on the GPU and
    the codes are appended to the CPU index, which need not fit GPU memory. On CPU an HNSW coarse
    quantizer is bypassed the same way (brute force over the centroids, ``exact_assigner``, checked
    on the first batch) up to ``EXACT_COARSE_MAX_NLIST`` cells, more where a projection finds the
    same cells; above that it assigns with efSearch >= ``QUANTIZER_ADD_EF``: 97 % of vectors reach
    their nearest cell (3M) instead of 78 % with the graph's default of 16. ``assigner``: one built
    already (a parallel build's tasks get it from the driver, ``cell_assign.from_bytes``).
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and assigner is None and resolve_gpu(use_gpu):
        assigner = faiss.index_cpu_to_all_gpus(centroid_index(ivf))
    added, first = 0, True
    with _quantizer_ef(ivf, QUANTIZER_ADD_EF):
        for rows, vectors in batches:
            x = as_float32(vectors, index.d)
            ids = np.ascontiguousarray(rows, dtype=np.int64)
            if ids.shape != (len(x),):
                raise ValueError(f"got {ids.shape} rows for {len(x)} vectors: pass one row id per vector")
            if first and ivf is not None and assigner is None:  # CPU, none given
                from pipeline.faiss_assign import pretransformed  # it imports this module
                assigner = exact_assigner(ivf, pretransformed(index, x), 1)  # checked on the first batch
            first = False
            if assigner is None:
                index.add_with_ids(x, ids)
            else:
                _add_preassigned(index, ivf, assigner, x, ids)
            added += len(ids)
    return added


@contextlib.contextmanager
def _quantizer_ef(ivf: faiss.IndexIVF | None, ef: int):
    """Within the block, an HNSW coarse quantizer of ``ivf`` searches with efSearch >= ``ef``."""
    quantizer = None if ivf is None else faiss.downcast_index(ivf.quantizer)
    if not isinstance(quantizer, faiss.IndexHNSW):
        yield
        return
    before = quantizer.hnsw.efSearch
    quantizer.hnsw.efSearch = max(before, ef)
    try:
        yield
    finally:
        quantizer.hnsw.efSearch = before


def _add_preassigned(
    index: faiss.Index, ivf: faiss.IndexIVF, assigner: faiss.Index, x: np.ndarray, ids: np.ndarray
) -> None:
    """Add to ``index`` what ``index.add_with_ids`` would, with the cell assignment done by ``assigner``."""
    from faiss.contrib.ivf_tools import add_preassigned

    from pipeline.faiss_assign import pretransformed  # it imports this module

    transformed = pretransformed(index, x)
    _, cells = assigner.search(transformed, 1)
    add_preassigned(ivf, transformed, cells.ravel(), ids)
    index.ntotal = ivf.ntotal  # wrappers keep their own count
