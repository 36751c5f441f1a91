"""Queries' IVF cells found apart from the index: on a GPU (neighbours.gpus_per_actor), then searched
with faiss's ``search_preassigned``. faiss_search's ``bulk_search``, ``refine_search`` and
``exact_coarse`` use these."""
from __future__ import annotations

import faiss
import numpy as np

from pipeline.faiss_build import as_float32, centroid_index

GPU_MAX_K = 2048  # largest k and nprobe a GPU search accepts


def gpu_centroid_index(ivf: faiss.IndexIVF, temp_memory: int = 256 << 20) -> faiss.Index:
    """``centroid_index`` on this process's first GPU (under Ray, the actor's), with ``temp_memory`` of
    scratch instead of faiss's default of up to 1.5 GiB: several actors share one GPU. A RuntimeError
    says what is missing (faiss-gpu, a visible GPU) or too large (nprobe above a GPU search's k)."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        raise RuntimeError("neighbours.gpus_per_actor needs faiss-gpu and a GPU visible to each actor, "
                           f"but faiss here sees {faiss.get_num_gpus()} GPUs")
    if ivf.nprobe > GPU_MAX_K:
        raise RuntimeError(f"nprobe {ivf.nprobe} exceeds the {GPU_MAX_K} cells a GPU search returns per query")
    resources = faiss.StandardGpuResources()
    resources.setTempMemory(temp_memory)
    index = faiss.index_cpu_to_gpu(resources, 0, centroid_index(ivf))
    index.resources = resources  # held with the index for its lifetime
    return index


def preassigned_search(index: faiss.Index, queries: np.ndarray, k: int, coarse: faiss.Index | None,
                       cells: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``search`` on a CPU IVF (OPQ or any transform in front applied first) in the cells that ``coarse``
    (a flat index of the centroids, on a GPU or not) finds: faiss's ``search_preassigned``. ``cells``
    ([n, nprobe]) instead of ``coarse``: an ``IVF,Flat``'s cells already known (their centroid scores,
    which only residual codes use, are passed as zeros)."""
    ivf = faiss.extract_index_ivf(index)
    x = pretransformed(index, as_float32(queries, index.d))
    if cells is None:
        scores, cells = coarse.search(x, ivf.nprobe)
    else:
        if type(faiss.downcast_index(index)) is not faiss.IndexIVFFlat:
            raise ValueError("preassigned_search takes known cells for a bare IndexIVFFlat only")
        scores = np.zeros(cells.shape, np.float32)
    sims, ids = ivf.search_preassigned(x, k, np.ascontiguousarray(cells, dtype=np.int64),
                                       np.ascontiguousarray(scores, dtype=np.float32))
    sims[ids < 0] = -np.inf
    return sims, ids


def pretransformed(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """``x`` through the transforms (OPQ, PCA) an ``IndexPreTransform`` applies before its IVF; else ``x``."""
    wrapper = faiss.downcast_index(index)
    for i in range(wrapper.chain.size() if isinstance(wrapper, faiss.IndexPreTransform) else 0):
        x = faiss.downcast_VectorTransform(wrapper.chain.at(i)).apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)
