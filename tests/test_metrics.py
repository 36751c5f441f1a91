"""model/metrics.py: every metric against a value worked out by hand on tiny arrays."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.linalg

import model.metrics as metrics
from model.bootstrap import bootstrap_ci, bootstrap_pair_ci
from model.metrics import (clip_score, frechet_distance, kernel_inception_distance, l2_normalise, memorisation,
                           precision_recall, prompt_accuracy, samples_precision_recall)


def test_l2_normalise_unit_rows_and_zero_rows():
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float16))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_prompt_accuracy_hand_example():
    # Prompt 1 has norm 3: ranking by raw dot products instead of cosines would change image 1.
    texts = np.array([[1.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]])
    images = np.array([[1.0, 0.2, 0.1],    # prompt 0, cosines .98/.20/.10: own 1st
                       [0.9, 0.5, 0.0],    # prompt 1, t0 beats t1: own 2nd
                       [0.9, 0.5, 0.1],    # prompt 2, own 3rd
                       [0.0, 2.0, 0.0]])   # prompt 1, own 1st
    acc = prompt_accuracy(images, texts, np.array([0, 1, 2, 1]), ks=(1, 2, 3))
    assert set(acc) == {1, 2, 3}
    np.testing.assert_array_equal(acc[1], [1, 0, 0, 1])
    np.testing.assert_array_equal(acc[2], [1, 1, 0, 1])
    np.testing.assert_array_equal(acc[3], [1, 1, 1, 1])
    assert acc[1].dtype == np.float64


def test_prompt_accuracy_ties_do_not_push_out_own_prompt():
    texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # prompts 0 and 1 identical
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    acc = prompt_accuracy(images, texts, np.array([1, 0]), ks=(1, 2))
    np.testing.assert_array_equal(acc[1], [1, 0])  # tie at the top counts; prompt 2 beats prompt 0
    np.testing.assert_array_equal(acc[2], [1, 1])  # prompt 1 ties prompt 0, so only 1 scores higher


def test_prompt_accuracy_rejects_bad_prompt_index():
    with pytest.raises(ValueError, match=r"prompt_of indexes outside 0\.\.1"):
        prompt_accuracy(np.ones((2, 2)), np.ones((2, 2)), np.array([0, 2]))


def test_clip_score_hand_values_and_clamp():
    texts = np.array([[1.0, 0.0], [0.0, 2.0]])
    images = np.array([[3.0, 4.0], [3.0, 4.0], [-1.0, 0.0], [1.0, -1.0], [1.0, 1.0]])
    scores = clip_score(images, texts, np.array([0, 1, 0, 1, 1]))
    np.testing.assert_allclose(scores, [60.0, 80.0, 0.0, 0.0, 100 / np.sqrt(2)])


def test_frechet_distance_diagonal_covariances():
    # a: (+-1, +-1), mean 0, np.cov = diag(4/3, 4/3). b: (5, 0) + (+-2, +-3), cov = diag(16/3, 12).
    # FD = |mu|^2 + sum (sqrt(s1) - sqrt(s2))^2 = 25 + (2/sqrt3 - 4/sqrt3)^2 + (2/sqrt3 - 6/sqrt3)^2
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float)
    a, b = signs, np.array([5.0, 0.0]) + signs * [2.0, 3.0]
    assert frechet_distance(a, b) == pytest.approx(25 + 4 / 3 + 16 / 3)
    assert frechet_distance(b, a) == pytest.approx(25 + 20 / 3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_one_dimension():
    # a = {0, 2}: mean 1, var 2; b = {1, 5}: mean 3, var 8. FD = 2^2 + (sqrt2 - sqrt8)^2 = 6.
    assert frechet_distance([[0.0], [2.0]], [[1.0], [5.0]]) == pytest.approx(6.0)


def test_frechet_distance_matches_sqrtm_formula_on_full_rank_data():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expect = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance(a[:4], a[:4]) == pytest.approx(0.0, abs=1e-9)  # rank-deficient: fine


def _kid_by_loops(x, y):
    d, m = x.shape[1], len(x)
    k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_equals_exact_unbiased_mmd_when_subset_covers_all():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.5
    expect = _kid_by_loops(a, b)
    assert kernel_inception_distance(a, b, num_subsets=3, max_subset_size=10) == pytest.approx(expect)
    assert kernel_inception_distance(a, b, num_subsets=1, max_subset_size=5) == pytest.approx(expect)


def test_kid_subsets_are_seeded():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 4)), rng.normal(size=(30, 4))
    first = kernel_inception_distance(a, b, num_subsets=5, max_subset_size=10, seed=3)
    assert kernel_inception_distance(a, b, num_subsets=5, max_subset_size=10, seed=3) == first
    assert kernel_inception_distance(a, b, num_subsets=5, max_subset_size=10, seed=4) != first


GRID = np.array([[i, j] for i in range(3) for j in range(3)], dtype=float)


def test_precision_recall_grid():
    # k = 1: every real grid point's nearest other real point is 1 away, so real balls have radius 1.
    # Fakes: (.5, 0) and (.5, .3) are inside the ball of (0, 0); (10, 10) is in no ball: precision 2/3.
    # Fake radii: .3, .3 and |(10,10) - (.5,.3)|^2 = 184.34. The far ball covers every real point
    # except (0, 0) (|.|^2 = 200), which is .5 and .58 from the two near fakes: recall 8/9.
    fake = np.array([[0.5, 0.0], [0.5, 0.3], [10.0, 10.0]])
    precision, recall = precision_recall(GRID, fake, k=1)
    assert precision == pytest.approx(2 / 3)
    assert recall == pytest.approx(8 / 9)


def test_precision_recall_uses_kth_neighbour():
    # real 0, 1, 3, 6 on a line. k = 2 radii: 3, 2, 3, 5; k = 1 radii: 1, 1, 2, 3.
    real = np.array([[0.0, 0], [1, 0], [3, 0], [6, 0]])
    fake = np.array([[9.5, 0.0], [11.5, 0.0], [-3.5, 0.0]])
    assert precision_recall(real, fake, k=2)[0] == pytest.approx(1 / 3)  # 9.5 is 3.5 from 6 (r 5)
    assert precision_recall(real, fake, k=1)[0] == 0.0


def test_precision_recall_blocked_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) + 0.4

    def coverage(manifold, queries, k):
        d_mm = np.linalg.norm(manifold[:, None] - manifold[None], axis=-1)
        radii = np.sort(d_mm, axis=1)[:, k]  # column 0 is the point itself
        d_qm = np.linalg.norm(queries[:, None] - manifold[None], axis=-1)
        return float((d_qm <= radii).any(axis=1).mean())

    expect = (coverage(real, fake, 3), coverage(fake, real, 3))
    monkeypatch.setattr(metrics, "BLOCK_ELEMS", 60)  # blocks of 2 rows
    assert precision_recall(real, fake, k=3) == pytest.approx(expect)


def test_memorisation_known_vectors(monkeypatch):
    train = np.array([[1.0, 0, 0], [0, 2.0, 0], [1.0, 1.0, 0]], dtype=np.float16)
    samples = np.array([[3.0, 0, 0], [0, 0, 1.0], [5.0, 5.0, 0], [1.0, 0, 1.0], [-1.0, 0, 0]])
    expect = [1.0, 0.0, 1.0, 1 / np.sqrt(2), 0.0]
    np.testing.assert_allclose(memorisation(samples, train), expect, atol=1e-12)
    monkeypatch.setattr(metrics, "BLOCK_ELEMS", 1)  # one training row at a time
    np.testing.assert_allclose(memorisation(samples, train), expect, atol=1e-12)


def test_bootstrap_estimate_is_the_mean():
    estimate, low, high = bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0, 10.0]), None, n_boot=300)
    assert estimate == 4.0
    assert 1.0 <= low <= estimate <= high <= 10.0
    assert bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0, 10.0]), None, n_boot=300) == (estimate, low, high)


def test_bootstrap_constant_has_zero_width():
    estimate, low, high = bootstrap_ci(np.full(7, 0.3), np.array([0, 0, 1, 1, 2, 2, 2]), n_boot=50)
    assert low == high == pytest.approx(estimate) and estimate == pytest.approx(0.3)


def _recording_mean(seen):
    def stat(v):
        seen.append(float(np.mean(v)))
        return np.mean(v)
    return stat


def test_cluster_bootstrap_resamples_whole_groups():
    values, groups = np.array([0.0, 0, 0, 1, 1, 1]), np.array([5, 5, 5, 9, 9, 9])
    seen = []
    bootstrap_ci(values, groups, n_boot=200, stat=_recording_mean(seen))
    assert set(seen) == {0.0, 0.5, 1.0}
    # Unequal groups (one 0, three 1s): draws {0,0}, {0,1}, {1,1} give means 0, 3/4, 1.
    seen = []
    bootstrap_ci(np.array([1.0, 0, 1, 1]), np.array([2, 1, 2, 2]), n_boot=200, stat=_recording_mean(seen))
    assert set(seen) == {0.0, 0.75, 1.0}
    # Item-level resampling of the first example gives other means, e.g. 1/6.
    seen = []
    bootstrap_ci(values, None, n_boot=200, stat=_recording_mean(seen))
    assert len(set(seen)) > 3


def test_bootstrap_pair_ci_b_fixed():
    a = np.repeat(np.arange(4.0), 2)[:, None] * [1.0, 0.0]   # column 0 = group id, 2 rows per group
    b = np.arange(5.0)[:, None] * [0.0, 1.0]
    calls = []

    def fn(x, y):
        calls.append((x.copy(), y.copy()))
        return float(x[:, 0].mean())

    estimate, low, high = bootstrap_pair_ci(a, b, a[:, 0].astype(int), None, fn, n_boot=40)
    assert estimate == pytest.approx(1.5) and low <= estimate <= high
    assert len(calls) == 41
    for x, y in calls:
        np.testing.assert_array_equal(y, b)
        assert len(x) == 8 and all(c % 2 == 0 for c in Counter(x[:, 0]).values())


def test_bootstrap_pair_ci_tuple_metric():
    a, b = np.arange(12.0).reshape(6, 2), np.zeros((3, 2))
    estimate, low, high = bootstrap_pair_ci(a, b, np.repeat([10, 20, 30], 2), np.arange(3),
                                            lambda x, y: (float(len(x)), float(len(y))), n_boot=30)
    for arr in (estimate, low, high):
        np.testing.assert_array_equal(arr, [6.0, 3.0])  # 3 groups of 2 drawn each time; b whole
    with pytest.raises(ValueError, match=r"b_groups must have shape \(3,\), got \(4,\)"):
        bootstrap_pair_ci(a, b, None, np.arange(4), lambda x, y: 0.0, n_boot=2)


def test_bootstrap_pair_ci_with_a_set_metric():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(40, 3)), rng.normal(size=(60, 3)) + 1.0
    estimate, low, high = bootstrap_pair_ci(a, b, np.arange(40) // 4, None, frechet_distance, n_boot=30)
    assert estimate == pytest.approx(frechet_distance(a, b))
    assert low < estimate < high


def test_kid_from_cached_kernels_equals_kid_from_each_subset(monkeypatch):
    """The kernels are computed once and each subset summed through its indicator vector; the same subsets computed from their
    rows give the same figure."""
    import model.metrics as metrics

    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((30, 6)), rng.standard_normal((20, 6)) + 0.3
    cached = kernel_inception_distance(a, b, num_subsets=7, max_subset_size=12, seed=2)
    monkeypatch.setattr(metrics, "KERNEL_CACHE_ROWS", 0)
    assert kernel_inception_distance(a, b, num_subsets=7, max_subset_size=12, seed=2) == pytest.approx(cached, abs=1e-12)


@pytest.mark.parametrize("metric, depth", [(frechet_distance, None), (kernel_inception_distance, None),
                                           (samples_precision_recall, None), (samples_precision_recall, 2)])
def test_bootstraps_sharing_work_across_replicates_equal_the_plain_calls(metric, depth, monkeypatch):
    """FD, KID and precision/recall prepare what every bootstrap replicate shares (the reference's Gaussian, the kernels,
    the balls and nearest-neighbour lists); each replicate, repeated rows included, must still equal the metric called on
    that replicate's rows, in both bootstraps. Depth 2 lists too few neighbours, so radii come from whole rows."""
    from model.bootstrap import bootstrap_paired_difference_ci

    if depth:
        monkeypatch.setattr(metrics, "PR_NEIGHBOURS", depth)

    plain = lambda x, y: metric(x, y)  # noqa: E731 - no on_rows: every replicate computes from its own rows
    assert getattr(plain, "on_rows", None) is None and metric.on_rows is not None
    rng = np.random.default_rng(7)
    a, b, ref = rng.standard_normal((48, 5)), rng.standard_normal((48, 5)) + 0.2, rng.standard_normal((30, 5)) + 0.5
    groups = np.arange(48) // 3  # replicates repeat whole prompts, so rows repeat
    shared = bootstrap_pair_ci(a, ref, groups, None, metric, n_boot=25)
    each = bootstrap_pair_ci(a, ref, groups, None, plain, n_boot=25)
    np.testing.assert_allclose(shared, each, rtol=1e-9, atol=1e-12)
    shared = bootstrap_paired_difference_ci(a, b, groups, ref, metric, n_boot=25)
    each = bootstrap_paired_difference_ci(a, b, groups, ref, plain, n_boot=25)
    np.testing.assert_allclose(shared, each, rtol=1e-9, atol=1e-12)
    rows = np.array([0, 0, 5, 5, 5, 9, 12, 40, 41, 47])  # one replicate by hand
    assert metric.on_rows(a, ref)(rows) == pytest.approx(metric(a[rows], ref), rel=1e-9, abs=1e-12)


def test_paired_difference_by_hand_and_zero_for_identical_sets():
    from model.bootstrap import bootstrap_paired_difference_ci

    mean_gap = lambda x, ref: float(np.abs(x.mean(axis=0) - ref.mean(axis=0)).sum())  # noqa: E731
    a = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 3.0], [6.0, 3.0]])
    b = a + 1.0
    ref = np.zeros((3, 2))
    groups = np.array([0, 0, 1, 1])
    estimate, low, high = bootstrap_paired_difference_ci(a, b, groups, ref, mean_gap, n_boot=50)
    assert estimate == pytest.approx((3 + 2) - (4 + 3))  # |mean a| = (3, 2), |mean b| = (4, 3)
    # b = a + 1 everywhere: every replicate's difference is exactly -2, so the interval is a point
    assert low == pytest.approx(-2.0) and high == pytest.approx(-2.0)
    assert bootstrap_paired_difference_ci(a, a, groups, ref, mean_gap, n_boot=20) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        bootstrap_paired_difference_ci(a, b[:3], None, ref, mean_gap)
