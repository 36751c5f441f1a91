"""dedup stage: embeddings -> dedup/keep.parquet (key, row, keep, duplicate_of, reason, similarity).

Two items are duplicates when their CLIP cosine similarity is above `cosine_threshold`, or,
among CLIP candidate pairs only, when their perceptual hashes differ in at most
`manhattan_threshold` bits (pHash alone cannot be applied to all pairs: unrelated 64 px emoji
often sit within 8 bits of each other). Candidates are each item's `candidates` nearest
neighbours from a faiss index (IVF beyond small N), so cost grows about linearly with N.
Then the paper's per-item rule, in row order: an item not yet removed is kept and removes every
later item it is a duplicate of, so each removed item names a kept item it is itself similar to
(no chains: A ~ B ~ C keeps C when A and C are not duplicates).

Then `holdout` of the kept images (at most `holdout_max`), chosen by a hash of their key, are held
out of the database and of training (`keep` false, `holdout` true, reason "holdout"): their captions
are `knnd evaluate`'s prompts and their pictures its real images. Their duplicates were already
removed, so no near-copy of a held-out image reaches training.
"""
from __future__ import annotations

import numpy as np

from pipeline.duplicates import candidate_pairs, near_duplicates, phash_bits_from_hex, remove_in_row_order
from pipeline.embeddings import Embeddings, read_metadata
from pipeline.faiss_build import add_batches, ivf_nlist, train_index, training_sample_size
from pipeline.faiss_search import index_for_search, search, set_nprobe
from pipeline.runner import Progress, StageRun, atomic_path

EXACT_UP_TO = 50_000  # below this, an exact flat index is both fastest and simplest
SEARCH_NPROBE = 16  # duplicates sit very close: a few IVF cells find them


def candidate_index(emb: Embeddings, seed: int = 0):
    """A faiss index over every row, for finding near neighbours (not the retrieval index)."""
    n, d = emb.shape
    factory = "Flat" if n <= EXACT_UP_TO else f"IVF{ivf_nlist(n)},Flat"
    sample = None
    if factory != "Flat":
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=training_sample_size(factory, n), replace=False))
        sample = emb[rows].astype(np.float32)
    index = train_index(factory, d, sample)
    add_batches(index, emb.blocks())
    if factory != "Flat":
        set_nprobe(index, SEARCH_NPROBE)
    return index_for_search(index), factory


def find_duplicate_edges(emb: Embeddings, index, phash_bits: np.ndarray, conf, progress=None):
    """Candidate pairs that are duplicates: (pairs [m, 2], similarity [m], reason codes [m]: 0 cosine, 1 phash)."""
    k = min(conf.candidates + 1, len(emb))
    pairs, sims, reasons = [], [], []
    for rows, vectors in emb.blocks():
        for start in range(0, len(rows), conf.batch_size):
            q_rows = rows[start:start + conf.batch_size]
            s, ids = search(index, vectors[start:start + conf.batch_size], k)
            p, ps = candidate_pairs(q_rows, s, ids)
            by_cosine, by_phash = near_duplicates(ps, phash_bits[p[:, 0]], phash_bits[p[:, 1]],
                                                  conf.cosine_threshold, conf.manhattan_threshold)
            dup = by_cosine | by_phash
            pairs.append(p[dup])
            sims.append(ps[dup])
            reasons.append(np.where(by_cosine[dup], 0, 1).astype(np.int8))
        if progress:
            progress.update(1, len(rows))
    if not pairs:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8)
    return np.concatenate(pairs), np.concatenate(sims), np.concatenate(reasons)


def run(stage: StageRun) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    conf = stage.conf
    embed_dir = stage.input_dirs["embed"]
    emb = Embeddings(embed_dir, stage.inputs["embed"])
    n = len(emb)
    meta = read_metadata(embed_dir, stage.inputs["embed"], ["key", "row", "phash"])
    phash_bits = phash_bits_from_hex(meta["phash"])
    stage.plan(1)  # one output file; progress below counts the input shards searched
    progress = Progress("dedup", len(emb.shards), unit="images")

    index, factory = candidate_index(emb)
    pairs, sims, reasons = find_duplicate_edges(emb, index, phash_bits, conf, progress)
    removed, duplicate_of, similarity, edge_reason = remove_in_row_order(n, pairs, sims, reasons)
    representative = ~removed
    holdout = holdout_mask(meta["key"], representative, conf.holdout, conf.holdout_max)
    keep = representative & ~holdout
    names = np.array(["cosine", "phash"])
    reason = np.where(removed, names[np.maximum(edge_reason, 0)], np.where(holdout, "holdout", ""))
    table = pa.table({
        "key": pa.array(meta["key"], pa.string()),
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "keep": pa.array(keep),
        "duplicate_of": pa.array(duplicate_of, mask=representative),
        "reason": pa.array(reason, pa.string(), mask=keep),
        "similarity": pa.array(similarity, pa.float32(), mask=representative),
        "holdout": pa.array(holdout),
    })
    with atomic_path(stage.dir / "keep.parquet") as tmp:
        pq.write_table(table, tmp)
    if conf.holdout > 0 and holdout.sum() < 2:
        print(f"dedup: only {int(holdout.sum())} image(s) held out for evaluation (dedup.holdout {conf.holdout}): "
              f"`knnd run evaluate` needs at least 2; raise dedup.holdout or set evaluate.prompts")
    by_reason = {name: int((removed & (edge_reason == i)).sum()) for i, name in enumerate(names)}
    stage.mark_done(0, {"kept": int(keep.sum())})
    return {
        "items": n,
        "counts": {"images": n, "kept": int(keep.sum()), "removed": int(removed.sum()), "holdout": int(holdout.sum()),
                   "groups": int(len(np.unique(duplicate_of[removed]))), **{f"removed_{k}": v for k, v in by_reason.items()}},
        "removed_by_reason": by_reason,
        "kept": int(keep.sum()),
        "candidate_index": factory,
        "thresholds": {"cosine": conf.cosine_threshold, "manhattan": conf.manhattan_threshold},
        "output": "keep.parquet",
    }


def holdout_mask(keys, representative: np.ndarray, fraction: float, most: int) -> np.ndarray:
    """The representatives whose key hashes (blake2b, 64 bits) below fraction * 2^64: about `fraction`
    of them, the same keys whatever the row order, and an item held out stays held out when the data
    grows. Beyond `most`, the `most` smallest hashes are kept (then growth can move a few back)."""
    import hashlib

    rows = np.nonzero(representative)[0]
    mask = np.zeros(len(representative), bool)
    if fraction <= 0 or most <= 0 or not len(rows):
        return mask
    digests = np.array([int.from_bytes(hashlib.blake2b(str(keys[r]).encode(), digest_size=8).digest(), "big")
                        for r in rows], dtype=np.uint64)
    below = np.nonzero(digests < np.uint64(min(int(fraction * 2 ** 64), 2 ** 64 - 1)))[0]
    if len(below) > most:
        below = below[np.argsort(digests[below], kind="stable")[:most]]
    mask[rows[below]] = True
    return mask
