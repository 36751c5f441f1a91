"""Paired comparison of two evaluations: `knnd compare A B` and the evaluate stage's no-kNN baseline.

Two evaluations of the same prompts with the same noise seeds (image i of A and image i of B share
its prompt and its initial noise), graded by the same evaluation encoder, differ only by what each
was conditioned on: neighbours or none, one index or another, one checkpoint or another. The
difference A - B is measured image by image, and each bootstrap replicate draws prompts once for
both, so what the two share (which prompts were drawn, how hard they are) cancels: a paired test,
far sharper than comparing the two unpaired intervals. Reported for prompt accuracy @1/@5, CLIP
score, FD / KID to the held-out images and to every database both were compared with, and precision /
recall to the held-out images, each with
a 95 % interval, a verdict, and whether the two unpaired intervals overlap.

Every evaluation folder holds `features.npz` (its samples, prompts, held-out images and databases in
the evaluation encoder's space), which is all a comparison reads besides `metrics.json`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import SCHEDULER_BEFORE
from pipeline.runner import UsageError, atomic_path, read_json, write_json

FEATURES = "features.npz"
MATCH_KEYS = ("prompts", "images", "images_per_prompt", "seed", "encoder")  # what two paired evaluations share


@dataclass
class Graded:
    """One evaluation in its encoder's space (L2-normalised float32 rows)."""
    generated: np.ndarray  # [N, d] the samples
    prompt_of: np.ndarray  # [N] each sample's prompt
    text: np.ndarray  # [P, d] the prompts
    real: np.ndarray | None = None  # [R, d] the held-out real images (None: a prompt file without images)
    databases: dict[str, np.ndarray] = field(default_factory=dict)  # index folder -> its database sample
    fold_of_prompt: np.ndarray | None = None  # [P] pooled folds (evaluate_pool): a prompt's rivals are its fold's


def prompt_hits(graded: Graded, generated: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Per image (graded's samples, or `generated` for the same prompts): 1.0 where its prompt is among
    the 1 / 5 prompts nearest to it, ranked among all prompts or, pooled, among its fold's."""
    from model import metrics

    generated = graded.generated if generated is None else generated
    if graded.fold_of_prompt is None:
        return metrics.prompt_accuracy(generated, graded.text, graded.prompt_of, ks=(1, 5))
    hits = {1: np.zeros(len(generated)), 5: np.zeros(len(generated))}
    for fold in np.unique(graded.fold_of_prompt):
        prompts = np.nonzero(graded.fold_of_prompt == fold)[0]
        rows = np.nonzero(np.isin(graded.prompt_of, prompts))[0]
        local = metrics.prompt_accuracy(generated[rows], graded.text[prompts],
                                        np.searchsorted(prompts, graded.prompt_of[rows]), ks=(1, 5))
        for k in hits:
            hits[k][rows] = local[k]
    return hits


def save_features(out: Path, graded: Graded) -> None:
    names = list(graded.databases)
    arrays = {"generated": graded.generated, "prompt_of": graded.prompt_of, "text": graded.text,
              "database_names": np.array(names, dtype=str)}
    if graded.real is not None:
        arrays["real"] = graded.real
    arrays |= {f"database_{i}": graded.databases[name] for i, name in enumerate(names)}
    with atomic_path(out / FEATURES) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_evaluation(folder: Path) -> tuple[dict, Graded]:
    """(metrics.json, features) of an evaluation folder."""
    folder = Path(folder)
    if not (folder / "metrics.json").exists():
        raise UsageError(f"{folder} is not an evaluation folder (no metrics.json): give a folder written by "
                         f"`knnd evaluate` or `knnd run evaluate`")
    if not (folder / FEATURES).exists():
        raise UsageError(f"{folder} has no {FEATURES} (evaluations before 2026-11-30 did not write it): re-grade its "
                         f"samples with `knnd evaluate -c <its workdir's stages.yaml> --samples-from {folder}`")
    with np.load(folder / FEATURES, allow_pickle=False) as data:
        names = [str(n) for n in data["database_names"]]
        graded = Graded(generated=data["generated"], prompt_of=data["prompt_of"], text=data["text"],
                        real=data["real"] if "real" in data.files else None,
                        databases={name: data[f"database_{i}"] for i, name in enumerate(names)})
    return read_json(folder / "metrics.json"), graded


def condition_text(result: dict) -> str:
    """What an evaluation conditioned on, in words."""
    text = ("text embedding alone (--no-knn)" if result["no_knn"] else
            f"{result['k']} neighbours alone (--neighbours-only)" if result.get("neighbours_only") else
            f"text embedding + {result['k']} neighbours")
    if result.get("neighbour_guidance") is not None and not result["no_knn"]:
        text += f" at neighbour guidance {result['neighbour_guidance']:g}"
    return text + (f", neighbours only where {result['where']}" if result.get("where") else "")


def check_paired(a_result: dict, a: Graded, b_result: dict, b: Graded) -> None:
    differ = [f"{key} {a_result.get(key)!r} vs {b_result.get(key)!r}" for key in MATCH_KEYS
              if a_result.get(key) != b_result.get(key)]
    if not differ and (not np.array_equal(a.prompt_of, b.prompt_of) or a.text.shape != b.text.shape
                       or not np.allclose(a.text, b.text, atol=1e-4)):
        differ.append("the prompts themselves")
    if differ:
        raise UsageError("the two evaluations are not paired (" + "; ".join(differ) + "): evaluate both with the same "
                         "prompts, evaluate.seed, evaluate.images_per_prompt and evaluate.encoder")


def _verdict(low: float, high: float, higher_is_better: bool) -> str:
    if low <= 0 <= high:
        return "no difference these prompts can see"
    return "A better" if (low > 0) == higher_is_better else "B better"


def _row(name: str, higher: bool, a_ci: dict | None, b_ci: dict | None, diff) -> dict:
    value, low, high = (float(x) for x in diff)  # the verdict from the unrounded interval
    overlap = None if a_ci is None or b_ci is None else bool(a_ci["low"] <= b_ci["high"] and b_ci["low"] <= a_ci["high"])
    return {"name": name, "higher_is_better": higher, "a": a_ci, "b": b_ci,
            "difference": {"value": round(value, 8), "low": round(low, 8), "high": round(high, 8)},
            "verdict": _verdict(low, high, higher), "unpaired_overlap": overlap}


def _same(x: np.ndarray | None, y: np.ndarray | None) -> bool:
    return x is not None and y is not None and x.shape == y.shape and np.allclose(x, y, atol=1e-4)


def compare(a_result: dict, a: Graded, b_result: dict, b: Graded, n_boot: int) -> dict:
    """A - B, paired image by image: the metric rows with their intervals and verdicts."""
    from model import bootstrap, metrics

    check_paired(a_result, a, b_result, b)
    groups, rows = a.prompt_of, []
    acc_a, acc_b = prompt_hits(a), prompt_hits(a, b.generated)
    ga, gb = a_result["generated"], b_result["generated"]
    for k in (1, 5):
        key = f"prompt_accuracy@{k}"
        rows.append(_row(f"prompt accuracy @{k}", True, ga[key], gb[key],
                         bootstrap.bootstrap_ci(acc_a[k] - acc_b[k], groups, n_boot=n_boot)))
    clip = metrics.clip_score(a.generated, a.text, groups) - metrics.clip_score(b.generated, a.text, groups)
    rows.append(_row("CLIP score", True, ga["clip_score"], gb["clip_score"], bootstrap.bootstrap_ci(clip, groups, n_boot=n_boot)))
    references, skipped = [], []  # a set metric is paired only against a reference both were measured with
    if a.real is not None or b.real is not None:
        if _same(a.real, b.real) and "to_real" in a_result and "to_real" in b_result:
            references.append(("held-out images", a.real, a_result["to_real"], b_result["to_real"]))
        else:
            skipped.append("held-out images (only one has them, or other pictures)")
    for name in dict.fromkeys([*a.databases, *b.databases]):
        label = f"database {Path(name).parent.name}/{Path(name).name}"
        if _same(a.databases.get(name), b.databases.get(name)):
            references.append((label, a.databases[name], a_result["databases"][name], b_result["databases"][name]))
        else:
            skipped.append(f"{label} (only one was compared with it, or with other pictures of it)")
    set_boot = bootstrap.set_replicates(n_boot)
    for label, reference, a_set, b_set in references:
        for key, fn in (("fd", metrics.frechet_distance), ("kid", metrics.kernel_inception_distance)):
            rows.append(_row(f"{key.upper()} to {label}", False, a_set[key], b_set[key],
                             bootstrap.bootstrap_paired_difference_ci(a.generated, b.generated, groups, reference, fn,
                                                                      n_boot=set_boot)))
        if "precision" in a_set and "precision" in b_set:  # measured against the held-out images only
            value, low, high = bootstrap.bootstrap_paired_difference_ci(a.generated, b.generated, groups, reference,
                                                                        metrics.samples_precision_recall, n_boot=set_boot)
            for i, key in enumerate(("precision", "recall")):
                rows.append(_row(f"{key} (k=3) to {label}", True, a_set[key], b_set[key], (value[i], low[i], high[i])))
    return {"a": _side(a_result), "b": _side(b_result), "prompts": a_result["prompts"], "images": a_result["images"],
            "folds": a_result.get("folds", 1), "bootstrap": n_boot, "rows": rows, "skipped": skipped}


def _side(result: dict) -> dict:
    return {"checkpoint": result["checkpoint"], "step": result.get("step"), "index": result["index"],
            "condition": condition_text(result),
            "sampling": f"{result['steps']} {result.get('scheduler', SCHEDULER_BEFORE)} steps, guidance {result['guidance']:g}"}


def print_comparison(result: dict, a_name: str = "A", b_name: str = "B") -> None:
    a, b = result["a"], result["b"]
    print(f"\npaired: A = {a_name}: {a['condition']}; {a['sampling']}; step {a['step']}\n"
          f"        B = {b_name}: {b['condition']}; {b['sampling']}; step {b['step']}\n"
          f"        {result['prompts']} prompts, {result['images']} images in all, the same noise for A and B"
          + (f"; pooled over {result['folds']} folds" if result.get("folds", 1) > 1 else ""))
    print(f"{'metric':<36} {'A':>9} {'B':>9} {'A - B':>9}  {'95 % interval':<22} verdict")
    for row in result["rows"]:
        a, b, d = row["a"], row["b"], row["difference"]
        overlap = "" if row["unpaired_overlap"] is None else (
            " (unpaired intervals overlap)" if row["unpaired_overlap"] else " (unpaired intervals apart)")
        print(f"{row['name']:<36} {a['value'] if a else float('nan'):>9.4g} {b['value'] if b else float('nan'):>9.4g} "
              f"{d['value']:>9.4g}  [{d['low']:.4g}, {d['high']:.4g}]".ljust(92) + f" {row['verdict']}{overlap}")
    for what in result.get("skipped", []):
        print(f"not compared: {what}")


def report_rows(result: dict) -> list[dict]:
    """The comparison as rows of report.html's metric table (value = A - B)."""
    return [{"name": row["name"], **row["difference"],
             "reference": f"A {row['a']['value']:.4g}, B {row['b']['value']:.4g}" if row["a"] and row["b"] else None,
             "note": row["verdict"]} for row in result["rows"]]


def compare_command(a_dir: str, b_dir: str, out: str | None, n_boot: int, pools: list | None = None) -> int:
    """`knnd compare A B [--pool A2 B2 ...]`: print the paired table (pooled over the pairs given) and
    write it as JSON (default A/compare-<B's name>.json, or A/compare-<B's name>-pooled<n>.json)."""
    if n_boot < 50:
        raise UsageError(f"--bootstrap must be at least 50, got {n_boot}")
    pairs = [(Path(a_dir), Path(b_dir)), *((Path(x), Path(y)) for x, y in pools or [])]
    if pools:
        from pipeline.evaluate_pool import pool

        a_result, a, b_result, b = pool(pairs, n_boot)
    else:
        (a_result, a), (b_result, b) = load_evaluation(pairs[0][0]), load_evaluation(pairs[0][1])
    result = compare(a_result, a, b_result, b, n_boot)
    result["a"]["folder"], result["b"]["folder"] = (", ".join(str(p[i].resolve()) for p in pairs) for i in (0, 1))
    suffix = f"-pooled{len(pairs)}" if pools else ""
    path = Path(out) if out else Path(a_dir) / f"compare-{Path(b_dir).resolve().name}{suffix}.json"
    write_json(path, result)
    print_comparison(result, Path(a_dir).name, Path(b_dir).name)
    print(f"compare: written to {path}", file=sys.stderr)
    return 0
