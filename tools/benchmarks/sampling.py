"""sampling: model.diffusion.sample and the sample stage against a bare diffusers DDIM loop."""
from __future__ import annotations

import json

from .common import Bench, clock, config, interleave, measured, median, run_stage_quietly, stage_exists
from .corpus import chain, chain_overrides


def bare_ddim(model, emb, steps: int, guidance: float, generator):
    """A plain diffusers DDIM loop with classifier-free guidance around the same U-Net, the condition
    encoded once (what model.diffusion.sample does, minus our wrappers)."""
    import torch
    from diffusers import DDIMScheduler

    from model.diffusion import make_scheduler

    config = model.config
    sched = DDIMScheduler.from_config(make_scheduler(config, "ddim").config)
    sched.set_timesteps(steps)
    batch = emb.shape[0]
    with torch.no_grad():
        drop = torch.arange(2 * batch) >= batch
        context, mask = model.condition(torch.cat([emb, emb]), drop)
        x = torch.randn((batch, config.in_channels, config.resolution, config.resolution), generator=generator)
        for t in sched.timesteps:
            out = model.unet(torch.cat([x, x]), t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
            cond, uncond = out.chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x, generator=generator).prev_sample
    return x


def section_sampling(b: Bench) -> None:
    import torch

    from model.denoiser import KnnDenoiser, ModelConfig
    from model.diffusion import sample

    steps, batch, guidance = b.sizes.sample_steps, b.sizes.sample_batch, 8.0

    def runs_for(model) -> dict:
        torch.manual_seed(0)
        emb = torch.nn.functional.normalize(torch.randn(batch, model.config.k + 1, model.config.clip_dim), dim=-1)
        sample(model, emb, steps=2, guidance=guidance)  # warm-up: first-call allocations and kernels
        bare_ddim(model, emb, 2, guidance, None)
        runs = {"ours": lambda i: clock(lambda: sample(model, emb, steps=steps, guidance=guidance,
                                                       generator=torch.Generator().manual_seed(i)))[0] / batch,
                "bare": lambda i: clock(lambda: bare_ddim(model, emb, steps, guidance, torch.Generator().manual_seed(i)))[0] / batch}
        return runs

    torch.manual_seed(0)
    model = KnnDenoiser(ModelConfig.demo()).eval()
    res = interleave(b.args.reps, runs_for(model))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    per_100 = "" if steps == 100 else f"; x{100 / steps:g} for 100 steps: {median(res['ours']) * 100 / steps:.2f} s"
    b.add(measured("sampling", f"s/image, {steps} DDIM steps, batch {batch}, guidance 8", "s", res["ours"], res["bare"],
                   higher_is_better=False, note=f"demo model {ModelConfig.demo().resolution} px, {params:.1f} M params, "
                   f"random weights, {torch.get_num_threads()} threads{per_100}",
                   includes="ours: model.diffusion.sample (guided batch of 2B, condition re-encoded every step); "
                            "reference: diffusers DDIMScheduler loop around the same U-Net, condition encoded once"))
    if not all(stage_exists(s) for s in ("pack", "train", "sample")):
        missing = [f"pipeline/{s}.py" for s in ("pack", "train", "sample") if not stage_exists(s)]
        b.skip("sampling", "sample stage s/image", f"{', '.join(missing)} not present")
        return
    from model.checkpoint import load_model

    wd = chain(b, "train")
    cfg = config(wd, *chain_overrides(b))
    trained = load_model(wd / "train" / json.loads((wd / "train" / "manifest.json").read_text())["checkpoint"])

    def stage(i):
        seconds, manifest = run_stage_quietly(b, "sample", cfg)
        return seconds / manifest["items"]

    res = interleave(b.args.reps, {"stage": stage, "bare": runs_for(trained)["bare"]})
    b.add(measured("sampling", f"sample stage s/image, batch {batch}", "s", res["stage"], res["bare"],
                   higher_is_better=False, note="includes loading checkpoint, CLIP and index each run",
                   includes="ours: run_stage('sample') wall time / images (1 prompt x batch); reference: the bare "
                            "diffusers loop with the stage's checkpoint (EMA weights)"))
