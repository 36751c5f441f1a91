"""Sampling as a library: a request, the loaded sampler, and sampling into a folder.

For a prompt t: f_txt(t) from the CLIP that embedded the index's images, its k nearest images in
the index, and the condition y = (f_txt(t), d_1 .. d_k) built from their stored image embeddings;
then the denoiser's EMA weights sample with classifier-free guidance. Any index directory built
by this pipeline will do: that is database swapping. The sample stage, `knnd sample`, `knnd
evaluate` and the demo all sample through here.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_SCHEDULER
from pipeline.files import StageError, UsageError
from pipeline.runner import resolve_device
from pipeline.grids import slugs, write_grid, write_images, write_records


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
    allow_other_clip: bool = False  # sample against an index of another CLIP (same dimension)
    where: str | None = None  # neighbours only among images whose metadata satisfies this filter
    unconditional: int = 0  # RDM's unconditional mode: this many random database embeddings as the queries
    scheduler: str = DEFAULT_SCHEDULER  # or ddpm (ancestral) or ddim (config.SCHEDULERS)
    neighbour_guidance: float | None = None  # None: the neighbours are guided with `guidance` (diffusion.guided_output)
    query_rows: list[int] | None = None  # (filled by Sampler.pseudo_queries) the index rows behind the prompts

    def validate(self) -> None:
        if self.unconditional < 0:
            raise UsageError(f"--unconditional must be at least 1, got {self.unconditional}")
        if self.unconditional and (self.no_knn or self.init_image):
            raise UsageError("--unconditional samples from database embeddings and their neighbours: "
                             "it excludes --no-knn and --init-image")
        if not self.prompts and not self.unconditional:
            raise UsageError("no prompts: give some on the command line or set sample.prompts")
        for name, low in (("k", 0), ("steps", 1), ("images_per_prompt", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.no_knn and self.neighbours_only:
            raise UsageError("--no-knn and --neighbours-only exclude each other: the first drops the neighbours, "
                             "the second the text")
        for name in ("guidance", "neighbour_guidance"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):  # nan passes `< 0`
                raise UsageError(f"{name} must be a finite number of at least 0, got {value}")
        if self.neighbour_guidance is not None and (self.no_knn or self.neighbours_only):
            raise UsageError("--neighbour-guidance (sample.neighbour_guidance) scales what the neighbours add to the "
                             "text: it needs both, so it excludes --no-knn and --neighbours-only; unset it for them")
        if self.init_image is not None:
            if not Path(self.init_image).is_file():
                raise UsageError(f"--init-image {self.init_image} does not exist: give an image file")
            if not 0 < self.strength <= 1:
                raise UsageError(f"--strength must be in (0, 1], got {self.strength}")


class Sampler:
    """Loaded once: the denoiser (EMA weights), the index and the CLIP that embedded its images.

    `__call__(prompt, request)` -> (uint8 images [n, H, W, 3], one record per image); an optional
    `progress(done, total)` is called after each denoising step.
    """

    def __init__(self, checkpoint: Path, index_dir: Path, device: str, allow_other_clip: bool = False,
                 manipulation: bool = False):
        """manipulation: the checkpoint must be a local-manipulation model (`knnd edit`), else a text-to-image one."""
        from model.checkpoint import checkpoint_clip, load_model
        from pipeline.index_files import check_same_clip
        from pipeline.retrieval import Retriever

        self.device = device
        self.checkpoint, self.index_dir = Path(checkpoint), Path(index_dir)
        try:
            self.model = load_model(self.checkpoint, use_ema=True, device=device)
        except ValueError as e:  # names the file: damaged, foreign or not weights-only
            raise StageError(str(e)) from None
        self.config = self.model.config
        check_model_kind(self.checkpoint, self.config.manipulation, manipulation)
        self.retriever = Retriever(self.index_dir, queries="text")
        if self.retriever.dim != self.config.clip_dim:
            raise UsageError(dimension_mismatch(self.checkpoint, self.config.clip_dim, self.index_dir, self.retriever.dim))
        check_same_clip(checkpoint_clip(self.checkpoint), self.retriever.infos.get("clip"), self.checkpoint,
                        self.index_dir, allow_other_clip)
        self.clip = load_index_clip(self.retriever.infos, self.index_dir, device)
        self.retriever.check_dim(self.clip.embed_dim, f"the CLIP model {self.clip.name}")

    def check_k(self, k: int) -> None:
        if k > self.config.k:
            raise UsageError(f"k={k} exceeds the {self.config.k} neighbours the model {self.checkpoint} was trained with: "
                             f"use -k {self.config.k} or fewer")
        n = self.retriever.infos.get("n")
        if n is not None and k > n:
            raise UsageError(f"k={k} exceeds the {n} images in the index {self.index_dir}: lower -k")

    def pseudo_queries(self, request: SampleRequest) -> SampleRequest:
        """RDM's unconditional mode: `request.unconditional` random indexed images (seeded by
        request.seed) become the queries; their labels replace the prompts."""
        if not request.unconditional:
            return request
        import dataclasses

        indexed = self.retriever.index_rows()
        rows = np.random.default_rng(request.seed).choice(indexed, size=request.unconditional,
                                                          replace=request.unconditional > len(indexed))
        labels = [f"pseudo-query {key}" for key, _ in self.retriever.describe(rows)]
        return dataclasses.replace(request, prompts=labels, query_rows=[int(r) for r in rows])

    def condition(self, prompt: str, request: SampleRequest, reference: np.ndarray | None, query_row: int | None = None):
        """(emb float32 [1, 1 + n, d], record fields): f_txt(t) (or a database image's embedding), then
        the reference, then neighbours."""
        from model.clip import encode_texts

        if query_row is None:
            text = encode_texts(self.clip, [prompt])
        else:  # a pseudo-query: the image's own embedding; its neighbours exclude itself
            text = self.retriever.embeddings[[query_row]].astype(np.float32)
        k = 0 if request.no_knn else request.k
        record = {"neighbour_keys": [], "neighbour_captions": [], "similarities": []}
        slots = [text]
        if k:
            sims, rows = self.retriever.search(text, k + (query_row is not None), where=request.where)
            sims, rows = sims[0], rows[0]
            if query_row is not None:
                sims, rows = sims[rows != query_row][:k], rows[rows != query_row][:k]
            keep = rows >= 0
            sims, rows = sims[keep], rows[keep]
            if reference is not None:  # the paper's editing condition: (f_txt, f_img(ref), d_2 .. d_k)
                sims, rows = sims[1:k], rows[1:k]
            described = self.retriever.describe(rows)
            record = {"neighbour_keys": [key for key, _ in described],
                      "neighbour_captions": [caption for _, caption in described],
                      "similarities": [round(float(s), 6) for s in sims]}
            slots.append(self.retriever.embeddings[rows].astype(np.float32))
        if reference is not None:
            slots.insert(1, reference)
        return np.concatenate(slots)[None], record

    def conditions(self, prompts: list[str], k: int, neighbours_only: bool = False, where: str | None = None):
        """Many prompts at once, for evaluation: (emb float32 [P, 1 + k, d], slot mask bool [P, 1 + k]
        (False where the index returned fewer than k), retrieved rows int64 [P, k] (-1: none),
        similarities float32 [P, k]). k = 0 conditions on the text embeddings alone; neighbours_only
        masks the text's slot, so the retrieved images alone condition the model (as RDM samples);
        `where` keeps the neighbours to images whose metadata satisfies that filter."""
        from model.clip import encode_texts

        texts = encode_texts(self.clip, prompts)
        if k == 0:
            return texts[:, None, :], np.ones((len(prompts), 1), bool), np.zeros((len(prompts), 0), np.int64), \
                np.zeros((len(prompts), 0), np.float32)
        sims, rows = self.retriever.search(texts, k, where=where)
        found = rows >= 0
        any_row = self.retriever.index_rows()[0]  # a placeholder for missing neighbours (masked out)
        neighbours = self.retriever.embeddings[np.where(found, rows, any_row).ravel()].astype(np.float32)
        neighbours = neighbours.reshape(len(prompts), k, -1) * found[..., None]
        emb = np.concatenate([texts[:, None, :], neighbours], axis=1)
        mask = np.concatenate([np.full((len(prompts), 1), not neighbours_only), found], axis=1)
        return emb, mask, rows, sims.astype(np.float32)

    def __call__(self, prompt: str, request: SampleRequest, progress=None,
                 query_row: int | None = None) -> tuple[np.ndarray, list[dict]]:
        import torch

        from model import diffusion

        reference = init_pixels = None
        if request.init_image is not None:
            reference = reference_embedding(self.clip, request.init_image)
            init_pixels = load_reference(request.init_image, self.config.resolution)
        emb, record = self.condition(prompt, request, reference, query_row)
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
                                  neighbour_mask=mask, progress=progress, scheduler=request.scheduler,
                                  neighbour_guidance=request.neighbour_guidance)
        records = []
        for i in range(n):
            records.append({"prompt": prompt, "index_in_prompt": i, "seed": request.seed + i,
                            "guidance": request.guidance, "neighbour_guidance": request.neighbour_guidance,
                            "steps": request.steps, "scheduler": request.scheduler,
                            "k": len(record["neighbour_keys"]), "no_knn": request.no_knn,
                            "neighbours_only": request.neighbours_only, **record,
                            "init_image": str(Path(request.init_image).resolve()) if request.init_image else None,
                            "strength": request.strength if request.init_image else None,
                            "index_dir": str(self.index_dir.resolve()), "checkpoint": str(self.checkpoint.resolve())})
        return images, records


def check_model_kind(checkpoint: Path, is_manipulation: bool, wanted: bool) -> None:
    """A text-to-image checkpoint cannot edit, and a local-manipulation one cannot sample from text alone."""
    if is_manipulation and not wanted:
        raise UsageError(f"{checkpoint} was trained for local manipulation (train.mode=manipulate): it edits images, "
                         f"with `knnd edit IMAGE \"edit text\" --checkpoint {checkpoint}`; sample from a checkpoint "
                         f"trained with train.mode=generate")
    if wanted and not is_manipulation:
        raise UsageError(f"{checkpoint} is a text-to-image model (train.mode=generate): `knnd edit` needs a checkpoint "
                         f"trained with train.mode=manipulate on a pack built with pack.manipulation=true")


def dimension_mismatch(checkpoint: Path, model_dim: int, index_dir: Path, index_dim: int) -> str:
    return (f"the model {checkpoint} was trained on {model_dim}-dimensional CLIP embeddings but the index {index_dir} "
            f"holds {index_dim}-dimensional ones: use an index built with the CLIP model the training data was embedded with")


def load_index_clip(infos: dict, index_dir: Path, device: str):
    """The CLIP named in the index infos (the embed stage's), on `device`.

    A random-init CLIP (embed.pretrained null, tests) is rebuilt from the seed the embed stage used.
    """
    from model.clip import load_clip_spec

    spec = infos.get("model") or {}
    model, pretrained = spec.get("model"), spec.get("pretrained")
    try:
        return load_clip_spec({"model": model, "pretrained": pretrained}, device)  # seed 0 as pipeline.embed.ClipEncoder
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        raise UsageError(f"the index {index_dir} was built from embeddings of CLIP {model!r} (pretrained {pretrained!r}), "
                         f"which cannot be loaded here ({e}): build the index with an open_clip model") from None


def reference_embedding(bundle, path: str, what: str = "--init-image") -> np.ndarray:
    """f_img(reference): float32 [1, d], through the CLIP's own preprocessing (decompression-bomb guarded)."""
    from PIL import Image

    from model.clip import encode_images, preprocess_images
    from pipeline.shards import open_image

    try:
        with open_image(path) as im:
            im.load()
            return encode_images(bundle, preprocess_images(bundle, [im]))
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise UsageError(f"{what} {path} cannot be read as an image ({e})") from None


def load_reference(path: str, size: int, what: str = "--init-image") -> np.ndarray:
    """The reference as uint8 [size, size, 3], resized exactly as the pack stage resizes training images."""
    from PIL import Image

    from pipeline.shards import load_image

    try:
        return load_image(Path(path), size)
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise UsageError(f"{what} {path} cannot be read as an image ({e})") from None


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
    folder = Path(cfg.workdir) / "train" / "checkpoints"
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
        images, prompt_records = sampler(prompt, request,
                                         query_row=request.query_rows[p] if request.query_rows else None)
        for record in prompt_records:
            record["prompt_index"] = p
        write_images(out, slug, images, prompt_records)
        print(f"sample: {prompt!r} -> {', '.join(r['image'] for r in prompt_records)}", file=sys.stderr)
        if done is not None:
            done(p, prompt_records)
        records += prompt_records
    return records


def request_from_config(conf) -> SampleRequest:
    """The sample: section as a request (the stage's, and the demo's swapped-index sampling)."""
    return SampleRequest(prompts=list(conf.prompts), k=conf.k, guidance=conf.guidance, steps=conf.steps,
                         seed=conf.seed, images_per_prompt=conf.images_per_prompt, scheduler=conf.scheduler,
                         neighbour_guidance=conf.neighbour_guidance)


def sample_into(cfg, request: SampleRequest, checkpoint: str | None = None, index: str | None = None,
                out: str | None = None) -> Path:
    """Sample `request` with a checkpoint (default: the latest of this workdir) against an index
    (default: sample.index, else this workdir's); writes images, samples.jsonl and grid.png into
    `out`, by default a new <workdir>/sample_cli/<YYYYmmdd-HHMMSS>[-N]/ (earlier calls' are kept).
    Returns the folder."""
    request.validate()
    sampler = Sampler(resolve_checkpoint(cfg, checkpoint), Path(index or cfg.sample.index or Path(cfg.workdir) / "index"),
                      resolve_device(cfg), request.allow_other_clip)
    folder = Path(out) if out else new_folder(Path(cfg.workdir) / "sample_cli")
    request = sampler.pseudo_queries(request)  # --unconditional: database images become the prompts
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


