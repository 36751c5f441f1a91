"""pack.tokens: the discrete backbone's VQ stage, run at the end of the pack stage.

Why inside pack and not a stage of its own: the tokens index the pack's samples one to one, so
they must be rebuilt exactly when the pack is (the runner's staleness does that for free); the
continuous path and `knnd run all` stay unchanged (no stage that the U-Net never reads); and train
keeps one upstream stage for both backbones.

Writes into pack/vq/: checkpoints/step_XXXXXXX.pt (the VQ autoencoder, resumable like the
trainer: an interrupted pack stage resumes its VQ training), metrics.jsonl, tokens.npz (keys: the
pack's sample keys, tokens: int16 [N, h, w]) and the reconstruction report in the pack manifest:
PSNR, codebook perplexity and dead codes, and the Frechet distance between the CLIP features of
reconstructions and originals in the embed stage's CLIP (the evaluation encoder by default).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.runner import StageError, UsageError

FD_IMAGES = 2000  # images whose reconstructions are compared in CLIP space


def vq_config(conf):
    """The VQConfig of the pack section; UsageError naming the keys when they do not fit."""
    from model.vq import VQConfig

    if conf.image_size % conf.vq_downsample:
        raise UsageError(f"pack.image_size {conf.image_size} is not divisible by pack.vq_downsample {conf.vq_downsample}: "
                         f"change one of them")
    if conf.vq_channels % 16:
        raise UsageError(f"pack.vq_channels {conf.vq_channels} must be a multiple of 16 (group norm): e.g. 64")
    return VQConfig(resolution=conf.image_size, downsample=conf.vq_downsample, codes=conf.vq_codes,
                    channels=conf.vq_channels, embed_dim=conf.vq_embed_dim)


def check(cfg) -> None:
    if cfg.pack.tokens:
        vq_config(cfg.pack)


def pack_images(out: Path, shards: list[dict]) -> tuple[list[str], np.ndarray]:
    """(keys, uint8 images [N, H, W, 3]) of the written pack shards, in shard order."""
    from model.data import read_pack_shard

    keys, images = [], []
    for shard in shards:
        if shard["samples"]:
            data = read_pack_shard(out / shard["tar"])
            keys += data["keys"]
            images.append(data["image"])
    if not images:
        raise StageError("the pack holds no samples to train the VQ autoencoder on")
    return keys, np.concatenate(images)


def run_tokens(stage, shards: list[dict], embed: dict) -> dict:
    """Train (or resume) the VQ, tokenize every pack sample, report; returns the manifest's "tokens"."""
    import torch

    from model.checkpoint import latest_checkpoint
    from model.vq_train import VQParams, load_vq, quality, reconstruct, tokenize, train_vq
    from pipeline.files import atomic_path

    conf, out = stage.conf, stage.dir / "vq"
    config = vq_config(conf)
    keys, images = pack_images(stage.dir, shards)
    params = VQParams(steps=conf.vq_steps, batch_size=conf.vq_batch_size, lr=conf.vq_lr,
                      max_seconds=None if conf.vq_minutes is None else conf.vq_minutes * 60)
    print(f"pack: VQ autoencoder on {len(images)} images, {config.grid} x {config.grid} tokens of {config.codes} codes, "
          f"{conf.vq_steps} steps" + (f", at most {conf.vq_minutes:g} min" if conf.vq_minutes is not None else ""),
          file=sys.stderr)
    try:
        result = train_vq(params, config, images, out)
    except ValueError as e:  # a foreign or damaged VQ checkpoint
        raise StageError(str(e)) from None
    checkpoint = latest_checkpoint(out / "checkpoints")
    vq, _ = load_vq(checkpoint)
    with torch.no_grad():
        tokens = tokenize(vq, images)
        reconstructions = reconstruct(vq, tokens)
    with atomic_path(out / "tokens.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=np.array(keys), tokens=tokens)
    report = quality(images, tokens, reconstructions, config.codes)
    report["fd_clip"] = reconstruction_fd(images, reconstructions, embed, stage)
    print(f"pack: VQ step {result['step']}: PSNR {report['psnr']:.2f} dB, perplexity {report['perplexity']:.1f} of "
          f"{config.codes} codes ({report['dead']} dead), FD(reconstructions, originals) {report['fd_clip']}", file=sys.stderr)
    return {"vq_checkpoint": str(checkpoint.relative_to(stage.dir)), "tokens": "vq/tokens.npz",
            "vq_config": config.to_dict(), "grid": [config.grid, config.grid], "codes": config.codes,
            "vq_step": result["step"], "vq_loss": result["loss"], "quality": report}


def reconstruction_fd(images: np.ndarray, reconstructions: np.ndarray, embed: dict, stage) -> float | None:
    """FD between CLIP image features of up to FD_IMAGES reconstructions and their originals, in the
    embed stage's CLIP; None when that CLIP cannot be loaded here."""
    from model import metrics
    from pipeline.evaluate import image_features
    from pipeline.generation import load_index_clip

    try:
        bundle = load_index_clip({"model": embed.get("model")}, stage.input_dirs["embed"], stage.device())
    except UsageError as e:
        print(f"pack: no FD of the VQ reconstructions ({e})", file=sys.stderr)
        return None
    rows = np.random.default_rng(0).permutation(len(images))[:FD_IMAGES]
    real, fake = image_features(bundle, images[rows]), image_features(bundle, reconstructions[rows])
    return round(float(metrics.frechet_distance(fake, real)), 4)
