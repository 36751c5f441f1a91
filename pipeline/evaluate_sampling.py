"""evaluate's sampling, batch by batch, resumable: the longest part of an evaluation survives a kill.

Each batch of samples is saved under `<out>/.sampling/` as it is drawn. A re-run with the same
condition (checkpoint, prompts, neighbours, noise seeds, sampler, guidance, batch size) loads the
saved batches and draws only the rest; every image comes from its own seeded generator, so the
result is the uninterrupted run's, bit for bit. Any other condition starts the folder afresh. The
evaluation deletes the folder once samples.npz is written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.files import atomic_path, write_json
from pipeline.runner import Progress

PARTIAL = ".sampling"


def noise_seed(seed: int, prompt: int, image: int) -> int:
    return int(np.random.SeedSequence([seed, prompt, image]).generate_state(1, np.uint32)[0])


def generate(sampler, prompts: list[str], setup, conf) -> dict:
    """Sample every prompt: {images uint8 [P*n, H, W, 3], prompt_of [P*n], rows [P, k], sims [P, k]}.
    Image j of prompt p starts from its own noise (noise_seed(seed, p, j)): samples are independent
    draws, and the same for every checkpoint and index evaluated with the same seed."""
    import torch

    from model import diffusion

    k = 0 if setup.no_knn else setup.k
    sampler.check_k(k)
    emb, mask, rows, sims = sampler.conditions(prompts, k, neighbours_only=setup.neighbours_only and k > 0,
                                               where=setup.where if k > 0 else None)
    n = conf.images_per_prompt
    prompt_of = np.repeat(np.arange(len(prompts)), n)
    seeds = [noise_seed(conf.seed, p, j) for p in range(len(prompts)) for j in range(n)]
    starts = range(0, len(prompt_of), conf.batch_size)
    saved = SavedBatches(Path(setup.out), sampling_key(sampler.checkpoint, emb, mask, seeds, conf,
                                                       str(getattr(sampler, "device", ""))))
    if done := saved.count(len(starts)):
        print(f"evaluate: resuming: {done} of {len(starts)} batches were sampled before", file=sys.stderr)
    out, progress = [], Progress("evaluate", len(starts), done=done, unit="images", parts="batches")
    for b, s in enumerate(starts):
        images = saved.get(b)
        if images is None:
            sel = prompt_of[s:s + conf.batch_size]
            generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[s:s + conf.batch_size]]
            images = diffusion.sample(sampler.model, torch.from_numpy(emb[sel]), steps=conf.steps, guidance=conf.guidance,
                                      generator=generators, neighbour_mask=torch.from_numpy(mask[sel]),
                                      scheduler=conf.scheduler, neighbour_guidance=conf.neighbour_guidance)
            saved.put(b, images)
            progress.update(shards=1, items=len(sel))
        out.append(images)
    return {"images": np.concatenate(out), "prompt_of": prompt_of, "rows": rows, "sims": sims,
            "seconds": round(sum(saved.seconds.values()), 1)}  # sampling time, a resumed run's included


def sampling_key(checkpoint: Path, emb: np.ndarray, mask: np.ndarray, seeds: list[int], conf, device: str = "") -> str:
    """What the saved batches depend on. The checkpoint by path, size and mtime: hashing a large file
    on every run would cost more than a batch. The device too: a GPU's batches are not a CPU's bits."""
    stat = Path(checkpoint).resolve().stat()
    h = hashlib.sha256(json.dumps([str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns, seeds, conf.steps,
                                   conf.guidance, conf.scheduler, conf.neighbour_guidance, conf.batch_size,
                                   device]).encode())
    for array in (emb, mask):
        h.update(str((array.dtype, array.shape)).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class SavedBatches:
    """<out>/.sampling/: key.json and one b<batch>.npy per finished batch, each renamed into place."""

    def __init__(self, out: Path, key: str):
        self.dir = out / PARTIAL
        self.key, key_file = key, self.dir / "key.json"
        try:
            previous = json.loads(key_file.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: nothing saved can be trusted
            previous = None
        if previous is None or previous.get("key") != key:
            shutil.rmtree(self.dir, ignore_errors=True)  # another condition's batches (or none): start afresh
            previous = {"seconds": {}}
            write_json(key_file, {"key": key, **previous})
        self.seconds: dict[str, float] = previous["seconds"]  # batch -> seconds it took to sample
        self.started = time.time()

    def path(self, batch: int) -> Path:
        return self.dir / f"b{batch:06d}.npy"

    def count(self, batches: int) -> int:
        return sum(self.path(b).exists() for b in range(batches))

    def get(self, batch: int) -> np.ndarray | None:
        path = self.path(batch)
        if not path.exists():
            return None
        try:
            images = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # cut short (a crash of the machine): drawn again, same seeds
            path.unlink(missing_ok=True)
            return None
        self.started = time.time()  # a loaded batch costs no sampling time
        return images

    def put(self, batch: int, images: np.ndarray) -> None:
        with atomic_path(self.path(batch), fsync=True) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
        self.seconds[str(batch)] = round(time.time() - self.started, 3)
        self.started = time.time()
        write_json(self.dir / "key.json", {"key": self.key, "seconds": self.seconds})


def drop(out: Path) -> None:
    """Once samples.npz holds every sample, the batches are not needed."""
    shutil.rmtree(Path(out) / PARTIAL, ignore_errors=True)
