"""index stage: kept embeddings -> index/image.index (faiss) and index/index_infos.json.

`factory: auto` picks the most accurate index that fits `memory_budget` for N (exact, HNSW,
IVF, then the paper's OPQ+IVF+PQ; IVF cells of `cell_size` vectors at any N, an HNSW coarse
quantizer above `hnsw_quantizer_above`); an explicit factory string is used as given. Training uses
a random sample sized to the index; vectors are added shard by shard from the float16 files, in
this process, or from `parallel_min_vectors` on (IVF factories) in one Ray task per embed shard
whose partial indexes merge into image.index + image.ivfdata (pipeline.index_parallel).
`nprobe: auto` is tuned to `target_recall` (recall@10 against exact search) on image queries (the
value neighbours uses) and separately on text-like queries (`nprobe_text`, the value search and
sampling use): the caption embeddings the embed stage wrote, else captions of indexed images embedded
here by its CLIP. Recall is then measured on image queries (database items, self excluded, as the
neighbours stage searches) and on text-like queries (what sampling sends), with and without exact
re-ranking from the stored float16 embeddings.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config import KMEANS_REFINE
from pipeline.embeddings import Embeddings, metadata_files, metadata_schema, read_keep
from pipeline.faiss_build import (add_batches, choose_factory, estimate_index_bytes, index_cost, make_index, train_index,
                                  training_sample_size)
from pipeline.faiss_ondisk import ivfdata_path, save_index, supports_parts
from pipeline.faiss_search import (drop_self, exact_search, recall_at_k, refine_search, search, search_param_name,
                                   set_search_param, tune_nprobe)
from pipeline.filters import check_where_on_embed, matching_rows
from pipeline.index_files import clip_identity, write_index_files
from pipeline.index_parallel import build_parallel, remove_parts
from pipeline.runner import Progress, StageRun, UsageError, atomic_path, stage_dir, write_json
from pipeline.sizes import parse_bytes

K_EVAL = 10
REFINE_K_FACTOR = 4


def check(cfg) -> None:
    if cfg.index.where:  # before anything is written: unknown columns and bad syntax
        check_where_on_embed(stage_dir(cfg, "embed"), cfg.index.where, "index.where")
    factory = cfg.index.factory
    if factory != "auto":
        try:
            make_index(factory, 64 if "OPQ" not in factory and "PQ" not in factory else 512)
        except RuntimeError as e:
            raise UsageError(f"index.factory {factory!r} is not a faiss factory string ({str(e).splitlines()[0][:120]}); "
                             f'use "auto" or e.g. "IVF1024,Flat", "OPQ64_256,IVF4096,PQ64", "HNSW32"') from None


def train(emb: Embeddings, kept_rows: np.ndarray, factory: str, seed: int, refine_iterations: int = KMEANS_REFINE):
    """`factory` trained on a random sample of the kept rows (sized by training_sample_size), empty."""
    rng = np.random.default_rng(seed)
    size = training_sample_size(factory, len(kept_rows))
    sample = None
    if size:
        sample = emb[np.sort(rng.choice(kept_rows, size=size, replace=False))].astype(np.float32)
    return train_index(factory, emb.dim, sample, refine_iterations=refine_iterations)


def build(emb: Embeddings, kept_rows: np.ndarray, train: Callable, batch_size: int):
    """The index `train()` gives, with every kept row added, shard by shard, in this process (a progress
    line per embed shard added)."""
    index = train()
    keep = np.zeros(len(emb), bool)
    keep[kept_rows] = True
    progress = Progress("index", len(emb.shards), unit="vectors", parts="embed shards added")

    def kept_blocks():
        for rows, vectors in emb.blocks():
            mask = keep[rows]
            for start in range(0, int(mask.sum()), batch_size):
                yield rows[mask][start:start + batch_size], vectors[mask][start:start + batch_size]
            progress.update(shards=1, items=int(mask.sum()))  # resumed once the shard's last batch is added

    add_batches(index, kept_blocks())
    return index


class KeptView:
    """The kept rows of the embeddings as a sliceable float16 matrix (for exact search in blocks)."""

    def __init__(self, emb: Embeddings, kept_rows: np.ndarray):
        self.emb, self.rows = emb, kept_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.emb[self.rows[sl]]


def ground_truth(emb: Embeddings, kept_rows: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return exact_search(KeptView(emb, kept_rows), queries, k, ids=kept_rows)[1]


def evaluate(index, emb: Embeddings, queries: np.ndarray, true: np.ndarray, query_rows, refine: bool) -> dict:
    """recall@1 and @10 and queries/s against exact search (`true`: exact top ids over the kept rows).

    With `query_rows` (image queries that are database items) the item itself is excluded
    from both the found and the true lists, and `true` holds K_EVAL + 1 ids per query."""
    extra = 1 if query_rows is not None else 0
    start = time.perf_counter()
    if refine:
        sims, found = refine_search(index, emb, queries, K_EVAL + extra, REFINE_K_FACTOR)
    else:
        sims, found = search(index, queries, K_EVAL + extra)
    qps = len(queries) / max(time.perf_counter() - start, 1e-9)
    if query_rows is not None:
        _, found = drop_self(sims, found, query_rows, K_EVAL)
        _, true = drop_self(np.zeros(true.shape, np.float32), true, query_rows, K_EVAL)
    return {"recall@1": round(recall_at_k(found, true, 1), 4), "recall@10": round(recall_at_k(found, true, K_EVAL), 4),
            "queries": len(queries), "queries_per_s": round(qps, 1)}


def run(stage: StageRun) -> dict:
    conf = stage.conf
    start = time.time()
    embed_dir = stage.input_dirs["embed"]
    emb = Embeddings(embed_dir, stage.inputs["embed"])
    kept_rows, factory = _rows_and_factory(stage, emb)
    n, d = len(kept_rows), emb.dim
    parallel = n >= conf.parallel_min_vectors and supports_parts(factory, d)
    print(f"index: {factory} over {n} kept vectors of dimension {d}"
          f"{', shards added in parallel Ray tasks' if parallel else ''}")
    timing = {}

    def timed_train():
        began = time.time()
        trained = train(emb, kept_rows, factory, conf.seed, conf.kmeans_refine)
        timing["train_s"] = round(time.time() - began, 1)
        return trained

    if parallel:
        index, parts = build_parallel(stage, emb, kept_rows, timed_train)
    else:
        remove_parts(stage.dir, keep_ivfdata=False)  # what an interrupted parallel build left
        stage.plan(1)
        index, parts = build(emb, kept_rows, timed_train, conf.add_batch_size), None
    timing["build_s"] = round(time.time() - start, 1)  # reading, training, adding (and merging)

    rng = np.random.default_rng(conf.seed + 1)
    q_rows = np.sort(rng.choice(kept_rows, size=min(conf.eval_queries, n), replace=False))
    image_queries = emb[q_rows].astype(np.float32)
    image_true = ground_truth(emb, kept_rows, image_queries, K_EVAL + 1)
    sets = {"image": (image_queries, image_true, q_rows)}
    text_queries = _text_queries(embed_dir, stage.inputs["embed"], conf, rng, kept_rows)
    if text_queries is not None:
        sets["text"] = (text_queries, ground_truth(emb, kept_rows, text_queries, K_EVAL), None)
    tuning = _tune(index, {name: (q, true[:, :K_EVAL]) for name, (q, true, _) in sets.items()}, conf,
                   emb if conf.refine else None)
    recall = {}
    for name, (queries, true, rows) in sets.items():
        if tuning:  # each kind of query is searched with its own value
            set_search_param(index, tuning["name"], tuning["by_queries"][name]["value"])
        recall[name] = evaluate(index, emb, queries, true, rows, refine=False)
        if conf.refine:
            recall[f"{name}_refined"] = evaluate(index, emb, queries, true, rows, refine=True)
    if tuning:
        set_search_param(index, tuning["name"], tuning["value"])
    timing["tune_s"] = round(time.time() - start - timing["build_s"], 1)  # ground truth, tuning, recall

    save_index(index, stage.dir / "image.index")
    remove_parts(stage.dir, keep_ivfdata=parallel)
    with atomic_path(stage.dir / "rows.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, kept_rows, allow_pickle=False)  # which embed rows the index holds (evaluation, reports)
    files = {}
    if conf.self_contained:  # the folder can be moved and shared without the embed folder
        files = write_index_files(stage.dir, emb, kept_rows, embed_dir,
                                  conf.thumbnail_size if stage.inputs["embed"].get("download_dir") else 0)
    fixed, per_vector = index_cost(factory, d)
    infos = {
        "factory": factory, "n": n, "d": d, "metric": "inner_product",
        "nprobe": tuning.get("value"), "search_param": tuning.get("name"), "nprobe_tuning": tuning,
        "nprobe_text": tuning.get("by_queries", {}).get("text", {}).get("value"),
        "bytes_per_vector": per_vector, "index_bytes": estimate_index_bytes(factory, n, d),
        "memory_budget": conf.memory_budget, "refine": conf.refine, "refine_k_factor": REFINE_K_FACTOR,
        "ivfdata": ivfdata_path(stage.dir / "image.index").name if parallel else None, "parallel_build": parts,
        "build_seconds": round(time.time() - start, 2), "recall": recall,
        "embed_dir": str(embed_dir.resolve()), "model": stage.inputs["embed"]["model"],
        "clip": clip_identity(stage.inputs["embed"]["model"]), "files": files, "where": conf.where,
    }
    write_json(stage.dir / "index_infos.json", infos)
    if not parallel:
        stage.mark_done(0, {"n": n})
    return {"items": n, "counts": {"vectors": n}, "index": "image.index", "infos": "index_infos.json", "rows": "rows.npy",
            "factory": factory, "recall": recall, "timing": timing,  # seconds: train, build (incl. train), tune
            "nodes": parts["nodes"] if parts else {}}  # {Ray node: embed shards it added}; {}: built in this process


def _rows_and_factory(stage: StageRun, emb: Embeddings) -> tuple[np.ndarray, str]:
    """The embed rows to index (kept by dedup, satisfying index.where) and the factory for them."""
    conf = stage.conf
    kept_rows = np.nonzero(read_keep(stage.input_dirs["dedup"]))[0].astype(np.int64)
    if conf.where:  # a filtered index: only the kept images whose metadata satisfies index.where
        chosen = matching_rows(metadata_files(emb.dir, stage.inputs["embed"]), conf.where, "index.where")
        kept_rows = np.intersect1d(kept_rows, chosen)
        if len(kept_rows) < 2:
            raise UsageError(f"index.where {conf.where!r} keeps {len(kept_rows)} images: loosen the filter")
    if conf.factory != "auto":
        return kept_rows, conf.factory
    try:
        return kept_rows, choose_factory(len(kept_rows), emb.dim, parse_bytes(conf.memory_budget), conf.cell_size,
                                         conf.hnsw_quantizer_above)
    except ValueError as e:
        raise UsageError(f"index.memory_budget {conf.memory_budget}: {e}") from None


def _tune(index, query_sets: dict, conf, refine_from: Embeddings | None) -> dict:
    """nprobe (efSearch for HNSW) per kind of query: the configured value, or the smallest that reaches
    target_recall, measured as searches will run (refined or not). Image queries give `value`, which
    the neighbours stage uses; text-like queries (caption embeddings, when there are some) sit farther
    from the images and usually need more cells: their value is what `knnd search` and sampling use."""
    name = search_param_name(index)
    if name is None:
        return {}
    if conf.nprobe != "auto":
        fixed = {"value": int(conf.nprobe), "tuned": False}
        return {"name": name, "value": int(conf.nprobe), "tuned": False, "by_queries": {kind: fixed for kind in query_sets}}
    by_set = {kind: tune_nprobe(index, q, true, K_EVAL, conf.target_recall, embeddings=refine_from,
                                k_factor=REFINE_K_FACTOR) for kind, (q, true) in query_sets.items()}
    for kind, t in by_set.items():
        if not t.reached:
            print(f"index: {name} {t.value} reaches recall@10 {t.recall:.3f} only on {kind} queries, below target "
                  f"{conf.target_recall}; consider refine: true or a larger memory_budget")
    image = by_set["image"]
    return {"name": name, "value": int(image.value), "tuned": True, "reached": bool(image.reached),
            "recall@10": round(float(image.recall), 4),
            "by_queries": {kind: {"value": int(t.value), "tuned": True, "recall@10": round(float(t.recall), 4),
                                  "reached": bool(t.reached)} for kind, t in by_set.items()}}


def _text_queries(embed_dir, manifest, conf, rng, kept_rows):
    """Text-like queries, what sampling sends: the caption embeddings the embed stage wrote (embed.text), else
    the captions of some indexed images embedded here by the CLIP named in the embed manifest. None where
    there are no captions or that CLIP cannot be loaded here (a synthetic set): image queries only then."""
    if manifest.get("text_emb"):
        text = Embeddings(embed_dir, manifest, kind="text")
        rows = np.sort(rng.choice(len(text), size=min(conf.eval_queries, len(text)), replace=False))
        return text[rows].astype(np.float32)
    rows = np.sort(rng.choice(kept_rows, size=min(conf.eval_queries, len(kept_rows)), replace=False))
    captions = [c for c in _captions(embed_dir, manifest, rows) if c]
    if len(captions) < 2:
        return None
    from model.clip import encode_texts, load_clip_spec

    spec = manifest.get("model") or {}
    try:  # a random-init CLIP (tests) is rebuilt from the seed the embed stage used
        bundle = load_clip_spec({"model": spec.get("model"), "pretrained": spec.get("pretrained")}, "cpu")
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"index: no text-like queries: the embed stage's CLIP {spec.get('model')!r} cannot be loaded here "
              f"({str(e).splitlines()[0][:120]}); image queries only")
        return None
    text = encode_texts(bundle, captions).astype(np.float32)
    if text.shape[1] != int(manifest["dim"]):
        print(f"index: no text-like queries: the CLIP named in the embed manifest gives {text.shape[1]}-d text "
              f"embeddings, the images are {manifest['dim']}-d; image queries only")
        return None
    return text


def _captions(embed_dir, manifest, rows: np.ndarray) -> list:
    """The captions of embed rows (sorted), reading only the metadata shards that hold them."""
    import pyarrow.parquet as pq

    if "caption" not in metadata_schema(embed_dir, manifest).names:  # one schema for every shard
        return []
    out = []
    for shard in manifest["shards"]:
        start, stop = shard["row_offset"], shard["row_offset"] + shard["rows"]
        wanted = rows[(rows >= start) & (rows < stop)] - start
        if len(wanted):
            table = pq.read_table(Path(embed_dir) / shard["metadata"], columns=["caption"])
            out += table.column("caption").take(wanted).to_pylist()
    return out
