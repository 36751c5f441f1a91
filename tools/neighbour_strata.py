"""The neighbours' paired effect on prompt accuracy, split by how close the database comes to each
held-out image: for every evaluation prompt, the highest cosine between its held-out sticker and any
indexed (kept) image, in the embed stage's CLIP space.

    python tools/neighbour_strata.py WORKDIR [WORKDIR ...]   # folds: each evaluated with the no-kNN baseline

Each WORKDIR needs embed/, dedup/keep.parquet, evaluate/features.npz and evaluate/no_knn/features.npz
(`knnd run evaluate` with evaluate.no_knn_baseline and the embed stage's CLIP as the judge, the default).
Prints, per band of that cosine, the prompts in it and neighbours - text alone for acc@5 and acc@1 with
95 % cluster-bootstrap intervals; folds are pooled, each image ranked among its own fold's prompts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import bootstrap, metrics  # noqa: E402
from pipeline.embeddings import Embeddings, read_keep  # noqa: E402

BANDS = [(-1.0, 0.90), (0.90, 0.95), (0.95, 0.98), (0.98, 1.01)]


def fold_effects(workdir: Path) -> tuple[np.ndarray, dict, dict, np.ndarray]:
    """(closest database cosine per prompt, acc hits with kNN, without, prompt of each image)."""
    indexed = np.nonzero(read_keep(workdir / "dedup"))[0]
    database = metrics.l2_normalise(Embeddings(workdir / "embed")[indexed].astype(np.float32))
    with np.load(workdir / "evaluate" / "features.npz") as a, np.load(workdir / "evaluate" / "no_knn" / "features.npz") as b:
        if "real" not in a.files or len(a["real"]) != len(a["text"]):
            raise SystemExit(f"{workdir}: needs one decoded held-out image per prompt (the default evaluate prompts)")
        closest = np.max(metrics.l2_normalise(a["real"]) @ database.T, axis=1)
        with_knn = metrics.prompt_accuracy(a["generated"], a["text"], a["prompt_of"], ks=(1, 5))
        text_alone = metrics.prompt_accuracy(b["generated"], a["text"], a["prompt_of"], ks=(1, 5))
        return closest, with_knn, text_alone, a["prompt_of"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+", type=Path)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    closest, diff, groups, offset = [], {1: [], 5: []}, [], 0
    for workdir in args.workdirs:
        near, with_knn, text_alone, prompt_of = fold_effects(workdir)
        print(f"{workdir}: {len(near)} prompts, median closest database cosine {np.median(near):.3f}")
        closest.append(near[prompt_of])
        groups.append(prompt_of + offset)
        offset += len(near)
        for k in diff:
            diff[k].append(with_knn[k] - text_alone[k])
    closest, groups = np.concatenate(closest), np.concatenate(groups)
    for low, high in BANDS:
        rows = (closest >= low) & (closest < high)
        if not rows.any():
            continue
        cells = []
        for k in (5, 1):
            value, lo, hi = bootstrap.bootstrap_ci(np.concatenate(diff[k])[rows], groups[rows], n_boot=args.bootstrap)
            cells.append(f"acc@{k} {value:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        print(f"closest cosine [{max(low, 0):.2f}, {min(high, 1):.2f}): {len(np.unique(groups[rows]))} prompts; "
              f"neighbours - text alone: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
