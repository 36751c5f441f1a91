"""pipeline/train.py: a tiny model through run_stage, weights-only checkpoints, up to date on re-run,
an interrupted stage resumes to the uninterrupted result, train.minutes, preset/pack fit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import model.trainer
from model.checkpoint import latest_checkpoint, load_model
from model.data import write_pack_shard
from pipeline.config import load_config
from pipeline.runner import UsageError, run_stage, write_json
from pipeline.train import model_config

RESOLUTION, K, D = 16, 3, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, shared cores


def write_pack(workdir, n: int = 8, image_size: int = RESOLUTION) -> dict:
    """A pack stage output as pipeline.pack writes it: two tars and the manifest."""
    rng = np.random.default_rng(0)
    samples = [{"key": f"{i:09d}", "image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
                "emb": rng.standard_normal(D).astype(np.float16), "nbr": rng.standard_normal((K, D)).astype(np.float16)}
               for i in range(n)]
    out = workdir / "pack"
    out.mkdir(parents=True)
    half = n // 2
    shards = [{"shard": 0, "tar": "00000.tar", "samples": write_pack_shard(out / "00000.tar", samples[:half]), "embed_shard": 0},
              {"shard": 1, "tar": "00001.tar", "samples": write_pack_shard(out / "00001.tar", samples[half:]), "embed_shard": 1}]
    manifest = {"stage": "pack", "config_hash": "test", "input_hash": "test", "items": n, "counts": {"samples": n},
                "shards": shards, "image_size": image_size, "k": K, "d": D, "clip": None}
    write_json(out / "manifest.json", manifest)
    return manifest


def train_config(workdir, *extra):
    return load_config(None, [f"workdir={workdir}", "device=cpu", "train.model=tiny", "train.steps=6",
                              "train.batch_size=4", "train.checkpoint_every=2", "train.warmup_steps=2", *extra])


def test_tiny_model_trains_and_rerun_is_up_to_date(tmp_path):
    write_pack(tmp_path)
    cfg = train_config(tmp_path)
    manifest = run_stage("train", cfg)
    train = tmp_path / "train"
    assert manifest["step"] == 6 and manifest["stopped_by"] == "steps" and np.isfinite(manifest["loss"])
    assert manifest["nodes"] == {}  # one CPU worker: trained in this process, not on Ray
    assert manifest["checkpoint"] == "checkpoints/step_0000006.pt" and manifest["samples_per_s"] > 0
    assert manifest["model_config"] == model_config("tiny", RESOLUTION, D, K).to_dict()
    assert sorted(p.name for p in (train / "checkpoints").iterdir()) == [
        "step_0000002.pt", "step_0000004.pt", "step_0000006.pt"]
    state = torch.load(train / manifest["checkpoint"], weights_only=True)
    assert state["step"] == 6 and manifest["parameters"] == sum(t.numel() for t in state["ema"].values())
    assert load_model(train / manifest["checkpoint"]).config.k == K
    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and {"loss", "lr", "samples_per_s"} <= set(metrics[-1])
    logs = []
    assert run_stage("train", cfg, log=logs.append)["step"] == 6
    assert logs == ["train: up to date, nothing to do"]


@pytest.mark.parametrize("data_input", ["auto", "stream"])
def test_interrupted_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, data_input):
    write_pack(tmp_path / "straight")
    extra = [f"train.input={data_input}", "train.shuffle_buffer=3"]
    run_stage("train", train_config(tmp_path / "straight", *extra))

    write_pack(tmp_path / "killed")
    real_step, calls = model.trainer.train_step, []

    def dies_in_step_5(*args):
        calls.append(1)
        if len(calls) == 5:  # after the step-4 checkpoint: as if Ctrl-C'd mid-step
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(model.trainer, "train_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", train_config(tmp_path / "killed", *extra))
    monkeypatch.setattr(model.trainer, "train_step", real_step)
    killed = tmp_path / "killed" / "train"
    assert latest_checkpoint(killed / "checkpoints").name == "step_0000004.pt"
    assert not (killed / "manifest.json").exists()

    logs = []
    manifest = run_stage("train", train_config(tmp_path / "killed", *extra), log=logs.append)
    assert logs == ["train: resuming"] and manifest["step"] == 6
    a, b = (torch.load(latest_checkpoint(d / "checkpoints"), weights_only=True)
            for d in (tmp_path / "straight" / "train", killed))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][name], b[part][name]) for name in a[part])
    assert a["data_position"] == b["data_position"]
    # auto: an 8-sample pack is read in memory; stream: the manifest's shard sizes, the buffer in the checkpoint
    assert a["data_input"] == ({"input": "memory"} if data_input == "auto" else {"input": "stream", "shuffle_buffer": 3})


def test_minutes_budget_stops_early_with_a_checkpoint(tmp_path):
    write_pack(tmp_path)
    manifest = run_stage("train", train_config(tmp_path, "train.minutes=0"))
    assert 1 <= manifest["step"] < 6 and manifest["stopped_by"] == "minutes"
    assert (tmp_path / "train" / manifest["checkpoint"]).exists()
    assert manifest["checkpoint"] == f"checkpoints/step_{manifest['step']:07d}.pt"


def test_presets_follow_the_pack_resolution_or_fail_naming_both_keys(tmp_path):
    tiny = model_config("tiny", 32, D, K)
    assert (tiny.resolution, tiny.attention_resolutions, tiny.clip_dim, tiny.k) == (32, (16,), D, K)
    assert model_config("demo", 64, 512, 10).attention_resolutions == (32, 16)
    write_pack(tmp_path, image_size=18)
    with pytest.raises(UsageError, match="pack.image_size 18 does not fit train.model demo.*multiple of 4"):
        run_stage("train", train_config(tmp_path, "train.model=demo"))
    assert not (tmp_path / "train").exists()
    with pytest.raises(UsageError, match="fewer than train.batch_size 16"):
        run_stage("train", train_config(tmp_path, "train.batch_size=16"))


def test_progress_eta_stops_at_the_minutes_budget(tmp_path, monkeypatch):
    import io
    import json

    import pipeline.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module.time, "monotonic", lambda: clock[0])
    metrics, out = tmp_path / "metrics.jsonl", io.StringIO()

    def at(t, step):
        clock[0] = t
        with metrics.open("a") as f:
            f.write(json.dumps({"step": step, "loss": 0.5, "lr": 1e-4, "samples_per_s": 30.0}) + "\n")
        tail._print()
        return out.getvalue().splitlines()[-1]

    tail = train_module.MetricsTail(metrics, total_steps=1000, stream=out, budget_seconds=60)
    at(0.0, 10)
    assert at(10.0, 20).endswith("ETA 0:00:50")  # 980 s of steps left, but the budget ends at 60 s
    tail = train_module.MetricsTail(metrics, total_steps=1000, stream=out)
    at(10.0, 30)
    assert at(20.0, 40).endswith("ETA 0:16:00")  # no budget: 960 steps at 1 step/s


def test_shard_paths_handed_to_the_trainer_are_absolute_with_a_relative_workdir(tmp_path, monkeypatch):
    """Ray Train runs each worker in a folder of its own: a path relative to the driver's working
    directory would name no file there (and read as a corrupt pack shard)."""
    from pathlib import Path

    class Captured(Exception):
        pass

    seen = {}

    def capture(params, config, shard_paths, out_dir, clip=None, shard_sizes=None):
        seen["paths"], seen["sizes"] = [Path(p) for p in shard_paths], shard_sizes  # out_dir: model.trainer.train resolves it itself
        raise Captured

    monkeypatch.chdir(tmp_path)
    write_pack(Path("work/x"))
    monkeypatch.setattr(model.trainer, "train", capture)
    with pytest.raises(Captured):
        run_stage("train", train_config("work/x"))
    assert [p.name for p in seen["paths"]] == ["00000.tar", "00001.tar"] and seen["sizes"] == [4, 4]
    assert all(p.is_absolute() and p.is_file() for p in seen["paths"]), seen["paths"]
    assert seen["paths"][0].parent == (tmp_path / "work" / "x" / "pack").resolve()
