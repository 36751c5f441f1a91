"""Train the offline demo's small CLIP on (sticker, caption) pairs, once, and cache it.

No CLIP weights can be downloaded for the demo, so it trains its own encoder from scratch with
open_clip's contrastive loss. Read top to bottom: config, cache, data, model, optimizer, loop, eval,
save. The dataset is decoded once into a uint8 tensor, so the loop only does tensor work.

Outputs in `out_dir`: `encoder.pt` (plain state_dict), `encoder_config.json` (the open_clip model
config), `encoder.json` (metrics and the cache key, written last), so that
`load_clip(str(out_dir / "encoder_config.json"), str(out_dir / "encoder.pt"))` gives the encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from torch.nn.attention import SDPBackend, sdpa_kernel
from PIL import Image

from model.clip import ClipBundle, encode_images, encode_texts, flatten_alpha, load_clip
from pipeline.files import atomic_path, usable_cpus, write_text


@dataclass(frozen=True)
class ClipTrainConfig:
    """Optimisation settings; the defaults are the ones measured on the OpenMoji demo."""

    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05  # of the step or time budget
    min_crop_side: float = 0.8  # random crops keep 80-100 % of the side: stickers are centred
    max_shift: float = 0.1  # crop centre moves at most this fraction of the side
    grad_clip: float = 1.0
    num_threads: int = 0  # 0: every core this process may use; 1 for tiny runs on a busy machine
    precision: str = "auto"  # "fp32", "bf16" (autocast), or "auto": bf16 where the CPU runs it fast
    # None: open_clip's learnable temperature (starts at 1/0.07 = 14.3); a number fixes it there. At
    # 14.3 a short run pulls each caption to cosine 0.91 of its image (a far smaller modality gap than a
    # real CLIP's); fixed at 100 (where CLIP's own ends) it stays near 0.6, but the demo then loses
    # recall (0.47 -> 0.19) and sample quality: measured in README, "Neighbours that matter".
    logit_scale: float | None = None

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r}: use auto, fp32 or bf16")
        if self.batch_size < 2 or self.lr <= 0 or not 0 < self.min_crop_side <= 1:
            raise ValueError(f"impossible training settings {self}: need batch_size >= 2, lr > 0, "
                             "0 < min_crop_side <= 1")
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"logit_scale={self.logit_scale}: a fixed logit scale must be > 0 (CLIP ends at 100), "
                             "or None to learn it")


def train_demo_clip(
    images: list[Image.Image],
    captions: list[str],
    out_dir: Path,
    config_json: Path,
    minutes: float | None = 4.0,
    seed: int = 0,
    holdout: float = 0.1,
    max_steps: int | None = None,
    train: ClipTrainConfig = ClipTrainConfig(),
    device: str = "cpu",
    progress_every: float = 10.0,
) -> dict:
    """Train the demo encoder for `minutes` (or `max_steps`, whichever ends first; minutes None: steps
    alone), evaluate text->image recall, save it.

    Returns the metrics also written to `out_dir/encoder.json`. A second call with the same data,
    config, seed and budget returns the cached metrics without training. With holdout=0 the recall
    is measured on the training pairs (tests); otherwise on the held-out pairs. While training, a
    progress line (step, loss, images/s, ETA) goes to stderr every `progress_every` seconds.
    """
    if len(images) != len(captions) or len(images) < 2:
        raise ValueError(f"need matching images and captions (got {len(images)} and {len(captions)})")
    if minutes is None and max_steps is None:
        raise ValueError("give the encoder a budget: minutes, max_steps or both")
    out_dir, config_json = Path(out_dir), Path(config_json)
    model_cfg = json.loads(config_json.read_text())
    train_rows, eval_rows = _split(len(images), holdout, seed)
    settings = {k: v for k, v in asdict(train).items() if k != "num_threads"}  # threads: same result
    cache_key = {
        "model_cfg": model_cfg, "seed": seed, "minutes": minutes, "holdout": holdout,
        "max_steps": max_steps, "train": settings, "data_sha256": _data_hash(images, captions),
    }
    cached = _read_cache(out_dir, cache_key)
    if cached is not None:
        return cached

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(train.num_threads or usable_cpus())  # the loop is compute-bound
    try:
        torch.manual_seed(seed)  # model init
        bundle = load_clip(str(config_json), None)
        bundle.model.to(device)  # fp32 weights even on cuda: training autocasts
        if train.logit_scale is not None:
            bundle.model.logit_scale.data.fill_(math.log(train.logit_scale))
            bundle.model.logit_scale.requires_grad_(False)
        bundle = replace(bundle, device=torch.device(device))
        pixels = _decode_uint8(bundle, images)
        tokens = bundle.tokenizer(list(captions))
        stats = _train_loop(bundle, pixels[train_rows], tokens[train_rows], minutes, max_steps, seed, train,
                            progress_every)
        recalls = _evaluate(bundle, pixels[eval_rows], [captions[i] for i in eval_rows])
    finally:
        torch.set_num_threads(previous_threads)

    metrics = {
        **recalls,
        "eval_split": "holdout" if holdout > 0 else "train",
        "n_train": len(train_rows), "n_holdout": len(eval_rows) if holdout > 0 else 0,
        **stats,
        "params": sum(p.numel() for p in bundle.model.parameters()),
        "model": bundle.name, "device": device, "cache_key": cache_key,
    }
    _save(out_dir, bundle.model, model_cfg, metrics)
    return metrics


# ---------------------------------------------------------------------------------------- data



def _data_hash(images: list[Image.Image], captions: list[str]) -> str:
    digest = hashlib.sha256()
    for image, caption in zip(images, captions):
        digest.update(f"{image.mode}{image.size}{caption}\0".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def _decode_uint8(bundle: ClipBundle, images: list[Image.Image], chunk: int = 256) -> torch.Tensor:
    """All images through the model's own val preprocess, stored as uint8 [n, 3, S, S].

    The preprocess resizes to uint8 pixels before normalising, so undoing the normalisation and
    rounding recovers those pixels exactly: training and eval see the same geometry and colours.
    """
    mean, std = _mean_std(bundle)
    out = []
    for start in range(0, len(images), chunk):
        batch = torch.stack([bundle.preprocess(flatten_alpha(im)) for im in images[start : start + chunk]])
        out.append((batch * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _mean_std(bundle: ClipBundle) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = bundle.model.visual.preprocess_cfg
    return torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def _normalise(bundle: ClipBundle, pixels: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(bundle)
    return (pixels.float() / 255 - mean) / std


def _split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train rows, eval rows); eval rows are the training rows when holdout is 0."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_holdout = int(round(n * holdout))
    if holdout > 0 and not 1 <= n_holdout < n:
        raise ValueError(f"holdout={holdout} leaves no training or no held-out pairs out of {n}")
    if n_holdout == 0:
        return sorted(order), sorted(order)
    return sorted(order[n_holdout:]), sorted(order[:n_holdout])


def _augment(x: torch.Tensor, generator: torch.Generator, train: ClipTrainConfig) -> torch.Tensor:
    """Mild random resized crop of a normalised batch, as one affine resample (no flips: arrows)."""
    n = x.shape[0]
    side = torch.empty(n).uniform_(train.min_crop_side, 1.0, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * torch.minimum(
        1 - side, torch.tensor(train.max_shift)
    ).unsqueeze(1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------- train


def _optimizer(model: torch.nn.Module, train: ClipTrainConfig) -> torch.optim.Optimizer:
    # As open_clip: no weight decay on gains, biases and the temperature.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.98), eps=1e-6)


def _lr(progress: float, train: ClipTrainConfig) -> float:
    """Linear warm-up then cosine decay to zero, over progress in [0, 1]."""
    if progress < train.warmup_frac:
        return train.lr * progress / train.warmup_frac
    span = (progress - train.warmup_frac) / max(1e-8, 1 - train.warmup_frac)
    return train.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, span)))


def _train_loop(
    bundle: ClipBundle, pixels: torch.Tensor, tokens: torch.Tensor,
    minutes: float | None, max_steps: int | None, seed: int, train: ClipTrainConfig, progress_every: float = 10.0,
) -> dict:
    """Contrastive training until the step or time budget ends; returns loss and speed stats.

    With max_steps the schedule follows steps, so a run is deterministic given the seed; otherwise it
    follows the clock, so the cosine reaches zero exactly when the time budget ends. Prints a
    progress line to stderr at most every `progress_every` seconds (0: after every step).
    """
    model, device = bundle.model, bundle.device
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer, loss_fn = _optimizer(model, train), ClipLoss()
    precision = _resolve_precision(train.precision, device)
    batch_size = min(train.batch_size, len(pixels))
    budget_s = math.inf if minutes is None else minutes * 60
    losses: list[float] = []
    step, seen, start = 0, 0, time.perf_counter()
    last_print = start
    while True:
        order = torch.randperm(len(pixels), generator=generator)
        for first in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged last batch
            elapsed = time.perf_counter() - start
            progress = step / max_steps if max_steps else elapsed / budget_s
            if elapsed >= budget_s or (max_steps is not None and step >= max_steps):
                stats = _loop_stats(losses, step, seen, len(pixels), time.perf_counter() - start)
                return {**stats, "precision": precision}
            for group in optimizer.param_groups:
                group["lr"] = _lr(progress, train)
            rows = order[first : first + batch_size]
            images = _augment(_normalise(bundle, pixels[rows]), generator, train).to(device)
            with _train_autocast(device, precision):
                image_features, text_features, logit_scale = model(images, tokens[rows].to(device))[:3]
            # the loss in fp32: bf16 logits scaled by up to 100 would lose the ranking's fine print
            loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            with torch.no_grad():  # CLIP caps the temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step, seen = step + 1, seen + len(rows)
            now = time.perf_counter()
            if now - last_print >= progress_every:
                last_print = now
                _print_progress(losses, step, seen, now - start, budget_s, max_steps)


def _print_progress(losses: list[float], step: int, seen: int, elapsed: float, budget_s: float,
                    max_steps: int | None) -> None:
    """`encoder: step 40, loss 2.31, 190 images/s, ETA 0:02:10`: the ETA is to the time budget, or
    to max_steps at the rate so far when that comes first; the loss averages the last few steps."""
    left = max(budget_s - elapsed, 0.0)
    if max_steps is not None:
        left = min(left, elapsed / step * max(max_steps - step, 0))
    loss = float(np.mean(losses[-10:]))
    print(f"encoder: step {step}, loss {loss:.2f}, {seen / max(elapsed, 1e-9):.0f} images/s, ETA {_hms(left)}",
          file=sys.stderr, flush=True)


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or _cpu_bf16_is_fast() else "fp32"


def _cpu_bf16_is_fast() -> bool:
    """Time one matmul in both dtypes: AMX CPUs run bf16 ~7x faster, CPUs without bf16 units slower."""

    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(4096, 192, dtype=dtype), torch.randn(192, 768, dtype=dtype)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - start

    return seconds(torch.bfloat16) * 1.5 < seconds(torch.float32)


@contextlib.contextmanager
def _train_autocast(device: torch.device, precision: str):
    """bf16 autocast (fp32 master weights) when asked; on CPU with the plain-matmul attention kernel,
    because the fused CPU attention backward is ~10x slower in bf16 than the matmuls it replaces."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16), contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def _loop_stats(losses: list[float], steps: int, seen: int, n_train: int, seconds: float) -> dict:
    window = max(1, min(10, len(losses) // 4))  # average a few steps: single-batch losses are noisy
    return {
        "steps": steps,
        "epochs": round(seen / n_train, 3),
        "seconds": round(seconds, 2),
        "images_per_s": round(seen / max(seconds, 1e-9), 1),
        "first_loss": float(np.mean(losses[:window])) if losses else None,
        "final_loss": float(np.mean(losses[-window:])) if losses else None,
    }


# ----------------------------------------------------------------------------------------- eval


def text_to_image_recall(text_emb: np.ndarray, image_emb: np.ndarray, ks=(1, 10)) -> dict:
    """Recall@k of caption i retrieving image i among all images; ties count against the model."""
    sims = text_emb @ image_emb.T
    correct = np.diag(sims)[:, None]
    others_at_least_as_close = (sims >= correct).sum(axis=1) - 1
    result = {}
    for k in ks:
        result[f"recall@{k}"] = float(np.mean(others_at_least_as_close < k))
        result[f"chance@{k}"] = min(1.0, k / len(sims))
    return result


def _evaluate(bundle: ClipBundle, pixels: torch.Tensor, captions: list[str], chunk: int = 512) -> dict:
    bundle.model.eval()
    image_emb = np.concatenate(
        [encode_images(bundle, _normalise(bundle, pixels[i : i + chunk])) for i in range(0, len(pixels), chunk)]
    )
    text_emb = np.concatenate([encode_texts(bundle, captions[i : i + chunk]) for i in range(0, len(captions), chunk)])
    return text_to_image_recall(text_emb, image_emb)


# ----------------------------------------------------------------------------------------- save


def _read_cache(out_dir: Path, cache_key: dict) -> dict | None:
    metrics_path = out_dir / "encoder.json"
    if not (metrics_path.is_file() and (out_dir / "encoder.pt").is_file()):
        return None
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError:
        return None
    return metrics if metrics.get("cache_key") == cache_key else None


def _save(out_dir: Path, model: torch.nn.Module, model_cfg: dict, metrics: dict) -> None:
    """Weights and config first, metrics last: encoder.json marks a finished, loadable encoder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "encoder.pt") as tmp:
        torch.save(state_dict, tmp)
    write_text(out_dir / "encoder_config.json", json.dumps(model_cfg, indent=2))
    write_text(out_dir / "encoder.json", json.dumps(metrics, indent=2))


def _hms(seconds: float) -> str:
    """H:MM:SS, as every progress line of the pipeline prints it."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
