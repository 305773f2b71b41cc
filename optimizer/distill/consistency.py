"""Latent-consistency-style consistency distillation (Song et al. 2023, arXiv 2303.01469, Alg. 2;
Luo et al. 2023 LCM, arXiv 2310.04378; diffusers examples/consistency_distillation
train_lcm_distill_sd_wds.py), unconditional.

The teacher's skipping-step DDIM solver moves z_{t_n} to t_{n-k}; the student's consistency
function at t_n must match the EMA target network's at t_{n-k}, f(x, t) = c_skip(t) x + c_out(t)
x0_hat(x, t), under a pseudo-Huber loss. The student samples multistep at LCMScheduler's
timesteps (engines.schedule.Sampler kind "consistency").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from optimizer.distill.sampling import boundary_scalings, predict_x0_eps


class SolverGrid:
    """LCM's DDIMSolver: timesteps [k-1, 2k-1, ..., T-1] and alpha_bar one solver step earlier."""

    def __init__(self, alphas: np.ndarray, num_train_timesteps: int, solver_steps: int):
        k = num_train_timesteps // solver_steps
        ts = np.arange(1, solver_steps + 1) * k - 1
        a = torch.from_numpy(alphas.astype(np.float32))
        self.k = k
        self.t = torch.from_numpy(ts).float()
        self.t_prev = (self.t - k).clamp_min(0)
        self.a = a[ts]
        self.a_prev = torch.cat([a[:1], a[ts[:-1]]])  # LCM: alpha_bar[0] before the first


def default_huber_c(sample_numel: int) -> float:
    """c = 0.00054 sqrt(d) (Song & Dhariwal 2023, "Improved techniques", Sec. 3.3)."""
    return 0.00054 * math.sqrt(sample_numel)


def cd_loss(
    student: nn.Module,
    teacher: nn.Module,
    target: nn.Module,
    grid: SolverGrid,
    x: torch.Tensor,
    gen: torch.Generator,
    prediction_type: str,
    huber_c: float,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    b, dev = len(x), x.device
    n = torch.randint(0, len(grid.t), (b,), generator=gen, device=dev).cpu()
    t, t_prev = grid.t[n].to(dev), grid.t_prev[n].to(dev)
    a = grid.a[n].reshape(-1, 1, 1, 1).to(dev)
    a_prev = grid.a_prev[n].reshape(-1, 1, 1, 1).to(dev)
    eps = torch.randn(x.shape, generator=gen, device=dev)
    z = a.sqrt() * x + (1 - a).sqrt() * eps
    cs, co = (v.reshape(-1, 1, 1, 1) for v in boundary_scalings(t, sigma_data, timestep_scaling))
    cs_p, co_p = (v.reshape(-1, 1, 1, 1) for v in boundary_scalings(t_prev, sigma_data, timestep_scaling))
    # online consistency function f_theta(z_tn, t_n)
    x0_s, _ = predict_x0_eps(z, student(z, t), a, prediction_type)
    pred = cs * z + co * x0_s
    with torch.no_grad():
        # one teacher DDIM step t_n -> t_{n-k} (the ODE solver Phi, Alg. 2)
        x0_t, e_t = predict_x0_eps(z, teacher(z, t), a, prediction_type)
        z_prev = a_prev.sqrt() * x0_t + (1 - a_prev).sqrt() * e_t
        # target network f_theta-(z_{t_{n-k}}, t_{n-k}); c_skip = 1 at t = 0 (boundary condition)
        x0_e, _ = predict_x0_eps(z_prev, target(z_prev, t_prev), a_prev, prediction_type)
        tgt = cs_p * z_prev + co_p * x0_e
    # pseudo-Huber distance sqrt(|x - y|^2 + c^2) - c (elementwise, as LCM's training script)
    return (torch.sqrt((pred - tgt) ** 2 + huber_c**2) - huber_c).mean()


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    for pt, po in zip(target.parameters(), online.parameters(), strict=True):
        pt.lerp_(po, 1.0 - decay)


def lcm_timesteps(scheduler_config: dict, steps: int, solver_steps: int) -> list[int]:
    """The multistep sampling timesteps LCMScheduler picks from the solver grid."""
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps, original_inference_steps=solver_steps)
    return [int(t) for t in sched.timesteps]
