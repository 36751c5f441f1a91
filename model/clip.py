"""CLIP encoders: load any open_clip model (by name or model-config JSON) and embed images and texts.

`load_clip` is the one way the project builds a CLIP: the embed stage, the demo encoder trainer,
retrieval and sampling all go through it, so a checkpoint written by one loads in all the others.
Checkpoints are plain state_dicts read with `torch.load(weights_only=True)`: a file from an untrusted
path can hold tensors, never code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from model.imageops import flatten_alpha  # noqa: F401 - re-exported: the project's one alpha rule

_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


@dataclass
class ClipBundle:
    """A CLIP model with the preprocessing and tokenizer that belong to it."""

    model: torch.nn.Module  # open_clip CLIP, eval mode; fp16 weights on cuda
    preprocess: Callable[[Image.Image], torch.Tensor]  # the model's own open_clip val transform
    tokenizer: Callable[[list[str]], torch.Tensor]
    embed_dim: int
    name: str  # the open_clip model name (a content-hashed name for a config JSON)
    device: torch.device

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)


def load_clip(model: str, pretrained: str | None, device: str = "cpu") -> ClipBundle:
    """Build an open_clip model.

    model: an open_clip model name ("ViT-B-32") or a path to a model-config JSON
        ({"embed_dim", "vision_cfg", "text_cfg"}, open_clip's own format).
    pretrained: an open_clip tag ("openai": downloads from the hub), a local state_dict file
        (bare or {"state_dict": ...}), or None for random initialisation.
    device: "cpu", "cuda", "cuda:1", ...; on cuda the weights are fp16.
    """
    name = _resolve_model_name(model)
    torch_device = torch.device(device)
    tag, checkpoint = _resolve_pretrained(name, pretrained)
    precision = "fp16" if torch_device.type == "cuda" else "fp32"
    with _quiet_random_init_warning(checkpoint is not None):
        net, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=tag, precision=precision, device=torch_device
        )
    if checkpoint is not None:
        state_dict = load_state_dict(checkpoint)
        try:
            # load_state_dict copies into the existing (possibly fp16, cuda) parameters.
            net.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {checkpoint} does not fit model {model!r}: {e}") from None
    net.eval()
    return ClipBundle(
        model=net,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        embed_dim=int(open_clip.get_model_config(name)["embed_dim"]),
        name=name,
        device=torch_device,
    )


def clip_preprocess(model: str, pretrained: str | None) -> tuple[Callable, int, str, int]:
    """(val transform, embed_dim, name, image_size) of the CLIP `load_clip` would build, without its
    weights: the model is built on torch's "meta" device (no memory, no init, no checkpoint read), and an
    open_clip tag's preprocessing (mean, std, interpolation, resize mode) is applied as load_clip's
    would be. The embed stage starts decoding with it while the real model loads, and checks the two agree."""
    name = _resolve_model_name(model)
    tag, _ = _resolve_pretrained(name, pretrained)
    force = {}
    if tag is not None:
        cfg = open_clip.get_pretrained_cfg(name, tag) or {}
        force = {f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if cfg.get(k) is not None}
    with _quiet_random_init_warning(True):
        try:
            with torch.device("meta"):  # tensors are created on meta: no random init at all
                net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="meta", **force)
        except (RuntimeError, NotImplementedError):  # a model whose construction reads a tensor's values
            net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="meta", **force)
    size = net.visual.image_size
    return (preprocess, int(open_clip.get_model_config(name)["embed_dim"]), name,
            size[0] if isinstance(size, (tuple, list)) else int(size))


def load_clip_spec(spec: dict, device: str = "cpu") -> ClipBundle:
    """The CLIP an embed manifest names ({"model", "pretrained", ...}); a random-init one (pretrained
    null: tests) is rebuilt from seed 0, as the embed stage built it, without touching the global RNG."""
    if spec.get("pretrained") is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return load_clip(spec["model"], None, device)
    return load_clip(spec["model"], spec["pretrained"], device)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict (bare or under "state_dict") without executing any pickled code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds more than tensors (weights_only load failed: "
            f"{str(e).splitlines()[0]}); save a plain state_dict instead"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def preprocess_images(bundle: ClipBundle, images: list[Image.Image]) -> torch.Tensor:
    """Stack PIL images into a model-ready float batch [n, 3, S, S] (alpha flattened onto white)."""
    return torch.stack([bundle.preprocess(flatten_alpha(im)) for im in images])


def encode_images(bundle: ClipBundle, images: torch.Tensor) -> np.ndarray:
    """Embed a preprocessed image batch: float32 [n, d], L2-normalised."""
    with torch.inference_mode(), _autocast(bundle.device):
        features = bundle.model.encode_image(images.to(bundle.device))
    return _normalised_numpy(features)


def encode_texts(bundle: ClipBundle, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Embed captions or prompts, batch_size at a time: float32 [n, d], L2-normalised."""
    texts, parts = list(texts), []
    for start in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(texts[start:start + batch_size]).to(bundle.device)
        with torch.inference_mode(), _autocast(bundle.device):
            parts.append(_normalised_numpy(bundle.model.encode_text(tokens)))
    return np.concatenate(parts) if parts else np.zeros((0, bundle.embed_dim), np.float32)


def _normalised_numpy(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


def _autocast(device: torch.device):
    # fp16 weights on cuda; autocast keeps the fp32 inputs and the fp16 weights compatible.
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    """Hide open_clip's "initialized randomly" warning when our own checkpoint is loaded next."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _resolve_model_name(model: str) -> str:
    """Return an open_clip model name, registering a model-config JSON under a content-hashed name."""
    if model.endswith(".json") or os.path.isfile(model):
        return _register_config_file(Path(model))
    if ":" not in model and open_clip.get_model_config(model) is None:  # "hf-hub:" names resolve remotely
        raise ValueError(
            f"unknown CLIP model {model!r}: give an open_clip model name (open_clip.list_models(), "
            "e.g. ViT-B-32) or the path of a model-config JSON"
        )
    return model


def _register_config_file(path: Path) -> str:
    """Register a config JSON with open_clip under a name derived from its contents.

    The name depends on the contents, not the file name, so two different `encoder_config.json` never
    shadow each other, and registering the same config twice is a no-op.
    """
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read model config {path}: {e}") from None
    missing = [k for k in _CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"model config {path} lacks {missing}: open_clip needs {list(_CONFIG_KEYS)}")
    canonical = json.dumps(cfg, sort_keys=True)
    name = f"knnd-{path.stem}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"
    if name not in open_clip.list_models():
        # add_model_config is open_clip's public registry API; it reads the file right away, so a
        # temporary copy under the hashed name is enough.
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / f"{name}.json"
            copy.write_text(canonical)
            open_clip.add_model_config(copy)
    return name


def _resolve_pretrained(name: str, pretrained: str | None) -> tuple[str | None, str | None]:
    """Split `pretrained` into (open_clip tag, local checkpoint path); at most one is set."""
    if pretrained is None:
        return None, None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return pretrained, None
    if os.path.isfile(pretrained):
        return None, pretrained
    raise FileNotFoundError(
        f"pretrained={pretrained!r} is neither a checkpoint file nor an open_clip tag for {name} "
        f"(tags: {tags or 'none'}); use null for random initialisation"
    )
