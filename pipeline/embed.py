"""embed stage: download shards -> CLIP image embeddings and metadata (clip-retrieval layout).

Per shard: `embed/img_emb/img_emb_{shard:05d}.npy` (float16, L2-normalised, [n, d]) and
`embed/metadata/metadata_{shard:05d}.parquet` row-aligned with it (key, row, shard, url,
caption, width, height, phash); with `embed.text: true` also `embed/text_emb/` caption embeddings.

Decoding runs in Ray tasks on CPU workers (the model's own PIL transforms, perceptual hash),
streaming uint8 chunks to one encoder actor, so the model never waits on JPEG decoding. The
rows are global positions in shard order, known only once every shard's size is: a shard
first writes its embeddings and a row-less metadata file under `_run/`, and the final pass
numbers the rows (idempotent, so a kill during it is harmless).
"""
from __future__ import annotations

import collections
import json
import tarfile
from pathlib import Path

import numpy as np

from pipeline.cluster import work_device
from pipeline.embeddings import shard_files
from pipeline.runner import RunClock, StageError, StageRun, atomic_path, auto_count, ensure_ray
from pipeline.shards import corrupt_message, image_bytes, iter_tar_samples, open_image


# --------------------------------------------------------------------------- decoding


def decode_sample(parts: dict, pil_transform, phash_size: int):
    """Bytes of one sample -> (uint8 pixels after the model's PIL transforms, width, height, phash hex)."""
    import imagehash

    from model.imageops import flatten_alpha

    data = image_bytes(parts)
    if data is None:
        raise ValueError("no image in sample")
    with open_image(data) as im:
        image = flatten_alpha(im)
    phash = str(imagehash.phash(image, hash_size=phash_size))
    pixels = np.asarray(pil_transform(image), dtype=np.uint8)
    return pixels, image.width, image.height, phash


def decode_chunks(tar_path: str, pil_transform, phash_size: int, chunk_size: int, expected: int | None = None,
                  extra: tuple = ()):
    """Decode a shard into chunks of at most `chunk_size` samples (dicts of columns).

    `expected` is the number of samples the downloader wrote: tarfile reads an archive cut at a
    member boundary without complaint, so a shorter shard is reported as truncated."""
    from PIL import Image

    chunk, seen = _empty_chunk(extra), 0
    try:
        for key, parts in iter_tar_samples(tar_path):
            seen += 1
            meta = json.loads(parts.get("json", b"{}") or b"{}")
            try:
                pixels, width, height, phash = decode_sample(parts, pil_transform, phash_size)
            except Image.DecompressionBombError:
                chunk["failed"]["too_large"] += 1
                continue
            except Exception:  # noqa: BLE001 - any undecodable sample is counted and skipped
                chunk["failed"]["undecodable"] += 1
                continue
            chunk["key"].append(key)
            chunk["url"].append(meta.get("url"))
            for name in extra:  # URL-list columns img2dataset saved in the sample's json
                chunk[name].append(meta.get(name))
            chunk["caption"].append(parts["txt"].decode("utf-8") if "txt" in parts else meta.get("caption"))
            chunk["width"].append(width)
            chunk["height"].append(height)
            chunk["phash"].append(phash)
            chunk["pixels"].append(pixels)
            if len(chunk["key"]) == chunk_size:
                yield _finish_chunk(chunk)
                chunk = _empty_chunk(extra)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise StageError(corrupt_message(tar_path, str(e))) from None
    if expected is not None and seen != expected:
        raise StageError(corrupt_message(tar_path, f"{seen} samples, the download manifest says {expected}"))
    yield _finish_chunk(chunk)


def _empty_chunk(extra: tuple = ()) -> dict:
    chunk = {c: [] for c in ("key", "url", "caption", "width", "height", "phash", "pixels", *extra)}
    chunk["failed"] = collections.Counter()
    return chunk


def _finish_chunk(chunk: dict) -> dict:
    chunk["pixels"] = np.stack(chunk["pixels"]) if chunk["pixels"] else np.zeros((0, 1, 1, 3), np.uint8)
    chunk["failed"] = dict(chunk["failed"])
    return chunk


# --------------------------------------------------------------------------- the model


class ClipEncoder:
    """The GPU/CPU work: loaded once in __init__, then `__call__(chunk) -> embeddings`.

    Runs the same in a plain loop or as a Ray actor. Takes uint8 pixels that already went
    through the model's PIL transforms; applies the tensor part (ToTensor + Normalize) here.
    """

    def __init__(self, model: str, pretrained: str | None, device: str, batch_size: int, text: bool = False):
        import torch

        from model.clip import load_clip

        torch.set_grad_enabled(False)
        if pretrained is None:
            torch.manual_seed(0)  # random init (tests) must be the same model in every process and run
        self.bundle = load_clip(model, pretrained, device)
        self.batch_size, self.text = batch_size, text
        self.pil_stage, mean, std = split_transform(self.bundle.preprocess)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def info(self) -> dict:
        from model.imageops import PilTransform

        # a torch-free copy when it can replay the steps, so decode workers need not import torch
        pil = PilTransform.from_torchvision(self.pil_stage) or self.pil_stage
        return {"dim": self.bundle.embed_dim, "name": self.bundle.name, "pil_transform": pil,
                "image_size": self.bundle.image_size}

    def encode(self, chunk: dict) -> dict:  # Ray actors expose named methods, not __call__
        return self(chunk)

    def __call__(self, chunk: dict) -> dict:
        import torch

        from model.clip import encode_images, encode_texts

        pixels = torch.from_numpy(np.array(chunk["pixels"]))  # Ray hands over a read-only buffer
        out = []
        for start in range(0, len(pixels), self.batch_size):
            x = pixels[start:start + self.batch_size].permute(0, 3, 1, 2).float().div_(255)
            out.append(encode_images(self.bundle, (x - self.mean) / self.std))
        result = {"img": _stack(out, self.bundle.embed_dim)}
        if self.text:
            captions = [c or "" for c in chunk["caption"]]
            texts = [encode_texts(self.bundle, captions[s:s + self.batch_size]) for s in range(0, len(captions), self.batch_size)]
            result["text"] = _stack(texts, self.bundle.embed_dim)
        return result


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


# --------------------------------------------------------------------------- the stage


def check(cfg) -> None:
    from pipeline.runner import UsageError

    conf = cfg.embed
    if conf.model.endswith(".json") and not Path(conf.model).exists():
        raise UsageError(f"embed.model {conf.model} does not exist: give an open_clip model name or an existing config JSON")
    if conf.pretrained and ("/" in conf.pretrained or conf.pretrained.endswith((".pt", ".bin", ".safetensors"))) \
            and not Path(conf.pretrained).exists():
        raise UsageError(f"embed.pretrained {conf.pretrained} does not exist: give an open_clip tag, a checkpoint path, or null")
    if cfg.ray.address:
        work_device(cfg)  # device cuda on a cluster without GPUs: refused now, not an encoder waiting forever


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def decode_worker_count(decode_workers: str | int, shard_bytes: int) -> int:
    """`embed.decode_workers`: a number, or "auto" = every CPU Ray sees but the encoder's, as many as
    half of Ray's object store holds: each in-flight shard sits there decoded (`shard_bytes`), and
    one more shard than there are workers is in flight."""
    import ray

    if decode_workers != "auto":
        return int(decode_workers)
    return auto_count(decode_workers, int(ray.cluster_resources().get("CPU", 2)) - 1,
                      ray.available_resources().get("object_store_memory", 0) / 2, shard_bytes, extra_in_flight=1)


def run(stage: StageRun) -> dict:
    import ray

    conf = stage.conf
    download = stage.inputs["download"]
    shards = [s for s in download["shards"]]
    stage.plan(len(shards))
    ensure_ray(stage.cfg)
    clock = RunClock()
    device = work_device(stage.cfg)  # on a cluster: its GPUs, not this machine's (pipeline.cluster)
    encoder = ray.remote(ClipEncoder).options(num_gpus=1 if device == "cuda" else 0, num_cpus=1).remote(
        _abs(conf.model), _abs(conf.pretrained), device, conf.batch_size, conf.text)
    info = ray.get(encoder.info.remote())
    clock.ready()
    decode = ray.remote(decode_chunks).options(num_cpus=1, max_retries=0)
    extra = tuple(download.get("extra_columns", ()))
    progress = stage.progress(len(shards), unit="images")
    todo = [s for s in shards if not stage.shard_done(s["shard"])]
    transform_ref = ray.put(info["pil_transform"])
    chunk_size = conf.batch_size  # one model batch per chunk: small enough to keep the encoder fed early
    running = collections.deque()
    largest = max((s["successes"] for s in todo), default=0)
    workers = decode_worker_count(conf.decode_workers, largest * info["image_size"] ** 2 * 3)

    def finish_oldest():
        rows = _finish_shard(stage, encoder, *running.popleft(), info["dim"], extra)
        clock.items += rows
        progress.update(1, rows)

    for shard in todo:
        tar = str((stage.input_dirs["download"] / shard["tar"]).resolve())  # Ray workers: absolute
        chunks = decode.remote(tar, transform_ref, conf.phash_size, chunk_size, shard["successes"], extra)
        running.append((shard["shard"], tar, chunks))
        while len(running) > workers:
            finish_oldest()
    while running:
        finish_oldest()
    timing = clock.report("encoder") | {"decode_workers": workers}
    return finalize(stage, [s["shard"] for s in shards], info) | {"timing": timing}


def _finish_shard(stage: StageRun, encoder, shard: int, tar: str, chunks, dim: int, extra: tuple = ()) -> int:
    """Encode a shard's decoded chunks, write its embeddings and row-less metadata, mark it done."""
    import ray

    pending, failed = [], collections.Counter()
    try:
        for chunk_ref in chunks:
            pending.append((chunk_ref, encoder.encode.remote(chunk_ref)))
        results = [(ray.get(c), ray.get(e)) for c, e in pending]
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, StageError):
            raise StageError(str(e.cause)) from None
        raise
    meta = {c: [v for chunk, _ in results for v in chunk[c]]
            for c in ("key", "url", "caption", "width", "height", "phash", *extra)}
    for chunk, _ in results:
        failed.update(chunk["failed"])
    img = np.concatenate([e["img"] for _, e in results]) if results else np.zeros((0, dim), np.float16)
    files = shard_files(shard, stage.conf.text)
    _save_npy(stage.dir / files["img_emb"], img)
    if stage.conf.text:
        _save_npy(stage.dir / files["text_emb"], np.concatenate([e["text"] for _, e in results]))
    _write_metadata(stage.dir / "_run" / "meta" / f"{shard:05d}.parquet", meta, shard, row_offset=None)
    stage.mark_done(shard, {"rows": len(img), "failed": dict(failed)})
    return len(img)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _write_metadata(path: Path, meta: dict, shard: int, row_offset: int | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(meta["key"])
    columns = {"key": pa.array(meta["key"], pa.string())}
    if row_offset is not None:
        columns["row"] = pa.array(np.arange(row_offset, row_offset + n, dtype=np.int64))
    columns |= {
        "shard": pa.array(np.full(n, shard, np.int32)),
        "url": pa.array(meta["url"], pa.string()),
        "caption": pa.array(meta["caption"], pa.string()),
        "width": pa.array(meta["width"], pa.int32()),
        "height": pa.array(meta["height"], pa.int32()),
        "phash": pa.array(meta["phash"], pa.string()),
    }
    columns |= {name: pa.array(values) for name, values in meta.items() if name not in columns and name != "row"}
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def finalize(stage: StageRun, shard_ids: list[int], info: dict) -> dict:
    """Number the rows across shards and write the final metadata files."""
    import pyarrow.parquet as pq

    stats = stage.done_stats()
    offset, out_shards, failed = 0, [], collections.Counter()
    for shard in shard_ids:
        rows = stats[shard]["rows"]
        failed.update(stats[shard]["failed"])
        meta = pq.read_table(stage.dir / "_run" / "meta" / f"{shard:05d}.parquet").to_pydict()
        files = shard_files(shard, stage.conf.text)
        _write_metadata(stage.dir / files["metadata"], meta, shard, row_offset=offset)
        out_shards.append({"shard": shard, "rows": rows, "row_offset": offset, **files})
        offset += rows
    encoder_report = Path(stage.conf.pretrained or "").parent / "encoder.json"  # the demo encoder's recall
    return {
        "items": offset,
        "counts": {"images": offset, "failed": sum(failed.values()), "shards": len(shard_ids)},
        "encoder_metrics": json.loads(encoder_report.read_text()) if stage.conf.pretrained and encoder_report.exists() else None,
        "failures": dict(sorted(failed.items())),
        "model": {"model": _abs(stage.conf.model), "pretrained": _abs(stage.conf.pretrained), "name": info["name"], "dim": info["dim"]},
        "dim": info["dim"],
        "rows": offset,
        "dtype": "float16",
        "text_emb": bool(stage.conf.text),
        "download_dir": str(stage.input_dirs["download"].resolve()),  # the pictures behind the rows (evaluate, reports)
        "shards": out_shards,
    }
