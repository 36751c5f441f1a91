"""pipeline/duplicates.py: the near-duplicate rule, candidate pairs, groups against BFS, pHash distances."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from pipeline import duplicates


def test_candidate_pairs_drop_self_and_missing():
    sims = np.array([[1.0, 0.9, 0.8], [0.95, 0.9, 0.1]], dtype=np.float32)
    rows = np.array([[10, 11, 12], [10, 13, -1]])
    pairs, pair_sims = duplicates.candidate_pairs(np.array([10, 20]), sims, rows)
    assert pairs.tolist() == [[10, 11], [10, 12], [20, 10], [20, 13]]
    assert pair_sims.tolist() == pytest.approx([0.9, 0.8, 0.95, 0.9])


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


def bfs_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Reference: breadth-first search, label = smallest node of the component."""
    neighbours = [[] for _ in range(n)]
    for a, b in pairs:
        neighbours[a].append(b)
        neighbours[b].append(a)
    labels = np.full(n, -1)
    for start in range(n):  # ascending, so the first node reached is the smallest
        if labels[start] >= 0:
            continue
        labels[start] = start
        queue = deque([start])
        while queue:
            for nxt in neighbours[queue.popleft()]:
                if labels[nxt] < 0:
                    labels[nxt] = start
                    queue.append(nxt)
    return labels


@pytest.mark.parametrize("n, m", [(3000, 1500), (3000, 2900), (500, 5000), (10, 0)])
def test_connected_components_match_bfs(n, m):
    rng = np.random.default_rng(n + m)
    pairs = rng.integers(0, n, size=(m, 2))
    np.testing.assert_array_equal(duplicates.connected_components(n, pairs), bfs_components(n, pairs))


def test_connected_components_long_shuffled_chain():
    n = 5000
    perm = np.random.default_rng(3).permutation(n)
    pairs = np.stack([perm[:-1], perm[1:]], axis=1)[::-1]
    assert (duplicates.connected_components(n, pairs) == 0).all()


def test_connected_components_rejects_unknown_nodes():
    with pytest.raises(ValueError, match=r"node numbers in \[0, 5\)"):
        duplicates.connected_components(5, np.array([[0, 5]]))


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
