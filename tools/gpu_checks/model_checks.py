"""Training and sampling on cuda: the trainer's own loop with bf16 autocast, the train stage's entry
through Ray Train, sampling as `knnd sample` and evaluate run it, and the discrete backbone."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import numpy as np
import torch

from tools.gpu_checks.common import ROOT, Context, expect, pack_shards, synthetic_images, synthetic_pack


def train_bf16(ctx: Context) -> dict:
    """model.trainer.train_loop in this process on cuda (bf16 autocast), the demo recipe on the pack, for
    ctx.steps steps or ctx.seconds, whichever ends first, into this run's fresh folder; the EMA
    weights of the steps in ctx.keep (and the last) are written to ctx.out as slim checkpoints
    (model_config + ema) that `knnd sample`/`knnd evaluate --checkpoint` load on any machine."""
    from model.trainer import TrainParams, train_loop
    from pipeline.train import model_config

    manifest, shards = pack_shards(ctx.pack())
    config = model_config("demo", manifest["image_size"], manifest["d"], manifest["k"])
    params = TrainParams(steps=ctx.steps, batch_size=32, lr=1e-3, weight_decay=0.0, warmup_steps=20, lr_schedule="constant",
                         query_drop_prob=0.5, checkpoint_every=min(ctx.keep), use_gpu=True, max_seconds=ctx.seconds)
    work = ctx.work / "train_bf16"
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # training only: sampling below runs with the default, as users do
    try:
        start = time.perf_counter()
        result = train_loop({"params": dataclasses.asdict(params), "model": config.to_dict(), "shard_paths": shards,
                             "out_dir": str(work)})
        seconds = time.perf_counter() - start
    finally:
        torch.backends.cudnn.benchmark = benchmark
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    shutil.copy(work / "metrics.jsonl", ctx.out / "metrics.jsonl")
    last = None
    for path in sorted((work / "checkpoints").glob("step_*.pt")):
        step = int(path.stem.split("_")[1])
        if step in ctx.keep or step == result["step"]:
            state = torch.load(path, map_location="cpu", weights_only=True)
            torch.save({"model_config": state["model_config"], "ema": state["ema"], "step": step,
                        "train_params": state["train_params"]}, ctx.out / path.name)
            last = ctx.out / path.name
    expect(result["step"] > 0 and math.isfinite(result["loss"]), f"steps trained and a finite loss, got {result}")
    return {"steps": result["step"], "seconds": round(seconds, 1), "final_loss": result["loss"],
            "median_samples_per_s": float(np.median([m["samples_per_s"] for m in lines])), "batch": 32,
            "pack": str(ctx.pack()), "checkpoint": str(last),
            "recipe": "demo: lr 1e-3 constant, warm-up 20, query_drop_prob 0.5"}


def sample_cuda(ctx: Context) -> dict:
    """Sampling as `knnd sample` (pipeline.generation.Sampler) and evaluate run it, on cuda from
    train_bf16's checkpoint: the default scheduler with one CPU generator per image, a neighbour mask
    (odd rows miss their farther neighbours), two-scale guidance, and an init image; the same
    generators must give the same images twice."""
    from model.checkpoint import load_model
    from model.diffusion import sample
    from pipeline.config import DEFAULT_SCHEDULER

    model = load_model(ctx.results["train_bf16"]["checkpoint"], device="cuda")
    n, slots, size = 8, model.config.k + 1, model.config.resolution
    emb = torch.nn.functional.normalize(torch.randn(n, slots, model.config.clip_dim,
                                                    generator=torch.Generator().manual_seed(0)), dim=-1)
    mask = torch.ones(n, slots, dtype=torch.bool)
    mask[1::2, max(1, slots // 2):] = False

    def run(rows=slice(None), **kw):
        generators = [torch.Generator().manual_seed(100 + i) for i in range(n)][rows]
        return sample(model, emb[rows], steps=25, guidance=3.0, generator=generators, scheduler=DEFAULT_SCHEDULER,
                      neighbour_mask=mask[rows], neighbour_guidance=5.0, **kw)

    start = time.perf_counter()
    a = run()
    seconds = time.perf_counter() - start
    b, one = run(), run(rows=slice(1, 2))
    edit, edit_again = (run(init_image=a[0], strength=0.6) for _ in range(2))
    expect(a.shape == (n, size, size, 3) and a.dtype == np.uint8, f"uint8 [{n}, {size}, {size}, 3], got {a.dtype} {a.shape}")
    expect(np.array_equal(a, b), "the same generators to give the same images on cuda")
    expect(np.array_equal(edit, edit_again), "the same generators and init image to give the same images on cuda")
    expect(not np.array_equal(edit, a), "an init image to change the images")
    return {"scheduler": DEFAULT_SCHEDULER, "images": n, "steps": 25, "seconds": round(seconds, 2),
            "pixel_std": float(a.std()), "deterministic": True,
            # a batch of one may take other kernels on cuda: how far image 1 of the batch is from it (CPU: 0)
            "batch_of_one_max_pixel_diff": int(np.abs(a[1:2].astype(int) - one.astype(int)).max())}


def train_ray(ctx: Context) -> dict:
    """The train stage's entry (model.trainer.train with pipeline.train's model_config and train_params)
    at use_gpu=True, num_workers=1: Ray Train's TorchTrainer, prepare_model, ray.train.torch.get_device()
    and, with a time budget set as train.minutes sets it, the NCCL broadcast after every step."""
    import ray

    from model.trainer import train, worker_nodes
    from pipeline.config import Config, TrainConfig
    from pipeline.runner import ensure_ray
    from pipeline.train import model_config, train_params

    manifest, shards = pack_shards(ctx.pack())
    conf = TrainConfig(model="tiny", steps=6, batch_size=8, checkpoint_every=3, use_gpu=True, num_workers=1)
    config = model_config(conf.model, manifest["image_size"], manifest["d"], manifest["k"], conf)
    params = dataclasses.replace(train_params(conf, True, "memory"), max_seconds=600.0)
    out = ctx.work / "train_ray"
    # Ray's workers import model/ and pipeline/ from the checkout (not installed on the GPU machine)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ensure_ray(Config())
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        expect(gpus >= 1, f"Ray to offer a GPU (else TorchTrainer waits for one forever), it offers {gpus}")
        start = time.perf_counter()
        result = train(params, config, shards, out, shard_sizes=[s["samples"] for s in manifest["shards"] if s["samples"]])
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    nodes = worker_nodes(out)
    expect(result.get("step") == conf.steps == state["step"], f"{conf.steps} steps, got {result.get('step')}")
    expect(math.isfinite(result["loss"]), f"a finite loss, got {result['loss']}")
    expect(len(nodes) == 1, f"one Ray Train worker recording its node, got {nodes}")
    return {"steps": result["step"], "loss": result["loss"], "seconds_with_ray_start": round(seconds, 1),
            "workers": len(nodes), "gpus_in_ray": gpus}


def discrete_bf16(ctx: Context) -> dict:
    """The discrete backbone on cuda: a tiny VQ (trained 2 steps) tokenises a tiny pack, the discrete
    trainer's per-worker loop (bf16 autocast) trains 4 steps, and its checkpoint samples with one
    generator per image, twice (the same images) and from an init image."""
    from model.checkpoint import load_model
    from model.diffusion import sample
    from model.discrete import DiscreteConfig
    from model.discrete_trainer import discrete_loop
    from model.trainer import TrainParams
    from model.vq import VQConfig
    from model.vq_train import VQParams, load_vq, tokenize, train_vq

    config = DiscreteConfig.tiny()
    n = 32
    pack = synthetic_pack(ctx.work / "discrete_pack", n, config.resolution, config.k, config.clip_dim)
    images = synthetic_images(n, config.resolution)  # the pack's, with keys 000000000, 000000001, ...
    vq_checkpoint = train_vq(VQParams(steps=2, batch_size=8), VQConfig.from_dict(config.vq), images,
                             ctx.work / "discrete_vq")["checkpoint"]
    tokens = ctx.work / "discrete_vq" / "tokens.npz"
    np.savez(tokens, keys=np.array([f"{i:09d}" for i in range(n)]), tokens=tokenize(load_vq(vq_checkpoint)[0], images))
    params = TrainParams(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=4, log_every=1, use_gpu=True)
    result = discrete_loop({"params": dataclasses.asdict(params), "model": config.to_dict(),
                            "shard_paths": pack_shards(pack)[1], "tokens_path": str(tokens),
                            "vq_checkpoint": str(vq_checkpoint), "aux_weight": 1.0, "out_dir": str(ctx.work / "discrete")})
    expect(result.get("step") == 4 and math.isfinite(result["loss"]), f"4 steps and a finite loss, got {result}")
    model = load_model(result["checkpoint"], device="cuda")
    emb = torch.randn(4, config.k + 1, config.clip_dim, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        return sample(model, emb, steps=10, guidance=3.0, generator=[torch.Generator().manual_seed(i) for i in range(4)], **kw)

    a, b = run(), run()
    edit = run(init_image=a[0], strength=0.5)
    size = config.resolution
    expect(a.shape == (4, size, size, 3) and a.dtype == np.uint8, f"uint8 [4, {size}, {size}, 3], got {a.dtype} {a.shape}")
    expect(np.array_equal(a, b), "the same generators to give the same discrete samples on cuda")
    expect(np.array_equal(edit, run(init_image=a[0], strength=0.5)), "the same init image and generators to repeat")
    return {"steps": result["step"], "loss": result["loss"], "parameters": model.num_parameters(),
            "sample_shape": list(a.shape), "deterministic": True}
