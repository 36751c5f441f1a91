"""Bootstrap intervals for `knnd evaluate`'s metrics (model.metrics), clustered by prompt.

    bootstrap_ci                     per-image values (prompt accuracy, CLIP score), optionally by group
    bootstrap_pair_ci                a set metric (FD, KID, precision/recall) of a generated set against a reference
    bootstrap_paired_difference_ci   a set metric's difference between two generated sets drawn with the same noise

A set metric may carry `on_rows(a, b)`: a callable rows -> fn(a[rows], b) that computes what every
replicate shares (the reference's statistics, kernels, distances) once; replicates then only select rows.
"""
from __future__ import annotations

import numpy as np

from model.metrics import _as2d


def set_replicates(n_boot: int) -> int:
    """Replicates for a set metric's interval (FD, KID, precision/recall): a fifth of the per-image
    metrics' n_boot, at least 50, as every evaluation so far has used."""
    return max(50, n_boot // 5)


def _group_layout(groups, n: int):
    """(n_groups, order, starts, counts): items of group g are order[starts[g]:starts[g] + counts[g]].

    groups None makes every item its own group.
    """
    if groups is None:
        return n, np.arange(n), np.arange(n), np.ones(n, dtype=np.int64)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    _, codes = np.unique(groups, return_inverse=True)
    counts = np.bincount(codes.ravel())
    return len(counts), np.argsort(codes.ravel(), kind="stable"), np.cumsum(counts) - counts, counts


def _rows_of(layout, drawn: np.ndarray) -> np.ndarray:
    """Row indices of all items of the drawn groups (repeats kept), without a Python loop."""
    _, order, starts, counts = layout
    c = counts[drawn]
    offsets = np.repeat(starts[drawn] - (np.cumsum(c) - c), c)
    return order[offsets + np.arange(c.sum())]


def _percentile_ci(estimate, boots: list) -> tuple:
    low, high = np.percentile(np.asarray(boots, dtype=np.float64), [2.5, 97.5], axis=0)
    if np.ndim(estimate) == 0:
        return float(estimate), float(low), float(high)
    return np.asarray(estimate, dtype=np.float64), low, high


def bootstrap_ci(values, groups=None, n_boot=1000, seed=0, stat=np.mean) -> tuple[float, float, float]:
    """(stat(values), low, high): a 95 % percentile bootstrap interval.

    groups None: resample the N items with replacement. groups given (e.g. the prompt index of
    each image): cluster bootstrap, drawing as many groups as there are, with replacement, and
    taking every item of each drawn group, so images of one prompt move together.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    estimate = stat(values)
    layout = _group_layout(groups, len(values))
    n_groups = layout[0]
    rng = np.random.default_rng(seed)
    boots = [stat(values[_rows_of(layout, rng.integers(n_groups, size=n_groups))])
             for _ in range(n_boot)]
    return _percentile_ci(estimate, boots)


def bootstrap_pair_ci(a_feats, b_feats, a_groups, b_groups, fn, n_boot=200, seed=0):
    """(fn(a, b), low, high) for a set metric, with a 95 % percentile bootstrap interval.

    a is the generated set, b the reference; fn(a, b) returns a number or a tuple of numbers
    (e.g. lambda a, b: precision_recall(b, a)); for a tuple, estimate/low/high are arrays.
    What is resampled: only a. Each replicate draws as many groups of a as there are (the
    prompts in a_groups; single images when a_groups is None) with replacement and takes every
    image of each drawn group; b is passed whole and unchanged to every call, so the interval
    covers the prompt-sampling variability of the generated set, not that of the reference.
    b_groups is only checked for shape (one id per row of b); it does not change the resampling.

    Centred on the estimate: a replicate holds exact duplicates (a group drawn twice), which
    nearest-neighbour radii (precision/recall) and within-set kernel sums (KID) read as real
    structure, and FD's small-sample bias grows with fewer distinct points, so the replicates
    drift away from the estimate (measured on same-distribution data: FD 1.50, replicates
    1.93-2.43). The interval is therefore the replicates' 2.5-97.5 % spread shifted by
    (median of the replicates - estimate): their spread, around the full-data figure.
    """
    a, b = _as2d(a_feats), _as2d(b_feats)
    if b_groups is not None and np.shape(b_groups) != (len(b),):
        raise ValueError(f"b_groups must have shape ({len(b)},), got {np.shape(b_groups)}")
    on_rows = _on_rows(fn, a, b)
    estimate = on_rows(np.arange(len(a)))  # the whole set: what on_rows prepared serves the estimate too
    layout = _group_layout(a_groups, len(a))
    n_groups = layout[0]
    rng = np.random.default_rng(seed)
    boots = [on_rows(_rows_of(layout, rng.integers(n_groups, size=n_groups))) for _ in range(n_boot)]
    return _centred_ci(estimate, boots)


def _on_rows(fn, a: np.ndarray, b: np.ndarray):
    """rows -> fn(a[rows], b): fn's own `on_rows(a, b)` where it has one (work shared by every
    replicate, such as b's statistics or the kernels), else the plain call on the gathered rows."""
    prepare = getattr(fn, "on_rows", None)
    return prepare(a, b) if prepare is not None else (lambda rows: fn(a[rows], b))


def _centred_ci(estimate, boots: list) -> tuple:
    """Percentile interval of the replicates, shifted so their median sits on the estimate."""
    boots = np.asarray(boots, dtype=np.float64)
    return _percentile_ci(estimate, boots - (np.median(boots, axis=0) - np.asarray(estimate, dtype=np.float64)))


def bootstrap_paired_difference_ci(a_feats, b_feats, groups, reference, fn, n_boot=200, seed=0):
    """(fn(a, ref) - fn(b, ref), low, high): a set metric's difference between two generated sets
    drawn for the same prompts with the same noise (row i of a and of b: same prompt, same seed).

    Each replicate draws prompts with replacement once and takes those rows from *both* sets, so
    what the two conditions share (which prompts were drawn) cancels, as in a paired test; the
    reference is passed whole. The interval is centred on the estimate as in bootstrap_pair_ci.
    """
    a, b = _as2d(a_feats), _as2d(b_feats)
    if a.shape != b.shape:
        raise ValueError(f"paired sets must have the same shape, got {a.shape} and {b.shape}")
    ref = _as2d(reference)
    on_a, on_b = _on_rows(fn, a, ref), _on_rows(fn, b, ref)
    every = np.arange(len(a))
    estimate = np.subtract(on_a(every), on_b(every))  # a tuple metric (precision, recall) gives one difference each
    layout = _group_layout(groups, len(a))
    n_groups = layout[0]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        rows = _rows_of(layout, rng.integers(n_groups, size=n_groups))
        boots.append(np.subtract(on_a(rows), on_b(rows)))
    return _centred_ci(estimate, boots)
