"""The neighbours' paired effect on prompt accuracy, split by how close the database comes to each
held-out image: for every evaluation prompt, the highest cosine between its held-out sticker and any
indexed (kept) image, in the embed stage's CLIP space.

    python tools/neighbour_strata.py WORKDIR [WORKDIR ...]   # folds: each evaluated with the no-kNN baseline

Each WORKDIR needs embed/, dedup/keep.parquet and two evaluation folders, evaluate/ and evaluate/no_knn/
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
from pipeline.evaluate_compare import Graded, load_evaluation, prompt_hits  # noqa: E402
from pipeline.evaluate_pool import concat  # noqa: E402

BANDS = [(-1.0, 0.90), (0.90, 0.95), (0.95, 0.98), (0.98, 1.01)]


def fold_effects(workdir: Path) -> tuple[np.ndarray, Graded, Graded]:
    """(closest database cosine per prompt, the fold's evaluation with kNN, the one without)."""
    indexed = np.nonzero(read_keep(workdir / "dedup"))[0]
    database = metrics.l2_normalise(Embeddings(workdir / "embed")[indexed].astype(np.float32))
    with_knn = load_evaluation(workdir / "evaluate")[1]
    text_alone = load_evaluation(workdir / "evaluate" / "no_knn")[1]
    if with_knn.real is None or len(with_knn.real) != len(with_knn.text):
        raise SystemExit(f"{workdir}: needs one decoded held-out image per prompt (the default evaluate prompts)")
    closest = np.max(metrics.l2_normalise(with_knn.real) @ database.T, axis=1)
    return closest, with_knn, text_alone


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+", type=Path)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    folds = [fold_effects(workdir) for workdir in args.workdirs]
    for workdir, (near, _, _) in zip(args.workdirs, folds):
        print(f"{workdir}: {len(near)} prompts, median closest database cosine {np.median(near):.3f}")
    # pooled as `knnd compare --pool` pools: each image's prompt ranked among its own fold's prompts
    with_knn, text_alone = concat([fold[1] for fold in folds]), concat([fold[2] for fold in folds])
    hits_knn, hits_text = prompt_hits(with_knn), prompt_hits(with_knn, text_alone.generated)
    groups = with_knn.prompt_of
    closest = np.concatenate([fold[0] for fold in folds])[groups]
    for low, high in BANDS:
        rows = (closest >= low) & (closest < high)
        if not rows.any():
            continue
        cells = []
        for k in (5, 1):
            value, lo, hi = bootstrap.bootstrap_ci((hits_knn[k] - hits_text[k])[rows], groups[rows], n_boot=args.bootstrap)
            cells.append(f"acc@{k} {value:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        print(f"closest cosine [{max(low, 0):.2f}, {min(high, 1):.2f}): {len(np.unique(groups[rows]))} prompts; "
              f"neighbours - text alone: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
