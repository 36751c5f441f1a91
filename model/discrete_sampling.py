"""Sampling the discrete backbone: all-[MASK] -> `steps` reverse steps (diffusers'
VQDiffusionScheduler.step on respaced tables) -> tokens -> the VQ decoder -> uint8 images.

Guidance is on logits, as in the paper and diffusers' VQDiffusionPipeline:
log p = log p(y') + lambda (log p(y) - log p(y')), renormalised over the codes (the model outputs log
probabilities, i.e. logits up to a per-token constant, which the renormalisation removes).
"""
import numpy as np
import torch

from model.discrete_diffusion import q_sample, respaced_scheduler
from model.vq import decode_tokens, encode_tokens
from model.precision import autocast


def guide_logits(cond: torch.Tensor, uncond: torch.Tensor, guidance: float, query: torch.Tensor | None = None,
                 neighbour_guidance: float | None = None) -> torch.Tensor:
    """uncond + guidance * (cond - uncond), or with the query pass the two-scale form
    (model.diffusion.combine_guidance), renormalised to log probabilities over dim 1."""
    from model.diffusion import combine_guidance

    out = combine_guidance(cond, uncond, query, guidance, neighbour_guidance)
    return out - torch.logsumexp(out, dim=1, keepdim=True)


def guided_log_x0(model, x_t, t: int, emb, guidance: float, neighbour_mask=None,
                  neighbour_guidance: float | None = None) -> torch.Tensor:
    """log p(x_0 | x_t) [B, K, N] with classifier-free guidance (the conditions in one batch; guidance 1
    skips the null pass; neighbour_guidance as model.diffusion.guided_output's, on logits)."""
    from model.diffusion import guidance_passes

    cond, uncond, query = guidance_passes(model, x_t, t, emb, guidance, neighbour_mask, neighbour_guidance)
    return cond if uncond is None else guide_logits(cond, uncond, guidance, query, neighbour_guidance)


def _uniforms(generators, batch: int, n: int):
    """Two uniforms per token, image i's from generator i (or all from one generator)."""
    if isinstance(generators, list):
        pairs = [(torch.rand(1, n, generator=g), torch.rand(1, n, generator=g)) for g in generators]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    return torch.rand(batch, n, generator=generators), torch.rand(batch, n, generator=generators)


def _step(sched, log_x0, i: int, x, generators):
    """One reverse step; a list of generators draws image i's Gumbel noise from generator i."""
    if not isinstance(generators, list):
        return sched.step(log_x0.cpu(), i, x.cpu(), generator=generators).prev_sample
    return torch.cat([sched.step(log_x0[j:j + 1].cpu(), i, x[j:j + 1].cpu(), generator=g).prev_sample
                      for j, g in enumerate(generators)])


@torch.no_grad()
def sample_discrete(model, emb: torch.Tensor, steps: int = 100, guidance: float = 8.0, generator=None,
                    init_image=None, strength: float = 1.0, neighbour_mask=None, progress=None,
                    neighbour_guidance: float | None = None) -> np.ndarray:
    """uint8 images [B, H, W, 3] for condition embeddings emb [B, n <= k+1, d]; the arguments are
    model.diffusion.sample's. init_image with strength s: its tokens, corrupted by q(x_tau | x_0) at the
    timestep ~s along the respaced chain (a partly masked, partly replaced start), then the remaining
    steps. Deterministic for CPU generators (a list: image i from generator i, as a batch of one)."""
    from model.diffusion import images_to_tensor, tensor_to_images

    config = model.config
    device = next(model.parameters()).device
    sched, taus = respaced_scheduler(config.codes, config.num_train_timesteps, steps)
    batch, n, K = emb.shape[0], config.grid ** 2, config.codes
    x = torch.full((batch, n), K, dtype=torch.long)
    indices = list(range(len(taus)))[::-1]
    if init_image is not None:
        keep = min(int(round(len(taus) * strength)), len(taus))
        indices = indices[len(taus) - keep:]
        x0 = encode_tokens(model.vq, images_to_tensor(init_image, batch).to(device)).reshape(batch, n).cpu()
        if indices:
            u_mask, u_code = _uniforms(generator if generator is not None else torch.Generator(), batch, n)
            x = q_sample_at(sched, x0, indices[0], u_mask, u_code)  # respaced row i holds tau_i
        else:
            x = x0
    was_training = model.training
    model.eval()
    emb = emb.to(device, torch.float32)
    for done, i in enumerate(indices):
        with autocast(device):
            log_x0 = guided_log_x0(model, x.to(device), int(taus[i]), emb, guidance, neighbour_mask, neighbour_guidance)
        x = _step(sched, log_x0, i, x, generator)
        if progress is not None:
            progress(done + 1, len(indices))
    model.train(was_training)
    images = decode_tokens(model.vq, x.view(batch, config.grid, config.grid).to(device))
    return tensor_to_images(images)


def q_sample_at(sched, x0: torch.Tensor, index: int, u_mask: torch.Tensor, u_code: torch.Tensor) -> torch.Tensor:
    """q_sample at row `index` of a (respaced) scheduler's cumulative tables."""
    return q_sample(sched, x0, torch.full((x0.shape[0],), index, dtype=torch.long), u_mask, u_code)
