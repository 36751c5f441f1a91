"""pack.manipulation: what the local-manipulation training mode needs per image, computed once.

For each packed image I (at pack.image_size):
  - nbr_image: its first neighbour's image (nn_img(I, 1), the nearest of its neighbour list), aligned
    to I with ECC (model.manipulation.align_ecc); when ECC fails the unaligned neighbour is kept and
    counted (manifest: manipulation.unaligned);
  - boxes: pack.boxes random boxes M, drawn from a generator seeded by the image's key (a re-run
    packs the same boxes);
  - box_emb: f_img(I * M) for each box: the embed stage's CLIP applied to the box's crop, cut from
    I decoded at the CLIP's own input size and padded to a square with white.

Embedding the crops here keeps the trainer free of CLIP (it stays a loop over tensors) at the cost
of a fixed set of boxes per image: each training step picks one of the b at random.
"""
from __future__ import annotations

import collections

import numpy as np

from model.manipulation import align_ecc, key_rng, random_boxes

ENCODE_BATCH = 64


def crop_box(source: np.ndarray, box, size: int):
    """The box (pixels of a size x size image) cut from `source` (the same image at another size),
    padded to a square with white: a PIL image for the CLIP's preprocessing."""
    from PIL import Image, ImageOps

    scale = source.shape[0] / size
    x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
    crop = Image.fromarray(source[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)])
    side = max(crop.size)
    return ImageOps.pad(crop, (side, side), color=(255, 255, 255))


class CropEncoder:
    """The embed stage's CLIP, loaded once per pack task: f_img of PIL crops, float32 [n, d]."""

    def __init__(self, clip_spec: dict, device: str = "cpu"):
        from model.clip import load_clip_spec

        self.bundle = load_clip_spec(clip_spec, device)
        self.size = self.bundle.image_size

    def __call__(self, crops: list) -> np.ndarray:
        from model.clip import encode_images, preprocess_images

        parts = [encode_images(self.bundle, preprocess_images(self.bundle, crops[i:i + ENCODE_BATCH]))
                 for i in range(0, len(crops), ENCODE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, self.bundle.embed_dim), np.float32)


def manipulation_members(keys: list[str], images: dict, crop_sources: dict, neighbour_images: dict,
                         encoder, settings: dict) -> tuple[dict, collections.Counter]:
    """({key: {nbr_image, boxes, box_emb}}, counts) for the keys that have an image.

    images / crop_sources: {key: uint8 image} at pack.image_size / at the CLIP's size;
    neighbour_images: {key: its first neighbour's uint8 image at pack.image_size} (a neighbour whose
    image no longer decodes is left out: the sample then gets a white neighbour, counted);
    settings: {boxes, box_min, box_max}."""
    counts, members, crops = collections.Counter(), {}, []
    for key in keys:
        if key not in images or key not in crop_sources:
            continue
        image = images[key]
        neighbour = neighbour_images.get(key)
        if neighbour is None:
            counts["neighbour_missing"] += 1
            aligned = np.full_like(image, 255)
        else:
            aligned, ok = align_ecc(neighbour, image)
            counts["aligned" if ok else "unaligned"] += 1
        boxes = random_boxes(key_rng(key), settings["boxes"], image.shape[0], settings["box_min"], settings["box_max"])
        crops += [crop_box(crop_sources[key], box, image.shape[0]) for box in boxes]
        members[key] = {"nbr_image": aligned, "boxes": boxes}
    embeddings = encoder(crops).reshape(len(members), settings["boxes"], -1) if members else None
    for i, key in enumerate(members):
        members[key]["box_emb"] = embeddings[i]
    return members, counts
