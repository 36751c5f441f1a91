"""Sample-quality metrics for `knnd evaluate`, computed on feature arrays.

Every function takes embeddings from an evaluation CLIP encoder (numpy arrays, any float dtype,
memmaps included) and does its maths in float64. Nothing here touches a model or the GPU.

Per-image metrics (one value per generated image, so they can be bootstrapped per prompt):
    prompt_accuracy   is the image's own prompt among the k prompts closest to it?
    clip_score        100 * max(cos(image, own prompt), 0)
    memorisation      highest cosine to any training feature
Set metrics (one value for a pair of sets):
    frechet_distance, kernel_inception_distance, precision_recall (samples_precision_recall: fake first)
Their bootstrap intervals are in model.bootstrap. frechet_distance, kernel_inception_distance and
samples_precision_recall carry `on_rows`, which keeps what every replicate shares: for sets of at most
KERNEL_CACHE_ROWS rows that is up to three 288 MB float64 matrices per set (a paired bootstrap holds two
sets' worth); bigger sets fall back to computing each replicate from its rows.

Pairwise matrices are otherwise built in row blocks of at most BLOCK_ELEMS float64 entries (128 MB), so
20k x 20k comparisons stay well under 1 GB.
"""
from __future__ import annotations

import numpy as np

BLOCK_ELEMS = 1 << 24


def _blocks(n_rows: int, n_cols: int):
    """Yield slices over n_rows so that a [rows, n_cols] float64 block holds <= BLOCK_ELEMS entries."""
    step = max(1, BLOCK_ELEMS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _as2d(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a [n, d] feature array, got shape {x.shape}")
    return x


def l2_normalise(x) -> np.ndarray:
    """Rows of x scaled to unit L2 norm (float64); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_prompt_of(prompt_of, n_images: int, n_prompts: int) -> np.ndarray:
    prompt_of = np.asarray(prompt_of)
    if prompt_of.shape != (n_images,) or not np.issubdtype(prompt_of.dtype, np.integer):
        raise ValueError(f"prompt_of must be {n_images} integers, got {prompt_of.dtype} {prompt_of.shape}")
    if n_images and (prompt_of.min() < 0 or prompt_of.max() >= n_prompts):
        raise ValueError(f"prompt_of indexes outside 0..{n_prompts - 1}")
    return prompt_of


def prompt_accuracy(image_feats, text_feats, prompt_of, ks=(1, 5)) -> dict[int, np.ndarray]:
    """Per image, is its own prompt among the k prompts most cosine-similar to it?

    Returns {k: float array [N] of 1.0 / 0.0}. Ties: the own prompt counts as in the top k when
    strictly fewer than k prompts score higher than it, so a prompt tied with the own one (e.g. a
    duplicate caption) never pushes it out.
    """
    images, texts = l2_normalise(_as2d(image_feats)), l2_normalise(_as2d(text_feats))
    prompt_of = _check_prompt_of(prompt_of, len(images), len(texts))
    higher = np.empty(len(images), dtype=np.int64)
    for rows in _blocks(len(images), len(texts)):
        sims = images[rows] @ texts.T
        own = sims[np.arange(len(sims)), prompt_of[rows]]
        higher[rows] = (sims > own[:, None]).sum(axis=1)
    return {int(k): (higher < k).astype(np.float64) for k in ks}


def clip_score(image_feats, text_feats, prompt_of) -> np.ndarray:
    """Per image, 100 * max(cos(image, its prompt), 0) (the torchmetrics CLIPScore convention)."""
    images, texts = l2_normalise(_as2d(image_feats)), l2_normalise(_as2d(text_feats))
    prompt_of = _check_prompt_of(prompt_of, len(images), len(texts))
    cos = np.einsum("nd,nd->n", images, texts[prompt_of])
    return 100.0 * np.maximum(cos, 0.0)


def memorisation(sample_feats, train_feats) -> np.ndarray:
    """Per sample, the highest cosine similarity to any training feature.

    The training set is read in chunks (each normalised on the fly), so a float16 memmap of a
    large training set is never copied whole into float64.
    """
    samples = l2_normalise(_as2d(sample_feats))
    train = np.asarray(train_feats)
    if train.ndim != 2 or train.shape[1] != samples.shape[1] or len(train) == 0:
        raise ValueError(f"train_feats must be a non-empty [M, {samples.shape[1]}] array")
    best = np.full(len(samples), -np.inf)
    for cols in _blocks(len(train), len(samples)):
        chunk = l2_normalise(train[cols])
        best = np.maximum(best, (samples @ chunk.T).max(axis=1))
    return best


def _mean_cov(x) -> tuple[np.ndarray, np.ndarray]:
    x = _as2d(x)
    if len(x) < 2:
        raise ValueError("a covariance needs at least 2 feature vectors")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr(sqrtm(s1 @ s2)) for symmetric PSD s1, s2."""
    return _trace_sqrt_given_root(_psd_sqrt(s1), s2)


def _trace_sqrt_given_root(r1: np.ndarray, s2: np.ndarray) -> float:
    """tr(sqrtm(s1 @ s2)) from r1 = sqrtm(s1), for symmetric PSD s1, s2.

    s1 @ s2 has the same eigenvalues as the symmetric PSD r1 @ s2 @ r1, so the trace is the sum of
    square roots of eigvalsh of that: exact for singular covariances too (fewer samples than
    dimensions) and never complex, unlike scipy.linalg.sqrtm(s1 @ s2).
    """
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula):

        |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)),  S = np.cov (ddof 1, as clean-fid).

    Rounding can make the result a hair below 0 for identical sets; it is clamped to 0.
    """
    mu_a, s_a = _mean_cov(feats_a)
    mu_b, s_b = _mean_cov(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * _trace_sqrt_product(s_a, s_b)
    return max(float(fd), 0.0)


def _fd_on_rows(feats_a, feats_b):
    """rows -> frechet_distance(feats_a[rows], feats_b) for many `rows` (bootstrap replicates), with
    b's mean, covariance and covariance square root computed once (tr sqrtm(S_a S_b) = tr sqrtm(S_b S_a)).
    Equal to rounding: ~1e-9 relative at CLIP sizes, ~1e-8 where a covariance is singular (fewer rows than
    dimensions), since the clipped near-zero eigenvalues then sit in the other factor."""
    a = _as2d(feats_a)
    mu_b, s_b = _mean_cov(feats_b)
    r_b, trace_b = _psd_sqrt(s_b), np.trace(s_b)

    def on_rows(rows) -> float:
        mu_a, s_a = _mean_cov(a[rows])
        diff = mu_a - mu_b
        return max(float(diff @ diff + np.trace(s_a) + trace_b - 2.0 * _trace_sqrt_given_root(r_b, s_a)), 0.0)

    return on_rows


frechet_distance.on_rows = _fd_on_rows  # bootstraps fit the reference's Gaussian once


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    k = x @ y.T
    k /= x.shape[1]
    k += 1.0
    cube = k * k  # two multiplications, in place: `** 3` costs twice the matrix product itself
    cube *= k
    return cube


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 from the kernel matrices of equal-size sets x, y: off-diagonal means within
    sets minus 2 x mean across."""
    m = len(kxx)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


KERNEL_CACHE_ROWS = 6000  # up to this many rows per set, the kernels are computed once, not per subset


def kernel_inception_distance(feats_a, feats_b, num_subsets=100, max_subset_size=1000, seed=0) -> float:
    """KID: unbiased MMD^2 with kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    Each subset draws m = min(len(a), len(b), max_subset_size) rows from each set without
    replacement, as clean-fid's kernel_distance does, but from np.random.default_rng(seed) rather
    than the global numpy state, so the value is reproducible. If m equals both set sizes every
    subset is the whole data and the result is the exact unbiased MMD^2. Can be negative.
    """
    a, b = _as2d(feats_a), _as2d(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(len(a), len(b), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors per set")
    if max(len(a), len(b)) <= KERNEL_CACHE_ROWS:
        return _kid_on_rows(a, b, num_subsets, max_subset_size, seed)(np.arange(len(a)))
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        total += _mmd2_unbiased(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y))
    return total / num_subsets


def _kid_on_rows(a, b, num_subsets=100, max_subset_size=1000, seed=0):
    """rows -> kernel_inception_distance(a[rows], b, ...), the same draws and sums, for many `rows`
    (bootstrap replicates, repeats included) from the kernels of a and b computed once.

    With c the row counts of a subset (0/1, or more where a replicate repeats a row), the sum of its
    kernel over distinct positions is c K c^T - c . diag(K), so every subset of every replicate is
    a gather-free matrix product over the whole sets' kernels, not three kernels of its own.
    """
    a, b = _as2d(a), _as2d(b)
    if max(len(a), len(b)) > KERNEL_CACHE_ROWS:  # kernels too big to keep: each replicate pays its own
        return lambda rows: kernel_inception_distance(a[rows], b, num_subsets, max_subset_size, seed)
    kaa, kbb, kab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
    diag_a, diag_b = np.diag(kaa), np.diag(kbb)

    def on_rows(rows) -> float:
        rows = np.asarray(rows)
        m = min(len(rows), len(b), max_subset_size)
        if m < 2:
            raise ValueError("KID needs at least 2 feature vectors per set")
        rng = np.random.default_rng(seed)
        ua, ub = np.zeros((num_subsets, len(a))), np.zeros((num_subsets, len(b)))
        for s in range(num_subsets):  # the draws kernel_inception_distance makes, in its order
            np.add.at(ua[s], rows[rng.choice(len(rows), m, replace=False)], 1.0)
            ub[s, rng.choice(len(b), m, replace=False)] = 1.0
        within_a = np.einsum("sn,sn->s", ua @ kaa, ua) - ua @ diag_a
        within_b = np.einsum("sn,sn->s", ub @ kbb, ub) - ub @ diag_b
        across = np.einsum("sn,sn->s", ua @ kab, ub)
        return float(((within_a + within_b) / (m * (m - 1)) - 2.0 * across / (m * m)).mean())

    return on_rows


kernel_inception_distance.on_rows = _kid_on_rows  # bootstraps share the kernels across replicates


def _sq_dists(x: np.ndarray, y: np.ndarray, y_sq: np.ndarray) -> np.ndarray:
    d = (x * x).sum(axis=1)[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d, 0.0)


def _knn_sq_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest *other* row."""
    if not 1 <= k < len(x):
        raise ValueError(f"k = {k} needs 1 <= k < number of points ({len(x)})")
    x_sq = (x * x).sum(axis=1)
    radii = np.empty(len(x))
    for rows in _blocks(len(x), len(x)):
        d = _sq_dists(x[rows], x, x_sq)
        d[np.arange(len(d)), np.arange(rows.start, rows.stop)] = np.inf  # not its own neighbour
        radii[rows] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def _coverage(manifold: np.ndarray, sq_radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of queries within (<=) the ball of at least one manifold point."""
    m_sq = (manifold * manifold).sum(axis=1)
    inside = 0
    for rows in _blocks(len(queries), len(manifold)):
        inside += int((_sq_dists(queries[rows], manifold, m_sq) <= sq_radii[None, :]).any(axis=1).sum())
    return inside / len(queries)


def precision_recall(real, fake, k=3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), Euclidean distances.

    Each real point gets a ball reaching its k-th nearest other real point; precision is the
    fraction of fake points inside at least one real ball (boundary included). Recall is the same
    with the roles swapped: the fraction of real points inside at least one fake ball.
    """
    real, fake = _as2d(real), _as2d(fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
    precision = _coverage(real, _knn_sq_radii(real, k), fake)
    recall = _coverage(fake, _knn_sq_radii(fake, k), real)
    return precision, recall


PR_NEIGHBOURS = 64  # nearest other samples listed per sample for the bootstraps' radii (deeper ones computed on demand)


def samples_precision_recall(fake, real, k=3) -> tuple[float, float]:
    """precision_recall(real, fake, k) with the generated set first, as the bootstraps pass it."""
    return precision_recall(real, fake, k)


def _nearest_others(x: np.ndarray, x_sq: np.ndarray, depth: int):
    """(rows [n, depth], sq distances [n, depth], sq distance to itself [n]): each row's nearest other rows, ascending."""
    near_rows, near_d, self_d = np.empty((len(x), depth), np.int64), np.empty((len(x), depth)), np.empty(len(x))
    for block in _blocks(len(x), len(x)):
        d = _sq_dists(x[block], x, x_sq)
        own = (np.arange(len(d)), np.arange(block.start, block.stop))
        self_d[block], d[own] = d[own], np.inf
        part = np.argpartition(d, depth - 1, axis=1)[:, :depth]
        part_d = np.take_along_axis(d, part, axis=1)
        order = np.argsort(part_d, axis=1, kind="stable")
        near_rows[block], near_d[block] = np.take_along_axis(part, order, axis=1), np.take_along_axis(part_d, order, axis=1)
    return near_rows, near_d, self_d


def _pr_on_rows(fake, real, k=3):
    """rows -> samples_precision_recall(fake[rows], real, k) for many `rows` (bootstrap replicates).

    Computed once: the real balls, which fake rows fall in one (precision is then a count), the
    fake-to-real distances, and each fake row's nearest other fake rows. A replicate's fake radius is
    the k-th nearest of the multiset its counts make (its own repeats at its distance to itself first,
    then listed neighbours times their counts), read from that list, or from the whole row when too
    few of the listed ones were drawn.
    """
    fake, real = _as2d(fake), _as2d(real)
    if len(fake) * len(real) > KERNEL_CACHE_ROWS ** 2 or len(fake) < 2:  # too big to keep: plain replicates
        return lambda rows: precision_recall(real, fake[rows], k)
    fake_sq, real_sq, real_radii = (fake * fake).sum(axis=1), (real * real).sum(axis=1), _knn_sq_radii(real, k)
    to_real = np.empty((len(fake), len(real)))
    for block in _blocks(len(fake), len(real)):  # no whole-matrix temporaries beside the one kept
        to_real[block] = _sq_dists(fake[block], real, real_sq)
    in_real_ball = (to_real <= real_radii[None, :]).any(axis=1)
    near_rows, near_d, self_d = _nearest_others(fake, fake_sq, min(PR_NEIGHBOURS, len(fake) - 1))

    def kth_from_whole_row(i: int, counts: np.ndarray) -> float:
        d, weight = _sq_dists(fake[i : i + 1], fake, fake_sq)[0], counts.astype(np.int64)
        d[i], weight[i] = self_d[i], counts[i] - 1
        order = np.argsort(d, kind="stable")
        return float(d[order][np.argmax(np.cumsum(weight[order]) >= k)])

    def on_rows(rows) -> tuple[float, float]:
        rows = np.asarray(rows)
        if not 1 <= k < len(rows):
            raise ValueError(f"k = {k} needs 1 <= k < number of points ({len(rows)})")
        counts = np.bincount(rows, minlength=len(fake))
        drawn = np.flatnonzero(counts)
        own = counts[drawn] - 1
        reach = own[:, None] + np.cumsum(counts[near_rows[drawn]], axis=1)
        radii = np.where(own >= k, self_d[drawn], near_d[drawn, np.argmax(reach >= k, axis=1)])
        for j in np.flatnonzero((own < k) & (reach[:, -1] < k)):  # the list ran out before k drawn rows
            radii[j] = kth_from_whole_row(int(drawn[j]), counts)
        recall = float((to_real[drawn] <= radii[:, None]).any(axis=0).mean())
        return float(counts @ in_real_ball) / len(rows), recall

    return on_rows


samples_precision_recall.on_rows = _pr_on_rows  # bootstraps keep the balls and distances across replicates
