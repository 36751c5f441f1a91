"""What the GPU checks share: the run's context, a failing expectation that says what failed, a
synthetic pack (so the script needs no demo pack), and a stand-in for Ray where it is not installed."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Context:
    """One run: where its files go, the fresh work folder, the training budget and the earlier checks' results."""
    out: Path                 # what comes back (gpu_check.json, metrics.jsonl, step_XXXXXXX.pt)
    work: Path                # a fresh temporary folder of this run: nothing resumes from an earlier run
    pack_dir: Path | None     # --pack; None: a synthetic pack written into `work` on first use
    steps: int = 17000
    seconds: float = 60.0
    keep: tuple[int, ...] = (200, 2000, 6000)
    results: dict = field(default_factory=dict)  # check name -> its entry in gpu_check.json

    def pack(self) -> Path:
        """--pack, or a synthetic one (16 px, k = 10, d = 64) written once per run."""
        if self.pack_dir is None:
            self.pack_dir = synthetic_pack(self.work / "pack", n=512, resolution=16, k=10, d=64)
        return self.pack_dir


def expect(ok: bool, what: str) -> None:
    """An AssertionError saying `what` was expected (not stripped by python -O, unlike assert)."""
    if not ok:
        raise AssertionError(f"expected {what}")


def synthetic_images(n: int, resolution: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, resolution, resolution, 3]: a colour per image times two gradients (smooth, so a VQ learns them)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.5, 1.0, resolution, dtype=np.float32)
    shade = ramp[None, :, None, None] * ramp[None, None, :, None]
    return (rng.uniform(0, 255, (n, 1, 1, 3)) * shade).astype(np.uint8)


def synthetic_pack(folder: Path, n: int, resolution: int, k: int, d: int, shards: int = 2) -> Path:
    """A pack folder like the pack stage's: tar shards of (key, image, emb, nbr) and a manifest.json
    with image_size, d, k, items and shards; random unit vectors for the conditions."""
    from model.data import write_pack_shard

    folder.mkdir(parents=True, exist_ok=True)
    images = synthetic_images(n, resolution)
    cond = np.random.default_rng(1).standard_normal((n, k + 1, d)).astype(np.float32)
    cond = (cond / np.linalg.norm(cond, axis=2, keepdims=True)).astype(np.float16)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    entries = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        name = f"{i:05d}.tar"
        write_pack_shard(folder / name, ({"key": f"{j:09d}", "image": images[j], "emb": cond[j, 0], "nbr": cond[j, 1:]}
                                         for j in range(start, stop)))
        entries.append({"tar": name, "samples": int(stop - start)})
    manifest = {"image_size": resolution, "d": d, "k": k, "items": n, "shards": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return folder


def pack_shards(pack: Path) -> tuple[dict, list[str]]:
    """(manifest, absolute paths of its non-empty shards): what the train stage hands the trainer."""
    manifest = json.loads((pack / "manifest.json").read_text())
    return manifest, [str((pack / s["tar"]).resolve()) for s in manifest["shards"] if s["samples"]]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [n, d] arrays (computed in float32)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@contextlib.contextmanager
def importable_ray():
    """`import ray` succeeds inside the block: Ray itself, or (where it is not installed, as on the GPU
    machine's image) a bare module. ClipEncoder.load imports it for the actors' hand-off of the
    expected transform, which an encoder run in this process does not use. Yields which one it was."""
    if importlib.util.find_spec("ray") is not None:
        yield "ray"
        return
    sys.modules["ray"] = types.ModuleType("ray")
    try:
        yield "a stand-in module (ray is not installed)"
    finally:
        sys.modules.pop("ray", None)
