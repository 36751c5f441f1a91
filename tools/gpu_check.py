"""The GPU paths in one short run (a few minutes on one H200; nothing is downloaded). Each check passes,
fails (its error and the end of its traceback recorded) or is skipped with the reason: no CUDA (every
check, on a CPU-only machine), a package not installed, faiss without a GPU, or a check it needs that
did not pass. The checks (tools/gpu_checks/):

  clip_fp16         model.clip's ViT-B-32 (random init) fp16 on cuda vs fp32 on CPU: cosine, images/s.
  embed_encoder     pipeline.embed_encoder.ClipEncoder (the embed actors' class) on a tiny open_clip config,
                    fp16 on cuda vs fp32 on CPU, on uint8 batches and captions: cosine > 0.99.
  train_bf16        model.trainer.train_loop on cuda with bf16 autocast, the demo recipe on --pack (default:
                    a synthetic 16 px pack), for --steps or --seconds; EMA checkpoints of --keep steps to OUT.
  sample_cuda       (needs train_bf16) sampling as `knnd sample`/evaluate run it: sde-dpmsolver++, one CPU
                    generator per image, a neighbour mask, neighbour_guidance, init_image; the same twice.
  discrete_bf16     the discrete backbone: its trainer's loop on cuda (bf16) 4 steps on a tiny VQ-token
                    pack, then sampling with per-image generators (the same twice) and from an init image.
  faiss_gpu_build   train_index/add_batches with use_gpu=True (GPU k-means, GPU cell assignment) vs the CPU
                    build, exact_search on the GPU and a GPU search: recall@10 against numpy's brute force.
  faiss_gpu_assign  neighbours.gpus_per_actor: queries' cells found on the GPU vs a CPU copy: the same rows.
  faiss_gpu_refine  the full k-means iterations on the GPU vs the CPU: the same objective.
  train_ray         the train stage's entry (model.trainer.train) with use_gpu=True, num_workers=1: Ray
                    Train's TorchTrainer, prepare_model, get_device() and the NCCL broadcast; 6 steps.

    python tools/gpu_check.py --out OUT [--pack work/demo/pack] [--steps 17000] [--seconds 60] [--only a,b]

Everything trains in a fresh temporary folder (deleted at the end): a re-run starts from scratch.
Writes OUT/gpu_check.json (after every check), OUT/metrics.jsonl and OUT/step_XXXXXXX.pt; prints one
line per check at the end. Exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.gpu_checks import clip_checks, faiss_checks, model_checks  # noqa: E402 - after the path
from tools.gpu_checks.common import Context  # noqa: E402

# name, function, checks that must pass first, packages it imports; in the order they run (Ray last:
# a Ray Train run that hangs costs no other check its result)
CHECKS = [
    ("clip_fp16", clip_checks.clip_fp16, (), ("open_clip",)),
    ("embed_encoder", clip_checks.embed_encoder, (), ("open_clip",)),
    ("train_bf16", model_checks.train_bf16, (), ("diffusers",)),
    ("sample_cuda", model_checks.sample_cuda, ("train_bf16",), ("diffusers",)),
    ("discrete_bf16", model_checks.discrete_bf16, (), ("diffusers",)),
    ("faiss_gpu_build", faiss_checks.faiss_gpu_build, (), ("faiss",)),
    ("faiss_gpu_assign", faiss_checks.faiss_gpu_assign, (), ("faiss",)),
    ("faiss_gpu_refine", faiss_checks.faiss_gpu_refine, (), ("faiss",)),
    ("train_ray", model_checks.train_ray, (), ("ray", "diffusers")),
]
NAMES = [name for name, *_ in CHECKS]


def selected(only: str | None) -> list[str]:
    """The checks --only names (comma-separated) and the checks they need, in table order; all without it."""
    if not only:
        return list(NAMES)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    unknown = sorted(wanted - set(NAMES))
    if unknown:
        raise ValueError(f"--only: unknown check(s) {unknown}; the checks are {', '.join(NAMES)}")
    for name, _, needs, _ in reversed(CHECKS):  # a check's needs come before it in the table
        if name in wanted:
            wanted |= set(needs)
    return [name for name in NAMES if name in wanted]


def skip_reason(needs, packages, done: dict) -> str | None:
    """Why a check cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA"
    for need in needs:
        if done.get(need, {}).get("status") != "pass":
            return f"{need} {'failed' if done.get(need, {}).get('status') == 'fail' else 'did not run'}"
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if "faiss" in packages:
        import faiss
        if faiss.get_num_gpus() == 0:
            return "faiss sees no GPU (faiss-cpu installed)"
    return None


def run_check(function, ctx: Context) -> dict:
    """{status: pass, ...the check's result} or {status: fail, error, traceback (its last 15 lines)}, with seconds."""
    start = time.perf_counter()
    try:
        entry = {"status": "pass", **function(ctx)}
    except Exception as e:  # noqa: BLE001 - every check reports, whatever fails
        entry = {"status": "fail", "error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc().rstrip().splitlines()[-15:]}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**entry, "seconds": round(time.perf_counter() - start, 1)}


def table(checks: dict) -> str:
    """One line per check: PASS/FAIL/SKIP, name, seconds, and the error or the reason."""
    lines = []
    for name, entry in checks.items():
        status = {"pass": "PASS", "fail": "FAIL"}.get(entry["status"], "SKIP")
        note = entry.get("error") or entry.get("reason") or ""
        lines.append(f"{status}  {name:<17} {entry.get('seconds', 0):>6.1f} s  {note}"[:200].rstrip())
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="gpu_check.json, metrics.jsonl and checkpoints go here")
    parser.add_argument("--pack", type=Path, help="a pack folder to train on (default: a synthetic 16 px pack)")
    parser.add_argument("--steps", type=int, default=17000, help="train_bf16: at most this many steps")
    parser.add_argument("--seconds", type=float, default=60.0, help="train_bf16: at most this long (300: the README's run)")
    parser.add_argument("--keep", default="200,2000,6000", help="train_bf16: steps whose EMA weights are written to --out")
    parser.add_argument("--only", help=f"comma-separated checks (and the checks they need): {', '.join(NAMES)}")
    args = parser.parse_args(argv)
    try:
        names = selected(args.only)
    except ValueError as e:
        parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name(0) if cuda else "no CUDA", "torch": torch.__version__, "checks": {}}
    with tempfile.TemporaryDirectory(prefix="knnd_gpu_check_") as work:
        ctx = Context(out=args.out, work=Path(work), pack_dir=args.pack.resolve() if args.pack else None,
                      steps=args.steps, seconds=args.seconds, keep=tuple(int(s) for s in args.keep.split(",")))
        for name, function, needs, packages in CHECKS:
            if name not in names:
                continue
            reason = skip_reason(needs, packages, report["checks"])
            entry = {"status": "skipped", "reason": f"skipped: {reason}"} if reason else run_check(function, ctx)
            report["checks"][name] = ctx.results[name] = entry
            print(f"{name}: {json.dumps(entry)}", flush=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report["checks"]), flush=True)
    return 1 if any(e["status"] == "fail" for e in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
