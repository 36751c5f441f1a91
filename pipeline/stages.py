"""The stage table: each stage's run, checks, upstream stages and progress unit, in one place.

A stage is one module with `run(stage: StageRun) -> dict` plus one line in TABLE. The runner
reads only this table; no stage imports another.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import dedup, download, embed, evaluate, index, neighbours, pack, sample, tokens, train


@dataclass(frozen=True)
class Stage:
    run: Callable                       # run(StageRun) -> manifest body
    upstream: tuple[str, ...]           # stages whose manifests it reads (and whose change makes it stale)
    unit: str                           # what its progress line counts
    check: Callable | None = None       # check(cfg): usage errors found before anything is written
    config_inputs: Callable | None = None  # config_inputs(cfg) -> [Path]: files the config names that are inputs too
    count_done: Callable | None = None  # count_done(out) -> int: finished units for `knnd status`, if not shard markers
    missing: Callable | None = None     # missing(out, manifest) -> str | None: finished outputs deleted since (resumed)


TABLE: dict[str, Stage] = {
    "download": Stage(download.run, (), "images", download.check, download.config_inputs, download.count_done_shards,
                      download.missing_shards),
    "embed": Stage(embed.run, ("download",), "images", embed.check),
    "dedup": Stage(dedup.run, ("embed",), "images"),
    "index": Stage(index.run, ("embed", "dedup"), "vectors", index.check),
    "neighbours": Stage(neighbours.run, ("embed", "dedup", "index"), "images", neighbours.check),
    "pack": Stage(pack.run, ("download", "embed", "neighbours"), "samples", tokens.check),
    "train": Stage(train.run, ("pack",), "steps", train.check, count_done=train.count_done_shards),
    "sample": Stage(sample.run, ("embed", "index", "train"), "images", sample.check),
    "evaluate": Stage(evaluate.run, ("embed", "dedup", "index", "pack", "train"), "images", evaluate.check,
                      evaluate.config_inputs),
}
STAGES = list(TABLE)


def config_input_paths(cfg, name: str) -> list[Path]:
    stage = TABLE[name]
    return [Path(p) for p in stage.config_inputs(cfg)] if stage.config_inputs else []
