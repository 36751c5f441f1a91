"""`knnd edit IMAGE "edit text"`: mask-free local manipulation (final paper, section 3.1).

A model trained with train.mode=manipulate learned to recover I from I_manip = I * (1 - M) + nn * M
(nn: I's first neighbour, ECC-aligned) given I_manip as extra input channels and f_img(I * M) in
condition slot 0, with I's neighbours d_1..d_k in the other slots. At inference:
  - the image input is the image itself (mask-free, as in the paper: the model finds where the text
    asks for a change), or, with --box x0,y0,x1,y1 (fractions of the side), the training construction
    I * (1 - M) + nn * M, nn being the image's first neighbour in the index (by its CLIP image
    embedding; near-duplicates of the image itself skipped), ECC-aligned to it;
  - the condition is (f_txt(edit text), d_1..d_k): the text where f_img(I * M) was in training, and
    the image's own nearest neighbours, as training conditioned on the image's neighbours.
Sampling starts from noise (DDIM; guidance acts on the condition, the image input is in both halves).
Into --out: before.png (the image at the model's resolution), input.png (what the U-Net was given),
after_<i>.png (image i from seed + i), grid.png (before, input, afters) and edit.json.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.files import UsageError, atomic_path
from pipeline.generation import (Sampler, load_reference, new_folder, reference_embedding, resolve_checkpoint)
from pipeline.grids import write_grid, write_images
from pipeline.runner import resolve_device


@dataclass
class EditRequest:
    image: str
    text: str
    box: tuple[float, float, float, float] | None  # fractions (x0, y0, x1, y1); None: mask-free
    k: int
    guidance: float
    steps: int
    seed: int
    images: int = 4
    allow_other_clip: bool = False

    def validate(self) -> None:
        if not Path(self.image).is_file():
            raise UsageError(f"IMAGE {self.image} does not exist: give an image file")
        if not self.text.strip():
            raise UsageError('the edit text is empty: say what to change, e.g. "wearing a hat"')
        for name, low in (("k", 0), ("steps", 1), ("images", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"--{name} must be at least {low}, got {getattr(self, name)}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):  # nan passes `< 0`
            raise UsageError(f"--guidance must be a finite number of at least 0, got {self.guidance}")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise UsageError(f"--box {','.join(map(str, self.box))}: give x0,y0,x1,y1 as fractions of the image "
                                 f"side with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, e.g. 0.25,0.25,0.75,0.75")


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UsageError(f"--box {text!r}: give four comma-separated fractions x0,y0,x1,y1, e.g. 0.25,0.25,0.75,0.75")
    return values


def box_pixels(box, size: int) -> np.ndarray:
    """Fractions -> int [4] pixel box on a size x size image (at least one pixel wide and high)."""
    x0, y0, x1, y1 = (int(round(v * size)) for v in box)
    return np.array([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)])


def image_neighbours(retriever, query: np.ndarray, k: int, duplicate_cosine: float):
    """(rows, sims) of the k nearest indexed images to an image embedding, skipping those above
    duplicate_cosine (the image itself when it is in the database: the neighbours stage skips them too)."""
    sims, rows = retriever.search(query, k + 8)
    keep = (rows[0] >= 0) & (sims[0] <= duplicate_cosine)
    rows, sims = rows[0][keep][:k], sims[0][keep][:k]
    if len(rows) < k:
        raise UsageError(f"the index {retriever.dir} has only {len(rows)} images that are not near-duplicates of "
                         f"the image; {k} are needed: lower -k or use a larger index")
    return rows, sims


def manipulated_input(image: np.ndarray, neighbour: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, bool]:
    """(I * (1 - M) + aligned nn * M as uint8, whether ECC aligned it) for a pixel box M."""
    import torch

    from model.manipulation import align_ecc, box_masks, manipulate

    aligned, ok = align_ecc(neighbour, image)
    mask = box_masks(torch.as_tensor(box)[None], image.shape[0])[0].permute(1, 2, 0).numpy()
    return manipulate(image.astype(np.float32), aligned.astype(np.float32), mask).round().astype(np.uint8), ok


def neighbour_picture(retriever, row: int, size: int) -> np.ndarray:
    """An indexed image at size x size (the index's thumbnail, resized; or decoded from the download)."""
    from PIL import Image

    picture = retriever.thumbnails([row], size=size).get(int(row))
    if picture is None:
        raise UsageError(f"the first neighbour of the image (row {row} of {retriever.dir}) no longer decodes: "
                         f"rebuild the index, or edit without --box")
    if picture.shape[0] != size:
        picture = np.asarray(Image.fromarray(picture).resize((size, size), Image.Resampling.LANCZOS))
    return picture


def edit_into(cfg, request: EditRequest, checkpoint: str | None = None, index: str | None = None,
              out: str | None = None) -> Path:
    """Edit request.image with request.text; writes before/input/after PNGs, grid.png, edit.json."""
    import torch

    from model import diffusion
    from model.clip import encode_texts

    request.validate()
    index_dir = Path(index or cfg.sample.index or Path(cfg.workdir) / "index")
    sampler = Sampler(resolve_checkpoint(cfg, checkpoint), index_dir, resolve_device(cfg), request.allow_other_clip,
                      manipulation=True)
    sampler.check_k(request.k)
    size, retriever = sampler.config.resolution, sampler.retriever
    before = load_reference(request.image, size, "IMAGE")
    own = reference_embedding(sampler.clip, request.image, "IMAGE")
    rows, sims = image_neighbours(retriever, own, max(request.k, 1 if request.box else 0), cfg.dedup.cosine_threshold)
    image_input, aligned = before, None
    if request.box is not None:
        image_input, aligned = manipulated_input(before, neighbour_picture(retriever, rows[0], size),
                                                 box_pixels(request.box, size))
    text = encode_texts(sampler.clip, [request.text])
    emb = np.concatenate([text, retriever.embeddings[rows[:request.k]].astype(np.float32)])[None]
    n = request.images
    emb = torch.from_numpy(emb).expand(n, *emb.shape[1:]).contiguous()
    generators = [torch.Generator().manual_seed(request.seed + i) for i in range(n)]
    after = diffusion.sample(sampler.model, emb, steps=request.steps, guidance=request.guidance, generator=generators,
                             image_cond=np.repeat(image_input[None], n, axis=0),
                             scheduler="ddim")  # edits were measured with DDIM only (README, Local manipulation)
    folder = Path(out) if out else new_folder(Path(cfg.workdir) / "edit_cli")
    folder.mkdir(parents=True, exist_ok=True)
    save_png(folder / "before.png", before)
    save_png(folder / "input.png", image_input)
    records = [{} for _ in range(n)]
    write_images(folder, "after", after, records)
    described = retriever.describe(rows[:max(request.k, 1 if request.box else 0)])
    record = {**asdict(request), "image": str(Path(request.image).resolve()), "seeds": [request.seed + i for i in range(n)],
              "after": [r["image"] for r in records], "neighbour_keys": [key for key, _ in described],
              "similarities": [round(float(s), 6) for s in sims], "ecc_aligned": aligned,
              "checkpoint": str(sampler.checkpoint.resolve()), "index_dir": str(index_dir.resolve())}
    with atomic_path(folder / "edit.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    cells = ["before.png", "input.png"] + record["after"]
    write_grid(folder, [{"image": name, "prompt_index": 0, "index_in_prompt": i} for i, name in enumerate(cells)],
               [request.text], len(cells))
    print(f"edit: {request.text!r} -> {', '.join(record['after'])} in {folder}", file=sys.stderr)
    print(f"grid: {folder / 'grid.png'}")
    return folder


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
