"""Rebuilds: the old output set aside until the rebuild finishes (or put back when it is refused),
or deleted first with --discard-old; never a stage that says done over missing files."""
from __future__ import annotations

import os

import pytest

from pipeline.runner import StageError, UsageError, atomic_path, run_stage, stage_status
from pipeline.stages import TABLE, Stage
from test_runner import cfg


def refusing(message: str, shards_first: int = 0):
    """A download stand-in that does `shards_first` shards, then refuses its config (a check only the run can make)."""
    def run(stage):
        stage.plan(2)
        for shard in range(shards_first):
            with atomic_path(stage.dir / f"{shard}.txt") as tmp:
                tmp.write_text("new")
            stage.mark_done(shard, {"items": 1})
        raise UsageError(message)

    return Stage(run, (), "items")


def test_a_refused_run_leaves_the_stage_as_it_found_it(tmp_path, fake_stages, monkeypatch):
    """A usage error the run raises before any work: a first run leaves nothing behind (so the corrected
    run needs no --force); a rebuild (--force or stale input) gets the previous output back, byte for byte."""
    c, real = cfg(tmp_path), TABLE["download"]
    monkeypatch.setitem(TABLE, "download", refusing("memory_budget too small"))
    with pytest.raises(UsageError, match="memory_budget too small"):
        run_stage("download", c)
    assert stage_status(c, "download") == ("pending", "") and not (tmp_path / "download").exists()
    monkeypatch.setitem(TABLE, "download", real)
    run_stage("download", c)  # the corrected run: no "started with a different config"
    before = {p.name: p.read_bytes() for p in (tmp_path / "download").rglob("*") if p.is_file()}

    monkeypatch.setitem(TABLE, "download", refusing("device is cuda"))
    with pytest.raises(UsageError, match="device is cuda"):
        run_stage("download", c, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "download").rglob("*") if p.is_file()} == before
    assert stage_status(c, "download")[0] == "done" and [p.name for p in tmp_path.iterdir()] == ["download"]

    monkeypatch.setitem(TABLE, "download", refusing("late", shards_first=1))  # refused after some work: kept
    with pytest.raises(UsageError, match="late"):
        run_stage("download", c, force=True)
    assert stage_status(c, "download") == ("partial", "1 of 2 shards")
    assert (tmp_path / ".download.replaced" / "manifest.json").exists()  # until the rebuild gets under way
    monkeypatch.setitem(TABLE, "download", real)
    logs = []
    run_stage("download", c, log=logs.append)
    assert logs == ["download: resuming"] and not (tmp_path / ".download.replaced").exists()
    assert (tmp_path / "download" / "0.txt").read_text() == "new"  # the rebuild's shard kept, not redone


def test_discard_old_deletes_the_old_output_before_the_rebuild_runs(tmp_path, fake_stages, monkeypatch):
    """By default a rebuild keeps the old output aside while it runs (2x the disk); --discard-old
    (keep_old=False) deletes it first: the rebuild starts from an empty folder with nothing set aside."""
    from pipeline.cli import build_parser

    c, real = cfg(tmp_path), TABLE["download"]
    run_stage("download", c)
    seen = []

    def looks_around(stage):
        seen.append((sorted(p.name for p in stage.dir.iterdir()), (tmp_path / ".download.replaced").exists()))
        return real.run(stage)

    monkeypatch.setitem(TABLE, "download", Stage(looks_around, (), "items"))
    run_stage("download", c, force=True)
    assert seen[-1] == (["_run"], True)  # the old output kept aside while the rebuild runs
    logs = []
    run_stage("download", c, force=True, keep_old=False, log=logs.append)
    assert seen[-1] == (["_run"], False) and "download: the old output is deleted (--discard-old)" in logs
    assert stage_status(c, "download")[0] == "done" and not (tmp_path / ".download.replaced").exists()
    assert build_parser().parse_args(["run", "download", "--force", "--discard-old"]).discard_old


def test_a_refused_first_run_keeps_what_it_wrote_for_its_resume(tmp_path, fake_stages, monkeypatch):
    """Stages keep work a re-run resumes from before any shard is done (an index's trained centroids,
    dedup's): a refusal after writing some keeps the folder; a symlinked stage folder is emptied in place."""
    c, real = cfg(tmp_path), TABLE["download"]

    def trained_then_failed(stage):
        stage.plan(2)
        (stage.dir / "parts").mkdir()
        (stage.dir / "parts" / "trained.index").write_text("hours of k-means")
        raise StageError("a Ray task failed: re-run to resume")

    monkeypatch.setitem(TABLE, "download", Stage(trained_then_failed, (), "items"))
    with pytest.raises(StageError):
        run_stage("download", c)
    assert (tmp_path / "download" / "parts" / "trained.index").read_text() == "hours of k-means"

    elsewhere = tmp_path.parent / f"{tmp_path.name}-disk"
    (tmp_path / "download").rename(elsewhere)
    (tmp_path / "download").symlink_to(elsewhere)  # the stage's folder on another disk
    monkeypatch.setitem(TABLE, "download", real)
    run_stage("download", c, force=True)
    run_stage("download", c, force=True)
    assert (tmp_path / "download").is_symlink() and (elsewhere / "manifest.json").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["0.txt", "1.txt", "_run", "manifest.json"]


def test_a_kill_while_discard_old_deletes_leaves_a_stage_that_rebuilds_everything(tmp_path, monkeypatch):
    """Ctrl-C while --discard-old deletes a large old output file by file: the next plain run neither calls
    the stage up to date nor resumes past deleted shards; it rebuilds every shard."""
    shards = 40

    def run(stage):
        stage.plan(shards)
        for shard in range(shards):
            if not stage.shard_done(shard):
                with atomic_path(stage.dir / f"{shard}.bin") as tmp:
                    tmp.write_text("x")
                stage.mark_done(shard, {"items": 1})
        return {"items": shards, "counts": {"items": shards}}

    monkeypatch.setitem(TABLE, "download", Stage(run, (), "items"))
    c = cfg(tmp_path)
    run_stage("download", c)
    real, deleted = os.unlink, []

    def unlink(path, *a, **kw):
        if len(deleted) == 10:
            raise KeyboardInterrupt
        deleted.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        run_stage("download", c, force=True, keep_old=False)
    monkeypatch.setattr(os, "unlink", real)
    assert stage_status(c, "download")[0] == "pending"
    logs = []
    assert run_stage("download", c, log=logs.append)["items"] == shards
    assert len(list((tmp_path / "download").glob("*.bin"))) == shards and "download: up to date, nothing to do" not in logs
    assert not (tmp_path / ".download.replaced").exists()
