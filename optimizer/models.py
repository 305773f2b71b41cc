"""Diffusers models and schedulers: load a teacher folder, rebuild a model from its config, and
wrap it behind the denoiser signature the IO spec describes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines.errors import InputError
from engines.fileio import sha256_file
from engines.schedule import SamplingSchedule, trailing_timesteps
from optimizer.model_io import SUPPORTED_MODELS

MODEL_SUBFOLDERS = ("unet", "transformer")


def _diffusers_class(name: str) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise InputError(f"diffusers has no class {name!r}")
    return cls


def model_from_config(class_name: str, config: dict[str, Any]) -> nn.Module:
    cls = _diffusers_class(class_name)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(cfg)


def alphas_cumprod(scheduler: Any) -> np.ndarray:
    return scheduler.alphas_cumprod.detach().cpu().numpy().astype(np.float64)


@dataclass
class Teacher:
    """A diffusers teacher folder: unet/ (or transformer/) + scheduler/."""

    path: Path
    model: nn.Module
    model_class: str
    scheduler: Any
    weights_sha256: str
    reference_sampler: str = "ddim"
    reference_steps: int = 64

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def schedule(self, steps: int, kind: str = "ddim") -> SamplingSchedule:
        """The teacher packed as a few-step student: DDIM at `steps` trailing timesteps."""
        cfg = self.scheduler.config
        # A teacher trained with x0 clipping (e.g. google/ddpm-cifar10-32) samples with it too;
        # without it, epsilon errors at t~T are amplified by 1/sqrt(alpha_bar) (~158x there).
        clip = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", False) else None
        return SamplingSchedule.from_alphas(
            alphas_cumprod(self.scheduler),
            trailing_timesteps(cfg.num_train_timesteps, steps),
            kind=kind,
            prediction_type=self.prediction_type,
            clip_sample=clip,
        )


def load_teacher(path: str | Path, *, reference_steps: int | None = None) -> Teacher:
    """Load `path/unet` (or `path/transformer`) and `path/scheduler` with from_pretrained(path)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: teacher folder not found")
    sub = next((s for s in MODEL_SUBFOLDERS if (path / s / "config.json").exists()), None)
    if sub is None:
        raise InputError(
            f"{path}: no unet/config.json or transformer/config.json (a diffusers "
            "save_pretrained layout is expected)"
        )
    cfg_path = path / sub / "config.json"
    cls_name = json.loads(cfg_path.read_text()).get("_class_name")
    if cls_name not in SUPPORTED_MODELS:
        raise InputError(
            f"{cfg_path}: model class {cls_name!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODELS)})"
        )
    weights = sorted((path / sub).glob("*.safetensors"))
    if not weights:
        raise InputError(f"{path / sub}: no .safetensors weights (dd-compile does not unpickle .bin files)")
    model = _diffusers_class(cls_name).from_pretrained(path, subfolder=sub, use_safetensors=True).eval()
    sched_cfg = path / "scheduler" / "scheduler_config.json"
    if not sched_cfg.exists():
        raise InputError(f"{path}: no scheduler/scheduler_config.json")
    sched_name = json.loads(sched_cfg.read_text()).get("_class_name", "DDPMScheduler")
    scheduler = _diffusers_class(sched_name).from_pretrained(path, subfolder="scheduler")
    info_path = path / "teacher.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return Teacher(
        path=path,
        model=model,
        model_class=cls_name,
        scheduler=scheduler,
        weights_sha256=sha256_file(weights[0]),
        reference_sampler=info.get("reference_sampler", "ddim"),
        reference_steps=reference_steps or info.get("reference_steps", 64),
    )


class Denoiser(nn.Module):
    """(sample, timestep[, encoder_hidden_states][, class_labels]) -> out_sample, as a plain tensor.

    The exported graph's signature; timestep is float32 [B] (TensorRT handles float inputs best,
    and diffusers casts timesteps to float for the sinusoidal embedding anyway).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.model_class = type(model).__name__

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.model_class == "UNet2DConditionModel":
            return self.model(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                class_labels=class_labels,
                return_dict=False,
            )[0]
        if self.model_class == "DiTTransformer2DModel":
            out = self.model(sample, timestep=timestep, class_labels=class_labels, return_dict=False)[0]
            return out[:, : sample.shape[1]].contiguous()  # DiT also predicts variances: keep the mean
        return self.model(sample, timestep, class_labels=class_labels, return_dict=False)[0]


@torch.no_grad()
def teacher_reference_samples(
    teacher: Teacher,
    noise: torch.Tensor,
    steps: int | None = None,
    cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Teacher samples with diffusers' DDIMScheduler (eta=0, trailing spacing), from given noise."""
    from diffusers import DDIMScheduler

    # clip_sample as the teacher's config says
    sched = DDIMScheduler.from_config(
        teacher.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
    )
    sched.set_timesteps(steps or teacher.reference_steps)
    den = Denoiser(teacher.model).eval()
    dev = next(teacher.model.parameters()).device  # noise may come from a CPU generator
    x = noise.to(dev, copy=True)
    cond = {k: v.to(dev) for k, v in (cond or {}).items()}
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), float(t), device=dev)
        out = den(x, tt, **cond)
        x = sched.step(out, t, x).prev_sample
    return x.to(noise.device)
