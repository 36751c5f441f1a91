"""train_input: the pack stage's loader against decoding and retrieving on the fly."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import Bench, Row, clock, config, interleave, measured, median, run_stage_quietly, stage_exists
from .corpus import chain, chain_overrides, iter_download_images


def pack_shard_paths(pack_dir: Path, manifest: dict) -> list[Path]:
    return [pack_dir / s["tar"] for s in manifest["shards"] if s.get("samples", 1)]


def on_the_fly_batches(b: Bench, wd: Path, batch_size: int, image_size: int, k: int):
    """What a trainer without the pack stage does: decode raw download shards, resize, look up each
    image's embedding, retrieve its neighbours with faiss, gather theirs. Yields (images, cond)."""
    import torch

    from pipeline import faiss_search
    from pipeline.shards import load_image
    from pipeline.retrieval import Retriever

    retriever = Retriever(wd / "index")
    emb = retriever.embeddings  # the index's vectors, by embed row (the rows dedup kept)
    rows = retriever.index_rows()
    row_of = {key: int(row) for row, (key, _) in zip(rows, retriever.describe(rows))}
    pending_images, pending_rows = [], []
    for key, data in iter_download_images(wd / "download"):
        if key not in row_of:
            continue
        pending_images.append(load_image(data, image_size))
        pending_rows.append(row_of[key])
        if len(pending_rows) == batch_size:
            rows = np.array(pending_rows)
            own = emb[rows].astype(np.float32)
            sims, found = retriever.search(own, k + 1)
            _, nbr = faiss_search.drop_self(sims, found, rows, k)
            cond = np.concatenate([own[:, None], emb[np.maximum(nbr, 0)].astype(np.float32)], axis=1)
            image = torch.from_numpy(np.stack(pending_images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            yield image, torch.from_numpy(cond)
            pending_images, pending_rows = [], []


def section_train_input(b: Bench) -> None:
    from model.data import PackDataset

    if not stage_exists("pack"):
        b.skip("train_input", "samples/s: pack loader vs decode + retrieve on the fly", "pipeline/pack.py not present")
        return
    wd = chain(b, "neighbours")
    cfg = config(wd, *chain_overrides(b))
    seconds, manifest = run_stage_quietly(b, "pack", cfg)
    b.add(Row("train_input", "pack stage samples/s (once)", "samples/s", manifest["items"] / seconds,
              note=f"{manifest['counts']['shards']} shards at {manifest['image_size']} px",
              includes="run_stage('pack') wall time; no reference"))
    b.chain_done.add("pack")
    batch = cfg.train.batch_size
    paths = pack_shard_paths(wd / "pack", manifest)

    def ours(i):
        load_seconds, data = clock(lambda: PackDataset(paths, batch_size=batch, seed=i))
        samples, start = 0, time.perf_counter()
        for _ in data:
            samples += batch
            if samples >= 3 * len(data.images) and time.perf_counter() - start > 1.0:
                break
        b.meta.setdefault("pack_load_seconds", []).append(load_seconds)
        return samples / (time.perf_counter() - start)

    def reference(i):
        samples, start = 0, time.perf_counter()
        for image, _ in on_the_fly_batches(b, wd, batch, manifest["image_size"], manifest["k"]):
            samples += len(image)
        return samples / (time.perf_counter() - start)

    res = interleave(b.args.reps, {"ours": ours, "reference": reference})
    b.add(measured("train_input", f"samples/s, batch {batch}: PackDataset vs on the fly", "samples/s", res["ours"],
                   res["reference"], target=10.0, target_text=">= 10",
                   note=f"pack load {median(b.meta['pack_load_seconds']):.2f} s (not counted); "
                        f"{manifest['image_size']} px, k={manifest['k']}, d={manifest['d']}",
                   includes="ours: iterating model.data.PackDataset (gather + float conversion), shards already loaded; "
                            "reference: one process reading the download tars, JPEG decode + resize (pack.load_image), "
                            "embedding lookup by key, faiss search of the stage's index per batch, neighbour gather"))
