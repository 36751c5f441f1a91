"""Sample files: one PNG per image, samples.jsonl, and grid.png (a row per prompt)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pipeline.files import atomic_path

GRID_CELL = 128  # grid cells are upscaled (nearest) to at least this many pixels: 32 px samples are tiny
LABEL_WIDTH = 160


def slugs(prompts: list[str]) -> list[str]:
    """File-name stems, one per prompt, unique (a repeated slug gets the prompt's position)."""
    out, seen = [], set()
    for p, prompt in enumerate(prompts):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
        if slug in seen:
            slug = f"{slug}-{p}"
        seen.add(slug)
        out.append(slug)
    return out


def write_images(out: Path, slug: str, images: np.ndarray, records: list[dict]) -> None:
    """`<slug>_<i>.png` per image (atomically); records get their file name."""
    from PIL import Image

    for i, (image, record) in enumerate(zip(images, records)):
        name = f"{slug}_{i}.png"
        with atomic_path(out / name) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        record["image"] = name


def write_grid(out: Path, records: list[dict], prompts: list[str], per_prompt: int) -> Path:
    """grid.png: a row per prompt (its text on the left), a column per image."""
    from PIL import Image, ImageDraw

    with Image.open(out / records[0]["image"]) as first:
        side = first.width
    cell, pad = side * max(1, -(-GRID_CELL // side)), 2
    grid = Image.new("RGB", (LABEL_WIDTH + per_prompt * (cell + pad) + pad, len(prompts) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for record in records:
        row, col = record["prompt_index"], record["index_in_prompt"]
        with Image.open(out / record["image"]) as im:
            tile = im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        grid.paste(tile, (LABEL_WIDTH + pad + col * (cell + pad), pad + row * (cell + pad)))
    for row, prompt in enumerate(prompts):
        label, at = fit_label(prompt, LABEL_WIDTH // 7), (4, pad + row * (cell + pad) + cell // 2 - 6)
        try:
            draw.text(at, label, fill="black")
        except UnicodeError:  # Pillow without FreeType: its bitmap font is Latin-1 only
            draw.text(at, label.encode("latin-1", "replace").decode("latin-1"), fill="black")
    with atomic_path(out / "grid.png") as tmp:
        grid.save(tmp, format="PNG")
    return out / "grid.png"


def fit_label(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars - 3] + "..."


def write_records(out: Path, records: list[dict]) -> None:
    with atomic_path(out / "samples.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
