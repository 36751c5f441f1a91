"""Checkpoints: `step_{step:07d}.pt` files of tensors and primitive containers only.

Everything stored is loadable with torch.load(weights_only=True), so a checkpoint from an untrusted
path executes no code. A checkpoint holds:
    model_config (dict), model, ema (state dicts), optimizer, lr_scheduler (state dicts), step,
    data_position [epoch, index], rng (torch/cuda/numpy/python states), train_params (dict).
"""
import random
import re
from pathlib import Path

import numpy as np
import torch

from model.denoiser import KnnDenoiser, ModelConfig
from pipeline.files import atomic_path

CHECKPOINT_NAME = re.compile(r"^step_(\d{7})\.pt$")


def checkpoint_step(path) -> int | None:
    """The step in a step_XXXXXXX.pt file name; None for any other name."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_path(directory, step: int) -> Path:
    return Path(directory) / f"step_{step:07d}.pt"


def save_checkpoint(directory, state: dict) -> Path:
    """Write state (which must hold "step") atomically: a temporary file, fsync, then rename."""
    path = checkpoint_path(directory, state["step"])
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)
    return path


def latest_checkpoint(directory) -> Path | None:
    """The highest-step finished checkpoint in directory (temporary files ignored), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := CHECKPOINT_NAME.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True); a damaged file raises ValueError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"cannot load checkpoint {path}: {error}. Delete it to resume from "
                         f"the previous one, or retrain with `knnd run train --force`") from error


def checkpoint_clip(path) -> dict | None:
    """The identity of the CLIP a checkpoint was trained on (None: written before it was recorded)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("clip")


def load_model(path, use_ema: bool = True, device="cpu") -> KnnDenoiser:
    """Rebuild the denoiser from a checkpoint alone (its config is inside), in eval mode: a
    KnnDenoiser, or a DiscreteDenoiser for a checkpoint with "backbone": "discrete"."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("backbone") == "discrete":
        from model.discrete import DiscreteConfig, DiscreteDenoiser
        model = DiscreteDenoiser(DiscreteConfig.from_dict(checkpoint["model_config"]))
    else:
        model = KnnDenoiser(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["ema" if use_ema else "model"])
    return model.to(device).eval()


def rng_state() -> dict:
    """Global RNG states of torch, cuda, numpy and python as tensors and primitives."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict):
    """Inverse of rng_state()."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():  # a resume may see fewer GPUs than the run that saved
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
