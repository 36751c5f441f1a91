"""The paper's ablations in miniature, on the demo's data: docs/ablation.md and docs/ablation.json.

    python tools/ablate.py                      # every section (needs a finished `knnd demo`)
    python tools/ablate.py --sections knn,k     # some sections; finished runs are reused
    python tools/ablate.py --quick --demo DIR   # tiny smoke version (the test suite runs it)

Every variant trains on the same pack, from the same seed, for the same number of optimizer steps
(never the same minutes: a busy machine must not change the outcome), and is graded by `knnd
evaluate` on the same held-out prompts and noise seeds. Runs live in --workdir, one folder each;
a finished training (its checkpoint) or evaluation (its metrics.json) is never redone, so a killed
run resumes where it stopped and sections can run one at a time. After each section the tables are
rewritten from every evaluation found so far.

Sections (the paper's figure is FID on MS-COCO; ours are the demo's metrics, see README):
  knn           a k = 0 model (the image embedding alone) sampled from the text alone, vs the
                k = 10 model sampled with text + retrieved neighbours (and itself without them)
  k             k in {1, 5, 10, 32}: trained and sampled with the same k
  conditioning  self_attention (ours) vs cross_attention (one token) vs concat (one token)
  index_size    the k = 10 model retrieving from 10 %, 30 %, 100 % of the database
  swap          the k = 10 model against the main and the swapped index: FD/KID to each database
  recipe        the k = 10 model trained with min-SNR-5 loss weights, and with v-prediction, vs the plain
                epsilon-MSE recipe (not the paper's: issue 11's leads for the CPU recipe)
  encoder       a second demo CLIP (another seed and width) grades every evaluation again
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # ablate_report beside this file, however this one was loaded

import ablate_report  # noqa: E402
from pipeline.config import SCHEDULER_BEFORE  # noqa: E402

SECTIONS = ("knn", "k", "conditioning", "index_size", "swap", "recipe", "encoder")
K_VALUES = (1, 5, 10, 32)
INDEX_FRACTIONS = (0.1, 0.3)
SHARED = ("download", "embed", "dedup", "index")  # the demo's stages every variant links to


@dataclass
class Settings:
    demo: Path
    workdir: Path
    steps: int
    docs: Path
    k_values: tuple = K_VALUES
    encoder_steps: int = 300
    quick: bool = False
    extra: list = field(default_factory=list)  # --set overrides for every run (quick: tiny model)


# the trained variants: name -> train overrides (all from the k = 32 pack)
def variants(s: Settings) -> dict[str, list[str]]:
    out = {f"k{k}": [f"train.k={k}"] for k in (0, *s.k_values)}
    for name in ("cross_attention", "concat"):
        out[name] = ["train.k=10", f"train.conditioning={name}"]
    out["min_snr"] = ["train.k=10", "train.loss_weighting=min_snr"]
    out["v_prediction"] = ["train.k=10", "train.prediction_type=v_prediction"]
    return out


# the evaluations: name -> (variant, options); options: k, no_knn, index (a name), compare (names)
def evaluations(s: Settings) -> dict[str, tuple[str, dict]]:
    return {
        "k0-text": ("k0", {"no_knn": True}),
        "k10-knn": ("k10", {"k": 10, "compare": ["main", "swap"]}),
        "k10-text": ("k10", {"no_knn": True}),
        **{f"k{k}-knn": (f"k{k}", {"k": k}) for k in s.k_values if k != 10},
        "cross_attention-knn": ("cross_attention", {"k": 10}),
        "concat-knn": ("concat", {"k": 10}),
        "min_snr-knn": ("min_snr", {"k": 10}),
        "v_prediction-knn": ("v_prediction", {"k": 10}),
        **{f"k10-index{round(f * 100)}": ("k10", {"k": 10, "index": f"index{round(f * 100)}"}) for f in INDEX_FRACTIONS},
        "k10-swap": ("k10", {"k": 10, "index": "swap", "compare": ["main", "swap"]}),
    }


SECTION_EVALS = {
    "knn": ["k0-text", "k10-knn", "k10-text"],
    "k": None,  # filled in by section_evals
    "conditioning": ["k10-knn", "cross_attention-knn", "concat-knn"],
    "index_size": ["k10-index10", "k10-index30", "k10-knn"],
    "swap": ["k10-knn", "k10-swap"],
    "recipe": ["k10-knn", "min_snr-knn", "v_prediction-knn"],
}


def section_evals(s: Settings, section: str) -> list[str]:
    if section == "k":
        return [f"k{k}-knn" for k in s.k_values]
    return SECTION_EVALS[section]


# --------------------------------------------------------------------------- runs


def config(s: Settings, workdir: Path, sets: list[str]):
    from pipeline.config import load_config

    return load_config(str(s.demo / "stages.yaml"), [f"workdir={workdir}", *s.extra, *sets])


def link_stages(workdir: Path, sources: dict[str, Path]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        link = workdir / name
        if not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)


def base_pack(s: Settings) -> Path:
    """neighbours + pack with k = max(k_values) over the demo's index: every variant trains from it."""
    from pipeline.runner import run_stage

    base = s.workdir / "base"
    link_stages(base, {name: s.demo / name for name in SHARED})
    cfg = config(s, base, [f"neighbours.k={max(s.k_values)}", f"neighbours.candidates={max(s.k_values) + 16}"])
    for stage in ("neighbours", "pack"):
        run_stage(stage, cfg)
    return base


def trained(s: Settings, name: str) -> Path:
    """Train variant `name` for s.steps steps (resuming, or reusing a finished run); its workdir."""
    from pipeline.runner import run_stage

    base = s.workdir / "base"
    workdir = s.workdir / name
    link_stages(workdir, {**{n: s.demo / n for n in SHARED}, "neighbours": base / "neighbours", "pack": base / "pack"})
    cfg = config(s, workdir, [f"train.steps={s.steps}", "train.minutes=null", f"train.checkpoint_every={min(500, s.steps)}",
                              *variants(s)[name]])
    start = time.time()
    manifest = run_stage("train", cfg)
    print(f"ablate: {name} trained to step {manifest['step']} ({time.time() - start:.0f} s)", flush=True)
    return workdir


def sub_index(s: Settings, fraction: float) -> Path:
    """An index over a seeded random `fraction` of the database, built by the index stage itself from
    a copy of dedup's keep.parquet with the other rows marked removed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.runner import run_stage

    name = f"index{round(fraction * 100)}"
    workdir = s.workdir / name
    dedup = workdir / "dedup"
    if not (dedup / "manifest.json").exists():
        link_stages(workdir, {"download": s.demo / "download", "embed": s.demo / "embed"})
        dedup.mkdir(parents=True, exist_ok=True)
        table = pq.read_table(s.demo / "dedup" / "keep.parquet")
        keep = table.column("keep").to_numpy(zero_copy_only=False).copy()
        kept = np.nonzero(keep)[0]
        dropped = np.random.default_rng(0).permutation(kept)[round(len(kept) * fraction):]
        keep[dropped] = False
        reason = table.column("reason").to_pylist()
        for row in dropped:
            reason[row] = f"ablation: not in the {round(fraction * 100)} % subset"
        table = table.set_column(table.schema.get_field_index("keep"), "keep", pa.array(keep))
        table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason))
        pq.write_table(table, dedup / "keep.parquet")
        shutil.copy(s.demo / "dedup" / "manifest.json", dedup / "manifest.json")
    run_stage("index", config(s, workdir, []))
    return workdir / "index"


def index_dir(s: Settings, name: str) -> Path:
    if name == "main":
        return s.demo / "index"
    if name == "swap":
        return s.demo / "swap" / "index"
    return sub_index(s, int(name.removeprefix("index")) / 100)


def evaluated(s: Settings, name: str, encoder: str = "a") -> dict:
    """metrics.json of evaluation `name` under encoder a (the model's CLIP) or b (the second one);
    b grades a's samples again."""
    from pipeline.evaluate import EvalSetup, evaluate
    from pipeline.generation import resolve_checkpoint

    variant, options = evaluations(s)[name]
    out = s.workdir / "evaluations" / (name if encoder == "a" else f"{name}@b")
    if (out / "metrics.json").exists():
        cached = json.loads((out / "metrics.json").read_text())
        if cached.get("scheduler", SCHEDULER_BEFORE) == config(s, s.demo, []).evaluate.scheduler:
            return cached
        shutil.rmtree(out)  # drawn with another sampler than evaluate.scheduler's: not comparable
        (s.workdir / "paired.json").unlink(missing_ok=True)
    samples_from = None
    sets = []
    if encoder == "b":
        samples_from = s.workdir / "evaluations" / name
        evaluated(s, name, "a")
        b = second_encoder(s)
        sets = [f"evaluate.encoder={b / 'encoder_config.json'}", f"evaluate.encoder_pretrained={b / 'encoder.pt'}"]
    workdir = trained(s, variant)
    compare = [str(index_dir(s, c).resolve()) for c in options.get("compare", [])]
    cfg = config(s, workdir, [*sets, f"evaluate.compare_index=[{', '.join(compare)}]"])
    index = index_dir(s, options.get("index", "main"))
    k = min(options.get("k", 0), json.loads((index / "index_infos.json").read_text())["n"])  # a tiny --quick subset
    setup = EvalSetup(checkpoint=resolve_checkpoint(cfg, None), index_dir=index,
                      out=out, k=k, no_knn=options.get("no_knn", False), samples_from=samples_from)
    start = time.time()
    result = evaluate(cfg, setup)
    print(f"ablate: evaluated {name} under encoder {encoder} ({time.time() - start:.0f} s)", flush=True)
    return result


def second_encoder(s: Settings) -> Path:
    """A second demo CLIP: seed 1, width 96 (the first: seed 0, width 128), embedding 192 (256)."""
    from model.clip_demo import ClipTrainConfig, train_demo_clip
    from pipeline.demo import ENCODER_CONFIG, downloaded_pairs

    out = s.workdir / "encoder_b"
    if (out / "encoder.json").exists():
        return out
    model_cfg = json.loads(ENCODER_CONFIG.read_text())
    model_cfg["embed_dim"] = 192
    model_cfg["vision_cfg"]["width"] = model_cfg["text_cfg"]["width"] = 96
    out.mkdir(parents=True, exist_ok=True)
    (out / "config_b.json").write_text(json.dumps(model_cfg, indent=1))
    images, captions = downloaded_pairs(config(s, s.demo, []))
    metrics = train_demo_clip(images, captions, out, out / "config_b.json", minutes=1e6, seed=1,
                              max_steps=s.encoder_steps, train=ClipTrainConfig(batch_size=min(256, len(images) // 2)))
    print(f"ablate: second encoder: recall@1 {metrics['recall@1']:.3f} ({metrics['seconds']:.0f} s)", flush=True)
    return out


# --------------------------------------------------------------------------- paired comparisons

PAIRS = [  # (a, b, what a - b says): same prompts, same noise seeds, so the comparison is paired
    ("k10-knn", "k10-text", "the k = 10 model with its neighbours minus itself from the text alone"),
    ("k10-knn", "k0-text", "the k = 10 model with neighbours minus a k = 0 model from the text alone"),
    ("k10-swap", "k10-knn", "the k = 10 model against the swapped index minus against the main index"),
    ("min_snr-knn", "k10-knn", "min-SNR-5 loss weights minus plain epsilon MSE (both k = 10, with neighbours)"),
    ("v_prediction-knn", "k10-knn", "v-prediction minus epsilon prediction (both k = 10, with neighbours)"),
]


class Grader:
    """Features of saved samples under encoder a, with the prompts' and held-out images' features."""

    def __init__(self, s: Settings):
        from pipeline.evaluate import database_sample, image_features, load_encoder, prompt_set, text_features
        from pipeline.images import DatabaseImages
        from pipeline.runner import read_json, stage_dir

        cfg = config(s, s.demo, [])
        index = s.demo / "index"
        self.encoder = load_encoder(cfg.evaluate, read_json(index / "index_infos.json"), index, "cpu")
        self.prompts, held_rows = prompt_set(cfg)
        self.text = text_features(self.encoder, self.prompts)
        self.size = int(np.load(s.workdir / "evaluations" / "k10-knn" / "samples.npz")["images"].shape[1])
        real = DatabaseImages(stage_dir(cfg, "embed")).load(held_rows, self.size)
        self.real = image_features(self.encoder, np.stack([real[r] for r in held_rows if r in real]))
        self.databases = {name: image_features(self.encoder, database_sample(
            index_dir(s, name), self.size, cfg.evaluate.database_images, cfg.evaluate.seed)[0]) for name in ("main", "swap")}
        self._image_features, self.s, self.cache = image_features, s, {}

    def samples(self, name: str):
        if name not in self.cache:
            with np.load(self.s.workdir / "evaluations" / name / "samples.npz") as data:
                self.cache[name] = (self._image_features(self.encoder, data["images"]), data["prompt_of"].copy())
        return self.cache[name]


def paired(s: Settings, grader: Grader, a: str, b: str, n_boot: int) -> dict:
    from model import bootstrap, metrics

    (fa, groups), (fb, groups_b) = grader.samples(a), grader.samples(b)
    if not np.array_equal(groups, groups_b):
        raise ValueError(f"{a} and {b} were not sampled for the same prompts")
    acc_a = metrics.prompt_accuracy(fa, grader.text, groups, ks=(5,))[5]
    acc_b = metrics.prompt_accuracy(fb, grader.text, groups, ks=(5,))[5]
    out = {"prompt_accuracy@5": bootstrap.bootstrap_ci(acc_a - acc_b, groups, n_boot=n_boot)}
    references = {"held_out": grader.real, **{f"database_{k}": v for k, v in grader.databases.items()}}
    for ref_name, ref in references.items():
        for metric, fn in (("fd", metrics.frechet_distance), ("kid", metrics.kernel_inception_distance)):
            out[f"{metric}_{ref_name}"] = bootstrap.bootstrap_paired_difference_ci(fa, fb, groups, ref, fn, n_boot=max(50, n_boot // 5))
    return {key: {"value": round(v[0], 5), "low": round(v[1], 5), "high": round(v[2], 5)} for key, v in out.items()}


def paired_comparisons(s: Settings) -> dict:
    have = [(a, b, what) for a, b, what in PAIRS
            if all((s.workdir / "evaluations" / n / "samples.npz").exists() for n in (a, b))]
    if not have:
        return {}
    out_path = s.workdir / "paired.json"
    done = json.loads(out_path.read_text()) if out_path.exists() else {}
    todo = [p for p in have if f"{p[0]} - {p[1]}" not in done]
    if todo:
        grader = Grader(s)
        n_boot = config(s, s.demo, []).evaluate.bootstrap
        for a, b, what in todo:
            done[f"{a} - {b}"] = {"what": what, **paired(s, grader, a, b, n_boot)}
        out_path.write_text(json.dumps(done, indent=1))
    return done


# --------------------------------------------------------------------------- report


def write_report(s: Settings, done_sections: list[str], seconds: dict) -> None:
    """docs/ablation.json (every figure) and docs/ablation.md (tables, grids) from the evaluations on disk."""
    index_labels = {str(index_dir(s, name).resolve()): name for name in ("main", "swap")}
    found = ablate_report.read_evaluations(s.workdir / "evaluations", list(evaluations(s)), index_labels)
    ablate_report.copy_grids(s.workdir / "evaluations", found, s.docs / "ablation")
    earlier = s.docs / "ablation.json"  # sections run before this call keep their times (and are still found)
    earlier = json.loads(earlier.read_text()) if earlier.exists() else {}
    if earlier.get("demo") == str(s.demo) and earlier.get("steps") == s.steps:
        seconds = {**earlier.get("seconds", {}), **seconds}
        done_sections = [*(x for x in earlier.get("sections", []) if x not in done_sections), *done_sections]
    data = {"command": "python tools/ablate.py " + " ".join(sys.argv[1:]), "git_commit": ablate_report.git_commit(ROOT),
            "steps": s.steps, "demo": str(s.demo), "sections": done_sections, "seconds": seconds, "evaluations": found,
            "paired": paired_comparisons(s)}
    ablate_report.write(s.docs, data, {section: section_evals(s, section) for section in ablate_report.TITLES})


# --------------------------------------------------------------------------- main


def run(s: Settings, sections: list[str]) -> None:
    done, seconds = [], {}
    base_pack(s)
    for section in sections:
        start = time.time()
        if section == "encoder":  # every evaluation finished so far, graded again
            for name in evaluations(s):
                if (s.workdir / "evaluations" / name / "metrics.json").exists():
                    evaluated(s, name, "b")
        else:
            for name in section_evals(s, section):
                evaluated(s, name)
        done.append(section)
        seconds[section] = round(time.time() - start, 1)
        write_report(s, done, seconds)
        print(f"ablate: section {section} done ({seconds[section]:.0f} s); {s.docs / 'ablation.md'} written", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="work/demo", help="a finished `knnd demo` workdir (default work/demo)")
    p.add_argument("--workdir", default=None, help="where the runs go (default <demo>/../ablation, or a tmp folder with --quick)")
    p.add_argument("--docs", default=None, help="where ablation.md/.json go (default docs/, or <workdir>/docs with --quick)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 1500; --quick 3)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps, k in {0, 1, 10}: a smoke run for the tests")
    args = p.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)}")
    demo = Path(args.demo).resolve()
    if not (demo / "stages.yaml").exists() or not (demo / "pack" / "manifest.json").exists():
        p.error(f"{demo} is not a finished demo workdir (no stages.yaml or pack): run `knnd demo` first")
    workdir = Path(args.workdir or demo.parent / ("ablation_quick" if args.quick else "ablation")).resolve()
    docs = Path(args.docs or (workdir / "docs" if args.quick else ROOT / "docs")).resolve()
    if args.quick:
        s = Settings(demo, workdir, args.steps or 3, docs, k_values=(1, 10), encoder_steps=2, quick=True,
                     extra=["train.model=tiny", "train.batch_size=8", "evaluate.steps=2", "evaluate.images_per_prompt=1",
                            "evaluate.bootstrap=50", "evaluate.train_images=32", "evaluate.database_images=32"])
    else:
        s = Settings(demo, workdir, args.steps or 1500, docs)
    run(s, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
