"""Torch twins of engines.schedule's math, batched on the training device.

Training and evaluation sample the student here; dd-compile samples it with the numpy
`engines.schedule.Sampler`. tests/test_distill.py checks that both give the same samples from the
same noise, so the schedule written into student.ckpt is the one the student was trained for.
"""

from __future__ import annotations

import numpy as np
import torch

from engines.schedule import SamplingSchedule


def predict_x0_eps(
    z: torch.Tensor, out: torch.Tensor, a: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output -> (x0, eps) at alpha_bar `a` (broadcasts); z = sqrt(a) x0 + sqrt(1-a) eps."""
    sa, so = a.sqrt(), (1.0 - a).sqrt()
    if prediction_type == "v_prediction":
        # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, eq. 9)
        return sa * z - so * out, sa * out + so * z
    if prediction_type == "epsilon":
        return (z - so * out) / sa, out
    return out, (z - sa * out) / so.clamp_min(1e-8)


def boundary_scalings(
    t: torch.Tensor, sigma_data: float, timestep_scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency-model boundary condition c_skip(t), c_out(t) (Song et al. 2023, App. C) with
    LCM's discrete-time scaling (Luo et al. 2023; diffusers LCMScheduler): f(x, 0) = x."""
    c = (t.double() * timestep_scaling) ** 2
    c_skip = sigma_data**2 / (c + sigma_data**2)
    c_out = c.sqrt() / (c + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    schedule: SamplingSchedule,
    noise: torch.Tensor,
    step_noise: torch.Tensor | None = None,
    batch_size: int = 1024,
    cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """engines.schedule.Sampler, in torch: noise [B, ...] -> samples in model space.

    `model(sample, timestep)` is a Denoiser (timestep float32 [B]); step_noise [S-1, B, ...] is
    needed for the consistency sampler with S > 1 (see engines.schedule.draw_noise); `cond` holds
    per-sample conditioning rows (encoder_hidden_states, class_labels) for conditional models.
    """
    if schedule.kind == "consistency" and schedule.steps > 1 and step_noise is None:
        raise ValueError("a consistency sampler needs step_noise [steps-1, B, ...]")
    out = []
    for lo in range(0, len(noise), batch_size):
        x = noise[lo : lo + batch_size].float()
        c = {k: v[lo : lo + batch_size].to(x.device) for k, v in (cond or {}).items()}
        alphas = [*schedule.alphas_cumprod, schedule.final_alpha_cumprod]
        for i, t in enumerate(schedule.timesteps):
            # float32 alpha, as numpy computes np.float32(np.sqrt(a)) from the float64 table
            a = torch.tensor(np.float32(alphas[i]))
            a_next = torch.tensor(np.float32(alphas[i + 1]))
            pred = model(x, torch.full((len(x),), float(t), device=x.device), **c)
            x0, eps = predict_x0_eps(x, pred, a, schedule.prediction_type)
            if schedule.clip_sample is not None:
                x0 = x0.clamp(-schedule.clip_sample, schedule.clip_sample)
            last = i == schedule.steps - 1
            if schedule.kind == "ddim":  # DDIM, eta = 0 (Song et al. 2021, eq. 12)
                x = x0 if last else a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            else:  # consistency multistep (Song et al. 2023, Alg. 1)
                c_skip, c_out = boundary_scalings(
                    torch.tensor(float(t)), schedule.sigma_data, schedule.timestep_scaling
                )
                x = c_skip * x + c_out * x0
                if not last:
                    x = a_next.sqrt() * x + (1 - a_next).sqrt() * step_noise[i, lo : lo + batch_size]
        out.append(x)
    return torch.cat(out)


def noise_for_seeds(
    seeds: list[int], shape: tuple[int, ...], steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """engines.schedule.draw_noise as tensors: the noise dd-compile's Sampler.from_seeds uses."""
    from engines.schedule import draw_noise

    init, per_step = draw_noise(seeds, shape, steps)
    return torch.from_numpy(init), torch.from_numpy(per_step)
