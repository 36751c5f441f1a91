"""Near duplicates, shared by the dedup and neighbours stages: the rule, removal in row order, pHash.

The rule (``near_duplicates``): two images are near-identical when their CLIP cosine similarity is
above the cosine threshold, or their perceptual hashes differ in at most the Manhattan threshold
bits. dedup applies it to candidate pairs to remove duplicates; neighbours applies it to skip them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


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


def remove_in_row_order(n: int, pairs: np.ndarray, sims: np.ndarray, reasons: np.ndarray):
    """The paper's per-item rule, in row order: an item not yet removed is kept and removes every later
    item it has a duplicate edge to. So every removed item names (`duplicate_of`) a kept item it is
    itself a duplicate of, with that pair's similarity and reason: no chains (A ~ B ~ C keeps C when
    A and C are not duplicates). Returns (removed bool [n], duplicate_of int64 [n] (-1: kept),
    similarity float32 [n] (nan: kept), reason int8 [n] (0 cosine, 1 phash, -1: kept))."""
    removed, duplicate_of = np.zeros(n, bool), np.full(n, -1, np.int64)
    similarity, reason = np.full(n, np.nan, np.float32), np.full(n, -1, np.int8)
    a, b = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    order = np.lexsort((reasons, b, a))  # by earlier item, then later item; cosine before pHash
    a, b, sims, reasons = a[order], b[order], sims[order], reasons[order]
    starts = np.searchsorted(a, np.arange(n + 1))
    for i in np.unique(a):  # items with a later duplicate, in row order
        if removed[i]:
            continue
        lo, hi = starts[i], starts[i + 1]
        later = b[lo:hi]
        new = ~removed[later] & (later != i)
        new &= np.r_[True, later[1:] != later[:-1]]  # one edge per pair (the first: cosine if both)
        removed[later[new]], duplicate_of[later[new]] = True, i
        similarity[later[new]], reason[later[new]] = sims[lo:hi][new], reasons[lo:hi][new]
    return removed, duplicate_of, similarity, reason


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
