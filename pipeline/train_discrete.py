"""train stage, `train.backbone: discrete`: the kNN-conditioned token transformer on pack/vq/tokens.npz.

The preset (tiny, demo, paper) sets the transformer's size; the token grid, the codebook and the
VQ decoder come from the pack's VQ (pack.tokens), the embedding dimension and k from the pack (k
lowered by train.k). The loop, its resume and its outputs are the continuous stage's
(model.discrete_trainer): checkpoints/, metrics.jsonl, the same manifest.
"""
from __future__ import annotations

import dataclasses
import sys

from pipeline.runner import StageError, StageRun, UsageError, ensure_ray


def discrete_config(preset: str, pack: dict, conf):
    """The DiscreteConfig of the preset over the pack's tokens; UsageError when the pack has none."""
    from model.discrete import DiscreteConfig

    tokens = pack.get("tokens")
    if tokens is None:
        raise UsageError("train.backbone is discrete but the pack holds no VQ tokens: "
                         "set pack.tokens=true and rebuild the pack (`knnd run pack --force --set pack.tokens=true`)")
    continuous_only = {"prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2", "loss_weighting": "none",
                       "attention_resolutions": None, "space_to_depth": 1}
    changed = [key for key, default in continuous_only.items() if getattr(conf, key) != default]
    if changed:
        raise UsageError(f"train.{changed[0]} applies to the continuous backbone only: leave it at its default "
                         f"({continuous_only[changed[0]]!r}) with train.backbone discrete")
    k = pack["k"]
    if conf.k is not None:
        if conf.k > k:
            raise UsageError(f"train.k {conf.k} is more than the {k} neighbours the pack holds: lower train.k "
                             f"or re-run `knnd run neighbours pack --set neighbours.k={conf.k}`")
        k = conf.k
    build = {"tiny": DiscreteConfig.tiny, "demo": DiscreteConfig.demo, "paper": DiscreteConfig.paper}[preset]
    return build(vq=tokens["vq_config"], clip_dim=pack["d"], k=k, conditioning=conf.conditioning)


def run(stage: StageRun) -> dict:
    from model.discrete_trainer import train_discrete
    from pipeline.index_files import clip_identity
    from pipeline.train import MetricsTail, manifest_body, train_params

    conf, pack = stage.conf, stage.inputs["pack"]
    config = discrete_config(conf.model, pack, conf)
    from pipeline.cluster import work_device

    use_gpu = conf.use_gpu or work_device(stage.cfg, conf.num_workers) == "cuda"  # the cluster's GPUs, as train.py
    params = train_params(conf, use_gpu)
    pack_dir = stage.input_dirs["pack"].resolve()
    paths = [pack_dir / s["tar"] for s in pack["shards"] if s["samples"]]
    stage.plan(conf.steps)
    if use_gpu or conf.num_workers > 1:
        ensure_ray(stage.cfg)
    print(f"train: discrete {conf.model} transformer ({config.layers} blocks, width {config.heads * config.head_dim}) over "
          f"{config.grid} x {config.grid} tokens of {config.codes} codes, k={config.k}, d={config.clip_dim}, "
          f"{conf.steps} steps of {conf.batch_size} on {'GPU' if use_gpu else 'CPU'}"
          + (f", at most {conf.minutes:g} min" if conf.minutes is not None else ""), file=sys.stderr)
    budget = None if conf.minutes is None else conf.minutes * 60
    try:
        with MetricsTail(stage.dir / "metrics.jsonl", conf.steps, budget_seconds=budget):
            result = train_discrete(dataclasses.replace(params, max_seconds=budget), config, paths,
                                    pack_dir / pack["tokens"]["tokens"], pack_dir / pack["tokens"]["vq_checkpoint"],
                                    stage.dir, clip=clip_identity(pack.get("clip")), aux_weight=conf.aux_weight)
    except ValueError as e:
        raise StageError(str(e)) from None
    body = manifest_body(stage.dir, result, config, conf, pack)
    if body["checkpoint"]:
        body["parameters"] = denoiser_parameters(stage.dir / body["checkpoint"])
    return {**body, "backbone": "discrete"}


def denoiser_parameters(checkpoint) -> int:
    """Parameters of the condition encoder + transformer (the frozen VQ decoder not counted)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return int(sum(t.numel() for name, t in state["ema"].items() if not name.startswith("vq.")))
