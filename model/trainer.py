"""Trainer: pack shards -> checkpoints/step_XXXXXXX.pt + metrics.jsonl, resumable exactly.

Read top to bottom: parameters, the Ray entry point, the per-worker loop, then its helpers.

`train()` runs `train_loop` on Ray Train workers (DDP through ray.train.torch.prepare_model) and,
for the one-CPU-worker case (tests, the CPU demo), directly in this process: Ray would add ~40 s
of start-up on 2 cores (measured) and a worker pinned to one CPU, for nothing to distribute.

Exact resume: a checkpoint holds model, EMA, optimizer, LR schedule, step, data position and RNG
states. The noise, timesteps and condition drops of step s on rank r come from a generator seeded
by (seed, r, s), so every rank resumes its random stream without gathering RNG states; stopping at
step n and resuming reproduces the uninterrupted run bit for bit on CPU.
"""
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import (latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                              set_rng_state)
from model.denoiser import KnnDenoiser, ModelConfig
from model.diffusion import make_scheduler, training_example
from model.manipulation import init_from_checkpoint, manipulation_batch
from model.stream import check_resumed_input, input_identity, open_input
from model.precision import autocast
from pipeline.files import write_text


@dataclass
class TrainParams:
    """Training hyper-parameters; the pipeline's `train:` config section maps onto these."""
    steps: int = 2000               # total optimizer steps (the LR schedule spans them)
    batch_size: int = 32            # per worker
    lr: float = 3e-4                # peak learning rate (AdamW)
    weight_decay: float = 0.01      # on weight matrices only, not on norms and biases
    warmup_steps: int = 100         # linear warm-up, then lr_schedule
    lr_schedule: str = "cosine"     # "cosine" (decay to lr / 10 at `steps`) | "constant"
    cond_drop_prob: float = 0.1     # condition -> null context, for classifier-free guidance
    query_drop_prob: float = 0.0    # mask the query slot alone: the neighbours must carry the condition
    query_noise: float = 0.0        # query <- normalise(query + query_noise * random unit vector)
    loss_weighting: str = "none"    # "none" | "min_snr" (Hang et al. 2023, gamma = min_snr_gamma)
    min_snr_gamma: float = 5.0
    grad_clip: float = 1.0          # max global gradient norm
    ema_decay: float = 0.999        # EMA of the weights (ramped up over the first steps)
    checkpoint_every: int = 500     # steps between checkpoints (plus one at the end)
    seed: int = 0
    num_workers: int = 1            # Ray Train workers (one per GPU)
    use_gpu: bool = False
    log_every: int = 10             # steps between metrics.jsonl lines
    stop_at_step: int | None = None  # stop early (with a checkpoint), as if interrupted
    max_seconds: float | None = None  # wall-clock budget of this run: then checkpoint and stop
    init_from: str | None = None    # a fresh run starts from this checkpoint's EMA weights (fine-tuning)
    input: str = "memory"           # "memory": every worker loads the pack (model.data); "stream": model.stream
    shuffle_buffer: int = 5000      # samples in the stream input's shuffle buffer


def train(params: TrainParams, model_config: ModelConfig, shard_paths, out_dir, clip: dict | None = None,
          shard_sizes=None) -> dict:
    """Train on pack shards into out_dir/checkpoints/ and out_dir/metrics.jsonl; returns a
    summary {step, loss, lr, samples_per_s, checkpoint}. `clip` (the identity of the CLIP whose
    embeddings the pack holds) is recorded in every checkpoint; shard_sizes (samples per shard, from
    the pack manifest) spare the stream input counting them."""
    config = {"params": dataclasses.asdict(params), "model": model_config.to_dict(), "clip": clip,
              "shard_paths": [str(p) for p in shard_paths], "out_dir": str(Path(out_dir).resolve()),
              "shard_sizes": None if shard_sizes is None else [int(n) for n in shard_sizes]}
    return run_workers(train_loop, config, params)


def run_workers(loop, config: dict, params: TrainParams) -> dict:
    """loop(config) in this process for one CPU worker, else on Ray Train workers (DDP)."""
    shutil.rmtree(Path(config["out_dir"]) / WORKERS, ignore_errors=True)  # an earlier run's (a resume's may differ)
    if params.num_workers == 1 and not params.use_gpu:
        return loop(config)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    trainer = TorchTrainer(
        recording_node(loop), train_loop_config={**config, "distributed": True},
        scaling_config=ScalingConfig(num_workers=params.num_workers, use_gpu=params.use_gpu),
        # checkpoints are ours (out_dir must be on storage every worker sees, as Ray's is)
        run_config=RunConfig(name="ray", storage_path=config["out_dir"]))
    trainer.fit()
    return summary(config["out_dir"])


WORKERS = "_run/workers"  # rank_{r:03d}.txt: the Ray node of each Ray Train worker of the latest run


def recording_node(loop):
    """`loop` as Ray Train's per-worker function, which first writes its worker's node (`worker_nodes`)."""
    def per_worker(config: dict):
        import ray.train

        from pipeline.cluster import node_id
        rank = ray.train.get_context().get_world_rank()
        write_text(Path(config["out_dir"]) / WORKERS / f"rank_{rank:03d}.txt", node_id())
        return loop(config)
    return per_worker


def worker_nodes(out_dir) -> list[str]:
    """The Ray node of each Ray Train worker of the latest run, by rank ([] for a run in this process)."""
    folder = Path(out_dir) / WORKERS
    return [p.read_text().strip() for p in sorted(folder.glob("rank_*.txt"))] if folder.exists() else []


def train_loop(config: dict) -> dict:
    """The per-worker loop: config = {params, model, shard_paths, out_dir[, distributed]}."""
    params = TrainParams(**config["params"])
    model_config = ModelConfig.from_dict(config["model"])
    out_dir = Path(config["out_dir"])
    rank, world_size, device = worker_context(config.get("distributed", False), params.use_gpu)
    seed_everything(params.seed)

    checkpoint = resume_checkpoint(out_dir / "checkpoints", model_config, params)  # None: fresh start
    step = checkpoint["step"] if checkpoint else 0

    # data: in memory or streamed (train.input), this rank's share, from the checkpoint's position
    position = tuple(checkpoint["data_position"]) if checkpoint else (0, 0)
    data = open_input(params, config, rank, world_size, position, model_config.k, model_config.manipulation)
    check_data(data.shapes, model_config)

    # model, EMA, optimizer, LR schedule
    model = KnnDenoiser(model_config)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    elif params.init_from:  # e.g. a text-to-image model fine-tuned for local manipulation
        init_from_checkpoint(model, params.init_from)
    model.to(device)
    ema, optimizer, lr_schedule, net = optimisation(model, params, checkpoint, config.get("distributed", False))
    noise_scheduler = make_scheduler(model_config, "ddpm")

    # the loop
    stop = min(params.steps, params.stop_at_step or params.steps)
    deadline = None if params.max_seconds is None else time.monotonic() + params.max_seconds
    metrics = MetricsLog(out_dir / "metrics.jsonl", step) if rank == 0 else None
    batches = iter(data)
    while step < stop:
        image, emb, *manipulation = next(batches)
        image_cond = None
        if model_config.manipulation:  # input I_manip, condition f_img(I * M) in slot 0 (paper 3.1)
            image_cond, emb = manipulation_batch(image, emb, *manipulation, params.seed, rank, step)
        noise, t, drop, slots = step_randomness(params, rank, step, image.shape,
                                                model_config.num_train_timesteps, emb.shape[1])
        if params.query_noise > 0:
            emb = noisy_query(emb, params.query_noise, params, rank, step)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        loss = train_step(net, optimizer, lr_schedule, noise_scheduler, params, device,
                          image, emb, noise, t, drop, slots, image_cond)
        step += 1
        stop = after_step(model, ema, optimizer, lr_schedule, data, params, config, step, stop, deadline,
                          metrics, loss, lr, rank, world_size, device)
    return summary(out_dir) if rank == 0 else {}


def optimisation(model, params: TrainParams, checkpoint: dict | None, distributed: bool):
    """(ema, optimizer, lr_schedule, net): EMA weights, AdamW, the LR schedule (restored from the
    checkpoint when resuming) and the network to call (DDP-wrapped under Ray Train)."""
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(model, params)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, params.warmup_steps, params.steps, params.lr_schedule))
    if checkpoint:
        load_training_state(checkpoint, ema, optimizer, lr_schedule)
    net = model
    if distributed:
        from ray.train.torch import prepare_model
        net = prepare_model(model)  # DDP when world_size > 1; broadcasts rank 0's weights
    return ema, optimizer, lr_schedule, net


def after_step(model, ema, optimizer, lr_schedule, data, params: TrainParams, config: dict, step: int, stop: int,
               deadline, metrics, loss, lr: float, rank: int, world_size: int, device, extra: dict | None = None) -> int:
    """The bookkeeping after optimizer step `step`: EMA, time budget, metrics line, checkpoint (with
    `extra` keys). Returns the (possibly earlier) stop step."""
    ema_update(model, ema, min(params.ema_decay, (1 + step) / (10 + step)))
    if out_of_time(deadline, config.get("distributed", False), device):
        stop = step  # this step ends the run: logged and checkpointed like the last one
    if metrics and (step % params.log_every == 0 or step == stop):
        metrics.write(step, loss.item(), lr, samples_per_step=params.batch_size * world_size)
    if rank == 0 and (step % params.checkpoint_every == 0 or step == stop):
        state = training_state(model, ema, optimizer, lr_schedule, step, data, params, config.get("clip"))
        save_checkpoint(Path(config["out_dir"]) / "checkpoints", {**state, **(extra or {})})
    return stop


def out_of_time(deadline: float | None, distributed: bool, device) -> bool:
    """Whether the time budget is spent. Under DDP rank 0's clock decides for every rank (one tiny
    broadcast a step), so all ranks stop after the same step."""
    if deadline is None:
        return False
    spent = time.monotonic() >= deadline
    if distributed:
        import torch.distributed as dist
        flag = torch.tensor([float(spent)], device=device)
        dist.broadcast(flag, src=0)
        spent = bool(flag.item())
    return spent


def resume_checkpoint(directory: Path, model_config: ModelConfig, params: TrainParams) -> dict | None:
    """The latest checkpoint in directory, checked against model_config and the data input; None if
    there is none."""
    path = latest_checkpoint(directory)
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    check_resumed_input(path, checkpoint, params)
    # A checkpoint written before a model key existed lacks it: compare with the key at its default.
    if ModelConfig.from_dict(checkpoint["model_config"]) != model_config:
        raise ValueError(f"{path} was trained with another model config; "
                         f"use a new train directory or `knnd run train --force`")
    return checkpoint


def train_step(net, optimizer, lr_schedule, noise_scheduler, params, device, image, emb, noise,
               t, drop, slots=None, image_cond=None) -> torch.Tensor:
    """One optimizer step of the epsilon/v-prediction MSE loss (min-SNR weighted on request);
    `slots` [B, k+1] bool masks condition slots (query dropout); `image_cond` is a manipulation
    model's extra input. Returns the (detached) loss."""
    image, emb, noise, t, drop = (x.to(device, non_blocking=True)
                                  for x in (image, emb, noise, t, drop))
    slots = None if slots is None else slots.to(device, non_blocking=True)
    extra = {} if image_cond is None else {"image_cond": image_cond.to(device, non_blocking=True)}
    x_t, target = training_example(noise_scheduler, image, noise, t)
    with autocast(device):
        prediction = net(x_t, t, emb, drop, slots, **extra)
    if params.loss_weighting == "min_snr":
        per_sample = (prediction.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(noise_scheduler, t, params.min_snr_gamma)).mean()
    else:
        loss = F.mse_loss(prediction.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), params.grad_clip)
    optimizer.step()
    lr_schedule.step()
    return loss.detach()


def step_randomness(params: TrainParams, rank: int, step: int, shape, num_timesteps: int,
                    slots: int = 1):
    """(noise, t, drop_mask, slot_mask) for a step, from a CPU generator seeded by (seed, rank,
    step). slot_mask [B, slots] is None without query dropout (the draws before it are unchanged)."""
    seed = np.random.SeedSequence([params.seed, rank, step]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator)
    t = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    drop = torch.rand(shape[0], generator=generator) < params.cond_drop_prob
    slot_mask = None
    if params.query_drop_prob > 0 and slots > 1:
        slot_mask = torch.ones(shape[0], slots, dtype=torch.bool)
        slot_mask[:, 0] = torch.rand(shape[0], generator=generator) >= params.query_drop_prob
    return noise, t, drop, slot_mask


def noisy_query(emb: torch.Tensor, sigma: float, params: TrainParams, rank: int, step: int) -> torch.Tensor:
    """emb with slot 0 replaced by normalise(q + sigma * u), u a random unit vector (cosine to q about
    1 / sqrt(1 + sigma^2)): the query is a blurred pointer, as a caption's embedding is at inference,
    and the neighbours must supply the detail. Seeded by (seed, rank, step, 1)."""
    seed = np.random.SeedSequence([params.seed, rank, step, 1]).generate_state(1, np.uint64)[0]
    u = F.normalize(torch.randn(emb.shape[0], emb.shape[2], generator=torch.Generator().manual_seed(int(seed))), dim=-1)
    query = F.normalize(F.normalize(emb[:, 0].float(), dim=-1) + sigma * u, dim=-1)
    return torch.cat([query[:, None].to(emb.dtype), emb[:, 1:]], dim=1)


def min_snr_weight(noise_scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample: min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets (Hang et al., 2023)."""
    alphas = noise_scheduler.alphas_cumprod.to(t.device)[t]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """Linear warm-up to 1, then constant, or cosine decay to 0.1 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, params: TrainParams) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and kernels only (nanoGPT's rule: ndim >= 2)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.999))


@torch.no_grad()
def ema_update(model: torch.nn.Module, ema: dict, decay: float):
    """ema <- decay * ema + (1 - decay) * weights. The decay ramps up as (1+s)/(10+s) so that short
    runs (the CPU demo) do not sample from weights that are mostly the random initialisation."""
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach(), 1 - decay)


def ema_state_dict(model: torch.nn.Module, ema: dict) -> dict:
    """The model's state dict with EMA parameters: loads into a KnnDenoiser for sampling."""
    return {name: ema.get(name, value).detach().clone()
            for name, value in model.state_dict().items()}


def training_state(model, ema, optimizer, lr_schedule, step, data, params, clip: dict | None = None) -> dict:
    """Everything to resume exactly, and the CLIP identity; tensors and primitives only (weights_only=True loads it)."""
    return {"model_config": model.config.to_dict(), "train_params": dataclasses.asdict(params), "clip": clip,
            "model": model.state_dict(), "ema": ema_state_dict(model, ema),
            "optimizer": optimizer.state_dict(), "lr_scheduler": lr_schedule.state_dict(),
            "step": step, "data_position": list(data.position), "data_input": input_identity(params),
            "rng": rng_state()}


def load_training_state(checkpoint: dict, ema: dict, optimizer, lr_schedule):
    for name in ema:
        ema[name].copy_(checkpoint["ema"][name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_schedule.load_state_dict(checkpoint["lr_scheduler"])
    set_rng_state(checkpoint["rng"])


def worker_context(distributed: bool, use_gpu: bool):
    """(rank, world_size, device) from Ray Train, or (0, 1, cuda/cpu) in-process."""
    if distributed:
        import ray.train
        import ray.train.torch
        context = ray.train.get_context()
        return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but no CUDA device is visible; set train.use_gpu=false")
    return 0, 1, torch.device("cuda" if use_gpu else "cpu")


def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def check_data(shapes: dict, config: ModelConfig):
    """The pack must match the model: resolution, k and embedding dimension."""
    for key in ("resolution", "k", "clip_dim"):
        if shapes[key] != getattr(config, key):
            raise ValueError(f"pack data has {key}={shapes[key]} but the model config has "
                             f"{key}={getattr(config, key)}; set the model's {key} to match or "
                             f"re-run `knnd run pack`")


class MetricsLog:
    """metrics.jsonl lines {step, loss, lr, samples_per_s}; samples/s over the steps since the last
    line. On resume it first drops lines past the checkpoint's step, so no step is doubled."""

    def __init__(self, path: Path, resume_step: int):
        self.path, self.last_step, self.last_time = path, resume_step, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if line.strip() and json.loads(line)["step"] <= resume_step]
        write_text(path, "".join(line + "\n" for line in kept))

    def write(self, step: int, loss: float, lr: float, samples_per_step: int):
        now = time.perf_counter()
        rate = (step - self.last_step) * samples_per_step / (now - self.last_time)
        line = {"step": step, "loss": loss, "lr": lr, "samples_per_s": round(rate, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.last_step, self.last_time = step, now


def summary(out_dir) -> dict:
    """{step, loss, lr, samples_per_s, checkpoint} from the files a run leaves behind."""
    out_dir = Path(out_dir)
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return {**last, "checkpoint": str(latest_checkpoint(out_dir / "checkpoints"))}
