"""Training-step speed of the demo model on CPU: our train step vs a bare diffusers loop over the
same U-Net, and the demo model before (32 px, cross-attention at 16 and 8 px) and after (16 px,
cross-attention at 8 and 4 px) the CPU recipe, and the recipe at 32 px with space-to-depth 2.

    python tools/bench_train.py [--pack work/demo/pack] [--steps 30] [--threads 2] [--out bench/train_speed.json]
    python tools/bench_train.py --cpu-options [...]   # the recipe with channels-last / torch.compile instead

Runs alone (note the load average it prints): each variant warms up for 5 steps, then times
`--steps` steps; variants alternate over 3 repetitions and the median samples/s is reported. With
no pack folder it uses random data of the demo's shapes (d = 256, k = 10).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.denoiser import KnnDenoiser, ModelConfig  # noqa: E402
from model.diffusion import make_scheduler, training_example  # noqa: E402
from model.trainer import TrainParams, make_optimizer, step_randomness, train_step  # noqa: E402

BATCH = 32
VARIANTS = {  # name: (resolution, attention resolutions, space-to-depth)
    "before: 32 px, attention 16+8": (32, (16, 8), 1),
    "after: 16 px, attention 8+4": (16, (8, 4), 1),
    "32 px, space-to-depth 2, attention 8+4": (32, (8, 4), 2),
}


def variant_config(resolution: int, attention: tuple, space_to_depth: int) -> ModelConfig:
    """The demo U-Net of one ``VARIANTS`` entry (d = 256, k = 10, as the demo trains)."""
    return ModelConfig.demo(resolution=resolution, attention_resolutions=attention, clip_dim=256, k=10,
                            space_to_depth=space_to_depth)


def batches(pack: Path | None, resolution: int, d: int = 256, k: int = 10):
    """An endless iterator of (image [-1, 1] [B,3,R,R], emb [B,k+1,d]) from the pack, resized to R."""
    import torch.nn.functional as F

    if pack is not None and (pack / "manifest.json").exists():
        from model.data import read_pack_shard

        manifest = json.loads((pack / "manifest.json").read_text())
        shard = read_pack_shard(pack / next(s["tar"] for s in manifest["shards"] if s["samples"]))
        images = torch.from_numpy(shard["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        emb = torch.from_numpy(np.concatenate([shard["emb"][:, None], shard["nbr"]], axis=1).astype(np.float32))
    else:
        gen = torch.Generator().manual_seed(0)
        images, emb = torch.rand(512, 3, resolution, resolution, generator=gen) * 2 - 1, torch.randn(512, k + 1, d, generator=gen)
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=resolution, mode="bilinear", align_corners=False)
    i = 0
    while True:
        rows = torch.arange(i, i + BATCH) % len(images)
        i += BATCH
        yield images[rows], emb[rows]


CPU_OPTIONS = {  # name: (channels-last, torch.compile) for the recipe (16 px, attention 8+4)
    "recipe": (False, False),
    "recipe, channels-last": (True, False),
    "recipe, torch.compile": (False, True),
}


def ours(config: ModelConfig, data, steps: int, channels_last: bool = False, compile_unet: bool = False) -> float:
    """samples/s of model.trainer.train_step (query dropout 0.5, as the demo trains); optionally the U-Net
    in channels-last memory format (inputs too) or compiled by torch.compile (inductor; its compile
    happens in the warm-up steps)."""
    torch.manual_seed(0)
    model = KnnDenoiser(config)
    if channels_last:
        model.unet.to(memory_format=torch.channels_last)
        data = ((image.contiguous(memory_format=torch.channels_last), emb) for image, emb in data)
    if compile_unet:
        model.unet = torch.compile(model.unet)
    params = TrainParams(batch_size=BATCH, lr=1e-3, query_drop_prob=0.5)
    optimizer = make_optimizer(model, params)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    noise_scheduler = make_scheduler(config, "ddpm")

    def one(step):
        image, emb = next(data)
        noise, t, drop, slots = step_randomness(params, 0, step, image.shape, config.num_train_timesteps, emb.shape[1])
        train_step(model, optimizer, schedule, noise_scheduler, params, torch.device("cpu"), image, emb, noise, t, drop, slots)
    return timed(one, steps)


def bare(config: ModelConfig, data, steps: int) -> float:
    """samples/s of a bare diffusers loop over the same UNet2DConditionModel: a linear projection of
    the k + 1 embeddings as the context, MSE on epsilon, AdamW. No condition encoder, EMA or masks."""
    torch.manual_seed(0)
    model = KnnDenoiser(config)
    unet, proj = model.unet, torch.nn.Linear(config.clip_dim, config.cond_width)
    optimizer = torch.optim.AdamW([*unet.parameters(), *proj.parameters()], lr=1e-3)
    noise_scheduler = make_scheduler(config, "ddpm")

    def one(step):
        image, emb = next(data)
        noise = torch.randn_like(image)
        t = torch.randint(0, config.num_train_timesteps, (len(image),))
        x_t, target = training_example(noise_scheduler, image, noise, t)
        fold = config.space_to_depth  # the U-Net's own input grid: fold the pixels as KnnDenoiser does
        if fold > 1:
            x_t, target = (torch.nn.functional.pixel_unshuffle(x, fold) for x in (x_t, target))
        loss = torch.nn.functional.mse_loss(unet(x_t, t, encoder_hidden_states=proj(emb)).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return timed(one, steps)


def timed(one, steps: int, warmup: int = 5) -> float:
    for s in range(warmup):
        one(s)
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        one(s)
    return steps * BATCH / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=Path("work/demo/pack"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/train_speed.json"))
    parser.add_argument("--cpu-options", action="store_true", help="time the recipe plain, channels-last and "
                        "compiled (writes bench/train_cpu_options.json unless --out is given)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}, torch threads {args.threads}")
    if args.cpu_options:
        return cpu_options(args)
    runs = {}
    for name, variant in VARIANTS.items():
        config, resolution = variant_config(*variant), variant[0]
        runs[f"ours, {name}"] = (ours, config, resolution)
        runs[f"bare diffusers, {name}"] = (bare, config, resolution)
    results = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, (fn, config, resolution) in runs.items():
            results[name].append(fn(config, batches(args.pack, resolution), args.steps))
    table = {name: round(statistics.median(v), 1) for name, v in results.items()}
    for name, value in table.items():
        print(f"{name:<48} {value:>8.1f} samples/s")
    after, before = table["ours, after: 16 px, attention 8+4"], table["ours, before: 32 px, attention 16+8"]
    folded = table["ours, 32 px, space-to-depth 2, attention 8+4"]
    summary = {"samples_per_s": table, "after_over_before": round(after / before, 2),
               "space_to_depth_over_before_at_32px": round(folded / before, 2),
               "ours_over_bare": {name: round(table[f"ours, {name}"] / table[f"bare diffusers, {name}"], 2) for name in VARIANTS},
               "threads": args.threads, "steps": args.steps, "reps": args.reps, "batch": BATCH,
               "load_average_after": os.getloadavg()}
    print(json.dumps({k: v for k, v in summary.items() if k != "samples_per_s"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def cpu_options(args) -> int:
    """The recipe (16 px, attention 8+4) plain, channels-last and torch.compile'd, alternating, medians."""
    config = ModelConfig.demo(resolution=16, attention_resolutions=(8, 4), clip_dim=256, k=10)
    results = {name: [] for name in CPU_OPTIONS}
    for _ in range(args.reps):
        for name, (channels_last, compile_unet) in CPU_OPTIONS.items():
            results[name].append(ours(config, batches(args.pack, 16), args.steps, channels_last, compile_unet))
    table = {name: round(statistics.median(v), 1) for name, v in results.items()}
    for name, value in table.items():
        print(f"{name:<48} {value:>8.1f} samples/s  ({value / table['recipe']:.2f}x)")
    out = args.out if args.out != Path("bench/train_speed.json") else Path("bench/train_cpu_options.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"samples_per_s": table, "reps": results, "threads": args.threads, "steps": args.steps,
                               "batch": BATCH, "load_average_after": os.getloadavg()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
