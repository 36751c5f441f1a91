"""Noise schedule and sampling loop: thin wrappers over diffusers' DDPM/DDIM schedulers.

Images are in [-1, 1] inside; `sample` returns uint8 [B, H, W, 3]. The trainer uses
`make_scheduler` + `training_example`; the sampler uses `guided_output` inside a plain loop.
"""
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from model.denoiser import ModelConfig
from model.precision import autocast


def make_scheduler(config: ModelConfig, kind: str = "ddpm"):
    """A fresh diffusers scheduler with the model's beta schedule: "ddpm" (ancestral), "ddim"
    (deterministic) or "sde-dpmsolver++" (DPM-Solver++ 2M, stochastic). Every one clips its x_0
    estimate to [-1, 1]; DPM-Solver++ needs that too (thresholding at 1.0): without it the x_0 it
    derives from the noise estimate at high noise blows up and the demo model draws noise."""
    # "trailing" spacing starts sampling at t = T - 1 (pure noise), which few-step DDIM needs.
    clipped = dict(clip_sample=True, timestep_spacing="trailing")
    schedulers = {"ddpm": (DDPMScheduler, clipped), "ddim": (DDIMScheduler, clipped),
                  "sde-dpmsolver++": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                                       thresholding=True, sample_max_value=1.0))}
    if kind not in schedulers:
        raise ValueError(f"scheduler={kind!r}: use one of {sorted(schedulers)}")
    cls, options = schedulers[kind]
    return cls(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
               prediction_type=config.prediction_type, **options)


def training_example(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(x_t, target): x_0 noised to timesteps t, and what the network must predict there."""
    x_t = scheduler.add_noise(x0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, t)
    return x_t, noise


def guided_output(model, x_t, t, emb, guidance: float, neighbour_mask=None, image_cond=None,
                  neighbour_guidance: float | None = None):
    """Classifier-free guidance, every condition in one batch:
    out = out_uncond + guidance * (out_cond - out_uncond). guidance 1 skips the uncond pass.
    neighbour_guidance (None: the same as guidance) scales what the neighbours add to the query
    apart from what the query adds to the null context (two-scale guidance, as InstructPix2Pix):
    out = out_uncond + guidance * (out_query - out_uncond) + neighbour_guidance * (out_cond - out_query),
    where out_query masks every slot but 0 (an editing reference in slot 1 too); a third pass, only
    when the scales differ. It needs the query in every row (not --neighbours-only).
    image_cond (a manipulation model's I_manip) goes to every pass: guidance acts on the condition."""
    extra = {} if image_cond is None else {"image_cond": image_cond}
    return combine_guidance(*guidance_passes(model, x_t, t, emb, guidance, neighbour_mask, neighbour_guidance, extra),
                            guidance, neighbour_guidance)


def guidance_passes(model, x_t, t, emb, guidance: float, neighbour_mask=None, neighbour_guidance=None, extra=None):
    """(out_cond, out_uncond or None, out_query or None) from one batched model call (see guided_output)."""
    batch, extra = x_t.shape[0], extra or {}
    timesteps = torch.full((batch,), int(t), device=x_t.device, dtype=torch.long)
    two_scale = neighbour_guidance is not None and neighbour_guidance != guidance and emb.shape[1] > 1
    if guidance == 1.0 and not two_scale:
        return model(x_t, timesteps, emb, None, neighbour_mask, **extra).float(), None, None
    masks = None if neighbour_mask is None else [neighbour_mask, neighbour_mask]
    if two_scale:  # the query alone: slot 0 as the full condition has it, every neighbour masked
        present = torch.ones(emb.shape[:2], dtype=torch.bool) if neighbour_mask is None else neighbour_mask.bool()
        if not present[:, 0].all():
            raise ValueError("neighbour_guidance scales what the neighbours add to the query: a row without its "
                             "query slot (neighbours only) has nothing to add it to")
        masks = [present, present, torch.cat([present[:, :1], torch.zeros_like(present[:, 1:])], dim=1)]
    passes = 3 if two_scale else 2
    drop = (torch.arange(passes * batch, device=x_t.device) // batch) == 1  # second pass: null context
    extra = {name: torch.cat([value] * passes) for name, value in extra.items()}
    out = model(torch.cat([x_t] * passes), torch.cat([timesteps] * passes), torch.cat([emb] * passes), drop,
                None if masks is None else torch.cat(masks), **extra).float()
    cond, uncond, *query = out.chunk(passes)
    return cond, uncond, query[0] if query else None


def combine_guidance(cond, uncond, query, guidance: float, neighbour_guidance: float | None):
    if uncond is None:
        return cond
    if query is None:
        return uncond + guidance * (cond - uncond)
    return uncond + guidance * (query - uncond) + neighbour_guidance * (cond - query)


@torch.no_grad()
def sample(model, emb: torch.Tensor, steps: int = 50, guidance: float = 8.0,
           generator: torch.Generator | list[torch.Generator] | None = None, init_image=None, strength: float = 1.0,
           scheduler: str = "ddim", neighbour_mask=None, progress=None, image_cond=None,
           neighbour_guidance: float | None = None) -> np.ndarray:
    """Generate uint8 images [B, H, W, 3] for condition embeddings emb [B, n <= k+1, d].

    Deterministic for a given CPU torch.Generator (noise is drawn on the CPU, on any device). A list
    of B generators draws each image's noise from its own generator, so image i of a batch is the
    image a batch of one with generator i gives (batched sampling, per-image seeds).
    init_image (uint8 [B, H, W, 3] or [H, W, 3]) with strength in [0, 1]: image editing, start from
    the reference noised to timestep ~strength * T and run the remaining steps (the paper also puts
    f_img(reference) in neighbour slot 1 of emb: the caller's job). neighbour_mask: see
    ConditionEncoder (e.g. --no-knn with a model trained with neighbours: pass emb[:, :1]).
    progress(done, total), if given, is called after each denoising step (`knnd serve` shows it).
    image_cond (uint8 [B, H, W, 3] or [H, W, 3]): a manipulation model's input image (knnd edit).
    neighbour_guidance: see guided_output (None: the neighbours are guided with `guidance`).
    A discrete-backbone model samples through model.discrete_sampling (`scheduler` does not apply).
    """
    if getattr(model, "backbone", "continuous") == "discrete":
        from model.discrete_sampling import sample_discrete
        return sample_discrete(model, emb, steps, guidance, generator, init_image, strength, neighbour_mask, progress,
                               neighbour_guidance)
    config = model.config
    device = next(model.parameters()).device
    sched = make_scheduler(config, scheduler)
    sched.set_timesteps(steps)
    batch = emb.shape[0]
    shape = (batch, config.in_channels, config.resolution, config.resolution)
    if isinstance(generator, list):
        x = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator]).to(device)
    else:
        x = torch.randn(shape, generator=generator).to(device)
    timesteps = sched.timesteps
    if init_image is not None:
        timesteps = timesteps[steps - min(int(round(steps * strength)), steps):]
        reference = images_to_tensor(init_image, batch).to(device)
        x = sched.add_noise(reference, x, timesteps[:1]) if len(timesteps) else reference
    was_training = model.training
    model.eval()
    emb = emb.to(device, torch.float32)
    if image_cond is not None:
        image_cond = images_to_tensor(image_cond, batch).to(device)
    for i, t in enumerate(timesteps):
        with autocast(device):
            out = guided_output(model, x, t, emb, guidance, neighbour_mask, image_cond, neighbour_guidance)
        x = sched.step(out, t, x, generator=generator).prev_sample
        if progress is not None:
            progress(i + 1, len(timesteps))
    model.train(was_training)
    return tensor_to_images(x)


def images_to_tensor(images, batch: int | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or one [H, W, 3] image, repeated to batch) -> [B, 3, H, W] in [-1, 1]."""
    images = torch.as_tensor(np.asarray(images))
    if images.ndim == 3:
        images = images.unsqueeze(0).expand(batch or 1, -1, -1, -1)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 numpy [B, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
