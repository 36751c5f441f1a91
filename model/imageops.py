"""Image operations that need Pillow only, never torch: decode workers import this and start in
well under a second, where importing torch and open_clip costs seconds per worker process.

`PilTransform` replays the PIL part of an open_clip val transform (torchvision Resize, CenterCrop,
open_clip's MaybeConvertMode) with the same Pillow calls torchvision makes, so its output is
pixel-identical (tests/test_embed.py compares the two on many image sizes).
"""

from __future__ import annotations

from PIL import Image

_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def flatten_alpha(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB copy of `image` with any transparency composited onto `background` (white, as img2dataset)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class PilTransform:
    """A torch-free copy of a torchvision PIL pipeline: a list of ("resize" | "center_crop" | "convert", ...)."""

    def __init__(self, steps: list[tuple]):
        self.steps = steps

    @classmethod
    def from_torchvision(cls, compose) -> "PilTransform | None":
        """The steps of a torchvision Compose, or None when it holds a step this class cannot replay."""
        steps = []
        for t in getattr(compose, "transforms", [compose]):
            kind = type(t).__name__
            if kind == "Resize":
                filt = _PIL_FILTERS.get(getattr(t.interpolation, "value", None))
                if filt is None:
                    return None
                size = [t.size] if isinstance(t.size, int) else list(t.size)
                steps.append(("resize", size, t.max_size, filt))
            elif kind == "CenterCrop":
                steps.append(("center_crop", tuple(t.size)))
            elif kind == "MaybeConvertMode":  # open_clip: convert(mode) for PIL images
                steps.append(("convert", t.mode))
            else:
                return None
        return cls(steps)

    def __call__(self, image: Image.Image) -> Image.Image:
        for step in self.steps:
            image = getattr(self, "_" + step[0])(image, *step[1:])
        return image

    def __repr__(self) -> str:
        return f"PilTransform({self.steps})"

    @staticmethod
    def _resize(image: Image.Image, size: list[int], max_size: int | None, filt: int) -> Image.Image:
        w, h = image.size
        if len(size) == 1:  # the shorter side becomes size[0] (torchvision's rule, int() truncation)
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size[0], int(size[0] * long / short)
            if max_size is not None and new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = size
        if (new_w, new_h) == (w, h):
            return image
        return image.resize((new_w, new_h), filt)

    @staticmethod
    def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
        crop_h, crop_w = size
        w, h = image.size
        if crop_w > w or crop_h > h:  # pad with zeros, the extra pixel right/bottom (torchvision)
            left, top = (crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0
            padded = Image.new(image.mode, (max(w, crop_w), max(h, crop_h)), 0)
            padded.paste(image, (left, top))
            image, (w, h) = padded, padded.size
            if (w, h) == (crop_w, crop_h):
                return image
        top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
        return image.crop((left, top, left + crop_w, top + crop_h))

    @staticmethod
    def _convert(image: Image.Image, mode: str) -> Image.Image:
        return image if image.mode == mode else image.convert(mode)
