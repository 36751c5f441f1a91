"""neighbours stage: brute-force equality on an exact index, recall on IVF+PQ, exclusions, resume."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import markers, run_and_kill
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.duplicates import phash_bits_from_hex
from pipeline.faiss_search import recall_at_k
from pipeline.runner import run_stage, stage_status
from pipeline.synthetic import clustered_unit_vectors, random_phashes, write_embed_output

N, D = 3000, 24


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Embeddings with pHash twins (cosine ~0.64) that dedup, looking at one candidate per item, misses
    whenever another item is nearer, so neighbours (8 candidates) must drop them."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    x = clustered_unit_vectors(N, D, n_clusters=60, spread=1.0, seed=0)
    hashes = random_phashes(N, seed=1)
    for i in range(0, 200, 2):  # pHash twins with embeddings similar enough to be near, not always nearest
        hashes[i + 1] = hashes[i]
        x[i + 1] = unit(x[i] + 1.2 * unit(rng.standard_normal(D)))
    write_embed_output(root, x, shard_size=500, phash=hashes)
    return root


def stage_args(work, *sets):
    """dedup.candidates=1: dedup compares each item with its nearest other item only, so a twin
    survives it whenever another item is nearer; neighbours must then drop it by pHash."""
    return [f"workdir={work}", "dedup.manhattan_threshold=0", "dedup.candidates=1", "dedup.holdout=0", *sets]


def prepare(source, work):
    """A copy of the source embeddings, deduplicated by cosine 0.99 alone."""
    shutil.copytree(source / "embed", work / "embed")
    run_stage("dedup", load_config(None, stage_args(work, "dedup.cosine_threshold=0.99")))


def read_all(work):
    return pq.read_table(sorted((work / "neighbours").glob("neighbours_*.parquet"))).to_pandas()


@pytest.mark.parametrize("where", ["threads", "actors"])
def test_identical_to_brute_force_on_exact_index(source, tmp_path, where, monkeypatch):
    """Both ways of running the shards: threads of this process (below neighbours.ray_min_rows, the
    default at this size; each searching on one faiss thread, which OpenMP sets per thread) and Ray
    actors (ray_min_rows 0)."""
    import faiss

    from pipeline.neighbours import NeighbourWorker

    faiss_threads, real_call = [], NeighbourWorker.__call__
    monkeypatch.setattr(NeighbourWorker, "__call__",
                        lambda self, *a: faiss_threads.append(faiss.omp_get_max_threads()) or real_call(self, *a))
    work = tmp_path / "w"
    prepare(source, work)
    cfg = load_config(None, stage_args(work, "dedup.cosine_threshold=0.99", "neighbours.k=5", "neighbours.candidates=8",
                                       "index.factory=Flat", f"neighbours.ray_min_rows={0 if where == 'actors' else 10**6}"))
    run_stage("index", cfg)
    m = run_stage("neighbours", cfg)
    if where == "actors":
        import ray

        assert m["nodes"] == {ray.get_runtime_context().get_node_id(): 6}  # the one node did the 6 shards
        assert m["timing"]["actors"] > 0
    else:
        assert m["nodes"] == {} and m["timing"]["threads"] > 0 and m["timing"]["actors"] == 0
        assert faiss_threads == [1] * 6
    got = read_all(work)
    x = np.concatenate([np.load(work / "embed" / "img_emb" / f"img_emb_{s:05d}.npy") for s in range(6)]).astype(np.float32)
    bits = phash_bits_from_hex(pq.read_table(sorted((work / "embed" / "metadata").glob("*.parquet"))).column("phash").to_pylist())
    keep = pq.read_table(work / "dedup" / "keep.parquet").column("keep").to_numpy()
    kept = np.nonzero(keep)[0]
    assert list(got["row"]) == list(kept)
    sims = x[kept] @ x[kept].T
    position = {r: i for i, r in enumerate(kept)}
    for qi, row in enumerate(kept):
        expected = []
        for j in np.argsort(-sims[qi], kind="stable"):  # exact order; skip self and near-identical
            r = kept[j]
            if r != row and sims[qi, j] <= 0.99 and np.unpackbits(bits[row] ^ bits[r]).sum() > 0:
                expected.append(r)
                if len(expected) == 5:
                    break
        assert list(got["neighbour_rows"][qi]) == expected, row
        np.testing.assert_allclose(got["similarities"][qi], sims[qi][[position[e] for e in expected]], atol=1e-5)
    kept_set = set(kept)
    twins = got[[r < 200 and (r ^ 1) in kept_set for r in got["row"]]]  # both twins survived dedup
    by_cosine = [set(kept[np.argsort(-sims[position[r]], kind="stable")[1:6]]) for r in twins["row"]]
    assert sum((r ^ 1) in top for r, top in zip(twins["row"], by_cosine)) >= 20  # by cosine alone, twins would be neighbours
    assert all((r ^ 1) not in set(nb) for r, nb in zip(twins["row"], twins["neighbour_rows"]))  # pHash twins dropped
    assert all(r not in set(nb) for r, nb in zip(got["row"], got["neighbour_rows"]))  # never self
    assert all(len(nb) == 5 for nb in got["neighbour_rows"])
    assert all(np.all(np.diff(s) <= 0) for s in got["similarities"])
    keys = pq.read_table(sorted((work / "embed" / "metadata").glob("*.parquet"))).column("key").to_pylist()
    assert [list(k) for k in got["neighbour_keys"][:20]] == [[keys[r] for r in nb] for nb in got["neighbour_rows"][:20]]


def test_recall_on_ivf_pq(source, tmp_path):
    work = tmp_path / "w"
    prepare(source, work)
    exact_dir = tmp_path / "exact"
    prepare(source, exact_dir)
    for w, factory in ((work, "IVF32,PQ8x4"), (exact_dir, "Flat")):
        cfg = load_config(None, stage_args(w, "dedup.cosine_threshold=0.99", f"index.factory={factory}", "index.refine=true",
                                           "index.target_recall=0.95"))
        run_stage("index", cfg)
        run_stage("neighbours", cfg)
    approx, exact = read_all(work), read_all(exact_dir)
    recall = recall_at_k(np.stack(approx["neighbour_rows"]), np.stack(exact["neighbour_rows"]), 10)
    assert recall >= 0.95


def test_k_at_least_kept_is_a_usage_error(source, tmp_path, capsys):
    work = tmp_path / "w"
    prepare(source, work)
    run_stage("index", load_config(None, stage_args(work, "dedup.cosine_threshold=0.99")))
    args = [a for s in stage_args(work, "dedup.cosine_threshold=0.99", f"neighbours.k={N}", f"neighbours.candidates={N + 1}")
            for a in ("--set", s)]
    assert main(["run", "neighbours"] + args) == 2
    assert f"neighbours.k ({N}) must be smaller than the number of kept images" in capsys.readouterr().err
    assert not (work / "neighbours").exists()


def test_killed_and_rerun_is_identical_and_stale_when_dedup_changes(source, tmp_path, ray_local):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    sets = ["dedup.cosine_threshold=0.99", "neighbours.batch_size=50", "index.factory=Flat"]
    for w in (killed, clean):
        prepare(source, w)
        run_stage("index", load_config(None, stage_args(w, *sets)))
    args = stage_args(killed, *sets, "ray.num_cpus=1")
    done = run_and_kill("neighbours", args, markers(killed / "neighbours" / "_run" / "done"), at_least=1)
    assert 1 <= done < 6, f"kill landed after {done} of 6 shards"
    cfg = load_config(None, stage_args(killed, *sets))
    assert stage_status(cfg, "neighbours") == ("partial", f"{done} of 6 shards")
    run_stage("neighbours", cfg)
    run_stage("neighbours", load_config(None, stage_args(clean, *sets)))
    for s in range(6):
        name = f"neighbours_{s:05d}.parquet"
        assert pq.read_table(killed / "neighbours" / name).equals(pq.read_table(clean / "neighbours" / name))
    assert stage_status(cfg, "neighbours")[0] == "done"
    run_stage("dedup", load_config(None, stage_args(killed, "dedup.cosine_threshold=0.95")), force=True)
    assert stage_status(cfg, "neighbours")[0] == "stale"


def test_auto_actor_count_is_one_per_cpu_within_half_the_memory(monkeypatch):
    import ray

    from pipeline.neighbours import ACTOR_BASE_BYTES, ACTOR_ROW_BYTES, actor_count

    per_actor = ACTOR_BASE_BYTES + ACTOR_ROW_BYTES * 10_000_000
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "memory": 100 * per_actor})
    assert actor_count("auto", 10_000_000) == 16  # CPUs bound it
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "memory": 7 * per_actor})
    assert actor_count("auto", 10_000_000) == 3  # half of the memory holds 3.5 actors
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "memory": per_actor})
    assert actor_count("auto", 10_000_000) == 1  # never fewer than one
    assert actor_count(5, 10_000_000) == 5
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0, "memory": 100 * per_actor})
    assert actor_count("auto", 10_000_000, shared=True) == 4  # a joined cluster: what is free now


def test_thresholds_come_from_the_dedup_manifest_not_the_current_config(source, tmp_path, ray_local):
    """Editing dedup.* and forcing neighbours must not mix two rules: neighbours drops what the dedup that
    wrote keep.parquet called near-identical (its manifest's "thresholds"), whatever the config says now."""
    import json

    from pipeline.runner import StageError

    work = tmp_path / "w"
    sets = ["dedup.cosine_threshold=0.99", "neighbours.k=5", "neighbours.candidates=8", "index.factory=Flat"]
    prepare(source, work)
    run_stage("index", load_config(None, stage_args(work, *sets)))
    run_stage("neighbours", load_config(None, stage_args(work, *sets)))
    built = read_all(work)
    assert built["similarities"].map(max).max() > 0.5  # the edit below would change the lists
    edited = load_config(None, stage_args(work, *sets, "dedup.cosine_threshold=0.5", "dedup.manhattan_threshold=20"))
    run_stage("neighbours", edited, force=True)
    assert read_all(work).equals(built)

    manifest = work / "dedup" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["thresholds"]
    manifest.write_text(json.dumps(old))
    with pytest.raises(StageError, match=r"(?s)dedup/manifest\.json.*knnd run dedup --force"):
        run_stage("neighbours", edited, force=True)


def test_bulk_search_on_ivf_flat_gives_the_lists_per_query_search_gives(source, tmp_path, ray_local, monkeypatch):
    """Batches of 500 queries over IVF24,Flat take the list-by-list path (faiss big_batch_search),
    batches of 3 the per-query one: every shard's lists must be identical. The Retriever routes bulk
    searches there (a spy on big_batch_search's block computation counts the calls)."""
    from faiss.contrib.big_batch_search import BlockComputer

    from pipeline.retrieval import Retriever

    sets = ["dedup.cosine_threshold=0.99", "index.factory=IVF24,Flat", "index.nprobe=2", "neighbours.k=5",
            "neighbours.candidates=8"]
    works = {batch: tmp_path / f"b{batch}" for batch in (3, 500)}
    for batch, w in works.items():
        prepare(source, w)
        run_stage("index", load_config(None, stage_args(w, *sets)))
        run_stage("neighbours", load_config(None, stage_args(w, *sets, f"neighbours.batch_size={batch}")))
    names = sorted(p.name for p in (works[3] / "neighbours").glob("neighbours_*.parquet"))
    assert len(names) == 6
    for name in names:
        assert pq.read_table(works[500] / "neighbours" / name).equals(pq.read_table(works[3] / "neighbours" / name))
    blocks = []
    real = BlockComputer.block_search
    monkeypatch.setattr(BlockComputer, "block_search", lambda self, *a, **k: blocks.append(1) or real(self, *a, **k))
    retriever = Retriever(works[500] / "index")
    queries = np.asarray(retriever.embeddings[retriever.index_rows()[:500]], dtype=np.float32)
    bulk = retriever.search(queries, 8, bulk=True)
    assert len(blocks) == 24  # one block per inverted list
    plain = retriever.search(queries, 8)
    assert len(blocks) == 24
    np.testing.assert_array_equal(bulk[1], plain[1])


def test_indexed_queries_at_nprobe_1_search_the_list_they_are_stored_in(source, tmp_path, ray_local, monkeypatch):
    """At nprobe 1 on IVF,Flat the stage's queries (indexed images) search the list each is stored
    in, scoring no centroid (Retriever builds no cell assigner): the stage's lists equal those of an
    in-process worker on that path and of one that assigns every query as before, and the Retriever's
    results equal index.search's; a query the index does not hold is assigned (the assigner is built)."""
    from pipeline.neighbours import NeighbourWorker
    from pipeline.retrieval import Retriever
    from pipeline.runner import read_json

    work = tmp_path / "w"
    sets = ["dedup.cosine_threshold=0.99", "index.factory=IVF24,Flat", "index.nprobe=1", "neighbours.k=5",
            "neighbours.candidates=8"]
    prepare(source, work)
    cfg = load_config(None, stage_args(work, *sets))
    run_stage("index", cfg)
    run_stage("neighbours", cfg)
    retriever = Retriever(work / "index")
    rows = retriever.index_rows()[:500]
    queries = np.asarray(retriever.embeddings[rows], dtype=np.float32)
    bulk = retriever.search(queries, 8, bulk=True, rows=rows)
    assert "_bulk_coarse" not in retriever.__dict__  # no centroid was scored
    np.testing.assert_array_equal(bulk[1], retriever.search(queries, 8)[1])
    outside = np.append(rows[:-1], rows.max() + 10_000)
    np.testing.assert_array_equal(retriever.search(queries, 8, bulk=True, rows=outside)[1], bulk[1])
    assert "_bulk_coarse" in retriever.__dict__

    shard = read_json(work / "embed" / "manifest.json")["shards"][0]
    dedup = read_json(work / "dedup" / "manifest.json")["thresholds"]
    outputs = {}
    for path in ("own", "assigned"):
        if path == "assigned":
            monkeypatch.setattr(Retriever, "_stored_cells", lambda self, queries, rows: None)  # assign every query
        outputs[path] = tmp_path / path
        outputs[path].mkdir()
        worker = NeighbourWorker(str(work / "index"), str(work / "embed"), str(work / "dedup"), str(outputs[path]), 5, 8,
                                 dedup["cosine"], dedup["manhattan"], 8192)
        worker(shard, str(work / "embed"))
        assert ("_bulk_coarse" in worker.retriever.__dict__) == (path == "assigned")  # the worker takes the own-cell path
    name = f"neighbours_{shard['shard']:05d}.parquet"
    for path in ("own", "assigned"):
        assert pq.read_table(outputs[path] / name).equals(pq.read_table(work / "neighbours" / name))


def test_unreadable_index_stops_the_stage_with_the_rebuild_message(source, tmp_path, ray_local):
    """The index is opened inside the Ray actors; its error must reach the user as the Retriever's own
    message (what is wrong, `knnd run index --force`), not as Ray's text of a dead actor. Nothing is written."""
    from pipeline.files import StageError

    work = tmp_path / "w"
    prepare(source, work)
    cfg = load_config(None, stage_args(work, "dedup.cosine_threshold=0.99", "index.factory=Flat"))
    run_stage("index", cfg)
    (work / "index" / "image.index").write_bytes(b"not a faiss index")
    with pytest.raises(StageError) as raised:
        run_stage("neighbours", cfg)
    message = str(raised.value)
    assert message.startswith(f"{work / 'index' / 'image.index'} cannot be read (")
    assert message.endswith("rebuild it with `knnd run index --force`") and "Traceback" not in message
    assert not list((work / "neighbours").glob("neighbours_*.parquet"))


def test_neighbour_actor_imports_no_scipy():
    """Each neighbours actor is a fresh process that imports this module: faiss.contrib.clustering drags in
    scipy (~0.2 s of start-up per actor) and is only needed to build indexes, so it is imported lazily."""
    import subprocess
    import sys

    code = "import sys, pipeline.neighbours; print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_back_to_back_runs_get_an_actor_per_cpu(source, tmp_path, ray_local):
    """The second of two runs in one process starts while the first's killed actors are still handing
    their CPUs back; it must still get one actor per CPU (it got one of two when counting free CPUs)."""
    import ray

    work = tmp_path / "w"
    prepare(source, work)
    cfg = load_config(None, stage_args(work, "dedup.cosine_threshold=0.99", "neighbours.k=5", "neighbours.candidates=8",
                                       "index.factory=Flat", "neighbours.actors=auto", "neighbours.ray_min_rows=0"))
    run_stage("index", cfg)
    counts = [run_stage("neighbours", cfg, force=True)["timing"]["actors"] for _ in range(2)]
    shards = len(list((work / "neighbours").glob("neighbours_*.parquet")))
    assert counts == [min(int(ray.cluster_resources()["CPU"]), shards)] * 2 and counts[0] > 1


def test_gpu_cell_assignment_without_a_gpu_is_refused_before_the_stage(tmp_path, monkeypatch):
    """neighbours.gpus_per_actor asks for GPU shares: on a machine where faiss sees no GPU (this one)
    the stage stops before any work, naming the setting and the fix; on a cluster it counts the
    cluster's GPUs: as many actors as the shares fit."""
    from pipeline import neighbours
    from pipeline.config import load_config
    from pipeline.runner import UsageError

    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)  # as on this machine, also where faiss-gpu sees one
    cfg = load_config(None, [f"workdir={tmp_path}", "neighbours.gpus_per_actor=0.25"])
    with pytest.raises(UsageError, match=r"neighbours.gpus_per_actor is 0.25 but faiss sees no GPU on this machine "
                                         r".*set neighbours.gpus_per_actor=0"):
        neighbours.check(cfg)
    monkeypatch.setattr("pipeline.cluster.cluster_resources", lambda cfg: {"CPU": 64, "GPU": 2})
    assert neighbours.gpu_actor_count(cfg) == 8
    monkeypatch.setattr("pipeline.cluster.cluster_resources", lambda cfg: {"CPU": 64})
    with pytest.raises(UsageError, match="offers 64 CPUs and 0 GPUs: set neighbours.gpus_per_actor=0"):
        neighbours.gpu_actor_count(cfg)
    neighbours.check(load_config(None, [f"workdir={tmp_path}"]))  # the default assigns on the CPU: no question
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index_infos.json").write_text('{"factory": "HNSW32"}')  # no IVF cells to assign to
    with pytest.raises(UsageError, match="but the index is HNSW32, which has none: set neighbours.gpus_per_actor=0"):
        neighbours.check(cfg)
    (tmp_path / "index" / "index_infos.json").write_text('{"factory": "OPQ64,IVF4096_HNSW32,PQ64"}')
    with pytest.raises(UsageError, match="0 GPUs: set neighbours.gpus_per_actor=0 to assign"):  # an IVF index: on to the GPU count
        neighbours.check(cfg)


def test_gpu_actors_fit_on_one_node_each_and_in_what_is_free():
    """An actor needs its CPU and its GPU share on one node: a CPU-only node adds none; a node adds the
    fewer of its CPUs and its shares; the total is capped by what Ray has free now."""
    from pipeline.neighbours import gpu_actor_slots

    nodes = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 8}},  # 32 shares of 0.25, but 16 CPUs
             {"Alive": True, "Resources": {"CPU": 64}},              # no GPU: no actor
             {"Alive": True, "Resources": {"CPU": 2, "GPU": 1}},     # 4 shares, 2 CPUs
             {"Alive": False, "Resources": {"CPU": 8, "GPU": 8}}]    # gone
    assert gpu_actor_slots(nodes, {"CPU": 90, "GPU": 9}, 0.25) == 18
    assert gpu_actor_slots(nodes, {"CPU": 90, "GPU": 2}, 0.25) == 8  # other jobs hold 7 GPUs
    assert gpu_actor_slots(nodes, {"CPU": 5, "GPU": 9}, 0.25) == 5
    assert gpu_actor_slots(nodes[1:2], {"CPU": 64}, 0.5) == 0


def test_the_driver_threads_take_small_whole_searched_indexes_only():
    """Threads in the driver below neighbours.ray_min_rows for HNSW / flat indexes; Ray actors for an IVF
    (its bulk search holds the GIL in Python loops: 1.9x slower on threads at 1M), on a cluster, with GPU
    assignment, at ray_min_rows rows and above, or when the index manifest does not name its factory."""
    from types import SimpleNamespace

    from pipeline.neighbours import local_threads

    def threads(factory="HNSW32", rows=1000, address=None, gpus=0.0, actors="auto", num_cpus=3):
        conf = SimpleNamespace(gpus_per_actor=gpus, ray_min_rows=10_000, actors=actors)
        cfg = SimpleNamespace(ray=SimpleNamespace(address=address, num_cpus=num_cpus))
        index = {} if factory is None else {"factory": factory}
        return local_threads(SimpleNamespace(conf=conf, cfg=cfg, inputs={"index": index, "embed": {"rows": rows}}))

    assert threads() == 3 and threads(factory="Flat") == 3 and threads(actors=2) == 2
    for case in (dict(factory="IVF24,Flat"), dict(factory="OPQ16_64,IVF1024_HNSW32,PQ16"), dict(factory=None),
                 dict(rows=10_000), dict(address="auto"), dict(gpus=0.25)):
        assert threads(**case) == 0, case
