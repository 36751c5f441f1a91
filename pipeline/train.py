"""train stage: pack shards -> train/checkpoints/step_{step:07d}.pt and train/metrics.jsonl.

A thin layer over `model.trainer.train`: it builds the model config from the `train.model` preset
(tiny, demo, paper) at the pack's resolution, CLIP dimension and k, maps the `train:` section onto
TrainParams, and records the result in the manifest. Resuming is the trainer's: a re-run of an
interrupted stage (the runner says "resuming") continues exactly from the latest checkpoint.
`train.minutes` bounds the wall time of one run (a resumed run gets the budget afresh); the run
then ends like a finished one (final checkpoint, manifest) after fewer than `train.steps` steps.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

from pipeline.cluster import require_per_worker, work_device
from pipeline.runner import StageError, StageRun, UsageError, ensure_ray, hms, read_json, stage_dir

PRESETS = ("tiny", "demo", "paper")
AUTO_STREAM_BYTES = 1 << 30  # train.input auto: a pack whose arrays pass this streams (model.stream)


# --------------------------------------------------------------------------- configs


def model_config(preset: str, resolution: int, clip_dim: int, k: int, conf=None):
    """The preset's network at `resolution`, fed `clip_dim`-dimensional embeddings of k neighbours.

    Cross-attention stays at the same U-Net levels (tiny attends at its second level: 8 px at
    16 px, 16 px at 32 px), so a preset keeps its shape and parameter count at any resolution that
    its levels divide; `conf` (the train section) may override the attention levels, the prediction
    type, the noise schedule, the conditioning variant and k (at most the pack's). Raises UsageError naming the keys when they do not fit together.
    """
    from model.denoiser import ModelConfig

    build = {"tiny": ModelConfig.tiny, "demo": ModelConfig.demo, "paper": ModelConfig.paper}[preset]
    base = build()
    levels = len(base.block_out_channels)
    s = conf.space_to_depth if conf is not None else 1
    if resolution % (s * 2 ** (levels - 1)):
        raise UsageError(f"pack.image_size {resolution} does not fit train.model {preset} with train.space_to_depth {s}: "
                         f"its {levels} U-Net levels halve the image {levels - 1} times after folding it by {s}, so the "
                         f"size must be a multiple of {s * 2 ** (levels - 1)} (the preset's own is {base.resolution}); "
                         f"change pack.image_size, train.space_to_depth or train.model")
    grid = resolution // s  # the U-Net's input grid
    attend = tuple(grid // 2 ** base.level_resolutions().index(r) for r in base.attention_resolutions)
    extra = {}
    if conf is not None:
        extra = {"prediction_type": conf.prediction_type, "beta_schedule": conf.beta_schedule,
                 "conditioning": conf.conditioning, "space_to_depth": s, "manipulation": conf.mode == "manipulate"}
        if conf.k is not None:
            if conf.k > k:
                raise UsageError(f"train.k {conf.k} is more than the {k} neighbours the pack holds: lower train.k "
                                 f"or re-run `knnd run neighbours pack --set neighbours.k={conf.k}`")
            k = conf.k
        if conf.attention_resolutions is not None:
            levels_px = [grid // 2 ** i for i in range(levels)]
            wrong = sorted(set(conf.attention_resolutions) - set(levels_px))
            if wrong:
                raise UsageError(f"train.attention_resolutions has {wrong}, which are not U-Net levels at pack.image_size "
                                 f"{resolution} (space-to-depth {s}): choose from {levels_px} (or null for the preset's)")
            attend = tuple(conf.attention_resolutions)
    return build(resolution=resolution, attention_resolutions=attend, clip_dim=clip_dim, k=k, **extra)


def pack_bytes(pack: dict) -> int:
    """What PackDataset would hold per worker: images, conditions (and the manipulation members)."""
    side, k, d = pack["image_size"], pack["k"], pack["d"]
    per_sample = side * side * 3 + (k + 1) * d * 2
    if pack.get("manipulation"):
        per_sample += side * side * 3 + 2 * d * 2  # the aligned neighbour image; boxes and their embeddings (~2)
    return pack["items"] * per_sample


def resolve_input(conf, pack: dict, out: Path | None = None) -> str:
    """train.input as the trainer takes it: memory or stream (auto: stream past AUTO_STREAM_BYTES, when it can;
    resuming, what the latest checkpoint in out/checkpoints read, so a run begun before auto streamed goes on)."""
    if conf.input != "auto":
        return conf.input
    resumed = checkpoint_input(out) if out is not None else None
    if resumed is not None:
        return resumed
    if conf.backbone == "discrete" or sum(1 for s in pack["shards"] if s["samples"]) < conf.num_workers:
        return "memory"
    return "stream" if pack_bytes(pack) > AUTO_STREAM_BYTES else "memory"


def checkpoint_input(out: Path) -> str | None:
    """The input ("memory" or "stream") of the latest checkpoint under out (read lazily); None without one."""
    import torch

    from model.checkpoint import latest_checkpoint

    latest = latest_checkpoint(Path(out) / "checkpoints")
    if latest is None:
        return None
    state = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)
    return state.get("data_input", {"input": "memory"})["input"]


def check_input(conf, pack: dict) -> None:
    """train.input=stream needs a backbone that streams and a pack with enough shards for the workers."""
    if resolve_input(conf, pack) != "stream":
        return
    if conf.backbone == "discrete":
        raise UsageError("train.input=stream is not available for the discrete backbone (its VQ tokens are one array "
                         "of the whole pack): set train.input=memory or auto")
    sizes = sorted(s["samples"] for s in pack["shards"] if s["samples"])
    workers = conf.num_workers
    if len(sizes) < workers:
        raise UsageError(f"train.input=stream deals pack shards to workers, but the pack has {len(sizes)} non-empty "
                         f"shards for train.num_workers={workers}: set train.input=memory or re-run the pack with a "
                         f"smaller pack.shard_size")
    if sum(sizes[:len(sizes) // workers]) < conf.batch_size // workers:
        raise UsageError(f"train.input=stream: a worker may be dealt fewer samples in an epoch than its share of "
                         f"train.batch_size {conf.batch_size}: lower train.batch_size or set train.input=memory")


def train_params(conf, use_gpu: bool, data_input: str = "memory"):
    """TrainParams from the `train:` section; batch_size there counts all workers, here one. data_input:
    train.input resolved (resolve_input)."""
    from model.trainer import TrainParams

    return TrainParams(steps=conf.steps, batch_size=conf.batch_size // conf.num_workers, lr=conf.lr,
                       weight_decay=conf.weight_decay, warmup_steps=conf.warmup_steps, lr_schedule=conf.lr_schedule,
                       cond_drop_prob=conf.cond_drop_prob, query_drop_prob=conf.query_drop_prob,
                       query_noise=conf.query_noise,
                       loss_weighting=conf.loss_weighting, grad_clip=conf.grad_clip, ema_decay=conf.ema_decay,
                       checkpoint_every=conf.checkpoint_every, seed=conf.seed, num_workers=conf.num_workers,
                       use_gpu=use_gpu, init_from=str(Path(conf.init_from).resolve()) if conf.init_from else None,
                       input=data_input, shuffle_buffer=conf.shuffle_buffer)


def check(cfg) -> None:
    """Usage errors found before anything is written: preset vs pack, batch vs pack size, GPU."""
    conf = cfg.train
    pack = read_json(stage_dir(cfg, "pack") / "manifest.json", "Rebuild it with `knnd run pack --force`.")
    if conf.backbone == "discrete":
        from pipeline.train_discrete import discrete_config
        if conf.mode == "manipulate":
            raise UsageError("train.mode=manipulate needs the continuous backbone: set train.backbone=continuous "
                             "(local manipulation is a U-Net with extra input channels)")
        discrete_config(conf.model, pack, conf)
    else:
        config = model_config(conf.model, pack["image_size"], pack["d"], pack["k"], conf)
        if conf.init_from:
            check_init_from(Path(conf.init_from), config)
    if conf.mode == "manipulate" and not pack.get("manipulation"):
        raise UsageError("train.mode is manipulate but the pack holds no aligned neighbour images and box embeddings: "
                         "re-run `knnd run pack --force --set pack.manipulation=true` first")
    check_input(conf, pack)
    if pack["items"] < conf.batch_size:
        raise UsageError(f"the pack holds {pack['items']} samples, fewer than train.batch_size {conf.batch_size}: "
                         f"lower train.batch_size or pack more images")
    if conf.use_gpu and cfg.device == "cpu":
        raise UsageError("train.use_gpu is true but device is cpu: set train.use_gpu=false")
    if not cfg.ray.address and conf.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("train.use_gpu is true but no CUDA device is visible: set train.use_gpu=false")
    # the cluster's GPUs and CPUs decide, or the local Ray's (pipeline.cluster): Ray Train waits forever otherwise
    use_gpu = conf.use_gpu or work_device(cfg, conf.num_workers) == "cuda"
    if use_gpu or conf.num_workers > 1:  # one process without a GPU needs no Ray
        require_per_worker(cfg, conf.num_workers, "GPU" if use_gpu else "CPU",
                           f"train.num_workers={conf.num_workers} on {'GPUs' if use_gpu else 'CPUs'}")


def check_init_from(path: Path, config) -> None:
    """train.init_from names a checkpoint of the same network (but for the manipulation input)."""
    from model.checkpoint import load_checkpoint
    from model.manipulation import check_init_source

    if not path.is_file():
        raise UsageError(f"train.init_from {path} does not exist: give a step_XXXXXXX.pt checkpoint, or null")
    try:
        check_init_source(path, load_checkpoint(path)["model_config"], config)
    except (ValueError, KeyError) as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------- the stage


def run(stage: StageRun) -> dict:
    from model.trainer import train
    from pipeline.index_files import clip_identity

    if stage.conf.backbone == "discrete":
        from pipeline import train_discrete
        return train_discrete.run(stage)
    conf, pack = stage.conf, stage.inputs["pack"]
    config = model_config(conf.model, pack["image_size"], pack["d"], pack["k"], conf)
    use_gpu = conf.use_gpu or work_device(stage.cfg, conf.num_workers) == "cuda"
    params = train_params(conf, use_gpu, resolve_input(conf, pack, stage.dir))
    # absolute: Ray Train moves every worker into a folder of its own
    shards = [s for s in pack["shards"] if s["samples"]]
    paths = [(stage.input_dirs["pack"] / s["tar"]).resolve() for s in shards]
    stage.plan(conf.steps)  # `knnd status` counts steps of the latest checkpoint (count_done_shards)
    if use_gpu or conf.num_workers > 1:
        ensure_ray(stage.cfg)  # Ray Train joins ray.address instead of starting a Ray of its own
    print(f"train: {conf.model} {'manipulation ' if config.manipulation else ''}model at {config.resolution} px, "
          f"k={config.k}, d={config.clip_dim}, "
          f"{conf.steps} steps of {conf.batch_size} on {'GPU' if use_gpu else 'CPU'}, pack read by {params.input}"
          + (f", at most {conf.minutes:g} min" if conf.minutes is not None else ""), file=sys.stderr)
    try:
        budget = None if conf.minutes is None else conf.minutes * 60
        with MetricsTail(stage.dir / "metrics.jsonl", conf.steps, budget_seconds=budget):
            result = train(dataclasses.replace(params, max_seconds=budget), config, paths, stage.dir,
                           clip=clip_identity(pack.get("clip")), shard_sizes=[s["samples"] for s in shards])
    except ValueError as e:  # the trainer's own messages: corrupt pack shard, foreign checkpoint
        raise StageError(str(e)) from None
    return manifest_body(stage.dir, result, config, conf, pack)


def manifest_body(out_dir: Path, result: dict, config, conf, pack: dict) -> dict:
    import statistics

    from model.checkpoint import latest_checkpoint
    from model.trainer import worker_nodes
    from pipeline.cluster import count_nodes

    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step = int(result.get("step", 0))
    return {
        "items": step * conf.batch_size,  # samples trained on, so the stage table shows samples/s
        "counts": {"steps": step, "samples": step * conf.batch_size},
        "step": step,
        "stopped_by": "steps" if step >= conf.steps else "minutes",
        "loss": result.get("loss"),
        "lr": result.get("lr"),
        "samples_per_s": statistics.median(m["samples_per_s"] for m in lines) if lines else None,
        "checkpoint": str(checkpoint.relative_to(out_dir)) if checkpoint else None,
        "checkpoints": "checkpoints/step_{step:07d}.pt",
        "metrics": "metrics.jsonl",
        "parameters": count_parameters(checkpoint) if checkpoint else None,
        "nodes": count_nodes(worker_nodes(out_dir)),  # {Ray node: Ray Train workers}; {}: trained in this process
        "model_preset": conf.model,
        "model_config": config.to_dict(),
        "clip": pack.get("clip"),  # the CLIP the model was trained on: sampling needs its text tower
    }


def count_parameters(checkpoint: Path) -> int:
    """Parameters of the saved model, read lazily (mmap) rather than by building the network."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return int(sum(t.numel() for t in state["ema"].values()))


def count_done_shards(out: Path) -> int:
    """For `knnd status`: the step of the latest checkpoint (the plan is train.steps)."""
    from model.checkpoint import checkpoint_step, latest_checkpoint

    latest = latest_checkpoint(Path(out) / "checkpoints")
    return checkpoint_step(latest) if latest else 0


class MetricsTail:
    """Prints the trainer's progress every few seconds, read from metrics.jsonl (which rank 0
    appends), so the in-process and the Ray Train paths report the same way."""

    def __init__(self, path: Path, total_steps: int, every: float = 5.0, stream=None, budget_seconds: float | None = None):
        self.path, self.total, self.every = Path(path), total_steps, every
        # train.minutes: the trainer's clock starts after its set-up; this one at the first metrics line
        self.budget, self.deadline = budget_seconds, None
        self.stream = stream or sys.stderr
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.first = self.last_step = None  # (time, step) of the first line seen: the ETA's origin

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._print()

    def _loop(self):
        while not self.stop.wait(self.every):
            self._print()

    def _print(self):
        try:
            lines = self.path.read_text().splitlines()
            last = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):  # not written yet, or caught mid-line
            return
        if last is None or last["step"] == self.last_step:
            return
        now, step = time.monotonic(), last["step"]
        self.first = self.first or (now, step)
        if self.budget is not None and self.deadline is None:
            self.deadline = now + self.budget
        self.last_step = step
        left = []  # seconds to the last step at the rate so far, and to the minutes budget
        if step > self.first[1]:
            left.append((now - self.first[0]) / (step - self.first[1]) * (self.total - step))
        if self.deadline is not None:
            left.append(max(self.deadline - now, 0.0))
        eta = hms(min(left)) if left else "?"
        self.stream.write(f"train: step {step}/{self.total}, loss {last['loss']:.4f}, lr {last['lr']:.2e}, "
                          f"{last['samples_per_s']:.1f} samples/s, ETA {eta}\n")
        self.stream.flush()
