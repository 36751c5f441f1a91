"""The manifest's `outputs`: files grouped by name pattern, with the schema of each kind read from headers."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import load_config
from pipeline.outputs_schema import MAX_KINDS, describe_outputs
from pipeline.runner import run_stage
from pipeline.synthetic import clustered_unit_vectors, write_embed_output


def write_tar(path, members: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for name in members:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def size(*paths) -> int:
    return sum(p.stat().st_size for p in paths)


def test_each_kind_has_its_count_bytes_and_schema(tmp_path):
    out = tmp_path / "stage"
    (out / "img_emb").mkdir(parents=True)
    table = pa.table({"key": ["a", "b", "c"], "row": pa.array([0, 1, 2], pa.int64()),
                      "sims": pa.array([[0.5], [0.25], []], pa.list_(pa.float32()))})
    parquets = [out / "shard_00000.parquet", out / "shard_00001.parquet"]
    pq.write_table(table, parquets[0])
    pq.write_table(table.slice(0, 2), parquets[1])
    npys = [out / "img_emb" / "img_emb_00000.npy", out / "img_emb" / "img_emb_00001.npy"]
    np.save(npys[0], np.zeros((5, 8), np.float16))
    np.save(npys[1], np.zeros((3, 8), np.float16))
    np.save(out / "scalar.npy", np.float32(1.0))
    write_tar(out / "00000.tar", ["000000001.jpg", "000000001.json", "000000001.txt", "000000002.nbr.npy",
                                  *[f"{i:09d}.jpg" for i in range(3, 11)],
                                  *[f"{i:09d}.late" for i in range(11, 20)]])  # past the first 12 members: not read
    Image.new("RGB", (20, 10)).save(out / "grid.png")
    Image.new("L", (4, 4)).save(out / "samples_1.png")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    # the runner's bookkeeping and hidden files: not outputs
    (out / "_run" / "done").mkdir(parents=True)
    (out / "_run" / "state.json").write_text("{}")
    (out / "_run" / "done" / "00000.json").write_text("{}")
    (out / "manifest.json").write_text("{}")
    (out / ".00001.tar.tmp-123").write_text("half")
    (out / ".sampling").mkdir()
    np.save(out / ".sampling" / "b0.npy", np.zeros(3))

    assert describe_outputs(out) == {
        "shard_*.parquet": {"files": 2, "bytes": size(*parquets), "rows": 5,
                            "columns": {"key": "string", "row": "int64", "sims": "list<element: float>"}},
        "img_emb/img_emb_*.npy": {"files": 2, "bytes": size(*npys), "dtype": "float16", "shape": [5, 8], "rows": 8},
        "scalar.npy": {"files": 1, "bytes": size(out / "scalar.npy"), "dtype": "float32", "shape": []},
        "*.tar": {"files": 1, "bytes": size(out / "00000.tar"), "member_suffixes": ["jpg", "json", "nbr.npy", "txt"]},
        "grid.png": {"files": 1, "bytes": size(out / "grid.png"), "size": [20, 10], "mode": "RGB"},
        "samples_*.png": {"files": 1, "bytes": size(out / "samples_1.png"), "size": [4, 4], "mode": "L"},
        "metrics.jsonl": {"files": 1, "bytes": size(out / "metrics.jsonl")},
    }


def test_an_unreadable_file_is_recorded_not_raised(tmp_path):
    for name in ("00000.parquet", "a.npy", "00000.tar", "grid.png"):
        (tmp_path / name).write_bytes(b"not what the name says" * 40)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))  # would need pickle: never loaded
    got = describe_outputs(tmp_path)
    assert set(got) == {"*.parquet", "a.npy", "*.tar", "grid.png", "objects.npy"}
    for kind, entry in got.items():
        assert entry["files"] == 1 and entry["bytes"] > 0 and entry["error"], kind
        assert set(entry) == {"files", "bytes", "error"}, kind


def test_kinds_beyond_the_cap_are_counted_together(tmp_path):
    names = [f"prompt-{chr(97 + i // 26)}{chr(97 + i % 26)}_0.txt" for i in range(MAX_KINDS + 3)]
    for name in names:
        (tmp_path / name).write_text("xy")
    got = describe_outputs(tmp_path)
    assert len(got) == MAX_KINDS + 1 and sorted(names)[0].replace("0", "*") in got
    assert got["(other)"] == {"kinds": 3, "files": 3, "bytes": 6}


def test_real_stages_describe_what_they_wrote(tmp_path):
    """dedup, index and neighbours run on a synthetic embed output: each manifest's `outputs` matches
    the files on disk (neighbours' Parquet columns and rows, index's float16 vectors, dedup's keep table)."""
    n, d = 600, 16
    write_embed_output(tmp_path, clustered_unit_vectors(n, d, n_clusters=12, spread=1.0, seed=0), shard_size=200)
    cfg = load_config(None, [f"workdir={tmp_path}", "dedup.holdout=0", "index.factory=Flat", "neighbours.k=4"])
    dedup, index, neighbours = (run_stage(name, cfg) for name in ("dedup", "index", "neighbours"))

    keep = pq.read_table(tmp_path / "dedup" / "keep.parquet")
    assert dedup["outputs"]["keep.parquet"]["rows"] == n
    assert dedup["outputs"]["keep.parquet"]["columns"] == {f.name: str(f.type) for f in keep.schema}
    kept = int(keep.column("keep").to_numpy().sum())
    assert index["outputs"]["vectors.npy"] == {"files": 1, "bytes": size(tmp_path / "index" / "vectors.npy"),
                                               "dtype": "float16", "shape": [kept, d], "rows": kept}
    assert index["outputs"]["rows.npy"]["rows"] == kept
    assert set(index["outputs"]["image.index"]) == {"files", "bytes"}  # its factory and size are in the body
    files = sorted((tmp_path / "neighbours").glob("neighbours_*.parquet"))
    schema = pq.read_schema(files[0])
    assert len(files) == 3 and neighbours["outputs"] == {"neighbours_*.parquet": {
        "files": 3, "bytes": size(*files), "rows": kept,
        "columns": {f.name: str(f.type) for f in schema}}}
    assert {"key", "row", "neighbour_rows", "similarities"} <= set(neighbours["outputs"]["neighbours_*.parquet"]["columns"])
