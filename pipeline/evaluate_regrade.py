"""`knnd evaluate --samples-from DIR`: grade an earlier evaluation's saved samples again, sampling nothing.

For another evaluation encoder (`evaluate.encoder`), or to write the `features.npz` that `knnd compare`
reads into a folder evaluated before it existed. The samples keep what they were drawn with: the
checkpoint, index, neighbours, sampler and guidance come from the folder's `metrics.json`, and the
prompts must be the ones they were drawn for (`samples.npz` names them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import SCHEDULER_BEFORE
from pipeline.runner import UsageError, read_json

# what the saved samples were drawn with: taken from their metrics.json, never from this call
CONDITION_KEYS = ("checkpoint", "step", "index", "k", "no_knn", "neighbours_only", "where", "steps", "scheduler",
                  "guidance", "neighbour_guidance", "seed", "images_per_prompt", "sampling_seconds")


def earlier(folder: Path) -> dict:
    return read_json(Path(folder) / "metrics.json", "Give a folder written by `knnd evaluate` or `knnd run evaluate`.")


def earlier_condition(folder: Path) -> dict:
    result = earlier(folder)
    return ({"scheduler": SCHEDULER_BEFORE, "neighbour_guidance": None}  # what results from before either key were
            | {key: result[key] for key in CONDITION_KEYS if key in result})


def reuse_samples(folder: Path, prompts: list[str]) -> dict:
    """generate()'s result, read back from an earlier evaluation's samples.npz, for these prompts."""
    path = Path(folder) / "samples.npz"
    if not path.exists():
        raise UsageError(f"{path} does not exist: evaluate into {folder} first")
    with np.load(path, allow_pickle=False) as data:
        generated = {key: data[key] for key in ("images", "prompt_of", "rows", "sims")}
        generated["seconds"] = float(data["seconds"])
        drawn_for = [str(p) for p in data["prompts"]] if "prompts" in data.files else None
    if len(generated["rows"]) != len(prompts) or (drawn_for is not None and drawn_for != list(prompts)):
        raise UsageError(f"the samples in {path} were drawn for other prompts than this evaluation's "
                         f"({len(generated['rows'])} against {len(prompts)}, or other captions): re-grade them with the "
                         f"config they were evaluated with (the same evaluate.seed, max_prompts and prompts)")
    return generated


def regrade_command(cfg, folder: str, out: str | None, allow_other_clip: bool, given: list[str]) -> int:
    """Grade `folder`'s samples with this config's evaluation encoder into `out` (default: `folder` itself)."""
    from pipeline.evaluate import EvalSetup, evaluate
    from pipeline.evaluate_outputs import print_metrics

    if given:
        raise UsageError(f"--samples-from grades saved samples, so {', '.join(given)} cannot apply: the samples keep the "
                         f"checkpoint, index and sampling they were drawn with (see {Path(folder) / 'metrics.json'})")
    drawn = earlier(folder)
    for key, what in (("checkpoint", "checkpoint"), ("index", "index folder")):
        if not Path(drawn[key]).exists():
            raise UsageError(f"the {what} the samples in {folder} were drawn with, {drawn[key]}, no longer exists: "
                             f"re-grading needs it (the model's resolution, the neighbours' pictures)")
    target = Path(out) if out else Path(folder)
    result = evaluate(cfg, EvalSetup(checkpoint=Path(drawn["checkpoint"]), index_dir=Path(drawn["index"]), out=target,
                                     k=drawn["k"], no_knn=drawn["no_knn"], neighbours_only=drawn.get("neighbours_only", False),
                                     allow_other_clip=allow_other_clip, where=drawn.get("where"),
                                     samples_from=Path(folder)))
    print_metrics(result)
    print(f"report: {target / 'report.html'}")
    return 0
