"""GPU and worker-count decisions for the work Ray places (the embed encoder, the training workers).

With `ray.address` set they are made against what the cluster offers (`ray.cluster_resources()`):
the machine running `knnd` may have no GPU while the cluster has many, and a request the cluster
cannot meet would wait forever instead of failing. With a local Ray (the default) they are made as
before, from what this machine's torch sees. Work the driver does itself (sampling, search,
evaluation) keeps `runner.resolve_device`.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter

from pipeline.files import StageError, UsageError, usable_cpus
from pipeline.runner import ensure_ray, resolve_device


def cluster_resources(cfg) -> dict | None:
    """`ray.cluster_resources()` of the cluster at `ray.address` (joined once per process), or None
    without an address (decide locally)."""
    if not cfg.ray.address:
        return None
    import ray

    ensure_ray(cfg)
    return ray.cluster_resources()


def local_resources(cfg) -> dict:
    """What a local Ray offers: its CPUs (ray.num_cpus, else this machine's) and this machine's GPUs."""
    gpus = 0
    if cfg.device != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": cfg.ray.num_cpus or usable_cpus(), "GPU": gpus}


def describe(cfg, resources: dict) -> str:
    where = f"the Ray cluster at {cfg.ray.address}" if cfg.ray.address else "this machine's local Ray"
    return f"{where} offers {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs"


def work_device(cfg, gpus_needed: int = 1) -> str:
    """The `device` of work Ray places, needing `gpus_needed` GPUs (one per worker), on the cluster's or
    this machine's: auto is cuda when there are that many GPUs, cuda with fewer is a UsageError naming
    what there is. (Ray Train asked for more GPUs than a local Ray has retries forever, silently.)"""
    resources = cluster_resources(cfg)
    if resources is None:
        if (device := resolve_device(cfg)) != "cuda":  # a UsageError for cuda without CUDA
            return device
        resources = local_resources(cfg)
    gpus = resources.get("GPU", 0)
    if cfg.device == "cpu" or gpus >= gpus_needed:
        return "cpu" if cfg.device == "cpu" else "cuda"
    if cfg.device == "auto":
        if not cfg.ray.address:  # this machine has GPUs, too few: say why the workers go to CPUs
            print(f"{gpus_needed} workers need {gpus_needed} GPUs, but {describe(cfg, resources)}: "
                  f"they run on CPUs (lower train.num_workers to {gpus:g} to use the GPU)", file=sys.stderr)
        return "cpu"
    fix = ("set device=cpu (or auto), or add GPU nodes to the cluster" if cfg.ray.address
           else f"lower train.num_workers to {gpus:g}, or set device=cpu")
    raise UsageError(f"device is cuda and needs {gpus_needed} GPU{'s' if gpus_needed > 1 else ''}, but "
                     f"{describe(cfg, resources)}: {fix}")


def require_per_worker(cfg, workers: int, resource: str, setting: str) -> None:
    """A UsageError unless the cluster (or the local Ray) offers `workers` x one `resource` ("GPU" or
    "CPU"), which `setting` asks for."""
    resources = cluster_resources(cfg) or local_resources(cfg)
    if resources.get(resource, 0) >= workers:
        return
    have = int(resources.get(resource, 0))
    fix = f"lower train.num_workers to {have}" if have else ("set train.use_gpu=false" if resource == "GPU" else "")
    more = f"add nodes with {resource}s" if cfg.ray.address else ("raise ray.num_cpus" if resource == "CPU" else "")
    raise UsageError(f"{setting} needs {workers} {resource}s (one per worker), but {describe(cfg, resources)}: "
                     f"{' or '.join(x for x in (fix, more) if x)}")


def node_id() -> str:
    """The id of the Ray node this code runs on (hex), or "" outside Ray. Stage tasks and actors return
    it with their results so the stage's manifest can say where its work ran (`count_nodes`)."""
    if "ray" not in sys.modules:  # not started here: no need to pay its import (a stage run in-process)
        return ""
    import ray

    if not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_id()


def count_nodes(ids) -> dict[str, int]:
    """{node id: how many of a stage's work items ran there}: a manifest's `nodes` entry."""
    return dict(sorted(Counter(i for i in ids if i).items()))


def release(actors, timeout: float = 10.0) -> None:
    """Kill a stage's actors (one CPU each, as embed's encoders and neighbours' workers take) now that
    its work is done, and wait, at most `timeout` seconds, until the cluster counts their CPUs free, so
    the next stage finds every node free: a handle going out of scope frees them only later, ray.kill
    returns before the nodes take the CPUs back, and a stage that starts meanwhile crowds onto the
    nodes that look free (the 3-node test saw pack's 4 tasks on one node, twice)."""
    import ray

    if not actors:
        return
    # the views lag: the free count read now may be high, so never wait for more than the cluster has
    expected = min(ray.available_resources().get("CPU", 0.0) + len(actors), ray.cluster_resources().get("CPU", 0.0))
    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + timeout  # bounded: on a shared cluster other jobs may take them at once
    while ray.available_resources().get("CPU", 0.0) < expected and time.monotonic() < deadline:
        time.sleep(0.05)


def ray_tasks(cfg, fn, calls: dict, on_error):
    """Run fn(*args) for every {key: args} as one-CPU Ray tasks spread over the nodes, and yield (key,
    result) as each finishes: the loop dedup's partitions, index's shards and pack's shards share.
    A failed task raises on_error(key, cause) (a StageError naming it and the fix), or the task's own
    error when on_error returns None."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as NodeAffinity

    ensure_ray(cfg)
    task, slots, running = ray.remote(fn), _cpu_slots(), {}
    for i, (key, args) in enumerate(calls.items()):
        where = NodeAffinity(slots[i], soft=True) if i < len(slots) else "SPREAD"
        running[task.options(num_cpus=1, max_retries=0, scheduling_strategy=where).remote(*args)] = key
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        key = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayTaskError as e:
            error = on_error(key, e.cause)
            if error is None:
                raise
            raise error from None
        yield key, result


def _cpu_slots() -> list[str]:
    """One node id per CPU of the alive nodes, interleaved across nodes (A, B, C, A, ...): where
    ray_tasks pins its first wave, one task per CPU. SPREAD alone is a preference the scheduler
    drops when its view of the other nodes still counts a finished stage's actors (the 3-node test
    saw pack's 4 tasks on one node, three times); soft affinity waits for the node instead, and
    falls back elsewhere only if that node is gone. Later tasks go wherever a CPU frees up. The cost:
    a first-wave task waits for its node even while another job holds that node's CPUs."""
    import ray

    cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")}
    return [node for r in range(max(cpus.values(), default=0)) for node, c in sorted(cpus.items()) if c > r]


@contextlib.contextmanager
def stage_errors_unwrapped():
    """Within the block, a Ray task or actor method that raised a StageError or UsageError (a corrupt
    shard, an unreadable index) surfaces as that error itself, not Ray's RayTaskError wrapping of it."""
    import ray

    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (StageError, UsageError)):
            raise e.cause from None
        raise
