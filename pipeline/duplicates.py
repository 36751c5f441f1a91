"""Near duplicates, shared by the dedup and neighbours stages: the rule, candidate pairs, groups, pHash.

The rule (``near_duplicates``): two images are near-identical when their CLIP cosine similarity is
above the cosine threshold, or their perceptual hashes differ in at most the Manhattan threshold
bits. dedup applies it to candidate pairs to remove duplicates; neighbours applies it to skip them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def candidate_pairs(
    query_rows: np.ndarray, sims: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """kNN results as (pairs int64 [m, 2] of (query row, neighbour row), sims [m]); self and -1 dropped."""
    queries = np.broadcast_to(np.asarray(query_rows, dtype=np.int64)[:, None], rows.shape)
    valid = (rows >= 0) & (rows != queries)
    return np.stack([queries[valid], rows[valid]], axis=1), sims[valid]


def near_duplicates(
    sims: np.ndarray,
    hash_bits_a: np.ndarray,
    hash_bits_b: np.ndarray,
    cosine_threshold: float,
    manhattan_threshold: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The near-duplicate rule on pairs: (by_cosine, by_phash) boolean masks shaped like ``sims``.

    ``by_cosine``: cosine similarity above ``cosine_threshold``; ``by_phash``: not by_cosine, and the
    packed hashes (broadcast as in ``phash_distances``) within ``manhattan_threshold`` bits.
    A pair is a near duplicate when either is true.
    """
    by_cosine = sims > cosine_threshold
    by_phash = ~by_cosine & (phash_distances(hash_bits_a, hash_bits_b) <= manhattan_threshold)
    return by_cosine, by_phash


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Label nodes 0..n-1 (pairs hold node numbers) with the smallest node of their connected component.

    Vectorised union-find: hook roots to the smaller root, compress paths by pointer jumping;
    O(log n) rounds, about a second for 1M nodes and 3M pairs.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n):
        raise ValueError(f"pairs must hold node numbers in [0, {n}), got {pairs.min()}..{pairs.max()}")
    return _component_roots(n, pairs[:, 0], pairs[:, 1])


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
