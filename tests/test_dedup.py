"""dedup stage: hand-made duplicates, and the same removals as a brute-force all-pairs reference, with no chains."""
from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from pipeline.config import load_config
from pipeline.duplicates import phash_bits_from_hex
from pipeline.runner import run_stage, stage_status
from pipeline.synthetic import clustered_unit_vectors, random_phashes, write_embed_output


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A distinct picture with structure at pHash's scale: upsampled random blocks."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def copies(im: Image.Image) -> dict[str, Image.Image]:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=75)
    shifted = im.transform(im.size, Image.AFFINE, (1, 0, -1, 0, 1, -1), fillcolor="white")
    return {"exact": im.copy(), "reencoded": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "resized": im.resize((48, 48), Image.BICUBIC).resize(im.size, Image.BICUBIC),
            "shifted": shifted, "brightened": ImageEnhance.Brightness(im).enhance(1.15)}


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_hand_made_duplicates_are_grouped_and_lookalikes_are_not(tmp_path):
    rng = np.random.default_rng(0)
    d, n_orig = 32, 30
    originals = [smooth_image(i) for i in range(n_orig)]
    base = clustered_unit_vectors(n_orig, d, n_clusters=3, spread=2.0, seed=1)  # "similar content" clusters
    images, vectors, truth = list(originals), list(base), list(range(n_orig))
    for o in range(5):  # originals 0-4 get every kind of copy
        for kind, im in copies(originals[o]).items():
            images.append(im)
            # exact/re-encoded/resized copies embed almost identically (cosine > 0.9); shifted and
            # brightened ones drift in CLIP space (cosine ~0.8) and must be caught by pHash instead
            noise = 0.05 if kind in ("exact", "reencoded", "resized") else 0.75
            vectors.append(unit(base[o] + noise * unit(rng.standard_normal(d))))
            truth.append(o)
    x = np.array(vectors, np.float32)
    hashes = [str(imagehash.phash(im)) for im in images]
    write_embed_output(tmp_path, x, shard_size=16, phash=hashes)
    m = run_stage("dedup", load_config(None, [f"workdir={tmp_path}", "dedup.manhattan_threshold=10"]))

    keep = pq.read_table(tmp_path / "dedup" / "keep.parquet").to_pandas()
    assert list(keep["row"]) == list(range(len(images)))
    assert list(keep["duplicate_of"].fillna(-1).astype(int)) == [-1 if r < n_orig else truth[r] for r in range(len(images))]
    assert keep["keep"].tolist() == [r < n_orig for r in range(len(images))]
    removed = keep[~keep["keep"]]
    kinds = [k for _ in range(5) for k in copies(originals[0])]
    by_kind = dict(zip(kinds, removed["reason"]))
    assert by_kind["exact"] == "cosine" and by_kind["shifted"] == "phash" and by_kind["brightened"] == "phash"
    assert (removed["similarity"] > 0).all() and keep[keep["keep"]]["similarity"].isna().all()
    assert m["counts"]["removed"] == 25 and m["counts"]["kept"] == n_orig
    assert m["removed_by_reason"]["cosine"] + m["removed_by_reason"]["phash"] == 25


def brute_force_keep(x: np.ndarray, bits: np.ndarray, cos_thr: float, man_thr: int, candidates: int) -> np.ndarray:
    """All pairs above the cosine threshold, plus pHash-close pairs among each item's top candidates;
    then the paper's rule in row order: each row not yet removed is kept and removes every later row it
    has an edge to. Returns, per row, itself if kept, else the kept row it names."""
    n = len(x)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :candidates]
    edges = {(i, j) for i in range(n) for j in range(i + 1, n) if sims[i, j] > cos_thr}
    for i in range(n):
        for j in top[i]:
            if np.unpackbits(bits[i] ^ bits[j]).sum() <= man_thr:
                edges.add((min(i, j), max(i, j)))
    named = list(range(n))
    removed = [False] * n
    for i in range(n):
        if removed[i]:
            continue
        for j in sorted(b for a, b in edges if a == i):
            if not removed[j]:
                removed[j], named[j] = True, i
    return np.array(named)


def test_same_removals_as_brute_force_and_no_chains(tmp_path):
    rng = np.random.default_rng(3)
    n, d = 600, 24
    x = clustered_unit_vectors(n, d, n_clusters=40, spread=0.9, seed=2)
    for _ in range(60):  # plant near-duplicates and chains
        i, j = rng.integers(0, n, 2)
        x[j] = unit(x[i] + 0.08 * unit(rng.standard_normal(d)))
    hashes = random_phashes(n, seed=5)
    for _ in range(40):  # plant pHash-close pairs (some will be CLIP candidates)
        i, j = rng.integers(0, n, 2)
        flipped = bytearray(bytes.fromhex(hashes[i]))
        flipped[0] ^= 0b101
        hashes[j] = flipped.hex()
    write_embed_output(tmp_path, x, shard_size=128, phash=hashes)
    run_stage("dedup", load_config(None, [f"workdir={tmp_path}", "dedup.manhattan_threshold=3", "dedup.candidates=8",
                                          "dedup.batch_size=100", "dedup.holdout=0"]))
    keep = pq.read_table(tmp_path / "dedup" / "keep.parquet").to_pandas()
    xs = np.load(tmp_path / "embed" / "img_emb" / "img_emb_00000.npy")  # float16 as stored
    x16 = np.concatenate([xs] + [np.load(tmp_path / "embed" / "img_emb" / f"img_emb_{s:05d}.npy") for s in range(1, 5)])
    bits = phash_bits_from_hex(hashes)
    labels = brute_force_keep(x16.astype(np.float32), bits, 0.9, 3, 8)
    got = np.where(keep["keep"], keep["row"], keep["duplicate_of"].fillna(-1)).astype(int)
    assert (labels != np.arange(n)).sum() > 30  # the planted structure produced removals
    np.testing.assert_array_equal(got, labels)
    # no chains: every removed item is itself a duplicate of the kept item it names, at the stated similarity
    removed = keep[~keep["keep"]]
    for row, of, sim, why in zip(removed["row"], removed["duplicate_of"].astype(int), removed["similarity"], removed["reason"]):
        assert keep.loc[of, "keep"]
        cosine = float(x16[row].astype(np.float32) @ x16[of].astype(np.float32))
        if why == "cosine":
            assert cosine > 0.9 and abs(cosine - sim) < 1e-5
        else:
            assert np.unpackbits(bits[row] ^ bits[of]).sum() <= 3


def test_dedup_is_stale_when_embed_changes(tmp_path):
    x = clustered_unit_vectors(200, 16, 10, seed=0)
    write_embed_output(tmp_path, x, shard_size=50)
    cfg = load_config(None, [f"workdir={tmp_path}"])
    run_stage("dedup", cfg)
    assert stage_status(cfg, "dedup")[0] == "done"
    write_embed_output(tmp_path, clustered_unit_vectors(200, 16, 10, seed=1), shard_size=50)
    assert stage_status(cfg, "dedup")[0] == "stale"


def test_duplicates_are_resolved_in_key_order_not_row_order():
    """Rows 0..3 hold keys d, c, b, a; pairs (0,1) and (1,2) and (2,3) chain. In key order a (row 3)
    is kept and removes b (row 2); c (row 1) is then kept (its only kept neighbour b is gone) and
    removes d (row 0). The same rows in any order give the same keep set by key."""
    from pipeline.dedup_group import remove_in_key_order

    pairs = np.array([[0, 1], [1, 2], [2, 3]])
    sims, reasons = np.array([0.96, 0.97, 0.98], np.float32), np.zeros(3, np.int8)
    removed, duplicate_of, similarity, reason = remove_in_key_order(["d", "c", "b", "a"], pairs, sims, reasons)
    assert removed.tolist() == [True, False, True, False]
    assert duplicate_of.tolist() == [1, -1, 3, -1]
    assert similarity[[0, 2]].tolist() == pytest.approx([0.96, 0.98]) and np.isnan(similarity[[1, 3]]).all()
    assert reason.tolist() == [0, -1, 0, -1]
    # shuffled rows: the same keys are removed, each naming the same key
    perm = np.array([2, 0, 3, 1])  # new row r holds old row perm[r]
    inverse = np.argsort(perm)
    keys = np.array(["d", "c", "b", "a"])[perm]
    r2, d2, _, _ = remove_in_key_order(list(keys), inverse[pairs], sims, reasons)
    assert sorted(keys[r2]) == ["b", "d"]
    assert {keys[i]: keys[d2[i]] for i in np.flatnonzero(r2)} == {"b": "a", "d": "c"}
    empty = remove_in_key_order(["x", "y"], np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8))
    assert not empty[0].any() and (empty[1] == -1).all()


def reference_keep_table(keys, pairs, sims, reasons, fraction, most, seed=0):
    """keep.parquet as the stage built it before it streamed: every row's key in memory at once."""
    import pyarrow as pa

    from pipeline.dedup_group import holdout_mask, remove_in_key_order

    removed, duplicate_of, similarity, edge_reason = remove_in_key_order(keys, pairs, sims, reasons)
    holdout = holdout_mask(keys, ~removed, fraction, most, seed)
    keep = ~removed & ~holdout
    reason = np.where(removed, np.array(["cosine", "phash"])[np.maximum(edge_reason, 0)],
                      np.where(holdout, "holdout", ""))
    return pa.table({"key": pa.array(keys, pa.string()), "row": pa.array(np.arange(len(keys), dtype=np.int64)),
                     "keep": pa.array(keep), "duplicate_of": pa.array(duplicate_of, mask=~removed),
                     "reason": pa.array(reason, pa.string(), mask=keep),
                     "similarity": pa.array(similarity, pa.float32(), mask=~removed), "holdout": pa.array(holdout)})


@pytest.mark.parametrize("fraction, most, seed", [(0.1, 1000, 0), (0.3, 7, 0), (0.0, 1000, 0), (0.3, 1000, 5)])
def test_streamed_grouping_writes_the_in_memory_reference(tmp_path, fraction, most, seed):
    """keep.parquet written shard by shard, reading only the keys of paired images, equals the
    in-memory rule's table row for row: shuffled keys (so key order is not row order), chains across
    shards, pHash edges, a repeated key, shards without pairs, and the hold-out cap."""
    from pipeline.dedup_group import holdout_rows, rank_removals, write_keep

    rng = np.random.default_rng(3)
    n = 230
    keys = [f"{i:05d}" for i in rng.permutation(n)]
    keys[17] = keys[150]  # two images under one key: ties are broken by row, as before
    manifest = write_embed_output(tmp_path, unit(rng.normal(size=(n, 8))), shard_size=40, keys=keys)
    paired = rng.choice(np.r_[0:80, 120:n], size=(90, 2))  # rows 80..119 (one whole shard) in no pair
    paired = paired[paired[:, 0] != paired[:, 1]]
    pairs = np.concatenate([paired, [[5, 6], [6, 7], [7, 8], [39, 40], [40, 160]]]).astype(np.int64)
    sims = rng.uniform(0.9, 1.0, len(pairs)).astype(np.float32)
    reasons = (rng.random(len(pairs)) < 0.3).astype(np.int8)
    embed = tmp_path / "embed"
    removal = rank_removals(embed, manifest, pairs, sims, reasons)
    holdout = holdout_rows(embed, manifest, removal, fraction, most, seed)
    kept = write_keep(tmp_path / "keep.parquet", embed, manifest, removal, holdout)
    written = pq.read_table(tmp_path / "keep.parquet")
    expected = reference_keep_table(keys, pairs, sims, reasons, fraction, most, seed)
    assert written.num_rows == n and written.column("row").to_pylist() == list(range(n))
    for name in expected.column_names:
        assert written.column(name).to_pylist() == expected.column(name).to_pylist(), name
    assert kept == sum(expected.column("keep").to_pylist())
    assert 0 < len(removal.rows) < n and len(holdout) == sum(expected.column("holdout").to_pylist())
    assert (len(holdout) == most) == (most == 7)  # the cap bites where it should
    none = rank_removals(embed, manifest, np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8))
    assert len(none.rows) == 0 and len(none.duplicate_of) == 0
