"""What `knnd evaluate` leaves to look at: samples/ PNGs, grid.png, report.html and the metric table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline.config import SCHEDULER_BEFORE, SCHEDULER_WORDS
from pipeline.evaluate_compare import condition_text, report_rows
from pipeline.files import atomic_path, write_json
from pipeline.grids import write_grid

GRID_PROMPTS = 16
REPORT_NEIGHBOURS = 5


def write_outputs(out: Path, result: dict, prompts, generated, real_images, sampler, conf, graded,
                  baseline: Path | None = None) -> None:
    """Everything an evaluation leaves; metrics.json goes first, so a crash never leaves the old one
    beside new features or samples. A paired baseline's samples are shown beside this one's."""
    from pipeline.evaluate_compare import save_features

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    save_features(out, graded)
    with atomic_path(out / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, prompts=np.array(prompts, dtype=str),
                 **{key: generated[key] for key in ("images", "prompt_of", "rows", "sims", "seconds")})
    write_grid_and_samples(out, prompts, generated, conf.images_per_prompt)
    write_html(out, result, prompts, generated, real_images, sampler, conf, baseline_samples(baseline, prompts, result))
    write_json(out / "metrics.json", result)
    print(f"evaluate: metrics in {out / 'metrics.json'}, report {out / 'report.html'}", file=sys.stderr)


def write_grid_and_samples(out: Path, prompts: list[str], generated: dict, per_prompt: int) -> Path:
    """samples/<p>_<j>.png for every sample; grid.png of the first GRID_PROMPTS prompts (a row each)."""
    from PIL import Image

    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, p) in enumerate(zip(generated["images"], generated["prompt_of"])):
        j = i % per_prompt
        name = f"samples/{p:04d}_{j}.png"
        with atomic_path(out / name) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        if p < GRID_PROMPTS:
            records.append({"image": name, "prompt_index": int(p), "index_in_prompt": j})
    return write_grid(out, records, prompts[:GRID_PROMPTS], per_prompt)


def loss_curve(checkpoint: Path) -> list[tuple[int, float]]:
    """(step, loss) from the metrics.jsonl of the run that wrote the checkpoint (empty if none)."""
    path = Path(checkpoint).resolve().parent.parent / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    from model.checkpoint import checkpoint_step

    last = checkpoint_step(checkpoint)
    return [(int(m["step"]), float(m["loss"])) for m in lines if last is None or int(m["step"]) <= last]


def baseline_samples(folder: Path | None, prompts: list[str], result: dict) -> tuple[str, dict[int, list]] | None:
    """(label, {prompt: images}) of a paired evaluation's samples (the same prompts and noise), or None;
    its condition is the one result["paired"] names."""
    if folder is None or not (Path(folder) / "samples.npz").exists() or Path(folder).name not in result.get("paired", {}):
        return None
    with np.load(Path(folder) / "samples.npz", allow_pickle=False) as data:
        if [str(p) for p in data["prompts"]] != list(prompts):
            return None  # not paired with these prompts: nothing to put side by side
        images, prompt_of = data["images"], data["prompt_of"]
    condition = result["paired"][Path(folder).name]["b"]["condition"]
    label = f"{condition.split(' (')[0]}, same noise ({Path(folder).name}/)"
    return label, {p: list(images[prompt_of == p]) for p in np.unique(prompt_of).tolist()}


def write_html(out: Path, result: dict, prompts, generated, real_images, sampler, conf, baseline=None) -> Path:
    """report.html: summary, metric table, loss curve, and the first report_prompts prompts with their
    retrieved neighbours (thumbnails from the index's own database), samples (and the paired baseline's,
    from baseline_samples) and real image."""
    from pipeline.html_report import write_report

    shown = min(conf.report_prompts, len(prompts))
    rows, sims = generated["rows"][:shown, :REPORT_NEIGHBOURS], generated["sims"][:shown, :REPORT_NEIGHBOURS]
    found = np.unique(rows[rows >= 0])
    thumbs = sampler.retriever.thumbnails(found, 64) if found.size else {}
    captions = dict(zip(found.tolist(), (c for _, c in sampler.retriever.describe(found)))) if found.size else {}
    real_by_prompt = real_images or {}  # {prompt index: image}
    entries = []
    for p in range(shown):
        neighbours = [{"image": thumbs.get(int(r)), "caption": captions.get(int(r), ""),
                       "similarity": float(s)} for r, s in zip(rows[p], sims[p]) if r >= 0]
        entries.append({"prompt": prompts[p], "samples": list(generated["images"][generated["prompt_of"] == p]),
                        "real": real_by_prompt.get(p), "neighbours": neighbours,
                        "others": [(baseline[0], baseline[1].get(p, []))] if baseline else []})
    summary = [("checkpoint", f"{result['checkpoint']} (step {result['step']})"), ("index", result["index"]),
               ("condition", condition_text(result)),
               ("sampling", f"{result['steps']} {SCHEDULER_WORDS[result.get('scheduler', SCHEDULER_BEFORE)]} steps, guidance {result['guidance']}, "
                            f"seed {result['seed']}, "
                            f"{result['images_per_prompt']} image(s) per prompt, {result['sampling_seconds']} s"),
               ("evaluation encoder", result["encoder"]), ("prompts", f"{result['prompts']} (showing {shown})")]
    report = {"title": f"knnd evaluate: step {result['step']}, {Path(result['index']).parent.name}/{Path(result['index']).name}",
              "summary": summary, "metrics": metric_rows(result), "loss": loss_curve(Path(result["checkpoint"])),
              "tables": [(f"Paired: this evaluation (A) - {name}/ (B, {paired['b']['condition']}), same prompts and noise",
                          report_rows(paired)) for name, paired in result.get("paired", {}).items()],
              "prompts": entries,
              "notes": ["Intervals are bootstrap 95 % intervals over prompts. Prompt accuracy ranks every evaluation "
                        "prompt by cosine similarity to each image in the evaluation encoder's space; the real held-out "
                        "images give the ceiling that encoder allows. All images are compared at the model's resolution.",
                        "A paired table gives A - B image by image (same prompt, same initial noise), with a bootstrap that "
                        "draws prompts once for both, so what they share cancels; its interval is far narrower than the "
                        "gap the two unpaired intervals would need."]}
    return write_report(out / "report.html", report)


# --------------------------------------------------------------------------- the metric table


def summary_line(result: dict) -> str:
    g = result["generated"]
    line = (f"prompt acc@5 {g['prompt_accuracy@5']['value']:.3f} (chance {result['chance@5']:.3f}), "
            f"CLIP score {g['clip_score']['value']:.2f}")
    if "to_real" in result:
        line += (f", real acc@5 {result['real']['prompt_accuracy@5']['value']:.3f}, ratio {result['ratio']['prompt_accuracy@5']:.2f}, "
                 f"FD {result['to_real']['fd']['value']:.3f}, KID {result['to_real']['kid']['value']:.4f}")
    return line


def metric_rows(result: dict) -> list[dict]:
    """The metric table (report.html and the terminal): name, value, interval, reference, note."""
    g, rows = result["generated"], []

    def add(name, ci, reference=None, note=None):
        rows.append({"name": name, "value": ci["value"], "low": ci["low"], "high": ci["high"],
                     "reference": reference, "note": note})

    real = result.get("real")
    for k in (1, 5):
        key = f"prompt_accuracy@{k}"
        ref = f"real held-out {real[key]['value']:.3f}; chance {result[f'chance@{k}']:.3f}" if real else f"chance {result[f'chance@{k}']:.3f}"
        add(f"prompt accuracy @{k}", g[key], ref, f"generated / real = {result['ratio'][key]:.2f}" if real else None)
    add("CLIP score", g["clip_score"], f"real held-out {real['clip_score']['value']:.2f}" if real else None)
    if "to_real" in result:
        t, floor = result["to_real"], result["floor"]
        add("FD to held-out images", t["fd"], f"floor (train vs held-out) {floor['fd']:.3f}")
        add("KID to held-out images", t["kid"], f"floor {floor['kid']:.6f}")
        add("precision (k=3)", t["precision"])
        add("recall (k=3)", t["recall"])
    add("memorisation (max cos to a training image)", g["memorisation"],
        f"real held-out {real['memorisation']['value']:.3f}" if real else None,
        f"against {result['train_images']} training images" if 'train_images' in result else None)
    if whole := result.get("memorisation_index"):  # every training image, through the training index
        add("memorisation, whole training index", whole["generated"],
            f"real held-out {whole['real']['value']:.3f}" if "real" in whole else None,
            f"{whole['images']} images; the index's own resolution")
    for name, db in result["databases"].items():
        add(f"FD to database {Path(name).parent.name}/{Path(name).name}", db["fd"], f"{db['images']} images")
        add(f"KID to database {Path(name).parent.name}/{Path(name).name}", db["kid"])
    return rows


def print_metrics(result: dict) -> None:
    print(f"\nevaluate: {result['prompts']} prompts, {result['images']} images, step {result['step']}, "
          f"k={result['k']}, encoder {result['encoder']}")
    print(f"{'metric':<44} {'value':>9}  {'95 % interval':<20} reference")
    for row in metric_rows(result):
        print(f"{row['name']:<44} {row['value']:>9.4f}  [{row['low']:.4f}, {row['high']:.4f}]".ljust(76)
              + f" {row['reference'] or ''}")

