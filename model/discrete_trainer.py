"""Trainer of the discrete backbone: pack conditions + pack tokens -> checkpoints + metrics.jsonl.

The continuous trainer's loop (model.trainer) with tokens for images and the VQ-Diffusion loss for
the MSE, sharing its parts: Ray Train for more than one worker (DDP), AdamW with the same LR
schedule, the EMA, exact resume, the time budget, metrics.jsonl and the checkpoint format (plus
"backbone": "discrete"). The timesteps, corruption uniforms and condition drops of step s on rank
r come from a generator seeded by (seed, r, s), so stopping at step n and resuming reproduces the
uninterrupted run bit for bit on CPU. The frozen VQ autoencoder is loaded from the pack's VQ
checkpoint at the start and saved inside every checkpoint (the sampler decodes with it).
"""
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import latest_checkpoint, load_checkpoint
from model.data import PackDataset
from model.discrete import DiscreteConfig, DiscreteDenoiser
from model.discrete_diffusion import make_scheduler, q_sample, vq_diffusion_loss
from model.precision import autocast
from model.trainer import (MetricsLog, TrainParams, after_step, noisy_query, optimisation, run_workers, seed_everything,
                           summary, worker_context)


class TokenDataset(PackDataset):
    """PackDataset whose batches are (tokens int64 [B, h*w], emb [B, k+1, d]): the pack's conditions
    and the tokens file's grids, matched by sample key (same order, same epochs as PackDataset)."""

    def __init__(self, shard_paths, tokens_path, *args, **kwargs):
        super().__init__(shard_paths, *args, **kwargs)
        with np.load(tokens_path, allow_pickle=False) as stored:
            keys, tokens = stored["keys"], stored["tokens"]
        row = {str(key): i for i, key in enumerate(keys)}
        missing = [key for key in self.keys if key not in row]
        if missing:
            raise ValueError(f"{tokens_path} has no tokens for pack sample {missing[0]!r} ({len(missing)} missing); "
                             f"re-run `knnd run pack --force` with pack.tokens=true")
        self.tokens = torch.from_numpy(tokens[[row[key] for key in self.keys]].astype(np.int64)).flatten(1)
        self.images = np.empty((len(self.keys), 0))  # tensors only from here on: no pixels kept

    @property
    def shapes(self) -> dict:
        return {"tokens": self.tokens.shape[1], "k": self.cond.shape[1] - 1, "clip_dim": self.cond.shape[2]}

    def batch(self, rows: np.ndarray):
        return self.tokens[torch.from_numpy(rows)], torch.from_numpy(self.cond[rows].astype(np.float32))


def train_discrete(params: TrainParams, model_config: DiscreteConfig, shard_paths, tokens_path, vq_checkpoint,
                   out_dir, clip: dict | None = None, aux_weight: float = 1.0) -> dict:
    """Train into out_dir/checkpoints/ and out_dir/metrics.jsonl; returns {step, loss, lr, samples_per_s,
    checkpoint}. aux_weight is xi, the weight of L_x0 beside L_vlb."""
    config = {"params": dataclasses.asdict(params), "model": model_config.to_dict(), "clip": clip,
              "shard_paths": [str(p) for p in shard_paths], "tokens_path": str(tokens_path),
              "vq_checkpoint": str(vq_checkpoint), "aux_weight": aux_weight, "out_dir": str(Path(out_dir).resolve())}
    return run_workers(discrete_loop, config, params)


def discrete_loop(config: dict) -> dict:
    """The per-worker loop (model.trainer.train_loop's shape)."""
    params, model_config = TrainParams(**config["params"]), DiscreteConfig.from_dict(config["model"])
    out_dir, distributed = Path(config["out_dir"]), config.get("distributed", False)
    if params.input != "memory":  # the tokens file is one array of all samples: no streaming yet
        raise ValueError("the discrete backbone reads its pack in memory only: set train.input=memory (or auto)")
    rank, world_size, device = worker_context(distributed, params.use_gpu)
    seed_everything(params.seed)
    checkpoint = resume(out_dir / "checkpoints", model_config)
    step = checkpoint["step"] if checkpoint else 0
    data = TokenDataset(config["shard_paths"], config["tokens_path"], params.batch_size, params.seed, rank,
                        world_size, tuple(checkpoint["data_position"]) if checkpoint else (0, 0), k=model_config.k)
    check_tokens(data.shapes, model_config)

    model = DiscreteDenoiser(model_config)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    else:
        model.vq.load_state_dict(load_checkpoint(config["vq_checkpoint"])["model"])
    model.to(device)
    ema, optimizer, lr_schedule, net = optimisation(model, params, checkpoint, distributed)
    sched = make_scheduler(model_config.codes, model_config.num_train_timesteps)

    stop = min(params.steps, params.stop_at_step or params.steps)
    deadline = None if params.max_seconds is None else time.monotonic() + params.max_seconds
    metrics = MetricsLog(out_dir / "metrics.jsonl", step) if rank == 0 else None
    batches = iter(data)
    while step < stop:
        x0, emb = next(batches)
        t, u_mask, u_code, drop, slots = step_randomness(params, rank, step, x0.shape,
                                                         model_config.num_train_timesteps, emb.shape[1])
        if params.query_noise > 0:
            emb = noisy_query(emb, params.query_noise, params, rank, step)
        lr = optimizer.param_groups[0]["lr"]
        x0, emb, t, drop = x0.to(device), emb.to(device), t.to(device), drop.to(device)
        x_t = q_sample(sched, x0, t, u_mask.to(device), u_code.to(device))
        with autocast(device):
            log_x0 = net(x_t, t, emb, drop, None if slots is None else slots.to(device)).float()
        loss, _ = vq_diffusion_loss(sched, log_x0, x0, x_t, t, config["aux_weight"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), params.grad_clip)
        optimizer.step()
        lr_schedule.step()
        step += 1
        stop = after_step(model, ema, optimizer, lr_schedule, data, params, config, step, stop, deadline,
                          metrics, loss, lr, rank, world_size, device, extra={"backbone": "discrete"})
    return summary(out_dir) if rank == 0 else {}


def step_randomness(params: TrainParams, rank: int, step: int, shape, num_timesteps: int, slots: int = 1):
    """(t [B], u_mask [B, N], u_code [B, N], drop [B], slot mask [B, slots] or None) from a CPU generator
    seeded by (seed, rank, step)."""
    seed = np.random.SeedSequence([params.seed, rank, step]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(seed))
    t = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    u_mask, u_code = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    drop = torch.rand(shape[0], generator=generator) < params.cond_drop_prob
    slot_mask = None
    if params.query_drop_prob > 0 and slots > 1:
        slot_mask = torch.ones(shape[0], slots, dtype=torch.bool)
        slot_mask[:, 0] = torch.rand(shape[0], generator=generator) >= params.query_drop_prob
    return t, u_mask, u_code, drop, slot_mask


def resume(directory: Path, model_config: DiscreteConfig) -> dict | None:
    path = latest_checkpoint(directory)
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    if checkpoint.get("backbone") != "discrete" or DiscreteConfig.from_dict(checkpoint["model_config"]) != model_config:
        raise ValueError(f"{path} was trained with another model config or backbone; "
                         f"use a new train directory or `knnd run train --force`")
    return checkpoint


def check_tokens(shapes: dict, config: DiscreteConfig):
    """The tokens and the pack must match the model: grid, k and embedding dimension."""
    if shapes["tokens"] != config.grid ** 2:
        raise ValueError(f"the pack's token grids have {shapes['tokens']} tokens but the model expects "
                         f"{config.grid} x {config.grid}; re-run `knnd run pack --force`")
    for key in ("k", "clip_dim"):
        if shapes[key] != getattr(config, key):
            raise ValueError(f"pack data has {key}={shapes[key]} but the model config has {key}={getattr(config, key)}; "
                             f"set the model's {key} to match or re-run `knnd run pack`")
