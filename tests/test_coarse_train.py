"""coarse_train: two-level k-means, then full k-means iterations that let cells cross the groups' borders."""
import faiss
import numpy as np
import pytest

from pipeline import cell_assign, coarse_train, faiss_build

IP, L2 = faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2


def lloyd(x: np.ndarray, centroids: np.ndarray, iterations: int, metric: int) -> np.ndarray:
    """The oracle: k-means iterations with brute-force assignment, by hand (spherical for inner product)."""
    c = centroids.astype(np.float64)
    if metric == IP:
        c /= np.linalg.norm(c, axis=1, keepdims=True)  # faiss normalises the starting centroids too
    for _ in range(iterations):
        scores = x @ c.T if metric == IP else -((x[:, None, :] - c[None]) ** 2).sum(-1)
        labels = scores.argmax(1)
        assert np.bincount(labels, minlength=len(c)).min() > 0  # no cell empties here: faiss would split one
        c = np.stack([x[labels == j].mean(0) for j in range(len(c))])
        if metric == IP:
            c /= np.linalg.norm(c, axis=1, keepdims=True)
    return c


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("metric", [IP, L2])
@pytest.mark.parametrize("rank", [8, 128])
def test_refine_is_lloyds_iterations_from_the_given_centroids(metric, rank):
    """Data in 8 of 128 dimensions (the projected assigner) or all 128 (brute force in full): the same
    centroids as Lloyd's algorithm by hand, started from the same (deliberately poor) centroids."""
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((128, rank)))[0]
    x = unit(rng.standard_normal((4000, rank)) @ basis.T + 0.02 * rng.standard_normal((4000, 128)))
    start = (x[rng.choice(len(x), 40, replace=False)] + 0.01).astype(np.float32)
    assigner = cell_assign.centroid_assigner(start, metric, x[::4], 1)
    assert isinstance(assigner, faiss.IndexRefine) == (rank == 8)  # the projected path is the one tested at rank 8
    got = coarse_train.refine(x, start, 3, metric)
    np.testing.assert_allclose(got, lloyd(x, start, 3, metric), atol=2e-5)


def nearest_cell_recall(x: np.ndarray, centroids: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of each query's true 10 nearest vectors that sit in the query's own (nearest) cell."""
    _, cell = faiss.knn(x, centroids, 1, metric=IP)
    _, own = faiss.knn(queries, centroids, 1, metric=IP)
    _, truth = faiss.knn(queries, x, 11, metric=IP)
    return float((cell[truth[:, 1:], 0] == own).mean())


def growth_like(n: int, d: int = 32, rank: int = 16, seed: int = 0) -> np.ndarray:
    """As tools/make_synthetic_embeddings.py: clusters of ~50 in a rank-16 subspace, noise in all d."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    centres = unit(rng.standard_normal((n // 50, rank)))
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, rank)) / np.sqrt(rank)
    return unit(x @ basis.T + 0.1 * rng.standard_normal((n, d)) / np.sqrt(d))


def test_refined_centroids_fit_better_than_two_level_and_train_index_uses_them():
    """1,100 cells (two-level k-means: 33 groups) over 64 vectors per cell: three full iterations raise
    the k-means objective and the share of true neighbours found in a vector's own cell (0.79 -> 0.88);
    train_index's quantizer holds exactly coarse_centroids' centroids, refined or not (index.kmeans_refine)."""
    x = growth_like(64 * 1100)
    two_level = coarse_train.coarse_centroids(x, 1100, IP, refine_iterations=0)
    refined = coarse_train.refine(x, two_level, 3, IP)

    def objective(c):
        return float(faiss.knn(x, c, 1, metric=IP)[0].mean())

    assert objective(refined) > objective(two_level) + 0.002
    queries = x[::64]
    assert nearest_cell_recall(x, refined, queries) > nearest_cell_recall(x, two_level, queries) + 0.05
    for iterations, expected in ((0, two_level), (3, refined)):
        index = faiss_build.train_index("IVF1100,Flat", 32, x, use_gpu=False, refine_iterations=iterations)
        np.testing.assert_array_equal(faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 1100), expected)


def test_refine_over_many_cells_assigns_through_groups_and_fits_as_well(monkeypatch):
    """Above GROUPED_MIN_NLIST cells the iterations assign each point among its nearest groups' centroids
    (an approximate k-means, REFINE_AGREEMENT of the nearest cells checked on the sample): the
    centroids then fit the data about as well as exact iterations (objective and neighbours found in
    the own cell within 1 %), and better than the two levels alone."""
    x = growth_like(64 * 1100)
    two_level = coarse_train.coarse_centroids(x, 1100, IP, refine_iterations=0)
    exact = coarse_train.refine(x, two_level, 5, IP)
    monkeypatch.setattr(cell_assign, "GROUPED_MIN_NLIST", 1000)
    monkeypatch.setattr(cell_assign, "GROUPED_SCAN_FACTOR", 1)  # the grouped fit is tested, not the choice
    used = []
    choose = cell_assign.centroid_assigner
    monkeypatch.setattr(coarse_train, "centroid_assigner",
                        lambda *args: used.append(choose(*args)) or used[-1])
    grouped = coarse_train.refine(x, two_level, 5, IP)
    assert cell_assign.groups_of(used[0]) is not None  # the grouped path is the one tested
    assert not np.allclose(grouped, exact)

    def objective(c):
        return float(faiss.knn(x, c, 1, metric=IP)[0].mean())

    queries = x[::64]
    assert objective(grouped) > objective(exact) - 0.001
    assert objective(grouped) > objective(two_level) + 0.002
    assert nearest_cell_recall(x, grouped, queries) > nearest_cell_recall(x, exact, queries) - 0.01
    assert nearest_cell_recall(x, grouped, queries) > nearest_cell_recall(x, two_level, queries) + 0.05
