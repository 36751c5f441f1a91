"""End to end on CPU: `knnd demo` on 100 stickers with tiny budgets, every stage through the CLI path.

The encoder trains for seconds only, so its embeddings are nearly all alike: dedup's cosine
test is switched off here (its behaviour is tested in test_dedup.py)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pipeline.cli import main
from pipeline.runner import STAGES


def test_demo_end_to_end_on_100_stickers(tmp_path, capsys):
    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--limit", "100", "--encoder-minutes", "0.1", "--minutes", "0.05"]
    sets = ["dedup.cosine_threshold=1.0", "dedup.manhattan_threshold=0", "train.model=tiny", "train.batch_size=8",
            "train.checkpoint_every=5", "sample.steps=4", "sample.images_per_prompt=2", "neighbours.k=4",
            "sample.k=4", "evaluate.k=4", "embed.batch_size=32", "dedup.holdout=0.1"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    for name in STAGES:
        manifest = json.loads((work / name / "manifest.json").read_text())
        assert manifest["items"] > 0, name
    assert json.loads((work / "download" / "manifest.json").read_text())["counts"]["images"] == 100
    grid = Image.open(work / "sample" / "grid.png")
    swapped = Image.open(work / "sample_swap" / "grid.png")
    assert grid.size == swapped.size and grid.size[1] >= 4 * 32
    main_records = [json.loads(line) for line in (work / "sample" / "samples.jsonl").read_text().splitlines()]
    swap_records = [json.loads(line) for line in (work / "sample_swap" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in main_records] == [r["prompt"] for r in swap_records]
    swap_keys = {k for r in swap_records for k in r["neighbour_keys"]}
    import pyarrow.parquet as pq

    swap_db = set(pq.read_table(sorted((work / "swap" / "embed" / "metadata").glob("*.parquet"))).column("key").to_pylist())
    assert swap_keys <= swap_db  # the swapped samples were conditioned on the second database only
    assert "grid.png" in out and "swapped database" in out
    metrics = json.loads((work / "evaluate" / "metrics.json").read_text())
    assert metrics["prompts"] >= 2 and metrics["k"] == 4 and set(metrics["databases"]) == {
        str((work / "index").resolve()), str((work / "swap" / "index").resolve())}
    assert set(metrics["generated"]) == {"prompt_accuracy@1", "prompt_accuracy@5", "clip_score", "memorisation"}
    assert metrics["images"] == 2 * metrics["prompts"] and metrics["prompts"] >= 5  # the demo draws 2 per prompt
    assert metrics["chance@1"] == round(1 / metrics["prompts"], 4)
    assert {"fd", "kid", "precision", "recall"} <= set(metrics["to_real"]) and "floor" in metrics
    report = (work / "evaluate" / "report.html").read_text()
    shown = min(metrics["prompts"], 48)
    assert report.count('class="sample"') == 2 * shown and report.count('class="real"') == shown
    assert "http://" not in report and "https://" not in report
    assert "report.html" in out and "prompt acc@5" in out
    # any checkpoint against any index, without neighbours, into its own folder
    assert main(["evaluate", "--no-knn", "-c", str(work / "stages.yaml"), "--out", str(tmp_path / "noknn")]) == 0
    no_knn = json.loads((tmp_path / "noknn" / "metrics.json").read_text())
    assert no_knn["k"] == 0 and no_knn["prompts"] == metrics["prompts"] and no_knn["checkpoint"] == metrics["checkpoint"]
    assert main(["evaluate", "--neighbours-only", "-c", str(work / "stages.yaml"), "--out", str(tmp_path / "nbo")]) == 0
    only = json.loads((tmp_path / "nbo" / "metrics.json").read_text())
    assert only["neighbours_only"] and only["k"] == 4 and not metrics["neighbours_only"]
    # a second run finds everything up to date and redoes nothing
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, nothing to do") >= 9
    assert np.asarray(Image.open(work / "sample" / "grid.png")).shape == np.asarray(grid).shape
