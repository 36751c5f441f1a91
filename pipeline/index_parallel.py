"""The index stage's build above `index.parallel_min_vectors`: train once, add each embed shard's kept
vectors in its own Ray task into a partial index, merge the parts into image.index + image.ivfdata
(faiss on-disk inverted lists, pipeline.faiss_ondisk).

    index/parts/trained.index        the trained, empty index (written once; a resume reuses it)
    index/parts/assigner.npy         how the tasks assign vectors to cells (written once, after it)
    index/parts/part_{shard:05d}.index  one embed shard's kept vectors, ids = embed rows
    index/_run/done/{shard:05d}.json    written after its part: a resume does not redo that shard

The parts are deleted once image.index is written. Memory per task: one shard's vectors (float32)
and its codes; the merge maps the parts and the output, so no process holds the whole index.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.cluster import count_nodes, node_id, ray_tasks
from pipeline.embeddings import Embeddings
from pipeline.faiss_ondisk import ivfdata_path, merge_partials, save_index, write_partial
from pipeline.files import atomic_path
from pipeline.runner import StageError, StageRun

PARTS = "parts"


def add_shard(trained_path: str, vectors_path: str, row_offset: int, rows: np.ndarray, out_path: str,
              batch_size: int, assigner_path: str) -> dict:
    """One Ray task: the kept `rows` (global embed rows) of one embed shard's float16 file, added to a
    copy of the trained index and written to `out_path`, cells assigned by the assigner at
    `assigner_path` (`_assigner`). Returns {vectors, node}."""
    vectors = np.load(vectors_path, mmap_mode="r")
    batches = ((rows[i:i + batch_size], vectors[rows[i:i + batch_size] - row_offset])
               for i in range(0, len(rows), batch_size))
    from pipeline.cell_assign import from_bytes

    added = write_partial(trained_path, batches, out_path, from_bytes(np.load(assigner_path)))
    return {"vectors": int(added), "node": node_id()}


def _assigner(parts: Path, trained_path: Path, emb: Embeddings, kept_rows: np.ndarray) -> Path:
    """parts/assigner.npy, written once: how every task assigns its vectors to cells, chosen here on
    a sample of the kept vectors instead of in each task (~1.9 s of a 3M task's ~3.2 s): the
    `cell_assign.exact_assigner` serialized (`to_bytes`), empty where the index's own quantizer assigns."""
    path = parts / "assigner.npy"
    if not path.exists():
        import faiss

        from pipeline.cell_assign import PROJECTED_SAMPLE, exact_assigner, to_bytes
        from pipeline.faiss_assign import pretransformed

        index = faiss.read_index(str(trained_path))
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(kept_rows, size=min(len(kept_rows), PROJECTED_SAMPLE), replace=False))
        assigner = exact_assigner(faiss.extract_index_ivf(index), pretransformed(index, emb[rows].astype(np.float32)), 1)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, to_bytes(assigner))
    return path


def build_parallel(stage: StageRun, emb: Embeddings, kept_rows: np.ndarray, train: Callable) -> tuple[object, dict]:
    """(the merged index, its lists on disk; {shards, reused, added}): `train()` gives the trained,
    empty index (called only when no earlier run wrote it); shards whose part an earlier run
    finished are reused, not redone."""

    parts = (stage.dir / PARTS).resolve()
    trained_path = parts / "trained.index"
    if not trained_path.exists():
        save_index(train(), trained_path)
    assigner_path = _assigner(parts, trained_path, emb, kept_rows)
    shards = _shard_rows(emb, kept_rows)
    stage.plan(len(shards))
    reused = [s for s in shards if stage.shard_done(s) and _part(parts, s).exists()]
    todo = [s for s in shards if s not in reused]
    progress = stage.progress(len(shards), unit="vectors")
    if todo:
        calls = {s: (str(trained_path), str((emb.dir / emb.shards[s]["img_emb"]).resolve()), int(emb.offsets[s]),
                     shards[s], str(_part(parts, s)), stage.conf.add_batch_size, str(assigner_path)) for s in todo}
        failed = lambda shard, cause: StageError(  # noqa: E731
            f"index: adding embed shard {shard} failed ({str(cause)[:300]}); "
            f"re-run `knnd run index` to resume (finished shards are kept)")
        for shard, stats in ray_tasks(stage.cfg, add_shard, calls, failed):
            stage.mark_done(shard, stats)  # after its part was renamed into place
            progress.update(1, stats["vectors"])
    print(f"index: merging {len(shards)} partial indexes into {ivfdata_path(stage.dir / 'image.index').name}")
    index = merge_partials(trained_path, [_part(parts, s) for s in sorted(shards)], stage.dir / "image.index")
    return index, {"shards": len(shards), "reused": len(reused), "added": len(todo),
                   "nodes": count_nodes(d.get("node") for d in stage.done_stats().values())}  # {node: shards}


def remove_parts(stage_dir: Path, keep_ivfdata: bool) -> None:
    """Delete the partial indexes (after image.index is written), and a stale image.ivfdata left by an
    interrupted parallel build when the index was then built in one process (`keep_ivfdata` False)."""
    shutil.rmtree(stage_dir / PARTS, ignore_errors=True)
    if not keep_ivfdata:
        ivfdata_path(stage_dir / "image.index").unlink(missing_ok=True)


def _part(parts: Path, shard: int) -> Path:
    return parts / f"part_{shard:05d}.index"


def _shard_rows(emb: Embeddings, kept_rows: np.ndarray) -> dict[int, np.ndarray]:
    """{embed shard: its kept rows (sorted, global)} for the shards that keep any."""
    shard_of = np.searchsorted(emb.offsets, kept_rows, side="right") - 1
    bounds = np.searchsorted(shard_of, np.arange(len(emb.shards) + 1))
    return {s: kept_rows[bounds[s]:bounds[s + 1]] for s in range(len(emb.shards)) if bounds[s + 1] > bounds[s]}
