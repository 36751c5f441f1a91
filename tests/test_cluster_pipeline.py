"""A simulated 3-node Ray cluster (ray.cluster_utils.Cluster: a head and two workers on this machine, one
CPU each), joined through `ray.address`: download -> embed -> dedup -> index -> neighbours -> pack ->
3 training steps on 2 Ray Train workers. Each stage's manifest names the nodes that did its shards,
the stages that distribute ran on more than one, and every output equals a single-node run's.

Outputs are compared per key: img2dataset's download threads write a shard's samples in the order
they arrive, so embed rows (and everything numbered by them) differ between two runs. The one copied
picture sits in another shard than its original: dedup keeps the earlier row of a duplicate pair, so a
pair inside one shard could be resolved either way by two runs, on one node or many. Training is
compared on the same pack (copied), since the order of a pack's samples decides the batches.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TINY_CLIP, ImageServer
from model.data import read_pack_shard
from pipeline.config import load_config
from pipeline.runner import run_stage

STAGES = ["download", "embed", "dedup", "index", "neighbours", "pack", "train"]
DISTRIBUTED = ["download", "index", "pack", "train"]  # one Ray task per shard, or Ray Train workers
SHARDS, SHARD_SIZE = 4, 8
COPY_OF = 3  # /copy.png serves picture 3 (in shard 0) as the first URL of shard 2
SETS = ["device=cpu", f"download.shard_size={SHARD_SIZE}", "download.image_size=32", "download.encode_format=png",
        "download.threads=4", "download.timeout=2",
        f"embed.model={os.path.abspath(TINY_CLIP)}", "embed.batch_size=8",
        "dedup.cosine_threshold=0.9999", "dedup.manhattan_threshold=0", "dedup.holdout=0.1",
        # IVF searched in every cell: exact, whatever the k-means (its sample follows the embed rows)
        "index.factory=IVF2,Flat", "index.nprobe=2", "index.parallel_min_vectors=0", "index.eval_queries=10",
        "index.thumbnail_size=0", "neighbours.k=3", "neighbours.candidates=8", "neighbours.actors=2",
        "pack.image_size=16", "train.model=tiny", "train.steps=3", "train.batch_size=4", "train.num_workers=2",
        "train.checkpoint_every=3", "train.warmup_steps=1"]


def url_list(server: ImageServer, path):
    """SHARDS x SHARD_SIZE URLs: distinct pictures, a copy of one in another shard, and two broken URLs."""
    server.good["/copy.png"] = server.good[f"/good/{COPY_OF}.png"]
    good = [f"{server.base}/good/{i}.png" for i in range(SHARDS * SHARD_SIZE - 3)]
    base = server.base
    urls = good[:5] + [f"{base}/missing.png"] + good[5:12] + [f"{base}/error.png"] + good[12:14] + [f"{base}/copy.png"] + good[14:]
    assert len(urls) == SHARDS * SHARD_SIZE and urls[2 * SHARD_SIZE].endswith("/copy.png")
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path)
    return path


def run_pipeline(workdir, sets: list[str], stages=STAGES) -> dict[str, dict]:
    cfg = load_config(None, [f"workdir={workdir}", *SETS, *sets])
    return {name: run_stage(name, cfg) for name in stages}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"cluster": (workdir, manifests, node ids), "single": (workdir, manifests)}: the pipeline on a
    3-node cluster, then on one local Ray node, which also trains on a copy of the cluster's pack. The
    session's local Ray is stopped meanwhile and restarted after."""
    import ray
    from model.clip import load_clip
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("cluster")
    server = ImageServer(SHARDS * SHARD_SIZE - 3)
    torch.manual_seed(0)
    clip = root / "tiny_clip.pt"  # a random CLIP, the same weights in both runs
    torch.save(load_clip(os.path.abspath(TINY_CLIP), None).model.state_dict(), clip)
    sets = [f"download.url_list={url_list(server, root / 'urls.parquet')}", f"embed.pretrained={clip}"]
    was_running = ray.is_initialized()
    out = {}
    try:
        ray.shutdown()
        node = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        try:
            for _ in range(2):
                cluster.add_node(**node)
            cluster.wait_for_nodes()
            manifests = run_pipeline(root / "cluster", [*sets, f"ray.address={cluster.address}"])
            out["cluster"] = (root / "cluster", manifests, {n["NodeID"] for n in ray.nodes() if n["Alive"]})
        finally:
            ray.shutdown()
            cluster.shutdown()
        # one node with the CPUs the 2 training workers need (fewer CPUs: fewer worker processes to start)
        ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="warning")
        manifests = run_pipeline(root / "single", sets, STAGES[:-1])
        # training on the cluster's pack, whose sample order (so batches) the single run's pack need not share
        shutil.copytree(root / "cluster" / "pack", root / "train_single" / "pack")
        manifests |= run_pipeline(root / "train_single", sets, ["train"])
        out["single"] = (root / "single", manifests)
    finally:
        ray.shutdown()
        server.close()
        if was_running:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    return out


def test_every_distributed_stage_ran_on_more_than_one_node(runs):
    _, manifests, node_ids = runs["cluster"]
    assert len(node_ids) == 3
    expected = {"download": SHARDS, "index": SHARDS, "pack": SHARDS, "train": 2}  # shards / workers
    for name in STAGES:
        nodes = manifests[name].get("nodes")
        if nodes is None:  # embed, dedup and neighbours until they record theirs
            assert name not in DISTRIBUTED, name
            continue
        assert set(nodes) <= node_ids, name
        if name in [*DISTRIBUTED, "embed", "neighbours"]:  # tasks per shard, actors, workers: spread out
            assert len(nodes) > 1, (name, nodes)
        if name in ("index", "pack"):  # cluster.ray_tasks pins its first wave, one task per CPU: every node
            assert len(nodes) == len(node_ids), (name, nodes)
        if name in expected:
            assert sum(nodes.values()) == expected[name], (name, nodes)
    assert manifests["index"]["factory"] == "IVF2,Flat"
    infos = json.loads((runs["cluster"][0] / "index" / "index_infos.json").read_text())
    assert infos["parallel_build"]["added"] == SHARDS and infos["ivfdata"] == "image.ivfdata"
    _, single = runs["single"]
    for name in DISTRIBUTED:  # the single-node run names its one node
        assert len(single[name]["nodes"]) == 1, name


def embeddings(workdir) -> dict[str, np.ndarray]:
    meta = pq.read_table(sorted((workdir / "embed" / "metadata").glob("*.parquet")), columns=["key"]).column("key")
    vectors = np.concatenate([np.load(p) for p in sorted((workdir / "embed" / "img_emb").glob("*.npy"))])
    return dict(zip(meta.to_pylist(), vectors, strict=True))


def urls(workdir) -> dict[str, str]:
    t = pq.read_table(sorted((workdir / "embed" / "metadata").glob("*.parquet")), columns=["key", "url"]).to_pydict()
    return dict(zip(t["key"], t["url"], strict=True))


def dedup(workdir) -> dict[str, tuple]:
    """key -> (keep, holdout, the key of the item it duplicates or None); duplicate_of is an embed row."""
    t = pq.read_table(workdir / "dedup" / "keep.parquet").to_pydict()
    assert t["row"] == list(range(len(t["row"])))
    return {key: (keep, hold, None if of is None else t["key"][of])
            for key, keep, hold, of in zip(t["key"], t["keep"], t["holdout"], t["duplicate_of"], strict=True)}


def neighbours(workdir) -> dict[str, list[str]]:
    out = {}
    for path in sorted((workdir / "neighbours").glob("neighbours_*.parquet")):
        t = pq.read_table(path, columns=["key", "neighbour_keys"]).to_pydict()
        out |= dict(zip(t["key"], t["neighbour_keys"], strict=True))
    return out


def pack(workdir) -> dict[str, dict]:
    out = {}
    for path in sorted((workdir / "pack").glob("*.tar")):
        shard = read_pack_shard(path)
        out |= {key: {name: shard[name][i] for name in ("image", "emb", "nbr")} for i, key in enumerate(shard["keys"])}
    return out


def test_outputs_equal_the_single_node_run_per_key(runs):
    (one, m1), (many, m2, _) = runs["single"], runs["cluster"]
    assert m1["download"]["counts"] == m2["download"]["counts"] == {
        "urls": SHARDS * SHARD_SIZE, "images": SHARDS * SHARD_SIZE - 2, "failed": 2, "shards": SHARDS}
    a, b = embeddings(one), embeddings(many)
    assert set(a) == set(b) and len(a) == SHARDS * SHARD_SIZE - 2
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    kept_a, kept_b = dedup(one), dedup(many)
    assert kept_a == kept_b
    key_of = {url.rsplit("/", 1)[1]: key for key, url in urls(one).items()}
    assert kept_a[key_of["copy.png"]] == (False, False, key_of[f"{COPY_OF}.png"])  # the copy names its original
    nbr_a, nbr_b = neighbours(one), neighbours(many)
    assert nbr_a == nbr_b and len(nbr_a) == m1["dedup"]["kept"] and all(len(v) == 3 for v in nbr_a.values())
    pack_a, pack_b = pack(one), pack(many)
    assert set(pack_a) == set(pack_b) == set(nbr_a)
    for key in pack_a:
        for name in ("image", "emb", "nbr"):
            np.testing.assert_array_equal(pack_a[key][name], pack_b[key][name], err_msg=f"{key} {name}")


def test_two_ray_train_workers_on_three_nodes_train_as_on_one(runs):
    (many, m2, _), (single, m1) = runs["cluster"], runs["single"]
    one = single.parent / "train_single"
    assert m1["train"]["step"] == m2["train"]["step"] == 3
    losses = [[json.loads(line)["loss"] for line in (w / "train" / "metrics.jsonl").read_text().splitlines()]
              for w in (one, many)]
    assert len(losses[0]) == 1 and losses[0] == losses[1]  # DDP over two ranks on CPU: bit for bit
    a = torch.load(one / "train" / m1["train"]["checkpoint"], weights_only=True)
    b = torch.load(many / "train" / m2["train"]["checkpoint"], weights_only=True)
    assert a["ema"].keys() == b["ema"].keys()
    assert all(torch.equal(a["ema"][name], b["ema"][name]) for name in a["ema"])
