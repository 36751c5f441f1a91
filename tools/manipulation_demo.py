"""Local manipulation on the demo data: train a manipulation model next to an existing demo, then write
before/after pairs for the README.

    python tools/manipulation_demo.py --demo work/demo --workdir work/demo_edit --minutes 20

1. <workdir>/{download,embed,dedup,index,neighbours} become links to the demo's (nothing of the demo
   is rewritten: its pack and train stay the text-to-image ones);
2. `knnd run pack train` there with pack.manipulation=true and train.mode=manipulate, fine-tuning the
   demo's latest text-to-image checkpoint (train.init_from; --init-from none: from scratch), the demo's
   config otherwise (--set adds overrides; a re-run resumes);
3. `knnd edit` on --pairs held-out demo images (never trained on), each with one of --texts: once
   mask-free and once with a centred box, into <workdir>/edit_demo/<n>/, and every grid stacked
   into <workdir>/edit_demo/pairs.png (a row per edit: before, input, afters).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UPSTREAM = ("download", "embed", "dedup", "index", "neighbours")
CENTRED_BOX = (0.25, 0.25, 0.75, 0.75)


def link_upstream(demo: Path, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for name in UPSTREAM:
        link, target = workdir / name, (demo / name).resolve()
        if not target.is_dir():
            sys.exit(f"manipulation_demo: {target} is missing: run `knnd demo --workdir {demo}` first")
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)


def held_out_images(cfg, n: int, out: Path) -> list[Path]:
    """n held-out demo images (dedup's evaluation hold-out) as 128 px PNGs in out/."""
    import numpy as np
    from PIL import Image

    from pipeline.embeddings import read_holdout
    from pipeline.images import DatabaseImages

    workdir = Path(cfg.workdir)
    rows = read_holdout(workdir / "dedup")
    rows = np.random.default_rng(0).choice(rows, size=min(n, len(rows)), replace=False)
    database = DatabaseImages(workdir / "embed")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for row, image in sorted(database.load(rows, 128).items()):
        path = out / f"{database.keys[row]}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def stack(grids: list[Path], out: Path) -> None:
    from PIL import Image

    images = [Image.open(g).convert("RGB") for g in grids]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    sheet.save(out)


def main() -> int:
    from model.checkpoint import latest_checkpoint
    from pipeline.config import load_config
    from pipeline.edit import EditRequest, edit_into
    from pipeline.runner import run_stage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="work/demo", help="an existing `knnd demo` workdir")
    parser.add_argument("--workdir", default="work/demo_edit", help="where the manipulation model goes")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget (train.minutes)")
    parser.add_argument("--pairs", type=int, default=6, help="held-out images to edit")
    parser.add_argument("--texts", nargs="+", default=None, help="edit texts (default: the config's sample.prompts)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per edit")
    parser.add_argument("--init-from", default=None,
                        help="checkpoint to fine-tune (default: the demo's latest; none: train from scratch)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    demo, workdir = Path(args.demo), Path(args.workdir).resolve()
    link_upstream(demo, workdir)
    init = args.init_from or latest_checkpoint(demo / "train" / "checkpoints")
    init = [] if init in (None, "none") else [f"train.init_from={Path(init).resolve()}"]
    cfg = load_config(demo / "stages.yaml", [f"workdir={workdir}", "pack.manipulation=true", "train.mode=manipulate",
                                             f"train.minutes={args.minutes}", *init, *args.set])
    run_stage("pack", cfg)
    run_stage("train", cfg)
    texts = args.texts or list(cfg.sample.prompts)
    out = workdir / "edit_demo"
    grids = []
    for i, image in enumerate(held_out_images(cfg, args.pairs, out / "inputs")):
        text = texts[i % len(texts)]
        for box in (None, CENTRED_BOX):
            request = EditRequest(image=str(image), text=text, box=box, k=cfg.sample.k, guidance=cfg.sample.guidance,
                                  steps=args.steps, seed=0, images=3)
            grids.append(edit_into(cfg, request, out=str(out / f"{i:02d}_{'box' if box else 'free'}")) / "grid.png")
    stack(grids, out / "pairs.png")
    print(f"manipulation_demo: {len(grids)} edits; before/after sheet: {out / 'pairs.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
