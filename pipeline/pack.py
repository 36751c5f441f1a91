"""pack stage: download shards + embeddings + neighbour lists -> training shards of tensors in `pack/`.

Per kept image (every row of `neighbours_{shard}.parquet`), one sample of `model.data`'s pack format:
the image as uint8 [H, W, 3] at `pack.image_size`, its own CLIP embedding float16 [d] and its
neighbours' embeddings float16 [k, d], nearest first. The trainer then decodes no JPEG and runs no
CLIP and no FAISS.

The unit of work is the embed shard (= the download shard it came from): a Ray task reads that
shard's neighbour lists, iterates the download tar(s) holding its keys once, and writes
`pack/{n:05d}.tar` files of at most `pack.shard_size` samples (an embed shard is split, never
merged with another: with the defaults, one pack shard per download shard). Pack shards are
numbered in embed-shard order before any work starts (the neighbours manifest gives each shard's
row count), and a re-run writes byte-identical tars. A task holds one embed shard's images at
training resolution in memory (10,000 at 64 px: 120 MB).

With pack.manipulation (the local-manipulation training mode) each sample also holds its first
neighbour's image ECC-aligned to it, and pack.boxes random boxes with the CLIP embeddings of their
crops (pipeline.pack_manipulation). A task then also reads the download tars holding its images'
first neighbours (any shard) and runs the embed stage's CLIP on the crops, on the CPU.
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from pipeline.cluster import count_nodes, node_id, ray_tasks
from pipeline.runner import StageError, StageRun
from pipeline.shards import corrupt_message, image_bytes, iter_tar_samples, load_image

# --------------------------------------------------------------------------- planning


def plan_pack_shards(neighbour_shards: list[dict], shard_size: int, k: int) -> list[dict]:
    """Per embed shard: the pack shards it writes, as [(pack shard id, first sample, stop)].

    A shard of n kept images writes ceil(n / shard_size) tars (one empty tar when n is 0, so
    every embed shard leaves a trace), numbered consecutively across embed shards.
    """
    plans, next_id = [], 0
    for shard in neighbour_shards:
        n = shard["rows"]
        parts = [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)] or [(0, 0)]
        plans.append({"shard": shard["shard"], "rows": n, "k": k, "neighbours": shard["neighbours"],
                      "parts": [(next_id + i, a, b) for i, (a, b) in enumerate(parts)]})
        next_id += len(parts)
    return plans


def pack_tar_name(pack_shard: int) -> str:
    return f"{pack_shard:05d}.tar"


# --------------------------------------------------------------------------- one shard (a Ray task)


def pack_shard(plan: dict, dirs: dict, download_tars: dict[int, str], image_size: int,
               manipulation: dict | None = None) -> dict:
    """Write the pack tars of one embed shard; return its stats {samples, failed, tars, manipulation, node}.

    dirs: {"embed", "neighbours", "out"} folders; download_tars: download shard id -> tar path;
    manipulation: None, or {boxes, box_min, box_max, clip} (pack.manipulation, the embed CLIP's spec).
    Runs anywhere the workdir is visible: it opens the memory-mapped embeddings itself.
    """
    from model.data import write_pack_shard
    from pipeline.embeddings import Embeddings

    table = _read_neighbours(Path(dirs["neighbours"]) / plan["neighbours"], plan["rows"], plan["k"])
    emb = Embeddings(Path(dirs["embed"]))
    keys, rows = table["key"], table["row"]
    embed_shard = next(s for s in emb.shards if s["shard"] == plan["shard"])
    shards = _download_shards_of(emb.dir, embed_shard, rows)
    images, failed = _decode_images(keys, shards, download_tars, image_size)
    extras, manipulated = {}, {}
    if manipulation is not None:
        extras, manipulated = _manipulation_extras(keys, shards, table["neighbour_rows"][:, 0], images, emb,
                                                   download_tars, image_size, manipulation)
    counts = []
    for pack_id, start, stop in plan["parts"]:
        own, nbr = emb[rows[start:stop]], emb[table["neighbour_rows"][start:stop]]  # one gather per tar
        samples = ({"key": keys[i], "image": images[keys[i]], "emb": own[i - start], "nbr": nbr[i - start],
                    **extras.get(keys[i], {})}
                   for i in range(start, stop) if keys[i] in images and (manipulation is None or keys[i] in extras))
        counts.append(write_pack_shard(Path(dirs["out"]) / pack_tar_name(pack_id), samples))
    return {"samples": sum(counts), "failed": dict(failed), "manipulation": dict(manipulated), "node": node_id(),
            "tars": [{"shard": pack_id, "tar": pack_tar_name(pack_id), "samples": count}
                     for (pack_id, _, _), count in zip(plan["parts"], counts)]}


def _manipulation_extras(keys, shards, first_rows, images, emb, download_tars, image_size, settings):
    """pipeline.pack_manipulation's members for a shard: the first neighbours' images (decoded from
    whichever download tars hold them) and the images again at the CLIP's size, for the box crops."""
    from pipeline.embeddings import read_metadata
    from pipeline.pack_manipulation import CropEncoder, manipulation_members

    spec = settings["clip"] or {}
    try:
        encoder = CropEncoder(spec)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise StageError(f"pack.manipulation embeds box crops with the embed stage's CLIP {spec.get('model')!r} "
                         f"(pretrained {spec.get('pretrained')!r}), which cannot be loaded here ({e}): embed with an "
                         f"open_clip model, or set pack.manipulation=false") from None
    crop_sources, _ = _decode_images(keys, shards, download_tars, encoder.size)
    meta = read_metadata(emb.dir, emb.manifest, ["key", "shard"])
    first_keys = [str(meta["key"][row]) for row in first_rows]
    decoded, _ = _decode_images(first_keys, meta["shard"][first_rows], download_tars, image_size)
    neighbour_images = {key: decoded[first] for key, first in zip(keys, first_keys) if first in decoded}
    return manipulation_members(keys, images, crop_sources, neighbour_images, encoder, settings)


def _read_neighbours(path: Path, expected_rows: int, k: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    hint = "rebuild it with `knnd run neighbours --force`"
    try:
        table = pq.read_table(path, columns=["key", "row", "neighbour_rows"])
    except (OSError, pa.ArrowInvalid) as e:
        raise StageError(f"{path} is missing or corrupt ({e}): {hint}") from None
    if table.num_rows != expected_rows:
        raise StageError(f"{path} has {table.num_rows} rows, the neighbours manifest says {expected_rows}: {hint}")
    nbr = table.column("neighbour_rows").combine_chunks()
    return {"key": table.column("key").to_pylist(), "row": table.column("row").to_numpy(),
            "neighbour_rows": nbr.flatten().to_numpy().reshape(len(nbr), k)}


def _download_shards_of(embed_dir: Path, embed_shard: dict, rows: np.ndarray) -> np.ndarray:
    """The download shard of each row (all within one embed shard), from the embed metadata's `shard` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.embeddings import REBUILD

    path = embed_dir / embed_shard["metadata"]
    try:
        shard_col = pq.read_table(path, columns=["shard"]).column("shard").to_numpy()
    except (OSError, pa.ArrowInvalid) as e:
        raise StageError(f"{path} is missing or corrupt ({e}): {REBUILD}") from None
    local = rows - embed_shard["row_offset"]
    if len(local) and (local.min() < 0 or local.max() >= len(shard_col)):
        raise StageError(f"the neighbour lists name rows outside embed shard {embed_shard['shard']} ({path}): "
                         f"rebuild them with `knnd run neighbours --force`")
    return shard_col[local]


def _decode_images(keys: list[str], shards: np.ndarray, download_tars: dict[int, str], image_size: int):
    """{key: uint8 image} for `keys`, reading each download tar they live in exactly once.

    An image that no longer decodes is counted and skipped; a key missing from its tar means the
    download output changed under the embeddings: a stage failure naming the tar.
    """
    import tarfile

    from PIL import Image

    images, failed = {}, collections.Counter()
    for shard in np.unique(shards):
        tar = download_tars.get(int(shard))
        if tar is None:
            raise StageError(f"the embeddings name download shard {int(shard)}, which the download manifest lacks: "
                             f"re-run `knnd run embed --force`")
        wanted = {k for k, s in zip(keys, shards) if s == shard}
        found = set()
        try:
            for key, parts in iter_tar_samples(tar):
                if key not in wanted:
                    continue
                found.add(key)
                data = image_bytes(parts) or b""
                try:
                    images[key] = load_image(data, image_size)
                except Image.DecompressionBombError:
                    failed["too_large"] += 1
                except Exception:  # noqa: BLE001 - any undecodable image is counted and skipped
                    failed["undecodable"] += 1
        except (tarfile.TarError, OSError, EOFError) as e:
            raise StageError(corrupt_message(tar, str(e))) from None
        if wanted - found:
            raise StageError(f"{tar} lacks {len(wanted - found)} sample(s) the embeddings list "
                             f"(first: {sorted(wanted - found)[0]}): it is truncated or changed after embed; "
                             f"re-download it (delete it and its _stats.json, `knnd run download`), then "
                             f"re-run `knnd run embed --force` and the stages after it")
    return images, failed


# --------------------------------------------------------------------------- the stage


def run(stage: StageRun) -> dict:

    conf = stage.conf
    embed, neighbours = stage.inputs["embed"], stage.inputs["neighbours"]
    plans = plan_pack_shards(neighbours["shards"], conf.shard_size, neighbours["k"])
    stage.plan(len(plans))
    dirs = {"embed": str(stage.input_dirs["embed"].resolve()), "neighbours": str(stage.input_dirs["neighbours"].resolve()),
            "out": str(stage.dir.resolve())}
    download_tars = {s["shard"]: str((stage.input_dirs["download"] / s["tar"]).resolve())
                     for s in stage.inputs["download"]["shards"]}
    todo = [p for p in plans if not stage.shard_done(p["shard"])]
    progress = stage.progress(len(plans), unit="samples")
    if todo:
        manipulation = None
        if conf.manipulation:
            manipulation = {"boxes": conf.boxes, "box_min": conf.box_min, "box_max": conf.box_max, "clip": embed.get("model")}
        calls = {p["shard"]: (p, dirs, download_tars, conf.image_size, manipulation) for p in todo}
        failed = lambda shard, cause: StageError(str(cause)) if isinstance(cause, StageError) else None  # noqa: E731
        for shard, stats in ray_tasks(stage.cfg, pack_shard, calls, failed):
            stage.mark_done(shard, stats)  # after its tars were renamed into place
            progress.update(1, stats["samples"])
    body = manifest_body(stage.done_stats(), plans, conf, neighbours["k"], embed)
    if conf.tokens:  # the discrete backbone's VQ tokens (pipeline.tokens)
        from pipeline.tokens import run_tokens
        body["tokens"] = run_tokens(stage, body["shards"], embed)
    return body


def manifest_body(stats: dict[int, dict], plans: list[dict], conf, k: int, embed: dict) -> dict:
    image_size = conf.image_size
    shards, failed, manipulated = [], collections.Counter(), collections.Counter()
    for plan in plans:
        done = stats[plan["shard"]]
        failed.update(done["failed"])
        manipulated.update(done.get("manipulation", {}))
        shards += [{**t, "embed_shard": plan["shard"]} for t in done["tars"]]
    total = sum(s["samples"] for s in shards)
    d = int(embed["dim"])
    dtypes = {"image": "uint8", "emb": "float16", "nbr": "float16"}
    shapes = {"image": [image_size, image_size, 3], "emb": [d], "nbr": [k, d]}
    manipulation = None
    if conf.manipulation:  # counts: aligned / unaligned (ECC failed) / neighbour_missing first neighbours
        manipulation = {"boxes": conf.boxes, "box_min": conf.box_min, "box_max": conf.box_max,
                        **{name: manipulated.get(name, 0) for name in ("aligned", "unaligned", "neighbour_missing")}}
        dtypes |= {"nbr_image": "uint8", "boxes": "int16", "box_emb": "float16"}
        shapes |= {"nbr_image": [image_size, image_size, 3], "boxes": [conf.boxes, 4], "box_emb": [conf.boxes, d]}
    return {
        "items": total,
        "counts": {"samples": total, "failed": sum(failed.values()), "shards": len(shards)},
        "failures": dict(sorted(failed.items())),
        "shards": shards,
        "nodes": count_nodes(stats[plan["shard"]].get("node") for plan in plans),  # {Ray node: embed shards it packed}
        "image_size": image_size, "k": k, "d": d,
        "dtypes": dtypes,
        "shapes": shapes,
        "manipulation": manipulation,  # null: a text-to-image pack
        "clip": embed.get("model"),  # the CLIP whose embeddings these are: sampling needs its text tower
        "format": "model.data pack tar: {key}.image.npy, {key}.emb.npy, {key}.nbr.npy"
                  + (" (+ .nbr_image.npy, .boxes.npy, .box_emb.npy)" if manipulation else ""),
    }
