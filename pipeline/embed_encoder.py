"""The embed stage's model side: ClipEncoder (one per GPU, or one on CPU) and how chunks are dealt to them.

An encoder actor starts in two steps, so the decode workers need not wait for the weights:
`describe()` imports open_clip and builds the model on torch's meta device (its transform, dim and
name, no weights), then `load()` builds the real model and checks that its transform is the one
`describe` gave the decode workers. Chunks of decoded pixels reach the encoders as object refs
straight from the decode tasks; the driver only ever fetches the encoders' results (embeddings and
the chunk's metadata, never pixels).
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.cluster import node_id
from pipeline.runner import StageError, UsageError

META_COLUMNS = ("key", "url", "caption", "width", "height", "phash")  # + download's extra columns


class ClipEncoder:
    """The GPU/CPU work: `__call__(chunk) -> embeddings`, the same in a plain loop or as a Ray actor.

    Takes uint8 pixels that already went through the model's PIL transforms; applies the tensor
    part (ToTensor + Normalize) here. `load=False` (the stage's actors) defers the model to `load()`.
    """

    def __init__(self, model: str, pretrained: str | None, device: str, batch_size: int, text: bool = False,
                 load: bool = True):
        self.model, self.pretrained, self.device = model, pretrained, device
        self.batch_size, self.text = batch_size, text
        self.bundle, self.error, self.described = None, None, None
        self.node = node_id()
        if load:
            self.load()

    def describe(self) -> dict:
        """The model's transform, dim and name from its config alone (no weights): what decoding needs."""
        from model.clip import clip_preprocess

        preprocess, dim, name, size = clip_preprocess(self.model, self.pretrained)
        self.described = _info(preprocess, dim, name, size) | {"at": time.time()}  # decoding can start now
        return self.described

    def load(self, expected: list | None = None) -> float:
        """Build the model; the wall-clock time it was ready. `expected`: [describe()'s ref] of the actor
        whose transform the decode workers use, checked against this model's (a mismatch stops encoding)."""
        import ray
        import torch

        from model.clip import load_clip

        try:
            # no global state changed (grad mode, RNG): a test may run an encoder in its own process;
            # encode_images runs under inference_mode
            with torch.random.fork_rng(devices=[]):
                if self.pretrained is None:
                    torch.manual_seed(0)  # random init (tests) must be the same model in every process and run
                self.bundle = load_clip(self.model, self.pretrained, self.device)
            self.pil_stage, mean, std = split_transform(self.bundle.preprocess)
            # on the encoder's device: the uint8 batch goes there as it is (a quarter of float32's bytes)
            # and is normalised there, not on the actor's one CPU thread while a GPU waits
            self.mean = torch.tensor(mean, device=self.bundle.device).view(1, 3, 1, 1)
            self.std = torch.tensor(std, device=self.bundle.device).view(1, 3, 1, 1)
            want = ray.get(expected[0]) if expected else self.described
            have = self.info()
            if want is not None and (repr(want["pil_transform"]), want["dim"]) != (repr(have["pil_transform"]), have["dim"]):
                raise StageError(f"embed: the loaded model's transform {have['pil_transform']!r} (dim {have['dim']}) differs "
                                 f"from the one read from its config {want['pil_transform']!r} (dim {want['dim']}), "
                                 f"which the decode workers used: report this with embed.model={self.model}")
        except Exception as e:  # noqa: BLE001 - every later encode call must fail with it, not encode
            self.error = str(e)
            raise
        return time.time()

    def info(self) -> dict:
        return _info(self.bundle.preprocess, self.bundle.embed_dim, self.bundle.name, self.bundle.image_size)

    def encode(self, chunk: dict) -> dict:
        """A decoded chunk -> its embeddings and its metadata (no pixels), for the driver (Ray actor method)."""
        if self.error is not None or self.bundle is None:
            raise StageError(f"the encoder did not load embed.model={self.model}: {self.error}")
        result = self(chunk)
        result["meta"] = {c: v for c, v in chunk.items() if c not in ("pixels", "failed", "node")}
        result |= {"failed": chunk["failed"], "decode_node": chunk.get("node", ""), "encode_node": self.node}
        return result

    def __call__(self, chunk: dict) -> dict:
        import torch

        from model.clip import encode_images, encode_texts

        pixels = torch.from_numpy(np.array(chunk["pixels"]))  # Ray hands over a read-only buffer
        out = []
        for start in range(0, len(pixels), self.batch_size):
            x = pixels[start:start + self.batch_size].to(self.bundle.device).permute(0, 3, 1, 2).float().div_(255)
            out.append(encode_images(self.bundle, (x - self.mean) / self.std))
        result = {"img": _stack(out, self.bundle.embed_dim)}
        if self.text:
            captions = [c or "" for c in chunk["caption"]]
            texts = [encode_texts(self.bundle, captions[s:s + self.batch_size]) for s in range(0, len(captions), self.batch_size)]
            result["text"] = _stack(texts, self.bundle.embed_dim)
        return result


def _info(preprocess, dim: int, name: str, image_size: int) -> dict:
    from model.imageops import PilTransform

    pil_stage = split_transform(preprocess)[0]
    # a torch-free copy when it can replay the steps, so decode workers need not import torch
    return {"dim": dim, "name": name, "pil_transform": PilTransform.from_torchvision(pil_stage) or pil_stage,
            "image_size": image_size}


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)).astype(np.float16)


def split_transform(preprocess):
    """Split an open_clip val transform into its PIL part and the (mean, std) of its tensor part.

    open_clip's transform is [PIL resizes/crops/mode, (Maybe)ToTensor, Normalize]; the PIL part
    runs in the decode workers, the rest (a divide and a normalise) on the model's side.
    """
    from torchvision import transforms as T

    steps = list(preprocess.transforms)
    names = [type(t).__name__ for t in steps]
    if len(steps) < 2 or not names[-2].endswith("ToTensor") or not isinstance(steps[-1], T.Normalize):
        raise ValueError(f"unexpected preprocess layout {names}: expected PIL transforms, ToTensor, Normalize")
    normalize = steps[-1]
    return T.Compose(steps[:-2]), list(normalize.mean), list(normalize.std)


# --------------------------------------------------------------------------- the actors


def encoder_count(setting: str | int, device: str) -> int:
    """`embed.encoders`: a number, or "auto" = one per GPU Ray offers (its whole cluster with
    `ray.address`) on cuda, one on CPU; every encoder also takes a CPU and one must be left for decoding."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    n = (max(1, min(gpus, cpus - 1)) if device == "cuda" else 1) if setting == "auto" else int(setting)
    if device == "cuda" and n > gpus:  # an actor asking for a GPU Ray does not have would wait forever
        raise UsageError(f"embed.encoders={setting} needs {n} GPU{'s' if n != 1 else ''} on cuda (one per encoder), "
                         f"but Ray offers {gpus}: lower embed.encoders, or set device=cpu")
    if n + 1 > cpus:
        raise UsageError(f"embed.encoders={n} takes {n} of Ray's {cpus} CPU{'s' if cpus != 1 else ''} (one per encoder) "
                         f"and leaves none for decoding: lower embed.encoders or give Ray more CPUs (ray.num_cpus)")
    return n


def start_encoders(conf, model: str, pretrained: str | None, device: str, n: int, load: bool = True):
    """Start `n` encoder actors without waiting for them: (actors, ref of describe(), refs of load())."""
    import ray

    cls = ray.remote(ClipEncoder).options(num_gpus=1 if device == "cuda" else 0, num_cpus=1)
    actors = [cls.remote(model, pretrained, device, conf.batch_size, conf.text, load=False) for _ in range(n)]
    info = actors[0].describe.remote()
    loaded = [a.load.remote([info]) for a in actors] if load else []  # [info]: not awaited before loading
    return actors, info, loaded


class LeastLoaded:
    """Deal chunks to the encoder with the fewest unfinished chunks (the one that is ahead)."""

    def __init__(self, actors: list):
        self.actors, self.pending, self.dealt = actors, [[] for _ in actors], [0] * len(actors)

    def submit(self, chunk_ref):
        import ray

        if len(self.actors) > 1:
            self.pending = [ray.wait(p, num_returns=len(p), timeout=0, fetch_local=False)[1] if p else p
                            for p in self.pending]
        i = min(range(len(self.actors)), key=lambda j: len(self.pending[j]))
        ref = self.actors[i].encode.remote(chunk_ref)
        self.pending[i].append(ref)
        self.dealt[i] += 1
        return ref
