"""docs/ablation.json and docs/ablation.md for tools/ablate.py: the figures of the evaluations on disk, as tables.

Reads metrics.json files and writes the report; it runs nothing (tools/ablate.py trains and evaluates).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

PAPER = {  # (section, evaluation) -> FID on MS-COCO from the paper's ablations
    ("knn", "k0-text"): "38.2 (no kNN)", ("knn", "k10-knn"): "16.66 (kNN)",
    ("k", "k1-knn"): "17.07 (1-NN)", ("k", "k10-knn"): "16.66 (10-NN)", ("k", "k32-knn"): "18.9 (100-NN)",
    ("conditioning", "k10-knn"): "18.3 (self-attention)", ("conditioning", "cross_attention-knn"): "22.4 (cross-attention)",
    ("conditioning", "concat-knn"): "34.1 (concatenation)",
    ("index_size", "k10-index10"): "13.92 (10 %)", ("index_size", "k10-knn"): "13.65 (70 %)",
}

TITLES = {"knn": "1. no kNN vs kNN", "k": "2. number of neighbours k", "conditioning": "3. conditioning variant",
          "index_size": "4. index size at sampling", "swap": "5. database swap",
          "recipe": "6. training objective (not in the paper)"}  # the sections with a table, in order


def figures(metrics: dict, index_labels: dict[str, str]) -> dict:
    """The report's figures from one metrics.json; index_labels: resolved index folder -> its name (main, swap)."""
    g, real = metrics["generated"], metrics.get("real", {})
    out = {name: g[name] for name in ("prompt_accuracy@1", "prompt_accuracy@5", "clip_score")}
    out |= {f"real_{name}": real[name]["value"] for name in ("prompt_accuracy@5",) if name in real}
    for name in ("fd", "kid", "precision", "recall"):
        if name in metrics.get("to_real", {}):
            out[name] = metrics["to_real"][name]
    out["databases"] = {index_labels.get(path, Path(path).parent.name): {m: v[m] for m in ("fd", "kid")}
                        for path, v in metrics.get("databases", {}).items()}
    out |= {"step": metrics["step"], "k": metrics["k"], "prompts": metrics["prompts"], "images": metrics["images"],
            "encoder": metrics["encoder"]}
    return out


def ci(c: dict, digits: int = 3) -> str:
    return f"{c['value']:.{digits}f} [{c['low']:.{digits}f}, {c['high']:.{digits}f}]"


def overlap(a: dict, b: dict) -> bool:
    return not (a["high"] < b["low"] or b["high"] < a["low"])


def read_evaluations(evaluations: Path, names: list[str], index_labels: dict[str, str]) -> dict:
    """{name: {"a": figures, "b": figures}} of every evaluation graded so far (b: the second encoder)."""
    found = {}
    for name in names:
        for enc in ("a", "b"):
            path = evaluations / (name if enc == "a" else f"{name}@b") / "metrics.json"
            if path.exists():
                found.setdefault(name, {})[enc] = figures(json.loads(path.read_text()), index_labels)
    return found


def copy_grids(evaluations: Path, names, grids: Path) -> None:
    """Each evaluation's grid.png to grids/<name>.png, where ablation.md links them."""
    grids.mkdir(parents=True, exist_ok=True)
    for name in names:
        grid = evaluations / name / "grid.png"
        if grid.exists():
            shutil.copy(grid, grids / f"{name}.png")


def git_commit(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def write(docs: Path, data: dict, section_rows: dict[str, list[str]]) -> None:
    """docs/ablation.json (data as is) and docs/ablation.md; section_rows: section -> its evaluations, in order."""
    (docs / "ablation.json").write_text(json.dumps(data, indent=1) + "\n")
    (docs / "ablation.md").write_text(markdown(data, section_rows))


def markdown(data: dict, section_rows: dict[str, list[str]]) -> str:
    found = data["evaluations"]
    lines = ["# Ablations in miniature", "",
             f"Written by `{data['command']}` at commit {data['git_commit']}: every variant trained "
             f"{data['steps']} steps on the demo's data (same seed, batch and recipe), evaluated on the same held-out "
             "prompts and noise seeds (`knnd evaluate`). Brackets: bootstrap 95 % intervals over prompts. "
             "The paper's column is FID on MS-COCO (lower is better); ours: prompt accuracy @5 (higher is better), "
             "FD and KID to the held-out images in the evaluation encoder's space (lower is better). "
             "Encoder a is the demo CLIP the models were conditioned on; encoder b, a second demo CLIP "
             "(another seed and width), grades the same samples.", ""]
    if data["seconds"]:
        lines += ["Time per section (s): " + ", ".join(f"{k} {v:.0f}" for k, v in data["seconds"].items()), ""]
    for section in TITLES:
        rows = [name for name in section_rows[section] if name in found]
        if rows:
            lines += [f"## {TITLES[section]}", "", *section_table(section, rows, found), ""]
    if data["paired"]:
        lines += [*paired_table(data["paired"]), ""]
    real = next((f["a"].get("real_prompt_accuracy@5") for f in found.values() if "a" in f), None)
    if real is not None:
        lines += [f"Real held-out images under encoder a: acc@5 {real:.3f} (the ceiling).", ""]
    return "\n".join(lines)


def section_table(section: str, rows: list[str], found: dict) -> list[str]:
    """One section's table: FD/KID to both databases for swap, the paper's FID and ours for the others."""
    if section == "swap":
        lines = ["| samples | FD to the main database | FD to the swapped database | KID main | KID swapped |",
                 "|---|---|---|---|---|"]
        for name in rows:
            db = found[name]["a"]["databases"]
            if {"main", "swap"} <= set(db):
                lines.append(f"| {name} | {ci(db['main']['fd'])} | {ci(db['swap']['fd'])} | "
                             f"{ci(db['main']['kid'], 4)} | {ci(db['swap']['kid'], 4)} |")
        return lines
    lines = ["| run | paper FID | acc@5 (a) | FD (a) | KID (a) | acc@5 (b) | FD (b) | grid |",
             "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        a, b = found[name]["a"], found[name].get("b")
        lines.append(f"| {name} | {PAPER.get((section, name), '')} | {ci(a['prompt_accuracy@5'])} | {ci(a['fd'])} | "
                     f"{ci(a['kid'], 4)} | {ci(b['prompt_accuracy@5']) if b else ''} | {ci(b['fd']) if b else ''} | "
                     f"![{name}](ablation/{name}.png) |")
    return lines


def paired_table(paired: dict) -> list[str]:
    lines = ["## Paired differences", "",
             "Two evaluations of the same prompts with the same noise seeds, compared image by image: "
             "a − b, with a bootstrap interval that resamples prompts once for both (so what they share "
             "cancels). An interval that excludes 0 is a difference this many prompts can see.", "",
             "| a − b | what | acc@5 | FD held-out | FD main database | FD swapped database |", "|---|---|---|---|---|---|"]
    for key, d in paired.items():
        lines.append(f"| {key} | {d['what']} | {ci(d['prompt_accuracy@5'])} | {ci(d['fd_held_out'])} | "
                     f"{ci(d['fd_database_main'])} | {ci(d['fd_database_swap'])} |")
    return lines
