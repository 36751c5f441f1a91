"""VQ-Diffusion's mask-and-replace process on diffusers' VQDiffusionScheduler tables.

diffusers implements the reverse step only (`q_posterior` for one scalar timestep, `step`). The
rest is here, built on its tables (log_cumprod_at/bt/ct, log_at/bt/ct): the forward corruption
q(x_t | x_0), the explicit transition matrices (for tests), a batched posterior (a different t per
sample, for the loss), the loss L_vlb + xi L_x0, and a respaced scheduler for sampling in fewer
steps than N.

Conventions (diffusers'): classes 0..K-1 are codes, K is [MASK]; timestep t in 0..N-1 indexes the
cumulative tables, so x_t is x_0 after t + 1 transitions; the tables carry one extra last entry,
the identity, so index t - 1 = -1 means "no transition".
"""
import numpy as np
import torch
from diffusers import VQDiffusionScheduler
from diffusers.schedulers.scheduling_vq_diffusion import alpha_schedules, gamma_schedules

LOG_FLOOR = -70.0  # VQ-Diffusion clamps log probabilities here (exp(-70) ~ 4e-31)


def make_scheduler(codes: int, num_train_timesteps: int) -> VQDiffusionScheduler:
    """diffusers' scheduler for K codes + [MASK] and N steps (the paper's default schedule)."""
    return VQDiffusionScheduler(num_vec_classes=codes + 1, num_train_timesteps=num_train_timesteps)


def log_onehot(x: torch.Tensor, classes: int) -> torch.Tensor:
    """int [B, N] -> log one-hot [B, classes, N] (log 0 floored as diffusers does)."""
    onehot = torch.nn.functional.one_hot(x.long(), classes).permute(0, 2, 1)
    return torch.log(onehot.float().clamp(min=1e-30))


def transition_matrix(sched: VQDiffusionScheduler, t: int, cumulative: bool) -> torch.Tensor:
    """The (K+1) x (K+1) matrix Q[i, j] = q(x_t = j | x_{t-1} = i) (cumulative: | x_0 = i), from the
    scheduler's tables: a code stays with a + b, becomes each other code with b, [MASK] with c;
    [MASK] stays [MASK]."""
    K = sched.num_embed - 1
    tables = (sched.log_cumprod_at, sched.log_cumprod_bt, sched.log_cumprod_ct) if cumulative else \
        (sched.log_at, sched.log_bt, sched.log_ct)
    a, b, c = (float(torch.exp(table[t].double())) for table in tables)
    Q = torch.full((K + 1, K + 1), b, dtype=torch.float64)
    Q[:K, :K] += a * torch.eye(K, dtype=torch.float64)
    Q[:K, K] = c
    Q[K] = 0.0
    Q[K, K] = 1.0
    return Q


def q_sample(sched: VQDiffusionScheduler, x0: torch.Tensor, t: torch.Tensor, u_mask: torch.Tensor,
             u_code: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) from two uniforms per token ([B, N] each, drawn by the caller):
    [MASK] with probability c_t, a uniformly random code with probability K b_t, else x_0."""
    K = sched.num_embed - 1
    c = sched.log_cumprod_ct.to(x0.device)[t].double().exp()[:, None]
    kb = sched.log_cumprod_bt.to(x0.device)[t].double().exp()[:, None] * K
    random_code = (u_code * K).long().clamp(max=K - 1)
    x = torch.where(u_mask < c + kb, random_code, x0.long())
    return torch.where(u_mask < c, torch.full_like(x, K), x)


def _gather(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return table.to(t.device)[t].view(-1, 1, 1)


def _log_q_to(sched, x_t: torch.Tensor, log_onehot_x_t: torch.Tensor, t: torch.Tensor, cumulative: bool):
    """Batched diffusers `log_Q_t_transitioning_to_known_class` (t [B])."""
    names = ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct") if cumulative else ("log_at", "log_bt", "log_ct")
    a, b, c = (_gather(getattr(sched, name), t) for name in names)
    from_masked = log_onehot_x_t[:, -1:, :]
    log_q = (log_onehot_x_t[:, :-1, :] + a).logaddexp(b)
    masked = (x_t == sched.mask_class).unsqueeze(1)
    log_q = torch.where(masked, c.expand_as(log_q), log_q)
    return log_q if cumulative else torch.cat((log_q, from_masked), dim=1)


def q_posterior(sched: VQDiffusionScheduler, log_p_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log p(x_{t-1} | x_t) [B, K+1, N] = sum_x0 q(x_{t-1} | x_t, x_0) p(x_0), diffusers'
    `q_posterior` with one timestep per sample (t [B] >= 1), normalised and floored at -70."""
    onehot = log_onehot(x_t, sched.num_embed)
    log_q_cum = _log_q_to(sched, x_t, onehot, t, cumulative=True)
    log_q_step = _log_q_to(sched, x_t, onehot, t, cumulative=False)
    q = log_p_x0 - log_q_cum
    q_lse = torch.logsumexp(q, dim=1, keepdim=True)
    q = q - q_lse
    a, b, c = (_gather(getattr(sched, n), t - 1) for n in ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct"))
    q = torch.cat(((q + a).logaddexp(b), c.expand(q.shape[0], 1, q.shape[2])), dim=1)
    out = q + log_q_step + q_lse
    return (out - torch.logsumexp(out, dim=1, keepdim=True)).clamp(min=LOG_FLOOR)


def vq_diffusion_loss(sched: VQDiffusionScheduler, log_model_x0: torch.Tensor, x0: torch.Tensor,
                      x_t: torch.Tensor, t: torch.Tensor, aux_weight: float):
    """(loss, {vlb, x0}): L_vlb + xi L_x0 per token, averaged.

    L_vlb at t >= 1: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)); at t = 0: -log p_theta(x_0 | x_1)
    (the decoder term). L_x0 = -log p_theta(x_0 | x_t) at every t (VQ-Diffusion's auxiliary loss).
    """
    K = sched.num_embed - 1
    nll = -log_model_x0.gather(1, x0.long().unsqueeze(1)).squeeze(1)  # [B, N]
    t_pos = t.clamp(min=1)  # t = 0 rows use the decoder term; their KL is computed and discarded
    log_true = q_posterior(sched, log_onehot(x0, K + 1)[:, :K], x_t, t_pos)
    log_model = q_posterior(sched, log_model_x0.clamp(min=LOG_FLOOR), x_t, t_pos)
    kl = (log_true.exp() * (log_true - log_model)).sum(dim=1)  # [B, N]
    vlb = torch.where((t == 0).unsqueeze(1), nll, kl).mean()
    x0_term = nll.mean()
    return vlb + aux_weight * x0_term, {"vlb": float(vlb.detach()), "x0": float(x0_term.detach())}


def respaced_scheduler(codes: int, num_train_timesteps: int, steps: int):
    """(scheduler, taus): diffusers' scheduler with its tables respaced to `steps` <= N timesteps
    taus (ascending, tau_0 = 0, tau_last = N - 1), so its index i steps from x_{tau_i} to
    x_{tau_{i-1}}. Mask-and-replace composes to mask-and-replace: from s to t the code keeps with
    a = att_t / att_s, is not masked with (1 - ctt_t) / (1 - ctt_s); b fills the row to 1. With
    steps = N the tables are diffusers' own."""
    N = num_train_timesteps
    steps = min(steps, N)
    taus = np.unique(np.round(np.linspace(0, N - 1, steps)).astype(np.int64))
    sched = make_scheduler(codes, N)
    _, att = alpha_schedules(N)
    _, ctt = gamma_schedules(N)
    att, ctt = att[taus], ctt[taus]  # cumulative at the kept timesteps
    at = att / np.concatenate(([1.0], att[:-1]))
    ct = 1 - (1 - ctt) / np.concatenate(([1.0], 1 - ctt[:-1]))
    bt, btt = (1 - at - ct) / codes, (1 - att - ctt) / codes
    att, btt, ctt = (np.concatenate((x, [end])) for x, end in ((att, 1.0), (btt, 0.0), (ctt, 0.0)))
    with np.errstate(divide="ignore"):
        for name, values in (("log_at", at), ("log_bt", bt), ("log_ct", ct), ("log_cumprod_at", att),
                             ("log_cumprod_bt", btt), ("log_cumprod_ct", ctt)):
            setattr(sched, name, torch.log(torch.tensor(values, dtype=torch.float64)).float())
    sched.set_timesteps(len(taus))
    return sched, torch.from_numpy(taus)
