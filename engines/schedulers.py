"""DDIM and LCM schedulers in numpy, from a diffusers scheduler_config.json.

Every scheduler has one interface, which the runtime's denoising loop (engines/t2i.py) calls:
`set_timesteps(n)` -> the timesteps fed to the model, `init_noise_sigma`,
`scale_model_input(sample, i)` (the model's input at the i-th step), `step(model_output, i, sample,
noise=None)` -> (prev_sample, denoised), and `stochastic` (True: `step` takes N(0, 1) `noise` of
the sample's shape at every step but the last, drawn by the caller per image seed).

They reproduce diffusers' DDIMScheduler (eta = 0) and LCMScheduler: the same beta schedules,
alphas_cumprod (float32 values, cumulated in double as torch does on CPU), timestep spacings
("leading" + steps_offset, "trailing", "linspace"), set_alpha_to_one, prediction types and x0
clipping, so `latents=` from a diffusers run gives the diffusers image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from engines.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# the diffusers scheduler classes the runtime samples exactly (make_scheduler kinds); others are refused
SCHEDULER_CLASSES = {"DDIMScheduler": "ddim", "LCMScheduler": "lcm"}
SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    original_inference_steps: int = 50  # LCM
    timestep_scaling: float = 10.0  # LCM

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], *, where: str = "scheduler config", **defaults: Any
    ) -> SchedulerConfig:
        names = {f.name for f in fields(cls)}
        kw = {**defaults, **{k: v for k, v in d.items() if k in names}}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(float(b) for b in kw["trained_betas"])
        cfg = cls(**kw)
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"{where}: prediction_type {cfg.prediction_type!r} not in {PREDICTION_TYPES}")
        if cfg.timestep_spacing not in SPACINGS:
            raise InputError(f"{where}: timestep_spacing {cfg.timestep_spacing!r} not in {SPACINGS}")
        if cfg.thresholding:
            raise InputError(f"{where}: dynamic thresholding is not supported by the numpy schedulers")
        if cfg.trained_betas is None and cfg.beta_schedule not in (
            "linear",
            "scaled_linear",
            "squaredcos_cap_v2",
        ):
            raise InputError(f"{where}: beta_schedule {cfg.beta_schedule!r} is not supported")
        return cfg


def _betas(cfg: SchedulerConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float32)
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64).astype(np.float32)
    if cfg.beta_schedule == "scaled_linear":
        b = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64).astype(np.float32)
        return b * b
    # squaredcos_cap_v2 (Nichol & Dhariwal 2021), as diffusers' betas_for_alpha_bar
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1 (diffusers' rescale_zero_terminal_snr), in float32 as there."""
    s = np.sqrt(np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32))
    s0, st = s[0], s[-1]
    s = (s - st) * (s0 / (s0 - st))
    ab = s * s
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    betas = _betas(cfg)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _x0(cfg: SchedulerConfig, out: np.ndarray, x: np.ndarray, a: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from the model output at alpha_bar a, as diffusers computes them."""
    b = np.float32(1) - a
    if cfg.prediction_type == "epsilon":
        return (x - b**0.5 * out) / a**0.5, out
    if cfg.prediction_type == "sample":
        return out, (x - a**0.5 * out) / b**0.5
    return a**0.5 * x - b**0.5 * out, a**0.5 * out + b**0.5 * x


class DDIMScheduler:
    """diffusers.DDIMScheduler with eta = 0 (deterministic)."""

    init_noise_sigma = 1.0
    stochastic = False

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.alphas_cumprod = alphas_cumprod(cfg)
        self.final_alpha_cumprod = np.float32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(cfg.num_train_timesteps)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        cfg, n = self.cfg, num_inference_steps
        if not 1 <= n <= cfg.num_train_timesteps:
            raise InputError(f"num_inference_steps={n}: must be in [1, {cfg.num_train_timesteps}]")
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, cfg.num_train_timesteps - 1, n).round()[::-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = cfg.num_train_timesteps // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + cfg.steps_offset
        else:
            ratio = cfg.num_train_timesteps / n
            ts = np.round(np.arange(cfg.num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
        self.num_inference_steps, self.timesteps = n, ts
        return ts

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prev_sample, prev_sample): DDIM with eta = 0 draws nothing and its last step is the sample."""
        cfg = self.cfg
        assert self.num_inference_steps is not None, "call set_timesteps first"
        timestep = int(self.timesteps[step_index])
        prev = timestep - cfg.num_train_timesteps // self.num_inference_steps  # diffusers' rule, any spacing
        a = self.alphas_cumprod[timestep]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = _x0(cfg, model_output, sample, a)
        if cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        x = (a_prev**0.5 * x0 + (np.float32(1) - a_prev) ** 0.5 * eps).astype(np.float32)
        return x, x


class LCMScheduler:
    """diffusers.LCMScheduler: consistency multistep; the re-noising draws are passed in."""

    init_noise_sigma = 1.0
    stochastic = True
    sigma_data = 0.5

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.alphas_cumprod = alphas_cumprod(cfg)
        self.final_alpha_cumprod = np.float32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(cfg.num_train_timesteps)[::-1].copy()

    def set_timesteps(
        self, num_inference_steps: int, original_inference_steps: int | None = None
    ) -> np.ndarray:
        cfg, n = self.cfg, num_inference_steps
        orig = original_inference_steps or cfg.original_inference_steps
        if not 1 <= n <= orig:
            raise InputError(f"num_inference_steps={n}: an LCM samples with 1..{orig} steps")
        k = cfg.num_train_timesteps // orig
        origin = (np.arange(1, orig + 1) * k - 1)[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.num_inference_steps, self.timesteps = n, origin[idx].astype(np.int64)
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def scalings(self, timestep: int) -> tuple[float, float]:
        """Boundary-condition c_skip, c_out (diffusers' get_scalings_for_boundary_condition_discrete)."""
        s = timestep * self.cfg.timestep_scaling
        return self.sigma_data**2 / (s**2 + self.sigma_data**2), s / (s**2 + self.sigma_data**2) ** 0.5

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prev_sample, denoised) at the step_index-th timestep; `noise` ~ N(0, 1) unless last."""
        cfg = self.cfg
        ts = self.timesteps
        t = int(ts[step_index])
        prev_t = int(ts[step_index + 1]) if step_index + 1 < len(ts) else t
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self.scalings(t)
        x0, _ = _x0(cfg, model_output, sample, a)
        if cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        denoised = (np.float32(c_out) * x0 + np.float32(c_skip) * sample).astype(np.float32)
        if step_index == len(ts) - 1:
            return denoised, denoised
        if noise is None:
            raise ValueError("LCMScheduler.step needs noise for every step but the last")
        prev = a_prev**0.5 * denoised + (np.float32(1) - a_prev) ** 0.5 * noise
        return prev.astype(np.float32), denoised


def make_scheduler(kind: str, config: dict[str, Any], *, where: str = "scheduler config") -> Any:
    if kind == "ddim":
        return DDIMScheduler(SchedulerConfig.from_dict(config, where=where))
    if kind == "lcm":  # LCMScheduler's own defaults differ from DDIM's for these two
        return LCMScheduler(
            SchedulerConfig.from_dict(
                config,
                where=where,
                clip_sample=False,
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
            )
        )
    raise InputError(f"{where}: scheduler kind {kind!r} is not supported (ddim, lcm)")
