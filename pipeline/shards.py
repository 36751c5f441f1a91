"""Tar shards in the webdataset layout ({key}.{ext} members, one sample per key) and their images.

Every stage that opens a download or pack shard (embed, pack, the trainer's input, the database
pictures behind an index, the demo) reads it here, with one pixel limit (Pillow's
decompression-bomb guard) and one message for a corrupt shard. The reader is `tarfile`, not
webdataset's own: importing webdataset imports torch (2.2 s and ~300 MB in every embed decode
worker, which are torch-free by design); tests check that webdataset reads our shards the same.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 1 << 26  # decompression-bomb guard for our own decoding (Pillow)


def iter_tar_samples(tar_path):
    """Yield (key, {ext: bytes}) for each sample of a webdataset tar, in file order: members named
    {key}.{ext}, a sample's members next to each other (webdataset's grouping rule).

    A damaged archive raises tarfile.TarError, EOFError or OSError (callers name the shard with
    `corrupt_message`); an archive cut at a member boundary reads as a shorter one."""
    import tarfile

    current, parts = None, {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = Path(member.name).name.partition(".")
            if key != current and current is not None:
                yield current, parts
                parts = {}
            current = key
            parts[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, parts


def image_bytes(parts: dict) -> bytes | None:
    """The image member of a sample (the first of IMAGE_EXTS present), or None."""
    return next((parts[e] for e in IMAGE_EXTS if e in parts), None)


def corrupt_message(tar_path, detail: str) -> str:
    return (f"{tar_path} is corrupt or truncated ({detail}): delete it and its _stats.json, "
            f"then re-run `knnd run download` to fetch that shard again")


def open_image(source: bytes | str | Path):
    """Pillow image of bytes or a path, under the pixel limit (too large: Image.DecompressionBombError)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def load_image(source: bytes | str | Path, size: int) -> np.ndarray:
    """Decode an image (bytes or a path) to uint8 [size, size, 3]: alpha flattened onto white,
    centre-cropped to a square, then resized with Lanczos (sharp, little aliasing when shrinking).

    The one image path of both training data (pack) and editing references (sample), so the model
    sees references exactly as it saw its training images.
    """
    from PIL import Image

    from model.imageops import flatten_alpha

    with open_image(source) as im:
        image = flatten_alpha(im)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return np.array(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)  # a writable copy
