"""Paired comparison pooled over folds: `knnd compare A B --pool A2 B2 ...`.

One held-out set of a few hundred prompts gives intervals too wide to tell two conditions apart, and
holding out more images (a bigger set) changes the experiment: the database loses the near-twins of
what it holds out, which is what retrieval draws on. Cross-validation keeps the hold-out fraction and
multiplies the prompts instead: build the stages once per hold-out draw (`dedup.holdout_seed`), evaluate
each fold's model both ways (A and B, same prompts and noise), then pool the folds here.

Pooled, every image keeps its own fold's figures: prompt accuracy ranks its prompt among its fold's
prompts only (a sticker held out in two folds is one prompt in each, never a rival of itself), CLIP
score is per image; FD, KID and precision / recall compare the pooled samples with the pooled held-out
images. The bootstrap draws prompts across all folds, paired as in `knnd compare`, and the unpaired
intervals of each side are computed on the pooled set as well.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.evaluate_compare import Graded, check_paired, load_evaluation
from pipeline.runner import UsageError

SHARED = ("images_per_prompt", "seed", "encoder", "steps", "scheduler", "guidance", "neighbour_guidance", "k", "no_knn",
          "neighbours_only", "where")  # what every fold of one side must share


def concat(graded: list[Graded]) -> Graded:
    """The folds' evaluations as one: prompts renumbered fold after fold, `fold_of_prompt` set."""
    offsets = np.cumsum([0] + [len(g.text) for g in graded])
    reals = [g.real for g in graded]
    return Graded(generated=np.concatenate([g.generated for g in graded]),
                  prompt_of=np.concatenate([g.prompt_of + o for g, o in zip(graded, offsets)]),
                  text=np.concatenate([g.text for g in graded]),
                  real=None if any(r is None for r in reals) else np.concatenate(reals),
                  fold_of_prompt=np.repeat(np.arange(len(graded)), [len(g.text) for g in graded]))


def pooled_result(results: list[dict], graded: Graded, n_boot: int) -> dict:
    """A metrics.json-like result for the pooled side: its unpaired intervals measured on the pool."""
    from model import bootstrap, metrics
    from pipeline.evaluate import interval, set_metrics
    from pipeline.evaluate_compare import prompt_hits

    differ = [key for key in SHARED if len({repr(r.get(key)) for r in results}) > 1]
    if differ:
        raise UsageError(f"the folds were not evaluated alike ({', '.join(differ)} differ between them): pool only "
                         f"evaluations made with the same settings and condition")
    hits, groups = prompt_hits(graded), graded.prompt_of
    ci = lambda values: interval(bootstrap.bootstrap_ci(values, groups, n_boot=n_boot))  # noqa: E731
    pooled = {key: results[0].get(key) for key in SHARED} | {
        "prompts": len(graded.text), "images": len(graded.generated), "folds": len(results),
        "checkpoint": ", ".join(r["checkpoint"] for r in results), "step": results[0].get("step"),
        "index": ", ".join(r["index"] for r in results),
        "generated": {"prompt_accuracy@1": ci(hits[1]), "prompt_accuracy@5": ci(hits[5]),
                      "clip_score": ci(metrics.clip_score(graded.generated, graded.text, groups))},
        "databases": {}}
    if graded.real is not None:
        pooled["to_real"] = set_metrics(graded.generated, groups, graded.real, n_boot)
    return pooled


def pool(pairs: list[tuple[Path, Path]], n_boot: int) -> tuple[dict, Graded, dict, Graded]:
    """(A's result, A, B's result, B) pooled over the folds' pairs, each pair checked as `knnd compare` does."""
    loaded = []
    for a_dir, b_dir in pairs:
        (a_result, a), (b_result, b) = load_evaluation(a_dir), load_evaluation(b_dir)
        check_paired(a_result, a, b_result, b)
        for (earlier_dir, _), earlier in zip(pairs, loaded):
            if earlier[1].text.shape == a.text.shape and np.allclose(earlier[1].text, a.text, atol=1e-4):
                raise UsageError(f"{a_dir} and {earlier_dir} hold the same prompts: the same fold given twice would "
                                 f"narrow the intervals without new evidence; pool folds drawn with another "
                                 f"dedup.holdout_seed")
        loaded.append((a_result, a, b_result, b))
    a, b = concat([x[1] for x in loaded]), concat([x[3] for x in loaded])
    return (pooled_result([x[0] for x in loaded], a, n_boot), a,
            pooled_result([x[2] for x in loaded], b, n_boot), b)
