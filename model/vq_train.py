"""Training the VQ autoencoder on pack images, resumably, and turning a whole pack into tokens.

Loss: mean squared reconstruction error + VQModel's commitment/codebook loss (beta 0.25). The
batch of step s is drawn (with replacement) from a generator seeded by (seed, s), so a run stopped
at step n and resumed reproduces the uninterrupted run bit for bit on CPU: a checkpoint holds the
weights, the optimizer state, the step and the RNG states (model.checkpoint's format).
"""
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from model.vq import VQConfig, build_vq, codebook_usage, decode_tokens, encode_tokens, psnr


@dataclass
class VQParams:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    max_seconds: float | None = None   # wall-clock budget of this run: then checkpoint and stop
    stop_at_step: int | None = None    # stop early (with a checkpoint), as if interrupted


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def batch_rows(params: VQParams, step: int, n: int) -> torch.Tensor:
    seed = np.random.SeedSequence([params.seed, step, 7]).generate_state(1, np.uint64)[0]
    return torch.randint(0, n, (params.batch_size,), generator=torch.Generator().manual_seed(int(seed)))


def train_vq(params: VQParams, config: VQConfig, images: np.ndarray, out_dir) -> dict:
    """Train on uint8 images [N, H, W, 3] into out_dir/checkpoints/ (+ out_dir/metrics.jsonl);
    resumes from the latest checkpoint there. Returns {step, loss, checkpoint}."""
    out_dir = Path(out_dir)
    if images.shape[1] != config.resolution:
        raise ValueError(f"pack images are {images.shape[1]} px but the VQ config has resolution "
                         f"{config.resolution}; set it to match")
    torch.manual_seed(params.seed)
    vq = build_vq(config)
    optimizer = torch.optim.Adam(vq.parameters(), lr=params.lr)
    step, path = 0, latest_checkpoint(out_dir / "checkpoints")
    if path is not None:
        state = load_checkpoint(path)
        if state["vq_config"] != config.to_dict():
            raise ValueError(f"{path} was trained with another VQ config; use `knnd run pack --force`")
        vq.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step = state["step"]
    else:
        init_codebook(vq, images, params.seed)
    stop = min(params.steps, params.stop_at_step or params.steps)
    deadline = None if params.max_seconds is None else time.monotonic() + params.max_seconds
    log = out_dir / "metrics.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    kept = [line for line in (log.read_text().splitlines() if log.exists() else []) if json.loads(line)["step"] <= step]
    log.write_text("".join(line + "\n" for line in kept))
    loss = None
    while step < stop:
        x = to_tensor(images[batch_rows(params, step, len(images)).numpy()])
        reconstruction, commit = vq(x, return_dict=False)
        loss = F.mse_loss(reconstruction, x) + commit.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if deadline is not None and time.monotonic() >= deadline:
            stop = step
        if step % params.log_every == 0 or step == stop:
            with open(log, "a") as f:
                f.write(json.dumps({"step": step, "loss": float(loss.detach())}) + "\n")
        if step % params.checkpoint_every == 0 or step == stop:
            save_checkpoint(out_dir / "checkpoints", {
                "vq_config": config.to_dict(), "model": vq.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "rng": rng_state(), "vq_params": dataclasses.asdict(params)})
    return {"step": step, "loss": None if loss is None else float(loss.detach()),
            "checkpoint": str(latest_checkpoint(out_dir / "checkpoints"))}


@torch.no_grad()
def init_codebook(vq, images: np.ndarray, seed: int, sample: int = 1024):
    """Data-dependent start: the codebook vectors are encoder outputs at random positions of up to
    `sample` random images (seeded), so every code starts where the data are (a random init leaves
    most codes far from every latent, never chosen, never updated)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(images), generator=generator)[:sample].numpy()
    latents = vq.encode(to_tensor(images[np.sort(rows)])).latents
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    codes = vq.quantize.embedding.weight
    pick = torch.randint(0, len(vectors), (codes.shape[0],), generator=generator)
    codes.copy_(vectors[pick])


def load_vq(path) -> tuple:
    """(VQModel in eval mode, VQConfig) from a VQ checkpoint."""
    state = load_checkpoint(path)
    config = VQConfig.from_dict(state["vq_config"])
    vq = build_vq(config)
    vq.load_state_dict(state["model"])
    return vq.eval(), config


@torch.no_grad()
def tokenize(vq, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> int16 tokens [N, h, w] (codebooks up to 32767 codes)."""
    out = [encode_tokens(vq, to_tensor(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.int16)


@torch.no_grad()
def reconstruct(vq, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """int16 tokens [N, h, w] -> uint8 images [N, H, W, 3] through the decoder."""
    out = []
    for i in range(0, len(tokens), batch_size):
        x = decode_tokens(vq, torch.from_numpy(tokens[i:i + batch_size].astype(np.int64)))
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).numpy()


def quality(images: np.ndarray, tokens: np.ndarray, reconstructions: np.ndarray, codes: int) -> dict:
    """{psnr, perplexity, used, dead}: reconstruction PSNR (dB) and codebook usage over the pack."""
    return {"psnr": round(psnr(to_tensor(images), to_tensor(reconstructions)), 3),
            **codebook_usage(torch.from_numpy(tokens.astype(np.int64)), codes)}
