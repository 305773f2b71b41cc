"""Guidance distillation primitives for text-to-image teachers.

Meng et al. 2023 ("On Distillation of Guided Diffusion Models", arXiv 2210.03142) and LCM (Luo et
al. 2023, arXiv 2310.04378) both condition the student on the guidance weight w, so one student
pass reproduces the teacher's two-pass classifier-free-guided prediction:

    eps_w = (1 + w) eps_c - w eps_u            Meng eq. 1 (w = 0: the conditional model)

diffusers' guidance_scale s means eps_u + s (eps_c - eps_u), the same thing with w = s - 1; the
LCM pipeline embeds w = s - 1 too (`guidance_scale - 1` in pipeline_latent_consistency_models.py).
Everything here takes w; `w_from_scale` converts a user's guidance scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# LCM's SD students use 256 (`time_cond_proj_dim=256`): room for a 1000x-scaled w
DEFAULT_W_EMBEDDING_DIM = 256


def w_from_scale(scale: float | torch.Tensor) -> float | torch.Tensor:
    """diffusers guidance_scale s -> Meng's w = s - 1."""
    return scale - 1.0


def guidance_embedding(w: torch.Tensor, dim: int = DEFAULT_W_EMBEDDING_DIM) -> torch.Tensor:
    """Sinusoidal embedding of w [B] -> [B, dim], exactly diffusers' get_guidance_scale_embedding
    (VDM's timestep embedding with w scaled by 1000)."""
    if w.ndim != 1:
        raise ValueError(f"w must be 1-D [B], got shape {tuple(w.shape)}")
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def make_w_student(teacher_unet: nn.Module, w_dim: int = DEFAULT_W_EMBEDDING_DIM) -> nn.Module:
    """The teacher's UNet plus diffusers' guidance input (time_cond_proj_dim / timestep_cond).

    The new projection (time_embedding.cond_proj, no bias) is zero-initialised, so at step 0 the
    student is exactly the teacher's conditional branch for every w (Meng et al., Sec. 4.1 start
    the student from the teacher).
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(teacher_unet, UNet2DConditionModel):
        raise TypeError(
            f"guidance distillation needs a UNet2DConditionModel, got {type(teacher_unet).__name__}"
        )
    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    if config.get("time_cond_proj_dim"):
        raise ValueError("the teacher already takes a guidance embedding (time_cond_proj_dim is set)")
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": w_dim})
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"teacher -> student weights: missing {missing}, unexpected {unexpected}")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def guided_eps(
    teacher: nn.Module,
    z: torch.Tensor,
    t: torch.Tensor,
    text_c: torch.Tensor,
    text_u: torch.Tensor,
    w: torch.Tensor,
) -> torch.Tensor:
    """The teacher's classifier-free-guided noise prediction at per-sample w: one batch-2B pass."""
    b = len(z)
    out = teacher(
        torch.cat([z, z]), torch.cat([t, t]), encoder_hidden_states=torch.cat([text_u, text_c])
    ).sample
    eps_u, eps_c = out[:b], out[b:]
    w = w.reshape(-1, 1, 1, 1)
    return (1 + w) * eps_c - w * eps_u


def student_eps(student: nn.Module, z: torch.Tensor, t: torch.Tensor, text_c: torch.Tensor, w: torch.Tensor):
    """The w-conditioned student's prediction: one batch-B pass, w through timestep_cond."""
    w_emb = guidance_embedding(w, student.config.time_cond_proj_dim).to(z.dtype)
    return student(z, t, encoder_hidden_states=text_c, timestep_cond=w_emb).sample


def draw_w(n: int, scale_range: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """w uniform over the guidance-scale range the user gave (diffusers' s), as w = s - 1."""
    lo, hi = scale_range
    s = lo + (hi - lo) * torch.rand(n, generator=gen)
    return w_from_scale(s)


def parse_guidance_range(text: str) -> tuple[float, float]:
    """`--guidance 2:8` (a range of diffusers guidance scales) or `--guidance 4` (one value)."""
    from engines.errors import InputError

    parts = text.split(":")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"--guidance {text!r}: not a number or a LO:HI range of guidance scales") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(math.isfinite(v) for v in vals):
        raise InputError(f"--guidance {text!r}: expected LO:HI (e.g. 2:8) or one scale")
    lo, hi = vals
    if lo < 1.0 or hi < lo:
        raise InputError(
            f"--guidance {text!r}: need 1 <= LO <= HI (diffusers guidance scales; 1 = no guidance)"
        )
    return lo, hi
