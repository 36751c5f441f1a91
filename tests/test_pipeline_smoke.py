"""End to end on CPU: `knnd demo` on 100 stickers with tiny budgets, every stage through the CLI path.

The encoder trains for seconds only, so its embeddings are nearly all alike: dedup's cosine
test is switched off here (its behaviour is tested in test_dedup.py)."""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.stages import STAGES

ARGS = ["--limit", "100", "--encoder-steps", "3", "--steps", "12"]
SETS = ["dedup.cosine_threshold=1.0", "dedup.manhattan_threshold=0", "train.model=tiny", "train.batch_size=8",
        "train.checkpoint_every=5", "sample.steps=4", "sample.images_per_prompt=2", "neighbours.k=4",
        "sample.k=4", "evaluate.k=4", "embed.batch_size=32", "dedup.holdout=0.1"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """(workdir, stdout, argv) of one tiny `knnd demo`, shared by the tests here."""
    work = tmp_path_factory.mktemp("smoke") / "demo"
    argv = ["demo", "--workdir", str(work), *ARGS] + [a for s in SETS for a in ("--set", s)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return work, out.getvalue(), argv


def test_demo_end_to_end_on_100_stickers(tiny_demo, tmp_path, capsys):
    work, out, argv = tiny_demo
    for name in STAGES:
        manifest = json.loads((work / name / "manifest.json").read_text())
        assert manifest["items"] > 0, name
    assert json.loads((work / "download" / "manifest.json").read_text())["counts"]["images"] == 100
    # step budgets instead of the clock: the same models on any host
    assert json.loads((work / "encoder" / "encoder.json").read_text())["steps"] == 3
    trained = json.loads((work / "train" / "manifest.json").read_text())
    assert (trained["step"], trained["stopped_by"]) == (12, "steps") and trained["config"]["minutes"] is None
    grid = Image.open(work / "sample" / "grid.png")
    swapped = Image.open(work / "sample_swap" / "grid.png")
    assert grid.size == swapped.size and grid.size[1] >= 4 * 32
    main_records = [json.loads(line) for line in (work / "sample" / "samples.jsonl").read_text().splitlines()]
    assert {r["scheduler"] for r in main_records} == {"sde-dpmsolver++"}  # sample.scheduler's default, recorded per image
    swap_records = [json.loads(line) for line in (work / "sample_swap" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in main_records] == [r["prompt"] for r in swap_records]
    swap_keys = {k for r in swap_records for k in r["neighbour_keys"]}
    import pyarrow.parquet as pq

    swap_meta = pq.read_table(sorted((work / "swap" / "embed" / "metadata").glob("*.parquet")))
    assert swap_keys <= set(swap_meta.column("key").to_pylist())  # the swapped samples were conditioned on the second database only
    # the second database is a subset of the stickers (U+1F300-U+1F5FF) in line art: no colour at all, where the main one has it
    main_meta = pq.read_table(sorted((work / "embed" / "metadata").glob("*.parquet")))
    swap_ids = [url.rsplit("/", 1)[1].removesuffix(".png") for url in swap_meta.column("url").to_pylist()]
    assert 0 < len(swap_ids) < main_meta.num_rows and all(i[:3] in ("1F3", "1F4", "1F5") for i in swap_ids)
    assert all("/line/" in url for url in swap_meta.column("url").to_pylist())
    assert set(swap_meta.column("colourfulness").to_pylist()) == {0.0} and max(main_meta.column("colourfulness").to_pylist()) > 20
    assert "grid.png" in out and "swapped database" in out
    # the index folder carries thumbnails of its stickers (as the pack stage decodes them), row-aligned
    from pipeline.images import DatabaseImages

    rows, thumbs = np.load(work / "index" / "rows.npy"), np.load(work / "index" / "thumbnails.npy")
    assert thumbs.shape == (len(rows), 32, 32, 3) and thumbs.dtype == np.uint8
    pictures = DatabaseImages(work / "embed").load(rows[:3], 32)
    assert all(np.array_equal(thumbs[i], pictures[int(r)]) for i, r in enumerate(rows[:3]))
    assert thumbs.std() > 10  # pictures, not a blank fill
    metrics = json.loads((work / "evaluate" / "metrics.json").read_text())
    assert metrics["prompts"] >= 2 and metrics["k"] == 4 and set(metrics["databases"]) == {
        str((work / "index").resolve()), str((work / "swap" / "index").resolve())}
    assert set(metrics["generated"]) == {"prompt_accuracy@1", "prompt_accuracy@5", "clip_score", "memorisation"}
    assert metrics["images"] == 2 * metrics["prompts"] and metrics["prompts"] >= 5  # the demo draws 2 per prompt
    assert metrics["chance@1"] == round(1 / metrics["prompts"], 4)
    assert {"fd", "kid", "precision", "recall"} <= set(metrics["to_real"]) and "floor" in metrics
    whole = metrics["memorisation_index"]  # every training image, searched in the index the demo CLIP embedded
    assert whole["images"] == json.loads((work / "index" / "index_infos.json").read_text())["n"]
    assert 0 < whole["generated"]["value"] <= 1 and 0 < whole["real"]["value"] <= 1
    report = (work / "evaluate" / "report.html").read_text()
    shown = min(metrics["prompts"], 48)
    assert report.count('class="sample"') == 2 * shown and report.count('class="real"') == shown
    assert "http://" not in report and "https://" not in report
    assert "report.html" in out and "prompt acc@5" in out
    # the stage's text-alone baseline (same prompts and noise) and the paired table, in metrics.json, report and stdout
    baseline = json.loads((work / "evaluate" / "no_knn" / "metrics.json").read_text())
    assert baseline["k"] == 0 and baseline["no_knn"] and baseline["prompts"] == metrics["prompts"]
    paired = metrics["paired"]["no_knn"]
    rows = {row["name"]: row for row in paired["rows"]}
    assert {"prompt accuracy @5", "FD to held-out images", "KID to held-out images"} <= set(rows)
    acc = rows["prompt accuracy @5"]
    assert acc["a"] == metrics["generated"]["prompt_accuracy@5"] and acc["b"] == baseline["generated"]["prompt_accuracy@5"]
    assert acc["difference"]["value"] == pytest.approx(acc["a"]["value"] - acc["b"]["value"], abs=2e-4)
    fd = rows["FD to held-out images"]
    assert fd["difference"]["value"] == pytest.approx(metrics["to_real"]["fd"]["value"] - baseline["to_real"]["fd"]["value"],
                                                      abs=2e-4)
    assert "Paired: this evaluation (A) - no_knn/" in report and "paired: A = with neighbours" in out
    assert report.count('class="other"') == 2 * shown and "text embedding alone, same noise (no_knn/)" in report
    # any checkpoint against any index, without neighbours, into its own folder
    capsys.readouterr()
    assert main(["evaluate", "--no-knn", "-c", str(work / "stages.yaml"), "--out", str(tmp_path / "noknn")]) == 0
    no_knn = json.loads((tmp_path / "noknn" / "metrics.json").read_text())
    assert re.search(rf"evaluate: (\d+)/\1 batches, {no_knn['images']} images \(", capsys.readouterr().err)  # progress
    assert no_knn["k"] == 0 and no_knn["prompts"] == metrics["prompts"] and no_knn["checkpoint"] == metrics["checkpoint"]
    capsys.readouterr()  # --baseline: the text alone first, on the same prompts and noise, then the paired table
    assert main(["evaluate", "--neighbours-only", "--baseline", "-c", str(work / "stages.yaml"),
                 "--out", str(tmp_path / "nbo")]) == 0
    only = json.loads((tmp_path / "nbo" / "metrics.json").read_text())
    assert only["neighbours_only"] and only["k"] == 4 and not metrics["neighbours_only"]
    assert json.loads((tmp_path / "nbo" / "no_knn" / "metrics.json").read_text())["generated"] == no_knn["generated"]
    assert only["paired"]["no_knn"]["b"]["condition"] == "text embedding alone (--no-knn)"
    assert "paired: A = with neighbours" in capsys.readouterr().out
    # `knnd compare`: the CLI's --no-knn evaluation draws the stage baseline's images, so the same paired table
    capsys.readouterr()
    assert main(["compare", str(work / "evaluate"), str(tmp_path / "noknn"), "--bootstrap", "500"]) == 0
    printed = capsys.readouterr().out
    assert "A = evaluate: text embedding + 4 neighbours" in printed and "B = noknn: text embedding alone" in printed
    compared = json.loads((work / "evaluate" / "compare-noknn.json").read_text())
    assert [r["difference"] for r in compared["rows"]] == [r["difference"] for r in paired["rows"]]
    assert compared["b"]["condition"] == "text embedding alone (--no-knn)"
    assert main(["compare", str(work / "evaluate"), str(tmp_path / "nbo")]) == 0  # neighbours alone: paired as well
    # re-grading saved samples (--samples-from) reproduces the figures and keeps the samples' own condition
    assert main(["evaluate", "-c", str(work / "stages.yaml"), "--samples-from", str(tmp_path / "noknn"),
                 "--out", str(tmp_path / "regraded")]) == 0
    regraded = json.loads((tmp_path / "regraded" / "metrics.json").read_text())
    assert regraded["generated"] == no_knn["generated"] and regraded["k"] == 0 and regraded["no_knn"]
    capsys.readouterr()  # sampling flags, and prompts other than the samples were drawn for, are refused
    assert main(["evaluate", "-c", str(work / "stages.yaml"), "--samples-from", str(tmp_path / "noknn"), "--guidance", "2",
                 "-k", "2"]) == 2
    assert "--samples-from grades saved samples, so -k, --guidance cannot apply" in capsys.readouterr().err
    others = tmp_path / "others.txt"
    others.write_text("".join(f"another prompt {i}\n" for i in range(metrics["prompts"])))
    for sets in (["--set", "evaluate.max_prompts=3"], ["--set", f"evaluate.prompts={others}"]):
        assert main(["evaluate", "-c", str(work / "stages.yaml"), "--samples-from", str(tmp_path / "noknn"), *sets]) == 2
        assert "were drawn for other prompts than this evaluation's" in capsys.readouterr().err
    # a guidance sweep into the default folders: one per scale, none overwriting another
    for g in ("1.5", "2"):
        assert main(["evaluate", "-c", str(work / "stages.yaml"), "--guidance", g, "--steps", "3"]) == 0
    swept = sorted((work / "evaluate_cli").glob("*/metrics.json"))
    assert [json.loads(m.read_text())["guidance"] for m in swept] == [1.5, 2.0]
    assert [m.parent.name.rsplit("-", 2)[1:] for m in swept] == [["g1.5", "s3"], ["g2", "s3"]]
    # the deterministic sampler, into its own folder: other images from the same noise
    assert main(["evaluate", "-c", str(work / "stages.yaml"), "--guidance", "2", "--steps", "3", "--scheduler", "ddim"]) == 0
    ddim = sorted((work / "evaluate_cli").glob("*-g2-s3-ddim"))
    assert len(ddim) == 1 and json.loads((ddim[0] / "metrics.json").read_text())["scheduler"] == "ddim"
    assert "3 DDIM steps" in (ddim[0] / "report.html").read_text() and "DPM-Solver++ (2M SDE) steps" in report
    with np.load(ddim[0] / "samples.npz") as a, np.load(swept[1].parent / "samples.npz") as b:
        assert a["images"].shape == b["images"].shape and not np.array_equal(a["images"], b["images"])
    # a second run finds everything up to date and redoes nothing: no manifest or grid rewritten
    written = {p: p.stat().st_mtime_ns for p in [*work.glob("*/manifest.json"), work / "sample" / "grid.png"]}
    grid_bytes = (work / "sample" / "grid.png").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, nothing to do") >= 9 and len(written) >= 10
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert (work / "sample" / "grid.png").read_bytes() == grid_bytes


def test_ablate_quick_on_the_tiny_demo(tiny_demo, tmp_path):
    """tools/ablate.py --quick: every section runs, every variant leaves samples and metrics, and the
    table lists each evaluation with the paper's figure beside it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import ablate

    work, _, _ = tiny_demo
    docs = tmp_path / "docs"
    assert ablate.main(["--quick", "--demo", str(work), "--workdir", str(tmp_path / "abl"), "--docs", str(docs)]) == 0
    data = json.loads((docs / "ablation.json").read_text())
    assert data["sections"] == list(ablate.SECTIONS) and data["steps"] == 3
    expected = {"k0-text", "k10-knn", "k10-text", "k1-knn", "cross_attention-knn", "concat-knn",
                "k10-index10", "k10-index30", "k10-swap", "min_snr-knn", "v_prediction-knn"}
    assert set(data["evaluations"]) == expected
    for name, graded in data["evaluations"].items():
        assert set(graded) == {"a", "b"}, name  # the second encoder graded every evaluation
        assert graded["a"]["step"] == 3 and graded["a"]["images"] == graded["a"]["prompts"] > 0
        assert graded["b"]["encoder"] != graded["a"]["encoder"]
        samples = sorted((tmp_path / "abl" / "evaluations" / name / "samples").glob("*.png"))
        assert len(samples) == graded["a"]["images"], name
    assert data["evaluations"]["k0-text"]["a"]["k"] == 0 and data["evaluations"]["k1-knn"]["a"]["k"] == 1
    swap = data["evaluations"]["k10-swap"]["a"]["databases"]
    assert set(swap) == {"main", "swap"}
    index10 = json.loads((tmp_path / "abl" / "index10" / "index" / "index_infos.json").read_text())["n"]
    full = json.loads((work / "index" / "index_infos.json").read_text())["n"]
    assert index10 == round(full * 0.1)
    text = (docs / "ablation.md").read_text()
    for title in ("1. no kNN vs kNN", "2. number of neighbours k", "3. conditioning variant", "4. index size at sampling",
                  "5. database swap"):
        assert f"## {title}" in text
    assert "| k0-text | 38.2 (no kNN) |" in text and "34.1 (concatenation)" in text
    assert all((docs / "ablation" / f"{name}.png").exists() for name in expected)
    # an evaluation cached from before the scheduler key (DDIM) is drawn again, not mixed in
    stale = tmp_path / "abl" / "evaluations" / "k1-knn" / "metrics.json"
    old = json.loads(stale.read_text())
    del old["scheduler"]
    stale.write_text(json.dumps(old))
    assert ablate.main(["--quick", "--demo", str(work), "--workdir", str(tmp_path / "abl"), "--docs", str(docs),
                        "--sections", "k"]) == 0
    assert json.loads(stale.read_text())["scheduler"] == "sde-dpmsolver++"


def test_a_killed_evaluate_stage_resumes_its_sampling_and_ends_as_the_uninterrupted_run(tiny_demo, tmp_path, monkeypatch,
                                                                                          capsys):
    """The evaluate stage killed while sampling (after its text-alone baseline finished) and run again:
    the baseline is not drawn again, the main evaluation draws only the batches it had not saved, and
    every sample equals the uninterrupted run's (the tiny demo's own evaluate/)."""
    import shutil

    from model import diffusion

    work, _, _ = tiny_demo
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("evaluate_cli"))
    args = ["run", "evaluate", "-c", str(work / "stages.yaml"), "--set", f"workdir={copy}", "--set", "evaluate.batch_size=3"]
    images = json.loads((work / "evaluate" / "metrics.json").read_text())["images"]
    batches = -(-images // 3)
    assert batches >= 3
    real, calls = diffusion.sample, []

    def dies_in_the_main_evaluation(*a, **kw):
        if len(calls) == batches + 2:  # the baseline's batches, then two of the main evaluation's
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(diffusion, "sample", dies_in_the_main_evaluation)
    assert main([*args, "--force"]) == 130
    saved = copy / "evaluate" / ".sampling"
    assert len(list(saved.glob("b*.npy"))) == 2 and not (copy / "evaluate" / "manifest.json").exists()
    assert (copy / "evaluate" / "no_knn" / "metrics.json").exists() and not (copy / "evaluate" / "no_knn" / ".sampling").exists()
    calls.clear()
    monkeypatch.setattr(diffusion, "sample", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming: 2 of" in capsys.readouterr().err
    assert len(calls) == batches - 2  # the baseline was done; the main evaluation drew only what it lacked
    assert not saved.exists()
    for folder in ("evaluate", "evaluate/no_knn"):
        with np.load(copy / folder / "samples.npz") as a, np.load(work / folder / "samples.npz") as b:
            assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["rows"], b["rows"]), folder
    resumed, whole = (json.loads((w / "evaluate" / "metrics.json").read_text()) for w in (copy, work))
    assert resumed["generated"] == whole["generated"] and resumed["to_real"] == whole["to_real"]
    figures = [[(r["a"], r["b"], r["difference"]) for r in m["paired"]["no_knn"]["rows"]] for m in (resumed, whole)]
    assert figures[0] == figures[1]  # (the database rows' names carry the index folder, which differs)


def test_saved_sampling_batches_of_another_condition_are_discarded(tiny_demo, tmp_path, monkeypatch):
    """`knnd evaluate` into a folder holding batches saved under other guidance draws every batch anew."""
    from model import diffusion

    work, _, _ = tiny_demo
    out = tmp_path / "ev"
    args = ["evaluate", "-c", str(work / "stages.yaml"), "--out", str(out), "--steps", "2", "--set", "evaluate.batch_size=4"]
    real, calls = diffusion.sample, []

    def dies_after_one(*a, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(diffusion, "sample", dies_after_one)
    assert main([*args, "--guidance", "2"]) == 130
    assert len(list((out / ".sampling").glob("b*.npy"))) == 1
    calls.clear()
    monkeypatch.setattr(diffusion, "sample", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert main([*args, "--guidance", "1.5"]) == 0
    images = json.loads((out / "metrics.json").read_text())["images"]
    assert len(calls) == -(-images // 4) and not (out / ".sampling").exists()
