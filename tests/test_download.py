"""download stage: every bad URL kind counted under its reason, resume after a real kill, status."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import BAD_KINDS, run_and_kill
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import run_stage, stage_status


def write_urls(path: Path, urls: list[str]) -> Path:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path)
    return path


def shard_contents(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every tar in the folder."""
    out: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def dl_args(workdir: Path, url_list: Path, *extra: str) -> list[str]:
    return [f"workdir={workdir}", f"download.url_list={url_list}", "download.image_size=48",
            "download.timeout=1", "download.threads=4", "download.encode_format=png", *extra]


def test_good_images_kept_bad_ones_counted_by_reason(image_server, tmp_path, ray_local):
    server = image_server(n_good=12)
    good = [server.base + p for p in server.good]
    bad = [server.base + p for p in BAD_KINDS]
    urls = [u for pair in zip(good, bad + [None] * len(good)) for u in pair if u]  # interleave
    url_list = write_urls(tmp_path / "urls.parquet", urls)
    cfg = load_config(None, dl_args(tmp_path / "w", url_list, "download.shard_size=5"))
    manifest = run_stage("download", cfg)

    assert manifest["counts"] == {"urls": 19, "images": 12, "failed": 7, "shards": 4}
    assert manifest["failures"] == dict(Counter(BAD_KINDS.values()))
    assert list(manifest["nodes"].values()) == [4]  # {the local Ray node: every shard}
    contents = shard_contents(tmp_path / "w" / "download")
    from PIL import Image
    import numpy as np

    got = {}
    for key, parts in contents.items():
        got[parts["json"] and __import__("json").loads(parts["json"])["url"]] = parts
    assert set(got) == set(good)  # every good image is in the shards, no bad one is
    for url, parts in got.items():  # lossless png at the source size: pixels identical to what was served
        served = np.asarray(Image.open(io.BytesIO(server.good[url[len(server.base):]])).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(parts["png"])).convert("RGB")), served)
    for shard in manifest["shards"]:  # img2dataset's own per-shard files are there too
        assert (tmp_path / "w" / "download" / shard["parquet"]).exists()
        assert (tmp_path / "w" / "download" / f"{shard['shard']:05d}_stats.json").exists()


def test_resume_after_kill_gives_identical_shards(image_server, tmp_path, ray_local):
    server = image_server(n_good=18, delay=0.25)
    url_list = write_urls(tmp_path / "urls.parquet", [server.base + p for p in server.good])
    args = dl_args(tmp_path / "killed", url_list, "download.shard_size=3", "download.threads=1", "ray.num_cpus=1")
    out = tmp_path / "killed" / "download"
    done = run_and_kill("download", args, lambda: list(out.glob("*_stats.json")), at_least=2)
    assert 2 <= done < 6, f"kill landed after {done} of 6 shards"
    cfg = load_config(None, args)
    state, detail = stage_status(cfg, "download")
    assert state == "partial" and detail == f"{done} of 6 shards"
    assert not (out / "manifest.json").exists()

    requests_before = server.requests
    run_stage("download", load_config(None, args[:-1]))  # resumes (ray.num_cpus is a runtime knob)
    assert server.requests - requests_before <= 18 - 3 * done + 3  # finished shards were not fetched again
    run_stage("download", load_config(None, dl_args(tmp_path / "clean", url_list, "download.shard_size=3")))
    killed, clean = shard_contents(out), shard_contents(tmp_path / "clean" / "download")
    assert len(clean) == 18
    assert killed == clean


def test_status_and_up_to_date_through_the_cli(image_server, tmp_path, ray_local, capsys):
    server = image_server(n_good=4)
    url_list = write_urls(tmp_path / "urls.parquet", [server.base + p for p in server.good])
    sets = [a for s in dl_args(tmp_path / "w", url_list) for a in ("--set", s)]
    assert main(["status"] + sets) == 0
    assert "download    pending" in capsys.readouterr().out
    assert main(["run", "download"] + sets) == 0
    out = capsys.readouterr().out
    assert "download" in out.splitlines()[-1] and " 4 " in out.splitlines()[-1]  # the stage table
    assert main(["status"] + sets) == 0
    assert "download    done     failed 0, images 4, shards 1, urls 4" in capsys.readouterr().out
    assert main(["run", "download"] + sets) == 0
    assert "download: up to date, nothing to do" in capsys.readouterr().out
    assert main(["run", "download"] + sets + ["--set", "download.image_size=32"]) == 2
    assert "--force" in capsys.readouterr().err


def test_deleted_or_corrupt_shards_are_fetched_again_as_the_errors_say(image_server, tmp_path, ray_local, capsys):
    """embed's corrupt-shard error says: delete the tar and its _stats.json, re-run download. A finished
    download then redoes that shard (it used to say "up to date" forever); a corrupt _stats.json stops the
    run naming the file, and following its advice gives the same shards."""
    server = image_server(n_good=6)
    url_list = write_urls(tmp_path / "urls.parquet", [server.base + p for p in server.good])
    args = dl_args(tmp_path / "w", url_list, "download.shard_size=3")
    sets = [a for s in args for a in ("--set", s)]
    out = tmp_path / "w" / "download"
    assert main(["run", "download"] + sets) == 0
    before = shard_contents(out)
    for name in ("00001.tar", "00001_stats.json"):
        (out / name).unlink()
    assert stage_status(load_config(None, args), "download") == ("partial", "1 shard(s) deleted (first: 00001) "
                                                                             "since it finished")
    capsys.readouterr()
    assert main(["run", "download"] + sets) == 0
    assert "download: 1 shard(s) deleted (first: 00001) since it finished: resuming to redo them" in capsys.readouterr().out
    assert shard_contents(out) == before and stage_status(load_config(None, args), "download")[0] == "done"

    (out / "manifest.json").unlink()
    (out / "00000_stats.json").write_text('{"count": 3, "succ')
    assert main(["run", "download"] + sets) == 1
    err = capsys.readouterr().err
    assert "00000_stats.json is corrupt" in err and "Delete it with 00000.tar and re-run `knnd run download`" in err
    for name in ("00000.tar", "00000_stats.json"):
        (out / name).unlink()
    assert main(["run", "download"] + sets) == 0
    assert shard_contents(out) == before


def test_csv_and_txt_url_lists(image_server, tmp_path, ray_local):
    server = image_server(n_good=3)
    urls = [server.base + p for p in server.good]
    (tmp_path / "u.txt").write_text("\n".join(urls) + "\n")
    (tmp_path / "u.csv").write_text("link,text\n" + "\n".join(f"{u},hello {i}" for i, u in enumerate(urls)) + "\n")
    m = run_stage("download", load_config(None, dl_args(tmp_path / "t", tmp_path / "u.txt", "download.caption_col=null")))
    assert m["counts"]["images"] == 3
    m = run_stage("download", load_config(None, dl_args(tmp_path / "c", tmp_path / "u.csv", "download.url_col=link",
                                                        "download.caption_col=text")))
    assert m["counts"]["images"] == 3
    captions = sorted(p["txt"] for p in shard_contents(tmp_path / "c" / "download").values())
    assert captions == [b"hello 0", b"hello 1", b"hello 2"]


def test_missing_column_is_a_usage_error(tmp_path, capsys):
    url_list = write_urls(tmp_path / "urls.parquet", ["http://127.0.0.1:9/x.png"])
    assert main(["run", "download", "--set", f"workdir={tmp_path / 'w'}", "--set", f"download.url_list={url_list}",
                 "--set", "download.url_col=link"]) == 2
    assert "download.url_col: column 'link' is not in" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
