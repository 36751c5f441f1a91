"""neighbours stage: for every kept image, its k nearest kept images -> neighbours_{shard:05d}.parquet.

Columns: key, row, neighbour_keys (list<string>[k]), neighbour_rows (list<int64>[k]),
similarities (list<float32>[k], descending). As in the paper, the image itself and
near-identical candidates (cosine above dedup.cosine_threshold or pHash within
dedup.manhattan_threshold bits) are dropped; extra candidates are fetched until k remain. The two
thresholds are those the dedup stage that wrote keep.parquet used (its manifest's "thresholds"),
not the current config's, so a re-run after editing dedup.* never mixes two rules.
Ray actors (one per CPU by default, each with one faiss thread) hold the index, memory-mapped so
they share its pages, and take embed shards one at a time. Their start-up (process, imports, index
mmap, metadata) is not waited for: shards are queued on them at once, and the driver reads what it
needs (the neighbours.where rows) meanwhile. Below neighbours.ray_min_rows, for an HNSW or flat index,
unless ray.address names a cluster, the same worker runs in this process, one thread per CPU (faiss
releases the GIL; an IVF's bulk search does not, in its Python loops, so it always gets actors):
a Ray actor takes 0.4-0.7 s to reach its constructor on a 2-core machine, about a tenth of the stage
at 100k rows. The manifest's `nodes` counts the shards each Ray node did.
"""
from __future__ import annotations

import numpy as np

from pipeline.duplicates import near_duplicates, phash_bits_from_hex
from pipeline.embeddings import read_keep
from pipeline.retrieval import Retriever
from pipeline.runner import RunClock, StageError, StageRun, UsageError, atomic_path, auto_count, ensure_ray, stage_dir


def check(cfg) -> None:
    from pipeline.runner import read_json

    path = stage_dir(cfg, "dedup") / "manifest.json"
    if path.exists():
        kept = read_json(path)["kept"]
        if cfg.neighbours.k >= kept:
            raise UsageError(f"neighbours.k ({cfg.neighbours.k}) must be smaller than the number of kept images ({kept}): "
                             f"lower neighbours.k")
    if cfg.neighbours.gpus_per_actor:
        infos = stage_dir(cfg, "index") / "index_infos.json"
        factory = read_json(infos).get("factory", "") if infos.exists() else ""
        if factory and "IVF" not in factory:  # the GPU assigns queries to IVF cells; other indexes have none
            raise UsageError(f"neighbours.gpus_per_actor assigns queries to IVF cells on the GPU, but the index is "
                             f"{factory}, which has none: set neighbours.gpus_per_actor=0")
        gpu_actor_count(cfg)  # no GPU to share: refused before the stage starts
    if cfg.neighbours.where:  # before anything is written: unknown columns and bad syntax
        from pipeline.filters import check_where_on_embed

        check_where_on_embed(stage_dir(cfg, "embed"), cfg.neighbours.where, "neighbours.where")


def select_neighbours(sims, rows, q_rows, q_bits, bits, k, cosine_threshold, manhattan_threshold):
    """First k candidates that are not the query and not near-identical; `ok` says whether k were found."""
    by_cosine, by_phash = near_duplicates(sims, q_bits[:, None, :], bits[np.maximum(rows, 0)],
                                          cosine_threshold, manhattan_threshold)
    valid = (rows >= 0) & (rows != q_rows[:, None]) & ~(by_cosine | by_phash)
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # valid first, search order kept
    ok = valid.sum(axis=1) >= k
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(rows, order, axis=1), ok


class NeighbourWorker:
    """Holds the index; `__call__(shard)` writes that shard's neighbour lists."""

    def __init__(self, index_dir: str, embed_dir: str, dedup_dir: str, out_dir: str, k: int, candidates: int,
                 cosine_threshold: float, manhattan_threshold: int, batch_size: int, gpu_assign: bool = False):
        from pathlib import Path

        from pipeline.cluster import node_id

        import faiss
        import pyarrow as pa

        from pipeline.embeddings import Embeddings, read_metadata_table

        faiss.omp_set_num_threads(1)  # one actor per CPU: threads inside an actor would oversubscribe
        self.failure = None
        try:
            self.retriever = Retriever(index_dir, gpu_assign=gpu_assign)
            if gpu_assign:  # a GPU problem surfaces here, with its cause, not at the first search
                self.retriever.prepare_bulk()
        except (StageError, UsageError) as e:  # raised by process(): Ray keeps a task's exception, an
            self.failure = e  # actor start-up's reaches the driver only as the text of an ActorDiedError
            return
        except RuntimeError as e:
            if not gpu_assign:
                raise
            self.failure = StageError(f"neighbours.gpus_per_actor: {e}: set neighbours.gpus_per_actor=0 "
                                      f"to assign cells on the CPU")
            return
        self.keep = read_keep(Path(dedup_dir))
        self.embeddings = emb = Embeddings(Path(embed_dir))  # the queries: every kept embed row
        meta = read_metadata_table(emb.dir, emb.manifest, ["key", "phash"])
        # Arrow strings (64-bit offsets past 2 GiB of keys): a few bytes over the key per row, in every actor
        self.keys = meta.column("key").cast(pa.large_string()).combine_chunks()
        self.bits = phash_bits_from_hex(meta.column("phash").to_pylist())
        self.out = Path(out_dir)
        self.k, self.candidates, self.batch_size = k, candidates, batch_size
        self.thresholds = (cosine_threshold, manhattan_threshold)
        self.allowed = None  # bool by embed row (neighbours.where), or None: sent with each shard
        self.n_kept = int(self.keep.sum())
        self.node = node_id()

    def neighbours(self, queries: np.ndarray, q_rows: np.ndarray):
        sims = np.zeros((len(q_rows), self.k), np.float32)
        rows = np.zeros((len(q_rows), self.k), np.int64)
        todo, c = np.arange(len(q_rows)), self.candidates
        while len(todo):
            s, r = self.retriever.search(queries[todo], min(c, self.n_kept), bulk=True, rows=q_rows[todo])
            if self.allowed is not None:  # neighbours.where: a filtered-out candidate counts as none
                r = np.where((r >= 0) & self.allowed[np.maximum(r, 0)], r, -1)
            s, r, ok = select_neighbours(s, r, q_rows[todo], self.bits[q_rows[todo]], self.bits, self.k, *self.thresholds)
            done = ok | (c >= self.n_kept)
            if (~ok & done).any():
                bad = q_rows[todo][~ok & done][0]
                raise StageError(f"row {bad} has fewer than {self.k} kept images that are not near-identical to it: "
                                 f"lower neighbours.k or the dedup thresholds")
            sims[todo[done]], rows[todo[done]] = s[done], r[done]
            todo, c = todo[~done], c * 2
        return sims, rows

    def __call__(self, shard: dict, embed_dir: str) -> tuple[int, int]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        emb = self.embeddings
        start = shard["row_offset"]
        q_rows = np.arange(start, start + shard["rows"], dtype=np.int64)
        q_rows = q_rows[self.keep[q_rows]]
        all_sims, all_rows = [], []
        for b in range(0, len(q_rows), self.batch_size):
            batch = q_rows[b:b + self.batch_size]
            s, r = self.neighbours(emb[batch].astype(np.float32), batch)
            all_sims.append(s)
            all_rows.append(r)
        sims = np.concatenate(all_sims) if all_sims else np.zeros((0, self.k), np.float32)
        rows = np.concatenate(all_rows) if all_rows else np.zeros((0, self.k), np.int64)
        k = self.k
        table = pa.table({
            "key": self.keys.take(q_rows).cast(pa.string()),
            "row": pa.array(q_rows),
            "neighbour_keys": pa.FixedSizeListArray.from_arrays(self.keys.take(rows.reshape(-1)).cast(pa.string()), k),
            "neighbour_rows": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), k),
            "similarities": pa.FixedSizeListArray.from_arrays(pa.array(sims.reshape(-1), pa.float32()), k),
        })
        with atomic_path(self.out / f"neighbours_{shard['shard']:05d}.parquet") as tmp:
            pq.write_table(table, tmp)
        return shard["shard"], len(q_rows)

    def ready(self) -> float:
        """When this actor was ready (wall clock): the stage's start-up figure."""
        import time

        return time.time()

    def process(self, shard: dict, embed_dir: str, allowed=None) -> tuple[int, int, str]:  # the Ray actor method
        """Write one shard's lists; (shard, rows, this actor's Ray node). `allowed`: neighbours.where's mask,
        sent with the work because the driver computes it while the actors start."""
        if self.failure is not None:
            raise self.failure
        self.allowed = allowed
        return (*self(shard, embed_dir), self.node)


ACTOR_BASE_BYTES = 400 << 20  # an actor's Python, numpy, faiss and pyarrow, before any rows
ACTOR_ROW_BYTES = 64  # per embed row in every actor: key (Arrow string), pHash, keep flag, with room


def actor_count(actors: str | int, rows: int, shared: bool = False) -> int:
    """`neighbours.actors`: a number, or "auto" = one single-threaded actor per CPU, as many as half of the
    memory holds (each keeps every key and pHash; the index pages are shared). On the local Ray the
    pipeline owns (`shared` False), its totals: a stage's killed actors hand their CPUs back
    asynchronously, so a run right after another saw one CPU free of two and ran one actor. On a
    joined cluster (`ray.address`), what is free now: other jobs may hold the rest, and an actor
    waiting for a CPU would hold its queued shard."""
    import ray

    if actors != "auto":
        return int(actors)
    resources = ray.available_resources() if shared else ray.cluster_resources()
    return auto_count(actors, int(resources.get("CPU", 1)), resources.get("memory", 0) / 2,
                      ACTOR_BASE_BYTES + ACTOR_ROW_BYTES * rows)


def gpu_actor_count(cfg) -> int:
    """Before the stage: are there GPUs for neighbours.gpus_per_actor? The Ray cluster's at `ray.address`
    (the driver may have none), else the ones faiss sees here. None is a UsageError; else how many
    shares the GPUs hold in all."""
    from pipeline.cluster import cluster_resources, describe

    share, resources = cfg.neighbours.gpus_per_actor, cluster_resources(cfg)
    if resources is not None:
        gpus, where = resources.get("GPU", 0), describe(cfg, resources)
    else:
        import faiss

        gpus, where = faiss.get_num_gpus(), "faiss sees no GPU on this machine (a GPU and the faiss-gpu package are needed)"
    if gpus < share:
        raise UsageError(f"neighbours.gpus_per_actor is {share:g} but {where}: set neighbours.gpus_per_actor=0 "
                         f"to assign cells on the CPU")
    return int(gpus / share + 1e-9)


def gpu_actor_slots(nodes: list[dict], available: dict, share: float) -> int:
    """How many actors of one CPU and `share` of a GPU Ray can place now: per live node, the fewer of
    its CPUs and its GPU shares (both on one node), summed; at most what is free in all (`available`).
    More would wait for resources that never free, holding the shards queued on them."""
    per_node = sum(min(int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0) / share + 1e-9))
                   for n in nodes if n.get("Alive"))
    return min(per_node, int(available.get("CPU", 0)), int(available.get("GPU", 0) / share + 1e-9))


def dedup_thresholds(stage: StageRun) -> tuple[float, int]:
    """(cosine, manhattan) of the dedup run that wrote keep.parquet, from its manifest."""
    thresholds = stage.inputs["dedup"].get("thresholds")
    if not isinstance(thresholds, dict) or not {"cosine", "manhattan"} <= set(thresholds):
        path = stage.input_dirs["dedup"] / "manifest.json"
        raise StageError(f"{path} does not record the near-duplicate thresholds that built keep.parquet "
                         f"(\"thresholds\": {{\"cosine\": ..., \"manhattan\": ...}}): rebuild it with "
                         f"`knnd run dedup --force`")
    return float(thresholds["cosine"]), int(thresholds["manhattan"])


def allowed_rows(stage: StageRun):
    """neighbours.where as a bool mask by embed row, or None."""
    if not stage.conf.where:
        return None
    from pipeline.embeddings import metadata_files
    from pipeline.filters import matching_rows, row_mask

    embed = stage.inputs["embed"]
    rows = matching_rows(metadata_files(stage.input_dirs["embed"], embed), stage.conf.where, "neighbours.where")
    if len(rows) <= stage.conf.k:
        raise UsageError(f"neighbours.where {stage.conf.where!r} leaves {len(rows)} images, not more than "
                         f"neighbours.k={stage.conf.k}: loosen the filter or lower neighbours.k")
    return row_mask(rows, int(embed["rows"]))


def local_threads(stage: StageRun) -> int:
    """Threads to run the shards on in this process (0: Ray actors): below neighbours.ray_min_rows embed
    rows, without a cluster (ray.address) or GPU assignment, and for an index faiss searches whole
    (HNSW, flat: the auto factory's up to 500k vectors). An IVF's bulk search walks its lists in Python,
    holding the GIL: on threads the 1M growth set took 35.7 s against 19.1 s on actors. One thread per
    CPU (ray.num_cpus, else this process's)."""
    from pipeline.files import usable_cpus

    conf, cfg = stage.conf, stage.cfg
    ivf = "IVF" in str(stage.inputs["index"].get("factory", "IVF"))  # unknown: as an IVF
    if cfg.ray.address or conf.gpus_per_actor or ivf or stage.inputs["embed"]["rows"] >= conf.ray_min_rows:
        return 0
    return int(conf.actors) if conf.actors != "auto" else cfg.ray.num_cpus or usable_cpus()


def run_in_process(stage: StageRun, args: tuple, todo: list, threads: int, progress) -> dict:
    """The shards on `threads` threads of this process, each with one faiss thread: the actors' code, so
    the same files; faiss's thread count is restored after. The manifest's `nodes` counts Ray nodes only."""
    import faiss
    from concurrent.futures import ThreadPoolExecutor, as_completed

    clock, before = RunClock(), faiss.omp_get_max_threads()
    try:
        worker = NeighbourWorker(*args)  # sets faiss to one thread per search
        if worker.failure is not None:
            raise worker.failure
        worker.allowed = allowed_rows(stage)  # HNSW / flat only (local_threads): no lazily built bulk-search state
        clock.ready()
        # OpenMP's thread count is per thread: each pool thread sets its own, or searches on every CPU
        with ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
            futures = [pool.submit(worker, shard, args[1]) for shard in todo]
            try:
                for future in as_completed(futures):
                    shard, count = future.result()
                    stage.mark_done(shard, {"rows": count, "node": ""})  # no Ray node: `nodes` stays {}
                    progress.update(1, count)
                    clock.items += count
            finally:
                pool.shutdown(cancel_futures=True)  # a failed shard stops the rest
    finally:
        faiss.omp_set_num_threads(before)
    return clock.report("worker") | {"actors": 0, "threads": threads}


def run(stage: StageRun) -> dict:
    from pipeline.cluster import count_nodes

    conf = stage.conf
    shards = stage.inputs["embed"]["shards"]
    cosine, manhattan = dedup_thresholds(stage)
    stage.plan(len(shards))
    # absolute: Ray workers need not share the driver's working directory
    args = (str(stage.input_dirs["index"].resolve()), str(stage.input_dirs["embed"].resolve()),
            str(stage.input_dirs["dedup"].resolve()), str(stage.dir.resolve()),
            conf.k, conf.candidates, cosine, manhattan, conf.batch_size, conf.gpus_per_actor > 0)
    todo = [s for s in shards if not stage.shard_done(s["shard"])]
    progress = stage.progress(len(shards), unit="images")
    timing = {"actors": 0, "images_this_run": 0}
    threads = local_threads(stage) if todo else 0
    if threads:
        timing = run_in_process(stage, args, todo, min(threads, len(todo)), progress)
    elif todo:
        timing = run_on_actors(stage, args, todo, progress)
    stats = stage.done_stats()
    total = sum(stats[s["shard"]]["rows"] for s in shards)
    return {
        "items": total,
        "counts": {"images": total, "shards": len(shards)},
        "k": conf.k,
        "nodes": count_nodes(stats[s["shard"]].get("node", "") for s in shards),  # {Ray node: shards done there}
        "shards": [{"shard": s["shard"], "rows": stats[s["shard"]]["rows"],
                    "neighbours": f"neighbours_{s['shard']:05d}.parquet"} for s in shards],
        "timing": timing,
    }


def run_on_actors(stage: StageRun, args: tuple, todo: list, progress) -> dict:
    """The shards on single-threaded Ray actors that each hold the index (memory-mapped: shared pages)."""
    import ray
    from ray.util import ActorPool

    from pipeline.cluster import release, stage_errors_unwrapped

    conf, cfg = stage.conf, stage.cfg
    ensure_ray(cfg)
    clock = RunClock()
    n_actors = min(actor_count(conf.actors, stage.inputs["embed"]["rows"], shared=bool(cfg.ray.address)), len(todo))
    if conf.gpus_per_actor:  # an actor waiting for a GPU share that never frees would hold its shard
        n_actors = min(n_actors, gpu_actor_slots(ray.nodes(), ray.available_resources(), conf.gpus_per_actor))
        if n_actors < 1:
            raise UsageError(f"neighbours.gpus_per_actor is {conf.gpus_per_actor:g} but Ray has no GPU share and "
                             f"CPU free on one node: free them, or set neighbours.gpus_per_actor=0")
    worker = ray.remote(NeighbourWorker).options(num_cpus=1, num_gpus=conf.gpus_per_actor, scheduling_strategy="SPREAD")
    actors = [worker.remote(*args) for _ in range(n_actors)]
    ready = [a.ready.remote() for a in actors]  # read at the end: the shards queue behind start-up
    allowed = allowed_rows(stage)  # while the actors start (process, imports, index mmap, metadata)
    allowed = None if allowed is None else ray.put(allowed)  # once to the object store, not with every shard
    pool = ActorPool(actors)
    embed_dir = args[1]
    with stage_errors_unwrapped():
        for shard, count, node in pool.map_unordered(lambda a, s: a.process.remote(s, embed_dir, allowed), todo):
            stage.mark_done(shard, {"rows": count, "node": node})
            progress.update(1, count)
            clock.items += count
    clock.ready(wall=min(ray.get(ready)))  # the first actor's start-up
    release(actors)
    return clock.report("actor") | {"actors": n_actors}
