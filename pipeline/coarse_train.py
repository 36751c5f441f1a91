"""IVF centroids for many cells: faiss's two-level k-means, then Lloyd iterations over the whole sample.

Flat k-means costs sample x nlist x d per iteration, and the sample grows with nlist (64 points per
cell), so it is quadratic in the number of vectors indexed. faiss's two-level k-means
(``contrib.clustering.two_level_clustering``: sqrt(nlist) groups, each split by its size) costs
sample x 2 sqrt(nlist) instead, but no cell crosses a group's border: the cells on either side of
one are fitted separately, so clusters that straddle it are cut, and a vector's neighbours end up
in another cell more often. On the synthetic growth sets that cost recall per probed cell, more as
groups multiply: recall@10 at
nprobe 1 (every vector in its nearest cell) was 0.830 at 1M vectors and 0.785 at 3M (README,
Performance).

``refine`` runs a few iterations of full k-means from those centroids (faiss ``Clustering``
initialised with them), assigning the sample through ``cell_assign.centroid_assigner``: brute force in
the centroids' top principal directions where that finds the nearest centroid (checked on the sample),
and above ``cell_assign.GROUPED_MIN_NLIST`` cells only among the centroids of the nearest groups, as
long as that finds ``REFINE_AGREEMENT`` of the nearest centroids (k-means with approximate assignment:
a point that lands in its second-nearest cell moves that centroid a little). Or a flat index on the
GPUs. Three exact iterations took recall@10 at nprobe 1 from 0.830 to 0.965 at 1M; five grouped ones
(the default since) fit better (0.971 at 1M; at 3M nprobe 1 reaches the 0.95 target where three exact
ones needed 2) at about the same cost, measured between 0.86x and 1.39x as fast depending on the
host's state (README, Performance, "2026-12-01"). That was with faiss on generic BLAS kernels; on the
CPU's own (``pipeline.openblas``) ranking every centroid got ~2.5x faster and the grouping is kept
only where ``cell_assign.GROUPED_SCAN_FACTOR`` says it is still cheaper.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

from pipeline.cell_assign import PROJECTED_SAMPLE, centroid_assigner
from pipeline.config import KMEANS_REFINE

SEED = 1234
REFINE_AGREEMENT = 0.98  # of the sample's nearest centroids a grouped assignment must find in refine


def coarse_centroids(x: np.ndarray, nlist: int, metric: int, gpu: bool = False,
                     refine_iterations: int = KMEANS_REFINE) -> np.ndarray:
    """[nlist, d] float32 centroids of the sample ``x`` (spherical k-means for inner product)."""
    from faiss.contrib.clustering import two_level_clustering  # imports scipy: not in every search process

    centroids, _ = two_level_clustering(x, int(math.sqrt(nlist)), nlist, clustering_niter=10, seed=SEED,
                                        spherical=metric == faiss.METRIC_INNER_PRODUCT, gpu=gpu)
    return refine(x, centroids, refine_iterations, metric, gpu)


def refine(x: np.ndarray, centroids: np.ndarray, iterations: int, metric: int, gpu: bool = False) -> np.ndarray:
    """``iterations`` of k-means over all of ``x`` starting from ``centroids`` (faiss splits any cell that
    empties, as in its own k-means)."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if iterations < 1:
        return centroids
    nlist, d = centroids.shape
    clustering = faiss.Clustering(d, nlist)
    clustering.niter, clustering.seed = iterations, SEED
    clustering.spherical = metric == faiss.METRIC_INNER_PRODUCT
    clustering.max_points_per_centroid = 1 << 30  # the whole sample: it was sized for these cells
    faiss.copy_array_to_vector(centroids.ravel(), clustering.centroids)
    if gpu:
        assigner = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(d, metric))
    else:
        # checked on vectors spread over the sample (index.train sorts it by row), against these centroids;
        # the projection stays fixed while they move, and each pass re-scores its 4 best in full
        assigner = centroid_assigner(centroids, metric, x[::max(1, len(x) // PROJECTED_SAMPLE)], 1, REFINE_AGREEMENT)
    clustering.train(x, assigner)
    return faiss.vector_to_array(clustering.centroids).reshape(nlist, d)
