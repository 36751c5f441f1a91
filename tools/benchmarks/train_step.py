"""train_step: our training step against a bare diffusers loop over the same U-Net (tools/bench_train.py)."""
from __future__ import annotations

from .common import Bench, interleave, measured


def section_train_step(b: Bench) -> None:
    """Our training step vs a bare diffusers loop over the same U-Net (tools/bench_train.py), at the
    demo's old (32 px) and new (16 px) settings; random data of the demo's shapes."""
    import bench_train  # tools/bench_train.py; tools/ is on sys.path (bench.py puts it there)
    from model.denoiser import ModelConfig

    steps = 10 if b.args.quick else 30
    for name, (resolution, attention) in bench_train.VARIANTS.items():
        config = ModelConfig.demo(resolution=resolution, attention_resolutions=attention, clip_dim=256, k=10)
        runs = {"ours": lambda i: bench_train.ours(config, bench_train.batches(None, resolution), steps),
                "bare": lambda i: bench_train.bare(config, bench_train.batches(None, resolution), steps)}
        res = interleave(b.args.reps, runs)
        b.add(measured("train step", f"samples/s, demo U-Net, {name}", "samples/s", res["ours"], res["bare"], target=0.9,
                       target_text=">= 0.9", note=f"batch {bench_train.BATCH}, {steps} timed steps after 5 warm-up",
                       includes="ours: condition encoder, query dropout, masks; bare: UNet2DConditionModel + a linear "
                                "projection of the k + 1 embeddings, MSE, AdamW"))
