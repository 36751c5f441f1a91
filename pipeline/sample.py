"""sample stage and `knnd sample`: prompts -> CLIP text embedding -> k neighbours -> guided DDIM -> PNGs.

For a prompt t: f_txt(t) from the CLIP that embedded the index's images, its k nearest images in
the index, and the condition y = (f_txt(t), d_1 .. d_k) built from their stored image embeddings;
then the denoiser's EMA weights sample with classifier-free guidance. Any index directory built
by this pipeline will do (`--index`): that is database swapping. Outputs in the output folder:
`<prompt-slug>_<i>.png`, `grid.png` (a row per prompt) and `samples.jsonl` (a line per image:
prompt, seed, neighbours used, guidance, steps, index, checkpoint).

Image i of a prompt starts from noise seeded by `seed + i`, so `--seed S+i` regenerates it alone.
`--no-knn` conditions on f_txt(t) alone (neighbour slots masked). `--init-image REF --strength s`
edits REF as in the paper: f_img(REF) replaces the first neighbour and the reverse process starts
from REF noised to ~s * T.

`knnd run sample` writes into <workdir>/sample/ (resumable per prompt); `knnd sample` writes into
--out, by default a new <workdir>/sample_cli/<YYYYmmdd-HHMMSS>/ per call, and needs no manifest of its own.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.runner import StageError, StageRun, UsageError, atomic_path, read_json, resolve_device, stage_dir

GRID_CELL = 128  # grid cells are upscaled (nearest) to at least this many pixels: 32 px samples are tiny
LABEL_WIDTH = 160


@dataclass
class SampleRequest:
    """What to sample: the SampleConfig section, overridden by CLI flags."""
    prompts: list[str]
    k: int
    guidance: float
    steps: int
    seed: int
    images_per_prompt: int
    no_knn: bool = False
    neighbours_only: bool = False
    init_image: str | None = None
    strength: float = 1.0

    def validate(self) -> None:
        if not self.prompts:
            raise UsageError("no prompts: give some on the command line or set sample.prompts")
        for name, low in (("k", 0), ("steps", 1), ("images_per_prompt", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.no_knn and self.neighbours_only:
            raise UsageError("--no-knn and --neighbours-only exclude each other: the first drops the neighbours, "
                             "the second the text")
        if self.guidance < 0:
            raise UsageError(f"guidance must be at least 0, got {self.guidance}")
        if self.init_image is not None:
            if not Path(self.init_image).is_file():
                raise UsageError(f"--init-image {self.init_image} does not exist: give an image file")
            if not 0 < self.strength <= 1:
                raise UsageError(f"--strength must be in (0, 1], got {self.strength}")


# --------------------------------------------------------------------------- the sampler


class Sampler:
    """Loaded once: the denoiser (EMA weights), the index and the CLIP that embedded its images.

    `__call__(prompt, request)` -> (uint8 images [n, H, W, 3], one record per image).
    """

    def __init__(self, checkpoint: Path, index_dir: Path, device: str):
        from model.checkpoint import load_model
        from pipeline.retrieval import Retriever

        self.checkpoint, self.index_dir = Path(checkpoint), Path(index_dir)
        try:
            self.model = load_model(self.checkpoint, use_ema=True, device=device)
        except ValueError as e:  # names the file: damaged, foreign or not weights-only
            raise StageError(str(e)) from None
        self.config = self.model.config
        self.retriever = Retriever(self.index_dir, queries="text")
        if self.retriever.dim != self.config.clip_dim:
            raise UsageError(dimension_mismatch(self.checkpoint, self.config.clip_dim, self.index_dir, self.retriever.dim))
        self.clip = load_index_clip(self.retriever.infos, self.index_dir, device)
        self.retriever.check_dim(self.clip.embed_dim, f"the CLIP model {self.clip.name}")

    def check_k(self, k: int) -> None:
        if k > self.config.k:
            raise UsageError(f"k={k} exceeds the {self.config.k} neighbours the model {self.checkpoint} was trained with: "
                             f"use -k {self.config.k} or fewer")
        n = self.retriever.infos.get("n")
        if n is not None and k > n:
            raise UsageError(f"k={k} exceeds the {n} images in the index {self.index_dir}: lower -k")

    def condition(self, prompt: str, request: SampleRequest, reference: np.ndarray | None):
        """(emb float32 [1, 1 + n, d], record fields): f_txt(t), then the reference, then neighbours."""
        from model.clip import encode_texts

        text = encode_texts(self.clip, [prompt])
        k = 0 if request.no_knn else request.k
        record = {"neighbour_keys": [], "neighbour_captions": [], "similarities": []}
        slots = [text]
        if k:
            sims, rows = self.retriever.search(text, k)
            sims, rows = sims[0], rows[0]
            keep = rows >= 0
            sims, rows = sims[keep], rows[keep]
            if reference is not None:  # the paper's editing condition: (f_txt, f_img(ref), d_2 .. d_k)
                sims, rows = sims[:k - 1], rows[:k - 1]
            described = self.retriever.describe(rows)
            record = {"neighbour_keys": [key for key, _ in described],
                      "neighbour_captions": [caption for _, caption in described],
                      "similarities": [round(float(s), 6) for s in sims]}
            slots.append(self.retriever.embeddings[rows].astype(np.float32))
        if reference is not None:
            slots.insert(1, reference)
        return np.concatenate(slots)[None], record

    def conditions(self, prompts: list[str], k: int, neighbours_only: bool = False):
        """Many prompts at once, for evaluation: (emb float32 [P, 1 + k, d], slot mask bool [P, 1 + k]
        (False where the index returned fewer than k), retrieved rows int64 [P, k] (-1: none),
        similarities float32 [P, k]). k = 0 conditions on the text embeddings alone; neighbours_only
        masks the text's slot, so the retrieved images alone condition the model (as RDM samples)."""
        from model.clip import encode_texts

        texts = encode_texts(self.clip, prompts)
        if k == 0:
            return texts[:, None, :], np.ones((len(prompts), 1), bool), np.zeros((len(prompts), 0), np.int64), \
                np.zeros((len(prompts), 0), np.float32)
        sims, rows = self.retriever.search(texts, k)
        found = rows >= 0
        neighbours = self.retriever.embeddings[np.where(found, rows, 0).ravel()].astype(np.float32)
        neighbours = neighbours.reshape(len(prompts), k, -1) * found[..., None]
        emb = np.concatenate([texts[:, None, :], neighbours], axis=1)
        mask = np.concatenate([np.full((len(prompts), 1), not neighbours_only), found], axis=1)
        return emb, mask, rows, sims.astype(np.float32)

    def __call__(self, prompt: str, request: SampleRequest) -> tuple[np.ndarray, list[dict]]:
        import torch

        from model import diffusion

        reference = init_pixels = None
        if request.init_image is not None:
            reference = reference_embedding(self.clip, request.init_image)
            init_pixels = load_reference(request.init_image, self.config.resolution)
        emb, record = self.condition(prompt, request, reference)
        n = request.images_per_prompt
        emb = torch.from_numpy(emb).expand(n, *emb.shape[1:]).contiguous()
        generators = [torch.Generator().manual_seed(request.seed + i) for i in range(n)]
        init = None if init_pixels is None else np.repeat(init_pixels[None], n, axis=0)
        mask = None
        if request.neighbours_only and emb.shape[1] > 1:  # the text retrieves; the neighbours alone condition
            mask = torch.ones(n, emb.shape[1], dtype=torch.bool)
            mask[:, 0] = False
        images = diffusion.sample(self.model, emb, steps=request.steps, guidance=request.guidance, generator=generators,
                                  init_image=init, strength=request.strength if init_pixels is not None else 1.0,
                                  neighbour_mask=mask)
        records = []
        for i in range(n):
            records.append({"prompt": prompt, "index_in_prompt": i, "seed": request.seed + i,
                            "guidance": request.guidance, "steps": request.steps,
                            "k": len(record["neighbour_keys"]), "no_knn": request.no_knn,
                            "neighbours_only": request.neighbours_only, **record,
                            "init_image": str(Path(request.init_image).resolve()) if request.init_image else None,
                            "strength": request.strength if request.init_image else None,
                            "index_dir": str(self.index_dir.resolve()), "checkpoint": str(self.checkpoint.resolve())})
        return images, records


def dimension_mismatch(checkpoint: Path, model_dim: int, index_dir: Path, index_dim: int) -> str:
    return (f"the model {checkpoint} was trained on {model_dim}-dimensional CLIP embeddings but the index {index_dir} "
            f"holds {index_dim}-dimensional ones: use an index built with the CLIP model the training data was embedded with")


def load_index_clip(infos: dict, index_dir: Path, device: str):
    """The CLIP named in the index infos (the embed stage's), on `device`.

    A random-init CLIP (embed.pretrained null, tests) is rebuilt from the seed the embed stage used.
    """
    import torch

    from model.clip import load_clip

    spec = infos.get("model") or {}
    model, pretrained = spec.get("model"), spec.get("pretrained")
    try:
        if pretrained is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # as pipeline.embed.ClipEncoder
                return load_clip(model, None, device)
        return load_clip(model, pretrained, device)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        raise UsageError(f"the index {index_dir} was built from embeddings of CLIP {model!r} (pretrained {pretrained!r}), "
                         f"which cannot be loaded here ({e}): build the index with an open_clip model") from None


def reference_embedding(bundle, path: str) -> np.ndarray:
    """f_img(reference): float32 [1, d], through the CLIP's own preprocessing (decompression-bomb guarded)."""
    from PIL import Image

    from model.clip import encode_images, preprocess_images
    from pipeline.embed import MAX_IMAGE_PIXELS

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            im.load()
            return encode_images(bundle, preprocess_images(bundle, [im]))
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise UsageError(f"--init-image {path} cannot be read as an image ({e})") from None


def load_reference(path: str, size: int) -> np.ndarray:
    """The reference as uint8 [size, size, 3], resized exactly as the pack stage resizes training images."""
    from PIL import Image

    from pipeline.pack import load_image

    try:
        return load_image(Path(path), size)
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise UsageError(f"--init-image {path} cannot be read as an image ({e})") from None


# --------------------------------------------------------------------------- files


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
        label, at = _fit(prompt, LABEL_WIDTH // 7), (4, pad + row * (cell + pad) + cell // 2 - 6)
        try:
            draw.text(at, label, fill="black")
        except UnicodeError:  # Pillow without FreeType: its bitmap font is Latin-1 only
            draw.text(at, label.encode("latin-1", "replace").decode("latin-1"), fill="black")
    with atomic_path(out / "grid.png") as tmp:
        grid.save(tmp, format="PNG")
    return out / "grid.png"


def _fit(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars - 3] + "..."


def write_records(out: Path, records: list[dict]) -> None:
    with atomic_path(out / "samples.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --------------------------------------------------------------------------- entry points


def resolve_checkpoint(cfg, given: str | None) -> Path:
    """--checkpoint (a file, or a folder: its latest), else the latest in <workdir>/train/checkpoints."""
    from model.checkpoint import latest_checkpoint

    if given is not None:
        path = Path(given)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise UsageError(f"--checkpoint {path} holds no step_XXXXXXX.pt checkpoint")
            return found
        if not path.is_file():
            raise UsageError(f"--checkpoint {path} does not exist")
        return path
    folder = stage_dir(cfg, "train") / "checkpoints"
    found = latest_checkpoint(folder)
    if found is None:
        raise UsageError(f"no checkpoint in {folder}: run `knnd run train` first, or pass --checkpoint PATH")
    return found


def generate(sampler: Sampler, request: SampleRequest, out: Path, done=None, skip=()) -> list[dict]:
    """Sample every prompt into `out`; `done(p, records)` after each prompt, prompts in `skip` left out."""
    sampler.check_k(0 if request.no_knn else request.k)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for p, (prompt, slug) in enumerate(zip(request.prompts, slugs(request.prompts))):
        if p in skip:
            continue
        images, prompt_records = sampler(prompt, request)
        for record in prompt_records:
            record["prompt_index"] = p
        write_images(out, slug, images, prompt_records)
        print(f"sample: {prompt!r} -> {', '.join(r['image'] for r in prompt_records)}", file=sys.stderr)
        if done is not None:
            done(p, prompt_records)
        records += prompt_records
    return records


def sample_command(cfg, args) -> int:
    """`knnd sample "prompt" ...`: CLI flags override the sample: section."""
    conf = cfg.sample
    request = SampleRequest(
        prompts=list(args.prompts) or list(conf.prompts),
        k=conf.k if args.k is None else args.k,
        guidance=conf.guidance if args.guidance is None else args.guidance,
        steps=conf.steps if args.steps is None else args.steps,
        seed=conf.seed if args.seed is None else args.seed,
        images_per_prompt=conf.images_per_prompt, no_knn=args.no_knn, neighbours_only=args.neighbours_only,
        init_image=args.init_image, strength=args.strength if args.init_image else 1.0)
    sample_into(cfg, request, args.checkpoint, args.index, args.out)
    return 0


def request_from_config(conf) -> SampleRequest:
    """The sample: section as a request (the stage's, and the demo's swapped-index sampling)."""
    return SampleRequest(prompts=list(conf.prompts), k=conf.k, guidance=conf.guidance, steps=conf.steps,
                         seed=conf.seed, images_per_prompt=conf.images_per_prompt)


def sample_into(cfg, request: SampleRequest, checkpoint: str | None = None, index: str | None = None,
                out: str | None = None) -> Path:
    """Sample `request` with a checkpoint (default: the latest of this workdir) against an index
    (default: sample.index, else this workdir's); writes images, samples.jsonl and grid.png into
    `out`, by default a new <workdir>/sample_cli/<YYYYmmdd-HHMMSS>[-N]/ (earlier calls' are kept).
    Returns the folder."""
    request.validate()
    sampler = Sampler(resolve_checkpoint(cfg, checkpoint), Path(index or cfg.sample.index or stage_dir(cfg, "index")),
                      resolve_device(cfg))
    folder = Path(out) if out else new_folder(stage_dir(cfg, "sample_cli"))
    records = generate(sampler, request, folder)
    write_records(folder, records)
    grid = write_grid(folder, records, request.prompts, request.images_per_prompt)
    print(f"sample: {len(records)} images, samples.jsonl and grid in {folder}\ngrid: {grid}")
    return folder


def new_folder(parent: Path) -> Path:
    """parent/<YYYYmmdd-HHMMSS>[-N], claimed with mkdir so two calls in the same second get two."""
    import time

    base = parent / time.strftime("%Y%m%d-%H%M%S")
    base.parent.mkdir(parents=True, exist_ok=True)
    out, n = base, 1
    while True:
        try:
            out.mkdir()
            return out
        except FileExistsError:
            n += 1
            out = base.with_name(f"{base.name}-{n}")


def check(cfg) -> None:
    """Before anything is written: the index exists and its dimension fits the trained model."""
    train = read_json(stage_dir(cfg, "train") / "manifest.json", "Rebuild it with `knnd run train --force`.")
    index_dir = Path(cfg.sample.index or stage_dir(cfg, "index"))
    infos_path = index_dir / "index_infos.json"
    if not infos_path.exists():
        raise UsageError(f"sample.index {index_dir} is not an index directory (no index_infos.json): "
                         f"build one with `knnd run index`")
    d, model = read_json(infos_path)["d"], train["model_config"]
    if d != model["clip_dim"]:
        raise UsageError(dimension_mismatch(stage_dir(cfg, "train") / train["checkpoint"], model["clip_dim"], index_dir, d))
    if cfg.sample.k > model["k"]:
        raise UsageError(f"sample.k ({cfg.sample.k}) exceeds the {model['k']} neighbours the model was trained with: "
                         f"lower sample.k")


def run(stage: StageRun) -> dict:
    conf = stage.conf
    request = request_from_config(conf)
    request.validate()
    train_dir = stage.input_dirs["train"]
    checkpoint = train_dir / stage.inputs["train"]["checkpoint"]
    index_dir = Path(conf.index) if conf.index else stage.input_dirs["index"]
    stage.plan(len(request.prompts))
    done = {p for p in range(len(request.prompts)) if stage.shard_done(p)}
    if len(done) < len(request.prompts):
        sampler = Sampler(checkpoint, index_dir, stage.device())
        progress = stage.progress(len(request.prompts), unit="images")

        def finished(p, records):
            stage.mark_done(p, {"records": records})  # the prompt's PNGs are in place
            progress.update(1, len(records))

        generate(sampler, request, stage.dir, done=finished, skip=done)
    stats = stage.done_stats()
    records = [r for p in range(len(request.prompts)) for r in stats[p]["records"]]
    write_records(stage.dir, records)
    grid = write_grid(stage.dir, records, request.prompts, request.images_per_prompt)
    print(f"sample: grid: {grid}")
    return {
        "items": len(records),
        "counts": {"prompts": len(request.prompts), "images": len(records)},
        "grid": "grid.png",
        "samples": "samples.jsonl",
        "images": [r["image"] for r in records],
        "request": asdict(request),
        "index_dir": str(index_dir.resolve()),
        "checkpoint": str(checkpoint.resolve()),
    }

