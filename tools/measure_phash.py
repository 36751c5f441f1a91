"""Measure pHash Manhattan distances on the demo stickers: copies vs unrelated vs colour variants.

Used to choose dedup.manhattan_threshold's default (see README, "Deduplication").
    python tools/measure_phash.py [--n 600]
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageEnhance

from model.clip import flatten_alpha
from pipeline.demo_data import render_stickers


def variants(im: Image.Image) -> dict[str, Image.Image]:
    """The copies dedup must catch: re-encoded, resized, shifted, cropped, brightened."""
    w, h = im.size
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=70)
    shifted = Image.new("RGB", im.size, "white")
    shifted.paste(im, (2, 1))
    c = max(1, round(0.03 * w))
    return {
        "reencoded_jpeg70": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
        "resized_48_64": im.resize((48, 48), Image.BICUBIC).resize((w, h), Image.BICUBIC),
        "shifted_2px": shifted,
        "cropped_3pct": im.crop((c, c, w - c, h - c)).resize((w, h), Image.BICUBIC),
        "brightened_1.2": ImageEnhance.Brightness(im).enhance(1.2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=600, help="stickers to sample")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = render_stickers(Path(tmp), size=64, limit=args.n)
        images = [flatten_alpha(Image.open(Path(tmp) / r["file"])) for r in records]
        hashes = [imagehash.phash(im) for im in images]
        print(f"{len(images)} stickers at 64 px (alpha flattened onto white)")
        for name in variants(images[0]):
            d = np.array([hashes[i] - imagehash.phash(variants(im)[name]) for i, im in enumerate(images)])
            print(f"  copy {name:<18} distance: median {np.median(d):.0f}, p95 {np.percentile(d, 95):.0f}, max {d.max()}")
        bits = np.array([h.hash.flatten() for h in hashes])
        dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
        nearest = np.sort(dist + np.eye(len(bits), dtype=int) * 99, axis=1)[:, 0]
        iu = np.triu_indices(len(bits), 1)
        print(f"  unrelated pairs: {np.mean(dist[iu] <= 4) * 100:.2f}% within 4 bits, {np.mean(dist[iu] <= 8) * 100:.2f}% within 8")
        print(f"  each sticker's nearest other sticker: median {np.median(nearest):.0f} bits; "
              f"{np.mean(nearest <= 4) * 100:.0f}% within 4, {np.mean(nearest <= 8) * 100:.0f}% within 8")


if __name__ == "__main__":
    main()
