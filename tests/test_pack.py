"""pipeline/pack.py: every packed tensor equals its source, shards split at pack.shard_size, resume
rewrites only unfinished shards, a key missing from its download tar stops the stage by name."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.data import read_pack_shard
from pipeline.config import load_config
from pipeline.pack import plan_pack_shards
from pipeline.runner import StageError, run_stage, write_json
from pipeline.synthetic import write_embed_output
from conftest import jpg_bytes, write_fake_download

K, D, SIZE = 3, 8, 16
DROPPED_ROW = 2  # as if dedup removed it: not in the neighbour lists, so not packed


def rgba_png(width: int = 30, height: int = 20) -> bytes:
    """A non-square image with transparency: exercises alpha flattening and the centre crop."""
    rng = np.random.default_rng(11)
    arr = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    arr[:, : width // 3, 3] = 0  # a transparent band: must come out white
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def write_neighbours(workdir, vectors: np.ndarray, shard_rows: list[range], keys: list[str], seed: int = 0) -> dict:
    """A neighbours stage output: K random other kept rows per kept row, one parquet per embed shard."""
    rng = np.random.default_rng(seed)
    kept = [r for rows in shard_rows for r in rows if r != DROPPED_ROW]
    out, shards = workdir / "neighbours", []
    out.mkdir(parents=True)
    for shard, rows in enumerate(shard_rows):
        q = [r for r in rows if r != DROPPED_ROW]
        nbr = np.array([rng.choice([c for c in kept if c != r], K, replace=False) for r in q], np.int64).reshape(-1, K)
        table = pa.table({
            "key": pa.array([keys[r] for r in q], pa.string()),
            "row": pa.array(np.array(q, np.int64)),
            "neighbour_keys": pa.FixedSizeListArray.from_arrays(pa.array([keys[r] for r in nbr.reshape(-1)]), K),
            "neighbour_rows": pa.FixedSizeListArray.from_arrays(pa.array(nbr.reshape(-1)), K),
            "similarities": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(nbr.size, np.float32)), K),
        })
        pq.write_table(table, out / f"neighbours_{shard:05d}.parquet")
        shards.append({"shard": shard, "rows": len(q), "neighbours": f"neighbours_{shard:05d}.parquet"})
    manifest = {"stage": "neighbours", "config_hash": "test", "input_hash": "test", "k": K, "shards": shards,
                "items": len(kept), "counts": {"images": len(kept)}}
    write_json(out / "manifest.json", manifest)
    return manifest


@pytest.fixture
def upstream(tmp_path):
    """download (2 tars) + embed (2 shards, d=8) + neighbours (k=3) for 9 images, one of them dropped."""
    keys = [f"{i:09d}" for i in range(9)]
    images = [jpg_bytes(i) for i in range(9)]
    images[4] = rgba_png()
    shard_rows = [range(0, 5), range(5, 9)]
    write_fake_download(tmp_path, [[(keys[r], images[r], f"caption {r}") for r in rows] for rows in shard_rows])
    vectors = np.random.default_rng(1).standard_normal((9, D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_embed_output(tmp_path, vectors, shard_size=5, keys=keys)
    neighbours = write_neighbours(tmp_path, vectors, shard_rows, keys)
    return {"keys": keys, "images": images, "vectors": vectors.astype(np.float16), "neighbours": neighbours}


def pack_config(workdir, *extra):
    return load_config(None, [f"workdir={workdir}", f"pack.image_size={SIZE}", "pack.shard_size=3",
                              "ray.num_cpus=2", *extra])


def expected_image(data: bytes) -> np.ndarray:
    """Oracle: composite onto white, centre square, Lanczos to SIZE (written independently of pack.py)."""
    im = Image.open(io.BytesIO(data)).convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    arr = np.asarray(Image.alpha_composite(white, im).convert("RGB"))
    h, w = arr.shape[:2]
    s = min(h, w)
    arr = arr[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), Image.Resampling.LANCZOS))


def neighbour_rows(workdir) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted((workdir / "neighbours").glob("*.parquet")):
        t = pq.read_table(path).to_pydict()
        out |= {key: np.array(rows) for key, rows in zip(t["key"], t["neighbour_rows"])}
    return out


def test_plan_splits_embed_shards_at_shard_size_and_numbers_them_in_order():
    shards = [{"shard": 0, "rows": 7, "neighbours": "a"}, {"shard": 1, "rows": 0, "neighbours": "b"},
              {"shard": 2, "rows": 3, "neighbours": "c"}]
    plans = plan_pack_shards(shards, 3, K)
    assert [p["parts"] for p in plans] == [[(0, 0, 3), (1, 3, 6), (2, 6, 7)], [(3, 0, 0)], [(4, 0, 3)]]


def test_every_packed_tensor_equals_its_source(tmp_path, upstream, ray_local):
    manifest = run_stage("pack", pack_config(tmp_path))
    assert [(s["shard"], s["tar"], s["samples"], s["embed_shard"]) for s in manifest["shards"]] == [
        (0, "00000.tar", 3, 0), (1, "00001.tar", 1, 0), (2, "00002.tar", 3, 1), (3, "00003.tar", 1, 1)]
    assert manifest["items"] == 8 and manifest["counts"] == {"samples": 8, "failed": 0, "shards": 4}
    assert (manifest["image_size"], manifest["k"], manifest["d"]) == (SIZE, K, D)
    assert manifest["shapes"] == {"image": [SIZE, SIZE, 3], "emb": [D], "nbr": [K, D]}
    assert manifest["dtypes"] == {"image": "uint8", "emb": "float16", "nbr": "float16"}
    assert list(manifest["nodes"].values()) == [2]  # {the local Ray node: both embed shards}

    keys, vectors, nbrs = upstream["keys"], upstream["vectors"], neighbour_rows(tmp_path)
    packed = [read_pack_shard(tmp_path / "pack" / s["tar"]) for s in manifest["shards"]]
    all_keys = [k for p in packed for k in p["keys"]]
    assert all_keys == [k for r, k in enumerate(keys) if r != DROPPED_ROW]  # row order, nothing doubled
    for shard in packed:
        for i, key in enumerate(shard["keys"]):
            row = keys.index(key)
            assert shard["image"][i].dtype == np.uint8 and shard["emb"].dtype == shard["nbr"].dtype == np.float16
            assert np.array_equal(shard["image"][i], expected_image(upstream["images"][row])), key
            assert np.array_equal(shard["emb"][i], vectors[row])
            assert np.array_equal(shard["nbr"][i], vectors[nbrs[key]])
    rgba = packed[1]["image"][0]  # row 4, the transparent band is white
    assert packed[1]["keys"] == [keys[4]] and (rgba[:, :2] == 255).all()


def test_rerun_resumes_and_leaves_finished_shards_alone(tmp_path, upstream, ray_local):
    cfg = pack_config(tmp_path)
    run_stage("pack", cfg)
    pack = tmp_path / "pack"
    before = {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in pack.glob("*.tar")}
    # killed while embed shard 1 was being packed: its marker and tars are gone, no manifest yet
    (pack / "manifest.json").unlink()
    (pack / "_run" / "done" / "00001.json").unlink()
    (pack / "00003.tar").unlink()
    (pack / "00002.tar").write_bytes(b"half a tar")
    logs = []
    manifest = run_stage("pack", cfg, log=logs.append)
    assert logs == ["pack: resuming"]
    after = {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in pack.glob("*.tar")}
    assert after.keys() == before.keys()
    assert after["00000.tar"] == before["00000.tar"] and after["00001.tar"] == before["00001.tar"]  # not rewritten
    for name in ("00002.tar", "00003.tar"):
        assert after[name][0] == before[name][0]  # rewritten byte for byte
    assert manifest["items"] == 8 and not list(pack.glob(".*tmp*")) and not list(pack.glob("*.tmp*"))
    logs.clear()
    run_stage("pack", cfg, log=logs.append)
    assert logs == ["pack: up to date, nothing to do"]


def test_key_missing_from_its_download_tar_names_the_tar(tmp_path, upstream, ray_local):
    tar = tmp_path / "download" / "00001.tar"
    keys, images = upstream["keys"], upstream["images"]
    write_fake_download(tmp_path, [[(keys[r], images[r], "") for r in range(5)],
                                   [(keys[r], images[r], "") for r in range(5, 8)]])  # row 8 lost
    manifest_path = tmp_path / "download" / "manifest.json"
    manifest_path.write_text(json.dumps(json.loads(manifest_path.read_text())))
    with pytest.raises(StageError, match=f"{tar}.*lacks 1 sample.*{keys[8]}.*knnd run embed --force"):
        run_stage("pack", pack_config(tmp_path))
    assert not (tmp_path / "pack" / "manifest.json").exists()
