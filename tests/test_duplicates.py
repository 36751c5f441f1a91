"""pipeline/duplicates.py: the near-duplicate rule, groups against BFS, pHash distances."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import duplicates


def test_near_duplicates_rule():
    sims = np.array([0.99, 0.95, 0.5, 0.5, 0.96], dtype=np.float32)
    a = np.zeros((5, 8), np.uint8)
    b = np.zeros((5, 8), np.uint8)
    b[:, 0] = [0xFF, 0x00, 0x07, 0x0F, 0xFF]  # 8, 0, 3, 4, 8 bits apart
    by_cosine, by_phash = duplicates.near_duplicates(sims, a, b, cosine_threshold=0.96, manhattan_threshold=3)
    assert by_cosine.tolist() == [True, False, False, False, False]  # strictly above: 0.96 is not
    assert by_phash.tolist() == [False, True, True, False, False]  # never both: cosine wins


def test_near_duplicates_broadcasts_query_hashes_over_candidates():
    """The neighbours stage's shape: one hash per query against [queries, candidates] hashes."""
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 256, size=(50, 8), dtype=np.uint8)
    rows = rng.integers(0, 50, size=(6, 7))
    sims = rng.uniform(0.5, 1.0, size=rows.shape).astype(np.float32)
    q_bits = bits[:6]
    by_cosine, by_phash = duplicates.near_duplicates(sims, q_bits[:, None, :], bits[rows], 0.9, 30)
    for i, j in np.ndindex(rows.shape):
        distance = sum(bin(x ^ y).count("1") for x, y in zip(q_bits[i], bits[rows[i, j]]))
        assert by_cosine[i, j] == (sims[i, j] > 0.9)
        assert by_phash[i, j] == (sims[i, j] <= 0.9 and distance <= 30)


def row_order_by_hand(n: int, edges: list[tuple[int, int, float, int]]):
    """The per-item rule written plainly: visit rows in order; a row not yet removed is kept and removes
    every later row it has an edge to (its first edge to that row, cosine before pHash)."""
    removed, named = [False] * n, {}
    for i in range(n):
        if removed[i]:
            continue
        for a, b, sim, reason in sorted(edges, key=lambda e: (min(e[:2]), max(e[:2]), e[3])):
            j = max(a, b)
            if min(a, b) == i and j != i and not removed[j]:
                removed[j], named[j] = True, (i, sim, reason)
    return removed, named


@pytest.mark.parametrize("n, m", [(300, 150), (300, 290), (50, 500), (10, 0)])
def test_row_order_removal_matches_the_rule_by_hand(n, m):
    rng = np.random.default_rng(n + m)
    pairs = rng.integers(0, n, size=(m, 2))
    sims = rng.uniform(0.9, 1.0, m).astype(np.float32)
    reasons = rng.integers(0, 2, m).astype(np.int8)
    removed, duplicate_of, similarity, reason = duplicates.remove_in_row_order(n, pairs, sims, reasons)
    by_hand, named = row_order_by_hand(n, [(int(a), int(b), float(s), int(r)) for (a, b), s, r in zip(pairs, sims, reasons)])
    assert removed.tolist() == by_hand
    for j, (i, sim, why) in named.items():
        assert (duplicate_of[j], reason[j]) == (i, why) and similarity[j] == np.float32(sim)
        assert not removed[i]  # every removed item names a kept one
    assert (duplicate_of[~removed] == -1).all() and np.isnan(similarity[~removed]).all()


def test_no_chains():
    """0 ~ 1 ~ 2 with 0 and 2 not duplicates: 1 goes (naming 0), 2 stays. Connected components would
    have removed 2 as well, naming 0, which it does not resemble."""
    removed, duplicate_of, _, _ = duplicates.remove_in_row_order(
        3, np.array([[1, 2], [0, 1]]), np.array([0.95, 0.96], np.float32), np.zeros(2, np.int8))
    assert removed.tolist() == [False, True, False] and duplicate_of.tolist() == [-1, 0, -1]


def test_phash_distances_match_bit_by_bit():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(200, 8), dtype=np.uint8)
    b = rng.integers(0, 256, size=(200, 8), dtype=np.uint8)
    reference = [sum(bin(x ^ y).count("1") for x, y in zip(ra, rb)) for ra, rb in zip(a, b)]
    assert duplicates.phash_distances(a, b).tolist() == reference
    as_u64 = a.view(np.uint64).ravel()  # one integer per 64-bit hash
    assert duplicates.phash_distances(as_u64, b.view(np.uint64).ravel()).tolist() == reference
    hex_hashes = [bytes(row).hex() for row in a[:3]]
    np.testing.assert_array_equal(duplicates.phash_bits_from_hex(hex_hashes), a[:3])
    assert duplicates.phash_distances(a[0], a[0]) == 0
