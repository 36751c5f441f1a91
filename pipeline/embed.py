"""embed stage: download shards -> CLIP image embeddings and metadata (clip-retrieval layout).

Per shard: `embed/img_emb/img_emb_{shard:05d}.npy` (float16, L2-normalised, [n, d]) and
`embed/metadata/metadata_{shard:05d}.parquet` row-aligned with it (key, row, shard, url,
caption, width, height, phash); with `embed.text: true` also `embed/text_emb/` caption embeddings.

Decoding runs in Ray tasks on CPU workers (the model's own PIL transforms, perceptual hash),
streaming uint8 chunks to the encoder actors (`embed.encoders`: one per GPU, or one on CPU), each
chunk to the encoder with the fewest unfinished ones, so the model never waits on JPEG decoding.
Pixels go from the decode tasks to the encoders as object refs; the driver fetches only the
encoders' results (embeddings and metadata). Decoding starts once an encoder has read the model's
config (its transform), while the weights still load. The manifest's `nodes` counts, per Ray node,
the shards decoded and the chunks encoded there. The
rows are global positions in shard order, known only once every shard's size is: a shard
first writes its embeddings and a row-less metadata file under `_run/`, and the final pass
numbers the rows (idempotent, so a kill during it is harmless).
"""
from __future__ import annotations

import collections
import json
import tarfile
import time
from pathlib import Path

import numpy as np

from pipeline.cluster import count_nodes, node_id, release, work_device
from pipeline.embed_encoder import ClipEncoder, split_transform  # noqa: F401 - re-exported (tests, tools)
from pipeline.embed_encoder import META_COLUMNS, LeastLoaded, encoder_count, start_encoders
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


def decode_worker_count(decode_workers: str | int, shard_bytes: int, encoders: int = 1, shared: bool = False) -> int:
    """`embed.decode_workers`: a number, or "auto" = every CPU Ray sees but the encoders', as many as
    half of Ray's object store holds: each in-flight shard sits there decoded (`shard_bytes`), and
    one more shard than there are workers is in flight. The store is, as in neighbours.actor_count, the
    total on the local Ray the pipeline owns (`shared` False): a previous stage's objects and actors are
    freed asynchronously, and this stage's first shard is already decoding when this is asked; on a
    joined cluster (`ray.address`), what is free now, as other jobs may fill the rest."""
    import ray

    if decode_workers != "auto":
        return int(decode_workers)
    store = (ray.available_resources() if shared else ray.cluster_resources()).get("object_store_memory", 0)
    return auto_count(decode_workers, int(ray.cluster_resources().get("CPU", 2)) - encoders, store / 2, shard_bytes,
                      extra_in_flight=1)


def decode_task(tar_path: str, info: dict, phash_size: int, chunk_size: int, expected: int | None = None,
                extra: tuple = ()):
    """The Ray task: `decode_chunks` with the model's transform from `info` (an encoder's describe()),
    each chunk stamped with the node that decoded it."""
    node = node_id()
    for chunk in decode_chunks(tar_path, info["pil_transform"], phash_size, chunk_size, expected, extra):
        chunk["node"] = node
        yield chunk


class InFlight:
    """A shard being decoded: its chunk generator and, in chunk order, the refs of its encoded chunks."""

    def __init__(self, shard: int, gen):
        self.shard, self.gen, self.encoded, self.decoded = shard, gen, [], False

    def take(self, deal: LeastLoaded) -> None:
        """The generator's next chunk (ready: no wait) to an encoder, or note that it is exhausted."""
        try:
            self.encoded.append(deal.submit(next(self.gen)))
        except StopIteration:
            self.decoded = True

    def done(self) -> bool:
        import ray

        return self.decoded and len(ray.wait(self.encoded, num_returns=len(self.encoded), timeout=0,
                                             fetch_local=False)[0]) == len(self.encoded)


def run(stage: StageRun) -> dict:
    import ray

    conf, download = stage.conf, stage.inputs["download"]
    shards = list(download["shards"])
    stage.plan(len(shards))
    ensure_ray(stage.cfg)
    clock, started = RunClock(), time.time()
    device = work_device(stage.cfg)  # on a cluster: its GPUs, not this machine's (pipeline.cluster)
    n_encoders = encoder_count(conf.encoders, device)
    todo = collections.deque(s for s in shards if not stage.shard_done(s["shard"]))
    encoders, info_ref, loaded = start_encoders(conf, _abs(conf.model), _abs(conf.pretrained), device, n_encoders,
                                                load=bool(todo))
    decode = ray.remote(decode_task).options(num_cpus=1, max_retries=0, scheduling_strategy="SPREAD")
    extra = tuple(download.get("extra_columns", ()))
    progress = stage.progress(len(shards), unit="images")
    largest = max((s["successes"] for s in todo), default=0)
    running: collections.deque[InFlight] = collections.deque()

    def start_next():  # decoding starts once the model's config is read (info_ref), not after its weights
        shard = todo.popleft()
        tar = str((stage.input_dirs["download"] / shard["tar"]).resolve())  # Ray workers: absolute
        running.append(InFlight(shard["shard"], decode.remote(tar, info_ref, conf.phash_size, conf.batch_size,
                                                              shard["successes"], extra)))

    if todo:
        start_next()
    info = _get(info_ref)
    workers = decode_worker_count(conf.decode_workers, largest * info["image_size"] ** 2 * 3, n_encoders,
                                  shared=bool(stage.cfg.ray.address))
    deal = LeastLoaded(encoders)
    while running or todo:
        while todo and len(running) <= workers:  # one shard more than decode workers, as before
            start_next()
        waiting = [s.gen for s in running if not s.decoded] + (running[0].encoded if running[0].decoded else [])
        ready = set(ray.wait(waiting, num_returns=1, fetch_local=False)[0])
        for s in [s for s in running if not s.decoded and s.gen in ready]:
            s.take(deal)
        while running and running[0].done():
            rows = _finish_shard(stage, running.popleft(), info["dim"], extra)
            clock.items += rows
            progress.update(1, rows)
    clock.ready(wall=min(_get(loaded), default=None))  # the first encoder's weights were ready
    release(encoders)
    timing = clock.report("encoder") | {"encoder_config_s": round(info["at"] - started, 3),  # decoding could start
                                        "decode_workers": workers, "encoders": n_encoders,
                                        "chunks_per_encoder": deal.dealt}
    return finalize(stage, [s["shard"] for s in shards], info) | {"timing": timing}


def _get(refs):
    """ray.get, a stage error (corrupt shard, unloadable model) re-raised as itself."""
    import ray

    from pipeline.cluster import stage_errors_unwrapped

    with stage_errors_unwrapped():
        return ray.get(refs)


def _finish_shard(stage: StageRun, shard: InFlight, dim: int, extra: tuple = ()) -> int:
    """Write a shard's embeddings and row-less metadata from its encoded chunks, mark it done."""
    results = _get(shard.encoded)
    failed = collections.Counter()
    meta = {c: [v for r in results for v in r["meta"][c]] for c in (*META_COLUMNS, *extra)}
    for r in results:
        failed.update(r["failed"])
    img = np.concatenate([r["img"] for r in results]) if results else np.zeros((0, dim), np.float16)
    files = shard_files(shard.shard, stage.conf.text)
    _save_npy(stage.dir / files["img_emb"], img)
    if stage.conf.text:
        _save_npy(stage.dir / files["text_emb"], np.concatenate([r["text"] for r in results]))
    _write_metadata(stage.dir / "_run" / "meta" / f"{shard.shard:05d}.parquet", meta, shard.shard, row_offset=None)
    nodes = [results[0]["decode_node"], *(r["encode_node"] for r in results)] if results else []
    stage.mark_done(shard.shard, {"rows": len(img), "failed": dict(failed), "nodes": nodes})
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
    offset, out_shards, failed, nodes = 0, [], collections.Counter(), []
    for shard in shard_ids:
        rows = stats[shard]["rows"]
        failed.update(stats[shard]["failed"])
        nodes += stats[shard].get("nodes", [])  # the shard's decode task, then each chunk's encoder
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
        "nodes": count_nodes(nodes),  # {Ray node: shards decoded + chunks encoded there}
        "model": {"model": _abs(stage.conf.model), "pretrained": _abs(stage.conf.pretrained), "name": info["name"], "dim": info["dim"]},
        "dim": info["dim"],
        "rows": offset,
        "dtype": "float16",
        "text_emb": bool(stage.conf.text),
        "download_dir": str(stage.input_dirs["download"].resolve()),  # the pictures behind the rows (evaluate, reports)
        "shards": out_shards,
    }
