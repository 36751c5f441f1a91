"""`knnd`: the command line. Parses, validates, and calls the stage functions; nothing more.

Exit codes: 0 success, 1 runtime failure, 2 bad config or usage (nothing written).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home

from pipeline.config import SCHEDULERS, ConfigError, load_config  # noqa: E402
from pipeline.report import print_table  # noqa: E402
from pipeline.runner import StageError, UsageError, run_stage, stage_status  # noqa: E402
from pipeline.stages import STAGES  # noqa: E402

DEFAULT_CONFIG = "stages.yaml"


def _config(args):
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    return load_config(path, args.set or [])


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help=f"stages.yaml to read (default: ./{DEFAULT_CONFIG} if present, else built-in defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set embed.batch_size=64 (repeatable)")


def _add_allow_other_clip(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--allow-other-clip", action="store_true",
                   help=f"{what} embedded by another CLIP than the model's (refused by default)")


def cmd_run(args) -> int:
    cfg = _config(args)
    names = STAGES if "all" in args.stages else args.stages
    for name in names:
        if name not in STAGES:
            raise UsageError(f"unknown stage {name!r}: choose from {', '.join(STAGES)} or all")
    names = [name for name in STAGES if name in names]  # pipeline order, whatever order they were typed in
    for name in names:
        run_stage(name, cfg, force=args.force, keep_old=not args.discard_old)
    print_table(cfg, names)
    return 0


def cmd_status(args) -> int:
    cfg = _config(args)
    print(f"workdir: {cfg.workdir}")
    for name in STAGES:
        state, detail = stage_status(cfg, name)
        print(f"  {name:<11} {state:<8} {detail}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type for step counts: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of steps") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} steps train nothing: give at least 1")
    return value


def _logit_scale(text: str) -> float:
    """argparse type for --encoder-logit-scale: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g}: a logit scale must be above 0 (a real CLIP's is 100)")
    return value


def cmd_demo(args) -> int:
    from pipeline.demo import run_demo

    workdir = args.workdir or ("work/demo" if args.backbone == "continuous" else f"work/demo-{args.backbone}")
    return run_demo(Path(workdir), minutes=args.minutes, limit=args.limit, set_args=args.set or [],
                    encoder_minutes=args.encoder_minutes, force=args.force, backbone=args.backbone,
                    steps=args.steps, encoder_steps=args.encoder_steps, encoder_logit_scale=args.encoder_logit_scale)


def cmd_search(args) -> int:
    from pipeline.search import search_command

    return search_command(_config(args), args.prompt, index_dir=args.index, k=args.k, where=args.where)


def cmd_sample(args) -> int:
    """`knnd sample "prompt" ...`: the flags override the sample: section."""
    from pipeline.generation import SampleRequest, sample_into

    cfg = _config(args)
    conf = cfg.sample
    request = SampleRequest(
        prompts=list(args.prompts) or list(conf.prompts),
        k=conf.k if args.k is None else args.k,
        guidance=conf.guidance if args.guidance is None else args.guidance,
        steps=conf.steps if args.steps is None else args.steps,
        seed=conf.seed if args.seed is None else args.seed,
        images_per_prompt=conf.images_per_prompt, no_knn=args.no_knn, neighbours_only=args.neighbours_only,
        init_image=args.init_image, strength=args.strength if args.init_image else 1.0,
        allow_other_clip=args.allow_other_clip, where=args.where, unconditional=args.unconditional or 0,
        scheduler=args.scheduler or conf.scheduler,
        neighbour_guidance=conf.neighbour_guidance if args.neighbour_guidance is None else args.neighbour_guidance)
    sample_into(cfg, request, args.checkpoint, args.index, args.out)
    return 0


def cmd_edit(args) -> int:
    """`knnd edit IMAGE "edit text"`: the flags override the sample: section's k, guidance, steps, seed."""
    from pipeline.edit import EditRequest, edit_into, parse_box

    cfg = _config(args)
    conf = cfg.sample
    request = EditRequest(
        image=args.image, text=args.text, box=parse_box(args.box),
        k=conf.k if args.k is None else args.k,
        guidance=conf.guidance if args.guidance is None else args.guidance,
        steps=conf.steps if args.steps is None else args.steps,
        seed=conf.seed if args.seed is None else args.seed,
        images=args.images, allow_other_clip=args.allow_other_clip)
    edit_into(cfg, request, args.checkpoint, args.index, args.out)
    return 0


def cmd_evaluate(args) -> int:
    from pipeline.evaluate import evaluate_command

    return evaluate_command(_config(args), args.checkpoint, args.index, args.out, k=args.k, no_knn=args.no_knn,
                            neighbours_only=args.neighbours_only, allow_other_clip=args.allow_other_clip,
                            where_filter=args.where, guidance=args.guidance, steps=args.steps, scheduler=args.scheduler,
                            samples_from=args.samples_from, baseline=args.baseline)


def cmd_compare(args) -> int:
    from pipeline.evaluate_compare import compare_command

    return compare_command(args.a, args.b, args.out, args.bootstrap, args.pool)


def cmd_serve(args) -> int:
    from pipeline.serve import serve_command

    return serve_command(_config(args), args.index, args.checkpoint, host=args.host, port=args.port,
                         allow_other_clip=args.allow_other_clip)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knnd", description="KNN-Diffusion: data pipeline, trainer and sampler")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run stages (or `all`), skipping those that are up to date")
    p.add_argument("stages", nargs="+", metavar="STAGE", help=f"one or more of: {', '.join(STAGES)}, all")
    p.add_argument("--force", action="store_true", help="rebuild even if the config changed or the stage is done")
    p.add_argument("--discard-old", action="store_true",
                   help="a rebuild deletes the old output first instead of keeping it until the new one is finished "
                        "(for outputs too large to keep twice; a refused rebuild then cannot bring it back)")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="each stage: done / partial (n of m shards) / stale / pending")
    _add_config_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="the whole pipeline on the offline OpenMoji demo data")
    p.add_argument("--workdir", default=None, help="where the demo writes (default: work/demo, "
                   "work/demo-discrete with --backbone discrete)")
    p.add_argument("--backbone", choices=["continuous", "discrete"], default="continuous",
                   help="continuous: the U-Net over pixels; discrete: VQ tokens and the token transformer")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="minutes of diffusion training (default: the demo's budget)")
    budget.add_argument("--steps", type=_positive_int, default=None,
                        help="diffusion training steps instead of minutes: the same model on any host")
    p.add_argument("--limit", type=int, default=None, help="use only N stickers, spread over the set (quick runs)")
    encoder_budget = p.add_mutually_exclusive_group()
    encoder_budget.add_argument("--encoder-minutes", type=float, default=4.0, help="minutes of demo CLIP training (cached)")
    encoder_budget.add_argument("--encoder-steps", type=_positive_int, default=None,
                                help="demo CLIP training steps instead of minutes (cached)")
    p.add_argument("--encoder-logit-scale", type=_logit_scale, default=None,
                   help="fix the demo CLIP's logit scale (inverse temperature) instead of learning it: at 100, a real "
                   "CLIP's, captions stay apart from their images (a modality gap) as with a pretrained encoder")
    p.add_argument("--force", action="store_true", help="rebuild the stages after download (e.g. after changing --set values)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("search", help="retrieval only: the neighbours of a text prompt")
    p.add_argument("prompt")
    p.add_argument("--index", help="index directory (default: this workdir's index/)")
    p.add_argument("-k", type=int, default=10, help="neighbours to print")
    p.add_argument("--where", help='only images whose metadata satisfies this SQL filter, e.g. "punsafe < 0.1" (DuckDB)')
    _add_config_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("sample", help="sample images for prompts against any index")
    p.add_argument("prompts", nargs="*", help="prompts (default: sample.prompts from the config)")
    p.add_argument("--index", help="index directory to retrieve from (database swapping)")
    p.add_argument("--checkpoint", help="checkpoint to load (default: the latest in train/checkpoints)")
    p.add_argument("-k", type=int, help="neighbours per prompt")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--neighbour-guidance", type=float, help="guidance scale of what the neighbours add to the text "
                   "(default: sample.neighbour_guidance; above --guidance: more of the database's look)")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="sampler: sde-dpmsolver++, ddpm (ancestral) or ddim (default: sample.scheduler)")
    p.add_argument("--seed", type=int, help="seed of the initial noise")
    p.add_argument("--out", help="output folder (default: a new <workdir>/sample_cli/<YYYYmmdd-HHMMSS>[-N] per call; "
                                 "`knnd run sample` writes <workdir>/sample)")
    p.add_argument("--no-knn", action="store_true", help="condition on the text embedding alone (the paper's ablation)")
    p.add_argument("--neighbours-only", action="store_true",
                   help="condition on the retrieved neighbours alone: the text only retrieves them (RDM-style)")
    p.add_argument("--init-image", help="reference image to edit (replaces the first neighbour, noised start)")
    p.add_argument("--strength", type=float, default=0.7, help="how far the reference is noised (0..1)")
    _add_allow_other_clip(p, "sample against an index")
    p.add_argument("--where", help='neighbours only among images whose metadata satisfies this SQL filter, '
                                   'e.g. "aesthetic >= q(0.9)" (DuckDB)')
    p.add_argument("--unconditional", type=int, metavar="N",
                   help="no prompts: N random database images as pseudo-queries, conditioned on their neighbours (RDM)")
    _add_config_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="grade a checkpoint against an index on held-out prompts: metrics.json + report.html")
    p.add_argument("--checkpoint", help="checkpoint file or folder (default: the latest in train/checkpoints)")
    p.add_argument("--index", help="index directory to retrieve from (default: this workdir's index/)")
    p.add_argument("--out", help="output folder (default: <workdir>/evaluate_cli/<checkpoint>-<index>-k<k>-g<guidance>"
                   "-s<steps>, with -noknn, -neighbours-only, -ddpm, -ddim or -where-<digest> where they apply)")
    p.add_argument("-k", type=int, help="neighbours per prompt (default: evaluate.k, else sample.k)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: evaluate.guidance); "
                   "the best scale depends on the model and the sampler, so compare a few")
    p.add_argument("--steps", type=int, help="denoising steps (default: evaluate.steps)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="sampler: sde-dpmsolver++, ddpm (ancestral) or ddim (default: evaluate.scheduler)")
    p.add_argument("--no-knn", action="store_true", help="condition on the text embedding alone")
    p.add_argument("--neighbours-only", action="store_true",
                   help="condition on the retrieved neighbours alone (the text only retrieves them)")
    p.add_argument("--baseline", action="store_true", help="also sample the same prompts and noise from the text alone "
                   "(into <out>/no_knn) and report the paired difference, as `knnd run evaluate` does")
    _add_allow_other_clip(p, "grade against an index")
    p.add_argument("--where", help='neighbours only among images whose metadata satisfies this SQL filter (DuckDB)')
    p.add_argument("--samples-from", help="grade the samples of an earlier evaluation folder again (e.g. under another "
                   "evaluate.encoder, or to write its features.npz), into that folder unless --out; samples nothing")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    add_compare_parser(sub)
    add_edit_parser(sub)
    add_serve_parser(sub)
    return parser


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="two evaluations of the same prompts and noise, paired image by image: A - B")
    p.add_argument("a", help="evaluation folder A (e.g. with neighbours)")
    p.add_argument("b", help="evaluation folder B (e.g. --no-knn, another index or checkpoint)")
    p.add_argument("--out", help="JSON file to write (default: A/compare-<B's folder name>.json)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over prompts (default 1000)")
    p.add_argument("--pool", nargs=2, action="append", metavar=("A", "B"),
                   help="another pair (e.g. the same two conditions on another fold: dedup.holdout_seed), pooled "
                        "with A B into one comparison; repeat for more folds")
    p.set_defaults(func=cmd_compare)


def add_edit_parser(sub) -> None:
    p = sub.add_parser("edit", help="mask-free local manipulation of an image by an edit text (a train.mode=manipulate model)")
    p.add_argument("image", help="the image to edit")
    p.add_argument("text", help='what to change, e.g. "wearing sunglasses"')
    p.add_argument("--box", metavar="X0,Y0,X1,Y1",
                   help="optional region, as fractions of the side: replaced by the image's ECC-aligned first "
                        "neighbour as in training (default: none, the paper's mask-free edit)")
    p.add_argument("--checkpoint", help="checkpoint file or folder (default: the latest in train/checkpoints)")
    p.add_argument("--index", help="index directory for the image's neighbours (default: sample.index, else this workdir's)")
    p.add_argument("-k", type=int, help="neighbours of the image in the condition (default: sample.k)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: sample.guidance)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: sample.steps)")
    p.add_argument("--seed", type=int, help="seed of the initial noise; image i uses seed + i (default: sample.seed)")
    p.add_argument("--images", type=int, default=4, help="edited versions to sample (default: 4)")
    p.add_argument("--out", help="output folder (default: a new <workdir>/edit_cli/<YYYYmmdd-HHMMSS>[-N])")
    _add_allow_other_clip(p, "retrieve from an index")
    _add_config_args(p)
    p.set_defaults(func=cmd_edit)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="a local web page (and JSON API) to search indexes and sample from them")
    p.add_argument("--index", action="append", metavar="DIR",
                   help="index directory to offer (repeatable; default: sample.index, else this workdir's index/)")
    p.add_argument("--checkpoint", help="checkpoint file or folder (default: the latest in train/checkpoints; "
                                        "none: search only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; anything else is reachable by others)")
    _add_allow_other_clip(p, "sample against indexes")
    _add_config_args(p)
    p.set_defaults(func=cmd_serve)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UsageError) as e:
        print(f"knnd: error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"knnd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("knnd: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if not out_of_gpu_memory(e):
            raise
        print(f"knnd: error: the GPU ran out of memory ({str(e).strip().splitlines()[0][:160]}): lower the batch size "
              f"of what ran (train.batch_size, embed.batch_size or evaluate.batch_size) and run "
              f"the same command again; finished shards are kept", file=sys.stderr)
        return 1


def out_of_gpu_memory(e: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, also when Ray hands it back wrapped (its text survives the wrapping)."""
    return type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(e)


if __name__ == "__main__":
    sys.exit(main())
