"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Algorithm 2).

One round halves the sampling steps: the student (initialised from its teacher) learns to do in
one DDIM step t -> t'' what the teacher does in two, t -> t' -> t''. Reference code:
google-research/diffusion_distillation, diffusion_distillation/dpm.py `training_losses`
(note: the stale diffusers community port swaps t' and t''; here t' is the midpoint).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engines.errors import InputError
from engines.schedule import trailing_timesteps
from optimizer.distill.sampling import predict_x0_eps


class RoundGrid:
    """The student's N trailing timesteps and the teacher's 2N (a superset: t_i(N) = t_2i(2N))."""

    def __init__(self, alphas: np.ndarray, num_train_timesteps: int, student_steps: int):
        T, n = num_train_timesteps, student_steps
        ts_s, ts_t = trailing_timesteps(T, n), trailing_timesteps(T, 2 * n)
        if ts_t[0::2] != ts_s:
            raise ValueError(f"{2 * n}-step grid does not contain the {n}-step grid")
        self.t = torch.tensor(ts_s, dtype=torch.float32)  # student step i starts at t
        self.t_mid = torch.tensor(ts_t[1::2], dtype=torch.float32)  # t' (teacher's midpoint)
        a = torch.from_numpy(alphas.astype(np.float32))
        self.a = a[ts_s]
        self.a_mid = a[ts_t[1::2]]
        self.a_next = torch.cat([a[ts_s[1:]], torch.ones(1)])  # t'' (1.0: a clean sample)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


@torch.no_grad()
def pd_target(
    teacher: nn.Module, grid: RoundGrid, z: torch.Tensor, i: torch.Tensor, teacher_pred: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x~, z_t'') for z_t at student step i: two teacher DDIM steps t -> t' -> t'' (Algorithm 2,
    lines 7-8) and the x that takes z_t to z_t'' in one DDIM step (line 9)."""
    dev = z.device
    t, t1 = grid.t[i].to(dev), grid.t_mid[i].to(dev)
    a, a1, a2 = (_col(v[i]).to(dev) for v in (grid.a, grid.a_mid, grid.a_next))
    x0, e = predict_x0_eps(z, teacher(z, t), a, teacher_pred)
    z1 = a1.sqrt() * x0 + (1 - a1).sqrt() * e
    x0, e = predict_x0_eps(z1, teacher(z1, t1), a1, teacher_pred)
    z2 = a2.sqrt() * x0 + (1 - a2).sqrt() * e
    # x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a); with alpha_t'' = 1 this is the teacher's x0(z')
    r = (1 - a2).sqrt() / (1 - a).sqrt()
    return (z2 - r * z) / (a2.sqrt() - r * a.sqrt()), z2


def pd_loss(
    student: nn.Module,
    teacher: nn.Module,
    grid: RoundGrid,
    x: torch.Tensor,
    gen: torch.Generator,
    student_pred: str,
    teacher_pred: str,
) -> torch.Tensor:
    """One PD loss evaluation on clean images x [B, C, H, W]."""
    b, dev = len(x), x.device
    i = torch.randint(0, len(grid.t), (b,), generator=gen, device=dev).cpu()
    a = _col(grid.a[i]).to(dev)
    eps = torch.randn(x.shape, generator=gen, device=dev)
    z = a.sqrt() * x + (1 - a).sqrt() * eps  # z_t = alpha_t x + sigma_t eps
    x_tgt, _ = pd_target(teacher, grid, z, i, teacher_pred)
    x_hat, _ = predict_x0_eps(z, student(z, grid.t[i].to(dev)), a, student_pred)
    # "truncated SNR" weighting, max(||x - x~||^2, ||eps - eps~||^2) = max(1, SNR_t) ||x - x~||^2
    # (Sec. 4, eq. 10); written with SNR so it stays finite where sigma_t -> 0
    snr = a / (1 - a)
    per_sample = ((x_hat - x_tgt) ** 2).mean(dim=(1, 2, 3))
    return (torch.clamp(snr.flatten(), min=1.0) * per_sample).mean()


def round_plan(teacher_steps: int, steps: int) -> list[int]:
    """Student steps per round: teacher_steps/2, /4, ... down to `steps`."""
    plan, n = [], teacher_steps
    while n > steps:
        if n % 2:
            raise InputError(f"--teacher-steps {teacher_steps} is not steps * 2^k (steps={steps})")
        n //= 2
        plan.append(n)
    if not plan or plan[-1] != steps:
        raise InputError(f"--teacher-steps {teacher_steps} is not steps * 2^k with k >= 1 (steps={steps})")
    return plan


def default_teacher_steps(reference_steps: int, steps: int) -> int:
    """steps * 2^k closest to the teacher's reference steps (k >= 1)."""
    k = max(1, int(round(np.log2(max(reference_steps, 2 * steps) / steps))))
    return steps * 2**k
