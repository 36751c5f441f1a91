"""Stage runner: up to date, refusal on changed config, --force, stale input, atomic writes, status."""
from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.runner import Progress, StageError, UsageError, atomic_path, run_stage, stage_status
from pipeline.stages import STAGES, TABLE, Stage


def cfg(tmp_path, *sets):
    return load_config(None, [f"workdir={tmp_path}", *sets])


def test_manifest_up_to_date_refusal_force(tmp_path, fake_stages):
    logs = []
    m = run_stage("download", cfg(tmp_path), log=logs.append)
    manifest = json.loads((tmp_path / "download" / "manifest.json").read_text())
    assert manifest == m
    assert {"config", "config_hash", "input_hash", "seconds", "versions", "counts"} <= set(manifest)
    assert manifest["config"]["image_size"] == 256 and "numpy" in manifest["versions"]

    run_stage("download", cfg(tmp_path), log=logs.append)
    assert logs[-1] == "download: up to date, nothing to do" and fake_stages["download"] == 1

    # a runtime knob (threads) does not change the output: still up to date
    run_stage("download", cfg(tmp_path, "download.threads=3"), log=logs.append)
    assert fake_stages["download"] == 1

    with pytest.raises(UsageError, match=r"different config \(image_size: 256 -> 64\).*--force"):
        run_stage("download", cfg(tmp_path, "download.image_size=64"))
    assert (tmp_path / "download" / "0.txt").read_text() == "download 0 256"  # nothing lost

    run_stage("download", cfg(tmp_path, "download.image_size=64"), force=True, log=logs.append)
    assert fake_stages["download"] == 2
    assert (tmp_path / "download" / "0.txt").read_text() == "download 0 64"



def test_manifest_records_the_globals_and_what_the_stage_wrote(tmp_path, fake_stages):
    """The globals (workdir, device, ray) sit beside the stage's config section, and `outputs` describes
    the files the stage wrote (pipeline.outputs_schema), its run state and manifest left out."""
    m = run_stage("download", cfg(tmp_path, "device=cpu", "ray.num_cpus=3"))
    assert m["globals"] == {"workdir": str(tmp_path.resolve()), "device": "cpu", "device_resolved": "cpu",
                            "ray": {"address": None, "num_cpus": 3}}
    sizes = [(tmp_path / "download" / f"{s}.txt").stat().st_size for s in range(2)]
    assert m["outputs"] == {"*.txt": {"files": 2, "bytes": sum(sizes)}}
    assert json.loads((tmp_path / "download" / "manifest.json").read_text())["outputs"] == m["outputs"]


def test_changing_device_workdir_or_ray_leaves_a_finished_stage_up_to_date(tmp_path, fake_stages, monkeypatch):
    """The globals are in the manifest, not in its config hash: another device or cluster (or the workdir
    moved) finds the stage up to date; a forced run with device=cuda and no CUDA does not fail in a stage
    that never needs a device, and records the device it asked for, not one it did not resolve."""
    import shutil

    import torch

    logs = []
    run_stage("download", cfg(tmp_path / "a", "device=cpu"))
    for sets in (["device=cuda"], ["device=auto", "ray.address=ray://10.0.0.1:10001", "ray.num_cpus=2"]):
        run_stage("download", cfg(tmp_path / "a", *sets), log=logs.append)
        assert logs[-1] == "download: up to date, nothing to do" and fake_stages["download"] == 1
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run_stage("download", cfg(tmp_path / "b"), log=logs.append)
    assert logs[-1] == "download: up to date, nothing to do" and fake_stages["download"] == 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    m = run_stage("download", cfg(tmp_path / "a", "device=cuda"), force=True)
    assert fake_stages["download"] == 2 and m["globals"]["device"] == "cuda" and "device_resolved" not in m["globals"]
    m = run_stage("download", cfg(tmp_path / "a", "device=auto", "ray.address=auto"), force=True)
    assert m["globals"]["ray"]["address"] == "auto" and "device_resolved" not in m["globals"]  # a cluster's GPUs decide


def test_a_key_added_since_a_stage_ran_counts_only_off_its_default(tmp_path, fake_stages):
    """A manifest written before download.min_image_size existed (and with a key that has become a
    runtime knob since): still up to date at the default, a changed config (naming the key) when the
    user sets it."""
    logs = []
    run_stage("download", cfg(tmp_path))
    path = tmp_path / "download" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["fingerprint"]["min_image_size"]
    manifest["fingerprint"]["a_knob_made_runtime_since"] = 7
    manifest["config_hash"] = "an-older-hash"
    path.write_text(json.dumps(manifest))
    run_stage("download", cfg(tmp_path), log=logs.append)
    assert logs[-1] == "download: up to date, nothing to do" and fake_stages["download"] == 1
    with pytest.raises(UsageError, match=r"different config \(min_image_size: None -> 8\)"):
        run_stage("download", cfg(tmp_path, "download.min_image_size=8"))


def test_a_key_whose_absence_meant_other_behaviour_makes_old_outputs_changed():
    """sample.scheduler and evaluate.scheduler came with ancestral sampling as the default: outputs
    from before were DDIM, so their fingerprints (without the key) are up to date only with ddim, and
    evaluate's no-kNN baseline did not exist (before=False)."""
    from pipeline.config import EvaluateConfig, SampleConfig, legacy_fingerprint, output_fingerprint
    from pipeline.runner import _changed_keys

    for section in (SampleConfig, EvaluateConfig):
        old = output_fingerprint(section())
        del old["scheduler"]
        old.pop("no_knn_baseline", None)
        changed = _changed_keys(old, output_fingerprint(section()), legacy_fingerprint(section))
        assert "scheduler: None -> 'sde-dpmsolver++'" in changed
        assert ("no_knn_baseline: None -> True" in changed) == (section is EvaluateConfig)
        assert _changed_keys(old, output_fingerprint(section(scheduler="ddim", no_knn_baseline=False) if section is
                                                     EvaluateConfig else section(scheduler="ddim")),
                             legacy_fingerprint(section)) == []
    old = output_fingerprint(SampleConfig())
    del old["seed"]  # a key without `before`: its absence meant its default
    assert _changed_keys(old, output_fingerprint(SampleConfig()), legacy_fingerprint(SampleConfig)) == []


def test_status_pending_done_stale(tmp_path, fake_stages):
    c = cfg(tmp_path)
    assert stage_status(c, "download") == ("pending", "")
    run_stage("download", c)
    run_stage("embed", c)
    assert stage_status(c, "embed")[0] == "done"
    assert stage_status(c, "download") == ("done", "items 2")
    run_stage("download", cfg(tmp_path, "download.image_size=64"), force=True)
    assert stage_status(c, "embed")[0] == "stale"
    logs = []
    run_stage("embed", c, log=logs.append)  # stale input: rebuilt without --force
    assert logs == ["embed: rebuilding (its input changed)"] and fake_stages["embed"] == 2
    assert stage_status(c, "embed")[0] == "done"


def test_partial_resume_skips_done_shards(tmp_path, fake_stages, monkeypatch):
    c = cfg(tmp_path)
    real = TABLE["download"]

    def crash_after_first(stage):
        stage.plan(2)
        with atomic_path(stage.dir / "0.txt") as tmp:
            tmp.write_text("download 0 256")
        stage.mark_done(0, {"items": 1})
        raise RuntimeError("killed")

    monkeypatch.setitem(TABLE, "download", Stage(crash_after_first, (), "items"))
    with pytest.raises(RuntimeError):
        run_stage("download", c)
    assert stage_status(c, "download") == ("partial", "1 of 2 shards")
    assert not (tmp_path / "download" / "manifest.json").exists()
    monkeypatch.setitem(TABLE, "download", real)
    logs = []
    run_stage("download", c, log=logs.append)
    assert logs == ["download: resuming"]
    assert stage_status(c, "download")[0] == "done"
    with pytest.raises(UsageError, match="different config"):
        run_stage("download", cfg(tmp_path, "download.image_size=64"))


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            1 / 0
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_corrupt_manifest_names_the_file(tmp_path, fake_stages):
    c = cfg(tmp_path)
    run_stage("download", c)
    (tmp_path / "download" / "manifest.json").write_text("{trunc")
    with pytest.raises(StageError, match=r"download/manifest\.json is corrupt.*knnd run download --force"):
        run_stage("embed", c)


def test_progress_line_has_shards_rate_eta():
    import io

    out = io.StringIO()
    p = Progress("embed", total=4, unit="images", stream=out)
    p.update(shards=1, items=100)
    p.update(shards=3, items=300)
    line = out.getvalue().strip().splitlines()[-1]
    assert line.startswith("embed: 4/4 shards, 400 images (") and "images/s), ETA 0:00:00" in line
    out = io.StringIO()
    Progress("dedup", total=2, unit="images", stream=out, parts="partitions").update(2, 50)
    assert out.getvalue().startswith("dedup: 2/2 partitions, 50 images (")


def test_stage_graph_is_ordered():
    for name, stage in TABLE.items():
        assert all(STAGES.index(u) < STAGES.index(name) for u in stage.upstream)


def test_usable_cpus_honours_a_cgroup_quota(tmp_path):
    """A container's CPU quota caps the count (cgroup v2 cpu.max, v1 cfs_quota_us/cfs_period_us); no quota,
    or no cgroup files, leaves the affinity mask's count; a fraction of a CPU is still one."""
    import os

    from pipeline.files import usable_cpus

    cpus = len(os.sched_getaffinity(0))
    v2, v1 = tmp_path / "cpu.max", tmp_path / "v1" / "cpu.cfs_quota_us"
    v1.parent.mkdir()
    assert usable_cpus([tmp_path / "missing" / "cpu.max"]) == cpus
    for text, expected in (("max 100000", cpus), ("100000 100000", 1), ("50000 100000", 1),
                           (f"{(cpus + 4) * 100000} 100000", cpus)):
        v2.write_text(text + "\n")
        assert usable_cpus([v2]) == expected, text
    (v1.parent / "cpu.cfs_period_us").write_text("100000\n")
    v1.write_text("-1\n")
    assert usable_cpus([v1]) == cpus
    v1.write_text("150000\n")
    assert usable_cpus([tmp_path / "missing" / "cpu.max", v1]) == 1


def test_run_clock_start_up_is_never_negative():
    """Workers report readiness in wall-clock time; a wall clock stepped back (seen once: -2.07 s of
    start-up) must not give a negative start-up or a rate over more time than the run took."""
    import time

    from pipeline.runner import RunClock

    clock = RunClock()
    clock.items = 100
    clock.ready(wall=time.time() - 3600)  # "ready an hour ago"
    report = clock.report("actor")
    assert report["actor_start_s"] == 0.0 and report["images_this_run"] == 100  # clamped to the clock's start
    clock.ready(wall=time.time())
    assert clock.report("actor")["actor_start_s"] >= 0.0


def test_resume_sweeps_what_a_killed_write_left(tmp_path, fake_stages, monkeypatch):
    c, real = cfg(tmp_path), TABLE["download"]

    def killed_mid_write(stage):
        stage.plan(2)
        (stage.dir / ".0.txt.tmp-4242").write_text("half")  # atomic_path's temporary, its process killed
        raise RuntimeError("killed")

    monkeypatch.setitem(TABLE, "download", Stage(killed_mid_write, (), "items"))
    with pytest.raises(RuntimeError):
        run_stage("download", c)
    monkeypatch.setitem(TABLE, "download", real)
    run_stage("download", c)
    assert sorted(p.name for p in (tmp_path / "download").iterdir()) == ["0.txt", "1.txt", "_run", "manifest.json"]


def test_a_finished_stage_redoes_the_outputs_deleted_since(tmp_path, fake_stages, monkeypatch):
    """A stage's `missing` hook (download's: shards whose tar was deleted, as a corrupt-shard error asks):
    the next run resumes and redoes them instead of saying up to date."""
    c, real = cfg(tmp_path), TABLE["download"]
    monkeypatch.setitem(TABLE, "download", Stage(real.run, (), "items", missing=lambda out, manifest: (
        None if (out / "1.txt").exists() else "shard 1 deleted")))
    run_stage("download", c)
    assert fake_stages["download"] == 1
    (tmp_path / "download" / "1.txt").unlink()
    (tmp_path / "download" / "_run" / "done" / "00001.json").unlink()  # what the hook does for its shards
    logs = []
    run_stage("download", c, log=logs.append)
    assert logs == ["download: shard 1 deleted since it finished: resuming to redo them", "download: resuming"]
    assert fake_stages["download"] == 2 and (tmp_path / "download" / "1.txt").read_text() == "download 1 256"
    run_stage("download", c, log=logs.append)
    assert logs[-1] == "download: up to date, nothing to do"


def test_an_unreachable_ray_address_is_a_usage_error_at_once():
    import socket

    from pipeline.runner import check_reachable

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UsageError, match=rf"ray.address '127.0.0.1:{port}': nothing answers at 127.0.0.1:{port} .*"
                                         r"`ray start --head`"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"ray://127.0.0.1:{s.getsockname()[1]}")  # something answers: left to Ray
    check_reachable("auto")
    check_reachable("::1")  # an unbracketed IPv6 address (no port to tell apart): left to Ray
    try:
        six = socket.socket(socket.AF_INET6)
        six.bind(("::1", 0))
    except OSError:
        return  # no IPv6 loopback here
    with six:
        six.listen()
        check_reachable(f"[::1]:{six.getsockname()[1]}")  # bracketed: the brackets are not part of the host


def test_device_cuda_without_cuda_is_a_usage_error(tmp_path, monkeypatch):
    import torch

    from pipeline.runner import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="device is cuda, but torch sees no CUDA device on this machine: set device=auto"):
        resolve_device(cfg(tmp_path, "device=cuda"))
    assert resolve_device(cfg(tmp_path, "device=auto")) == "cpu" and resolve_device(cfg(tmp_path, "device=cpu")) == "cpu"


def test_knnd_run_takes_stages_in_pipeline_order(tmp_path, fake_stages, capsys):
    from pipeline.cli import main

    assert main(["run", "embed", "download", "--set", f"workdir={tmp_path}"]) == 0  # typed out of order
    assert fake_stages == {"download": 1, "embed": 1}
    assert stage_status(cfg(tmp_path), "embed")[0] == "done"


def test_a_cuda_out_of_memory_error_names_the_fix(tmp_path, monkeypatch, capsys):
    """torch's OutOfMemoryError (or Ray's wrapping of it) is a one-line error naming the batch sizes,
    exit 1; any other exception still raises with its traceback."""
    import torch

    from pipeline import cli

    def runs_out(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "cmd_run", runs_out)
    assert cli.main(["run", "train", "--set", f"workdir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower the batch size" in err
    assert "train.batch_size" in err and "Traceback" not in err
    monkeypatch.setattr(cli, "cmd_run", lambda args: (_ for _ in ()).throw(RuntimeError("ray: CUDA out of memory on rank 1")))
    assert cli.main(["run", "train"]) == 1
    monkeypatch.setattr(cli, "cmd_run", lambda args: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        cli.main(["run", "train"])
