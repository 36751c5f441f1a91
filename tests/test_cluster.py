"""GPU and worker decisions against the Ray cluster at ray.address (pipeline.cluster), not the machine
running knnd: a local Ray cluster (ray.cluster_utils) whose nodes declare GPUs they do not have.
No CUDA code runs: only the checks and the device choice."""
from __future__ import annotations

import json
import time

import pytest

from pipeline import embed, train
from pipeline.cli import main
from pipeline.cluster import work_device
from pipeline.config import load_config
from pipeline.files import UsageError


@pytest.fixture(scope="module")
def cluster():
    """A head node with 2 CPUs and no GPU; the driver joins it through ray.address (as on a cluster).
    The session's local Ray is stopped meanwhile and restarted after."""
    import ray
    from ray.cluster_utils import Cluster

    was_running = ray.is_initialized()
    ray.shutdown()
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    yield head
    ray.shutdown()
    head.shutdown()
    if was_running:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")


def workdir(tmp_path, address):
    """A workdir whose pack stage is done (the manifest train.check reads), joined to `address`."""
    pack = tmp_path / "pack"
    pack.mkdir(parents=True)
    (pack / "manifest.json").write_text(json.dumps({"image_size": 16, "d": 8, "k": 2, "items": 64, "shards": []}))
    return [f"workdir={tmp_path}", f"ray.address={address}", "train.model=tiny"]


def test_no_gpu_on_the_cluster_is_refused_naming_its_resources(cluster, tmp_path, capsys):
    sets = workdir(tmp_path, cluster.address)
    args = [a for s in sets for a in ("--set", s)]
    offers = f"the Ray cluster at {cluster.address} offers 2 CPUs and 0 GPUs"
    assert main(["run", "train", *args, "--set", "train.use_gpu=true", "--set", "train.num_workers=2"]) == 2
    err = capsys.readouterr().err
    assert f"train.num_workers=2 on GPUs needs 2 GPUs (one per worker), but {offers}" in err
    assert f"{offers}: set train.use_gpu=false or add nodes with GPUs" in err
    assert main(["run", "train", *args, "--set", "device=cuda"]) == 2
    assert f"device is cuda and needs 1 GPU, but {offers}: set device=cpu" in capsys.readouterr().err
    assert main(["run", "train", *args, "--set", "train.num_workers=4", "--set", "train.batch_size=32"]) == 2
    assert f"train.num_workers=4 on CPUs needs 4 CPUs (one per worker), but {offers}" in capsys.readouterr().err
    with pytest.raises(UsageError, match=f"device is cuda and needs 1 GPU, but {offers}"):
        embed.check(load_config(None, [*sets, "device=cuda"]))  # the encoder would otherwise wait forever
    assert work_device(load_config(None, sets)) == "cpu"  # auto: no GPU on the cluster
    assert not (tmp_path / "train").exists()  # refused before anything was written


def test_gpus_declared_by_a_cluster_node_pass_although_this_machine_has_none(cluster, tmp_path):
    import torch

    assert not torch.cuda.is_available()  # the old check (this machine's CUDA) refused every case below
    cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes()
    sets = workdir(tmp_path, cluster.address)
    train.check(load_config(None, [*sets, "train.use_gpu=true", "train.num_workers=2"]))
    embed.check(load_config(None, [*sets, "device=cuda"]))
    assert work_device(load_config(None, sets), gpus_needed=2) == "cuda"  # auto: the cluster's GPUs
    assert work_device(load_config(None, sets), gpus_needed=3) == "cpu"
    offers = f"the Ray cluster at {cluster.address} offers 3 CPUs and 2 GPUs"
    with pytest.raises(UsageError, match=f"train.num_workers=4 on GPUs needs 4 GPUs \\(one per worker\\), but {offers}: "
                       "lower train.num_workers to 2 or add nodes with GPUs"):
        train.check(load_config(None, [*sets, "train.use_gpu=true", "train.num_workers=4"]))


def test_without_ray_address_this_machine_decides_as_before(tmp_path, capsys):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "manifest.json").write_text(json.dumps({"image_size": 16, "d": 8, "k": 2, "items": 64, "shards": []}))
    assert main(["run", "train", "--set", f"workdir={tmp_path}", "--set", "train.model=tiny",
                 "--set", "train.use_gpu=true"]) == 2
    assert "train.use_gpu is true but no CUDA device is visible: set train.use_gpu=false" in capsys.readouterr().err
    assert work_device(load_config(None, [f"workdir={tmp_path}"])) == "cpu"


def test_a_local_ray_with_fewer_gpus_or_cpus_than_workers_is_refused_not_left_waiting(tmp_path, monkeypatch, capsys):
    """Locally, Ray Train asked for more GPUs (or CPUs) than the local Ray has retries for ever without a
    word: a machine with one GPU and train.num_workers=2 is refused (device=cuda) or trains on CPUs (auto,
    saying so), and more CPU workers than ray.num_cpus are refused. No CUDA code runs."""
    import torch

    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "manifest.json").write_text(json.dumps({"image_size": 16, "d": 8, "k": 2, "items": 64, "shards": []}))
    sets = [f"workdir={tmp_path}", "train.model=tiny", "ray.num_cpus=2"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    offers = "this machine's local Ray offers 2 CPUs and 1 GPUs"
    with pytest.raises(UsageError, match=f"device is cuda and needs 2 GPUs, but {offers}: lower train.num_workers to 1"):
        train.check(load_config(None, [*sets, "device=cuda", "train.num_workers=2"]))
    with pytest.raises(UsageError, match=f"train.num_workers=2 on GPUs needs 2 GPUs \\(one per worker\\), but {offers}: "
                       "lower train.num_workers to 1"):
        train.check(load_config(None, [*sets, "train.use_gpu=true", "train.num_workers=2"]))
    assert work_device(load_config(None, sets), gpus_needed=1) == "cuda"
    capsys.readouterr()
    assert work_device(load_config(None, sets), gpus_needed=2) == "cpu"  # auto: the workers go to CPUs, and it says so
    assert "lower train.num_workers to 1 to use the GPU" in capsys.readouterr().err
    train.check(load_config(None, [*sets, "train.num_workers=2"]))  # two CPU workers on two CPUs: fine
    with pytest.raises(UsageError, match=f"train.num_workers=4 on CPUs needs 4 CPUs \\(one per worker\\), but {offers}: "
                       "lower train.num_workers to 2 or raise ray.num_cpus"):
        train.check(load_config(None, [*sets, "train.num_workers=4", "train.batch_size=32"]))


def test_released_actors_cpus_are_free_when_release_returns(cluster):
    """The next stage's SPREAD tasks must see every node's CPUs free, not the ones a killed actor still holds."""
    import ray

    from pipeline.cluster import release

    if not ray.is_initialized():  # the tests above may have joined it already
        ray.init(address=cluster.address, logging_level="warning")

    @ray.remote(num_cpus=1)
    class Busy:
        def ping(self):
            return 1

    total = ray.cluster_resources()["CPU"]
    actors = [Busy.remote() for _ in range(int(total))]  # every CPU taken
    assert ray.get([a.ping.remote() for a in actors]) == [1] * len(actors)
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0.0) > 0 and time.monotonic() < deadline:  # the view lags
        time.sleep(0.05)
    assert ray.available_resources().get("CPU", 0.0) == 0.0
    release(actors)
    assert ray.available_resources().get("CPU", 0.0) == total
