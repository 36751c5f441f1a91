"""train_step: our training step against a bare diffusers loop over the same U-Net (tools/bench_train.py)."""
from __future__ import annotations

from .common import Bench, interleave, measured


def section_train_step(b: Bench) -> None:
    """Our training step vs a bare diffusers loop over the same U-Net (tools/bench_train.py), at each
    of ``bench_train.VARIANTS`` (the old 32 px demo, the 16 px recipe, 32 px with space-to-depth);
    random data of the demo's shapes."""
    import bench_train  # tools/bench_train.py; tools/ is on sys.path (bench.py puts it there)

    steps = 10 if b.args.quick else 30
    for name, variant in bench_train.VARIANTS.items():
        config, resolution = bench_train.variant_config(*variant), variant[0]
        runs = {"ours": lambda i: bench_train.ours(config, bench_train.batches(None, resolution), steps),
                "bare": lambda i: bench_train.bare(config, bench_train.batches(None, resolution), steps)}
        res = interleave(b.args.reps, runs)
        b.add(measured("train step", f"samples/s, demo U-Net, {name}", "samples/s", res["ours"], res["bare"], target=0.9,
                       target_text=">= 0.9", note=f"batch {bench_train.BATCH}, {steps} timed steps after 5 warm-up",
                       includes="ours: condition encoder, query dropout, masks; bare: UNet2DConditionModel + a linear "
                                "projection of the k + 1 embeddings, MSE, AdamW"))
