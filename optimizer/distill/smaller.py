"""A smaller student (BK-SDM style; Kim et al. 2023, arXiv 2305.15798): the teacher's config with
fewer channels and/or fewer layers per block, initialised from the teacher where shapes allow,
then trained by knowledge distillation (task + output + feature losses, BK-SDM eq. 3) before step
distillation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from engines.errors import InputError

log = logging.getLogger(__name__)


def smaller_config(config: dict[str, Any], width: float, layers_per_block: int | None) -> dict[str, Any]:
    """The teacher's diffusers config with block_out_channels * width (multiples of the GroupNorm
    groups) and, optionally, fewer layers per block."""
    if not 0.0 < width <= 1.0:
        raise InputError(f"--width {width}: expected 0 < width <= 1")
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    groups = int(cfg.get("norm_num_groups") or 32)
    old = list(cfg["block_out_channels"])
    new = [max(groups, int(round(c * width / groups)) * groups) for c in old]
    cfg["block_out_channels"] = new
    head = cfg.get("attention_head_dim")
    if isinstance(head, int) and head:
        # keep the number of heads where possible: heads = channels / head_dim
        head = max(1, int(round(head * width)))
        while any(c % head for c in new):
            head -= 1
        cfg["attention_head_dim"] = head
    if layers_per_block is not None:
        if not 1 <= layers_per_block <= int(cfg.get("layers_per_block", 2)):
            raise InputError(
                f"--layers-per-block {layers_per_block}: expected 1..{cfg.get('layers_per_block')}"
            )
        cfg["layers_per_block"] = layers_per_block
    return cfg


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, int]:
    """Copy each teacher tensor of the same name into the student: whole where shapes match, its
    leading slice where the student is narrower (weight inheritance by channel truncation).
    Returns counts of copied / sliced / fresh tensors."""
    t_sd = teacher.state_dict()
    counts = {"copied": 0, "sliced": 0, "fresh": 0}
    for name, p in student.state_dict().items():
        src = t_sd.get(name)
        if src is None or src.ndim != p.ndim or any(s < d for s, d in zip(src.shape, p.shape, strict=True)):
            counts["fresh"] += 1
            continue
        if src.shape == p.shape:
            p.copy_(src)
            counts["copied"] += 1
        else:
            p.copy_(src[tuple(slice(0, d) for d in p.shape)])
            counts["sliced"] += 1
    return counts


def _block_outputs(model: nn.Module) -> list[nn.Module]:
    return [*model.down_blocks, model.mid_block, *model.up_blocks]


class FeatureTap:
    """Records each down/mid/up block's output on every forward (BK-SDM's feature KD points)."""

    def __init__(self, model: nn.Module):
        self.feats: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(self._hook) for b in _block_outputs(model)]

    def _hook(self, module: nn.Module, args: Any, out: Any) -> None:
        self.feats.append(out[0] if isinstance(out, tuple) else out)

    def take(self) -> list[torch.Tensor]:
        f, self.feats = self.feats, []
        return f

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class KDStudent(nn.Module):
    """The student Denoiser plus 1x1 projections from its block widths to the teacher's
    (FitNets-style regressors, Romero et al. 2015), trained together; only the student is kept."""

    def __init__(self, student: nn.Module, student_model: nn.Module, teacher_model: nn.Module):
        super().__init__()
        self.student = student
        s_ch = [_channels(b) for b in _block_outputs(student_model)]
        t_ch = [_channels(b) for b in _block_outputs(teacher_model)]
        self.proj = nn.ModuleList(
            nn.Identity() if s == t else nn.Conv2d(s, t, 1) for s, t in zip(s_ch, t_ch, strict=True)
        )
        self.tap = FeatureTap(student_model)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, **cond: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.tap.take()
        out = self.student(sample, timestep, **cond)
        return out, [p(f) for p, f in zip(self.proj, self.tap.take(), strict=True)]


def _channels(block: nn.Module) -> int:
    resnets = getattr(block, "resnets", None)
    if resnets:
        return resnets[-1].conv2.out_channels
    raise InputError(f"cannot find the output width of {type(block).__name__} for feature KD")


def kd_loss(
    net: nn.Module,
    teacher: nn.Module,
    teacher_tap: FeatureTap,
    x: torch.Tensor,
    gen: torch.Generator,
    alphas: torch.Tensor,
    prediction_type: str,
    feature_weight: float,
) -> torch.Tensor:
    """BK-SDM eq. 3: L_task + L_outKD + feature_weight * L_featKD at uniform timesteps."""
    b, dev = len(x), x.device
    t = torch.randint(0, len(alphas), (b,), generator=gen, device=dev)
    a = alphas.to(dev)[t].reshape(-1, 1, 1, 1)
    eps = torch.randn(x.shape, generator=gen, device=dev)
    z = a.sqrt() * x + (1 - a).sqrt() * eps
    tf = t.float()
    with torch.no_grad():
        teacher_tap.take()
        out_t = teacher(z, tf)
        feats_t = teacher_tap.take()
    out_s, feats_s = net(z, tf)
    if prediction_type == "v_prediction":
        task = a.sqrt() * eps - (1 - a).sqrt() * x
    elif prediction_type == "epsilon":
        task = eps
    else:
        task = x
    loss = nn.functional.mse_loss(out_s, task) + nn.functional.mse_loss(out_s, out_t)
    feat = sum(nn.functional.mse_loss(fs, ft) for fs, ft in zip(feats_s, feats_t, strict=True)) / len(feats_t)
    return loss + feature_weight * feat


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
