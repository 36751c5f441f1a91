"""Mask-free local manipulation (final KNN-Diffusion paper, section 3.1): the manipulated image.

Training teaches the denoiser to recover I from

    I_manip = I * (1 - M) + nn_img(I, 1) * M

given I_manip (extra U-Net input channels) and f_img(I * M) (condition slot 0), where M is a random
box and nn_img(I, 1) is the first neighbour's picture aligned to I with ECC (Evangelidis & Psarakis,
2008; OpenCV's findTransformECC). At inference f_txt(edit text) takes slot 0.

Here: the boxes (drawn per sample when packing, so their CLIP crops can be embedded there), the ECC
alignment, the per-step choice among a sample's boxes (seeded by (seed, rank, step), so a resumed run
draws the same boxes) and the composition. Plain numpy / torch / OpenCV; no pipeline imports.
"""
import hashlib

import cv2
import numpy as np
import torch

# --------------------------------------------------------------------------- boxes


def key_rng(key: str, seed: int = 0) -> np.random.Generator:
    """A generator that depends on a sample key and a seed only (pack output is reproducible)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_boxes(rng: np.random.Generator, count: int, size: int, low: float, high: float) -> np.ndarray:
    """int16 [count, 4] boxes (x0, y0, x1, y1), half-open pixel ranges on a size x size image.

    Width and height are drawn independently, uniform in [low * size, high * size] (at least one
    pixel), the position uniform among those that fit."""
    lo, hi = max(1, round(low * size)), max(1, round(high * size))
    sides = rng.integers(lo, hi + 1, size=(count, 2))
    x0 = rng.integers(0, size - sides[:, 0] + 1)
    y0 = rng.integers(0, size - sides[:, 1] + 1)
    return np.stack([x0, y0, x0 + sides[:, 0], y0 + sides[:, 1]], axis=1).astype(np.int16)


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """float [B, 1, size, size]: 1 inside each box (x0 <= x < x1, y0 <= y < y1), 0 outside."""
    boxes = torch.as_tensor(boxes).long()
    grid = torch.arange(size)
    inside_x = (grid[None] >= boxes[:, 0:1]) & (grid[None] < boxes[:, 2:3])  # [B, W]
    inside_y = (grid[None] >= boxes[:, 1:2]) & (grid[None] < boxes[:, 3:4])  # [B, H]
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


def choose_boxes(batch: int, boxes_per_sample: int, seed: int, rank: int, step: int) -> torch.Tensor:
    """long [batch]: which of its packed boxes each sample of a step uses, from a generator seeded by
    (seed, rank, step, 2): independent of the noise draws, and the same again after a resume."""
    state = np.random.SeedSequence([seed, rank, step, 2]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.randint(0, boxes_per_sample, (batch,), generator=generator)


def manipulate(image: torch.Tensor, neighbour: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """I * (1 - M) + nn * M for image tensors [B, 3, H, W] and masks [B, 1, H, W]."""
    return image * (1 - mask) + neighbour * mask


def manipulation_batch(image, emb, neighbour, boxes, box_emb, seed: int, rank: int, step: int):
    """A training batch's (I_manip [B,3,H,W], condition [B,k+1,d]): per sample one of its boxes M,
    I_manip = I * (1 - M) + aligned nn * M, and f_img(I * M) (the box's packed embedding) in slot 0."""
    chosen = choose_boxes(image.shape[0], boxes.shape[1], seed, rank, step)
    rows = torch.arange(image.shape[0])
    mask = box_masks(boxes[rows, chosen], image.shape[-1])
    condition = torch.cat([box_emb[rows, chosen][:, None], emb[:, 1:]], dim=1)
    return manipulate(image, neighbour, mask), condition


# --------------------------------------------------------------------------- ECC alignment


def align_ecc(moving: np.ndarray, fixed: np.ndarray, iterations: int = 200, eps: float = 1e-6,
              max_scale: float = 2.0) -> tuple[np.ndarray, bool]:
    """(moving warped onto fixed, aligned?) for uint8 [H, W, 3] images of one size.

    An affine warp maximising the enhanced correlation coefficient of the grey images
    (cv2.findTransformECC), applied with cv2.warpAffine (edges replicated). When ECC fails (no
    convergence, a flat image: cv2.error) or finds a degenerate warp (a singular value of its linear
    part outside [1 / max_scale, max_scale]), the neighbour is returned unaligned, with False."""
    height, width = fixed.shape[:2]
    grey = [cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
            for im in (fixed, moving)]
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, eps)
    try:
        _, warp = cv2.findTransformECC(grey[0], grey[1], warp, cv2.MOTION_AFFINE, criteria, None, 3)
    except cv2.error:
        return moving, False
    singular = np.linalg.svd(warp[:, :2], compute_uv=False)
    if not np.isfinite(warp).all() or singular.max() > max_scale or singular.min() < 1 / max_scale:
        return moving, False
    aligned = cv2.warpAffine(np.ascontiguousarray(moving), warp, (width, height),
                             flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return aligned, True


# --------------------------------------------------------------------------- fine-tuning


def check_init_source(path, source: dict, config) -> None:
    """The source checkpoint's model config (a dict) must equal `config` but for `manipulation`."""
    import dataclasses

    from model.denoiser import ModelConfig

    source = ModelConfig.from_dict(source)
    if dataclasses.replace(source, manipulation=config.manipulation) != config:
        differ = sorted(k for k, v in source.to_dict().items() if k != "manipulation" and config.to_dict()[k] != v)
        raise ValueError(f"train.init_from {path} was trained with another model ({', '.join(differ)} differ): "
                         f"start from a checkpoint of the same train.model preset, pack and train keys")


def init_from_checkpoint(model, path) -> None:
    """Load a checkpoint's EMA weights into `model` before training (the paper fine-tunes its text-to-image
    model for manipulation). The source must have the same model config but for `manipulation`; a
    text-to-image source's U-Net input convolution is widened with zero weights for the I_manip
    channels, so the started model computes exactly what the source did, whatever I_manip holds."""
    from model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    check_init_source(path, checkpoint["model_config"], model.config)
    state = dict(checkpoint["ema"])
    own = model.state_dict()
    name = "unet.conv_in.weight"
    if state[name].shape != own[name].shape:  # text-to-image -> manipulation: zeros for the new channels
        widened = torch.zeros_like(own[name])
        widened[:, :state[name].shape[1]] = state[name]
        state[name] = widened
    model.load_state_dict(state)
