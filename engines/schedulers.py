"""The runtime's schedulers in numpy, from a diffusers scheduler_config.json.

Every scheduler has one interface, which the runtime's denoising loop (engines/t2i.py) calls:
`set_timesteps(n)` -> the timesteps fed to the model, `init_noise_sigma`,
`scale_model_input(sample, i)` (the model's input at the i-th step), `step(model_output, i, sample,
noise=None)` -> (prev_sample, denoised), and `stochastic` (True: `step` takes N(0, 1) `noise` of
the sample's shape at every step but the last, drawn by the caller per image seed). `denoised` is
what the pipeline decodes after the last step (LCM: the consistency prediction; others: the sample).
Image-to-image (diffusers' StableDiffusionImg2ImgPipeline) adds two: `add_noise(original, noise,
step_index)`, the forward process to the step_index-th timestep (DDIM, LCM, PNDM: sqrt(alpha_bar) x +
sqrt(1 - alpha_bar) noise; Euler, Euler ancestral: x + sigma noise, not scaled by init_noise_sigma, as
diffusers' img2img leaves it; DPM-Solver++: alpha_t x + sigma_t noise), and `set_begin_index(i)`: the
loop starts at step i (a multistep scheduler starts its history there; set_timesteps resets it to 0).
LCM shortens its schedule itself (`set_timesteps(n, strength=)`, `strength_in_set_timesteps`), as
diffusers' LatentConsistencyModelImg2ImgPipeline does.

They reproduce diffusers' DDIMScheduler (eta = 0), LCMScheduler, EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler (dpmsolver++), PNDMScheduler and
FlowMatchEulerDiscreteScheduler: the same beta schedules, alphas_cumprod (float32 values, cumulated in
double as torch does on CPU), timestep spacings ("leading" + steps_offset, "trailing", "linspace"),
sigma schedules (Karras, exponential), prediction types and the float32/float64 steps where diffusers
takes them, so `latents=` from a diffusers run gives the diffusers image. An option whose value is
not implemented is refused by name (InputError), never sampled as something else.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from engines.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# the diffusers scheduler classes the runtime samples exactly in UNet pipelines (class -> make_scheduler
# kind; the sd family table reads it); others are refused
SCHEDULER_CLASSES = {
    "DDIMScheduler": "ddim",
    "LCMScheduler": "lcm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpm_multistep",
    "PNDMScheduler": "pndm",
}
# flow-matching transformer pipelines (SD3, Flux): not a UNet pipeline's scheduler (it has no
# init_noise_sigma, so diffusers' StableDiffusionPipeline cannot run it); for their family
FLOW_SCHEDULER_CLASSES = {"FlowMatchEulerDiscreteScheduler": "flow_euler"}
KINDS = (*SCHEDULER_CLASSES.values(), *FLOW_SCHEDULER_CLASSES.values())
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


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU bit for bit: a float32 step, each value one
    rounding of start + step * i (end - step * (n - 1 - i) for the upper half). An ulp off in a beta
    is amplified in the zero-terminal-SNR tail and by sigma_max in the Euler steps."""
    s, e = np.float64(np.float32(start)), np.float64(np.float32(end))
    step = np.float64((np.float32(e) - np.float32(s)) / np.float32(max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)  # step * i is exact in float64, so the sum rounds once
    return np.where(i < n // 2, s + step * i, e - step * (n - 1 - i)).astype(np.float32)


def _betas(cfg: SchedulerConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float32)
    if cfg.beta_schedule == "linear":
        return _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    if cfg.beta_schedule == "scaled_linear":
        b = _linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n)
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


def _alpha_noise(ac: np.ndarray, timestep: int, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The forward process at a training timestep, float32 as diffusers' add_noise computes it."""
    a = ac[timestep]
    return (a**0.5 * original + (np.float32(1) - a) ** 0.5 * noise).astype(np.float32)


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

    def set_begin_index(self, step_index: int) -> None:
        """Nothing to do: each step reads only its own timestep."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """diffusers' add_noise at the step_index-th timestep: sqrt(a) x + sqrt(1 - a) noise."""
        return _alpha_noise(self.alphas_cumprod, int(self.timesteps[step_index]), original, noise)

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

    # image-to-image: `strength` shortens the schedule inside set_timesteps (diffusers' LCM img2img
    # pipeline), not by skipping its first steps
    strength_in_set_timesteps = True

    def set_timesteps(
        self, num_inference_steps: int, original_inference_steps: int | None = None, strength: float = 1.0
    ) -> np.ndarray:
        cfg, n = self.cfg, num_inference_steps
        orig = original_inference_steps or cfg.original_inference_steps
        if not 1 <= n <= orig:
            raise InputError(f"num_inference_steps={n}: an LCM samples with 1..{orig} steps")
        k = cfg.num_train_timesteps // orig
        kept = int(orig * strength)  # strength 1: all of them
        if kept // n < 1:
            raise InputError(
                f"strength={strength} with num_inference_steps={n}: an LCM keeps int({orig} x strength) = "
                f"{kept} of its original steps, fewer than the steps asked"
            )
        origin = (np.arange(1, kept + 1) * k - 1)[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.num_inference_steps, self.timesteps = n, origin[idx].astype(np.int64)
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def set_begin_index(self, step_index: int) -> None:
        """Nothing to do: each step reads only its own timestep."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """diffusers' add_noise at the step_index-th timestep: sqrt(a) x + sqrt(1 - a) noise."""
        return _alpha_noise(self.alphas_cumprod, int(self.timesteps[step_index]), original, noise)

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


# -- Euler, Euler ancestral, DPM-Solver++ multistep, PNDM (PLMS) and flow-matching Euler ----------------
# Each class's options with diffusers 0.42's defaults (its __init__ signature; tests/test_schedulers.py
# checks they agree), so a config saved without some key samples as diffusers would. An option whose
# value is not implemented is refused by name: the runtime never samples a substitute.
_BETAS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None
)
_SIGMA_SCHEDULES = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
EULER_OPTIONS: dict[str, Any] = {
    **_BETAS,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    **_SIGMA_SCHEDULES,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}
EULER_ANCESTRAL_OPTIONS: dict[str, Any] = {
    **_BETAS,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
DPM_OPTIONS: dict[str, Any] = {
    **_BETAS,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    **_SIGMA_SCHEDULES,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}
PNDM_OPTIONS: dict[str, Any] = {
    **_BETAS,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}
FLOW_OPTIONS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    **_SIGMA_SCHEDULES,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


class _Options:
    """A diffusers class's options: its defaults updated by the config's keys (others are ignored, as
    diffusers' from_config ignores them), and the refusals of values the runtime does not implement."""

    def __init__(self, cls: str, defaults: dict[str, Any], config: dict[str, Any], where: str):
        self.cls, self.where = cls, where
        self.o = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
        if "beta_schedule" in defaults:  # the shared betas, prediction and spacing checks
            self.base = SchedulerConfig.from_dict(self.o, where=where, clip_sample=False)
        schedules = [k for k in _SIGMA_SCHEDULES if self.o.get(k)]
        if len(schedules) > 1:  # diffusers raises on this too
            self.refuse(" and ".join(schedules), True, "at most one of them")

    def __getitem__(self, name: str) -> Any:
        return self.o[name]

    def refuse(self, name: str, value: Any, supported: str) -> None:
        raise InputError(
            f"{self.where}: {name}={value!r} is not supported by the runtime's {self.cls} "
            f"(supported: {supported})"
        )

    def off(self, name: str) -> None:
        """A flag the runtime does not implement: False or None (diffusers' falsy default) only."""
        if self.o[name]:
            self.refuse(name, self.o[name], "False")

    def only(self, name: str, *allowed: Any) -> Any:
        v = self.o[name]
        if not any(v is a or (type(v) is type(a) and v == a) for a in allowed):
            self.refuse(name, v, ", ".join(map(repr, allowed)))
        return v


def _logf(x: Any) -> np.float32:
    """float32 log of a scalar, correctly rounded as torch's (numpy's SIMD log may differ by an ulp,
    which the multistep coefficients amplify); log(0) = -inf as in torch."""
    return np.float32(math.log(x)) if x > 0 else np.float32(-np.inf)


def _expf(x: Any) -> np.float32:
    return np.float32(math.exp(x))


def _check_steps(n: int, limit: int, least: int = 1) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not least <= n <= limit:
        raise InputError(f"num_inference_steps={n!r}: must be an integer in [{least}, {limit}]")


def _vp_alphas_cumprod(o: _Options) -> np.ndarray:
    ac = alphas_cumprod(o.base)
    if o.base.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24  # diffusers: close to 0 so the first sigma is finite
    return ac


def _train_sigmas(ac: np.ndarray) -> np.ndarray:
    """sqrt((1 - a) / a) per training timestep, float32 as diffusers computes it."""
    return np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)


def _float_timesteps(spacing: str, n: int, n_train: int, offset: int) -> np.ndarray:
    """The Euler schedulers' float32 timesteps (Table 2 of arXiv:2305.08891), as diffusers computes them."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32) + np.float32(offset)
    return np.arange(n_train, 0, -n_train / n).round().astype(np.float32) - np.float32(1)


def _sigma_to_t(sigma: Any, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' _sigma_to_t: the fractional training timestep of a sigma (log-linear interpolation)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def _bounds(in_sigmas: np.ndarray, o: _Options) -> tuple[float, float]:
    lo, hi = o.o.get("sigma_min"), o.o.get("sigma_max")  # only Euler has these options
    return (lo if lo is not None else in_sigmas[-1].item()), (hi if hi is not None else in_sigmas[0].item())


def _karras(in_sigmas: np.ndarray, n: int, o: _Options) -> np.ndarray:
    """Karras et al. 2022 (rho = 7), float64 as diffusers' _convert_to_karras."""
    sigma_min, sigma_max = _bounds(in_sigmas, o)
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _exponential(in_sigmas: np.ndarray, n: int, o: _Options) -> np.ndarray:
    sigma_min, sigma_max = _bounds(in_sigmas, o)
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _sigma_last(o: _Options, ac: np.ndarray) -> np.float32:
    if o["final_sigmas_type"] == "sigma_min":
        return np.sqrt((np.float32(1) - ac[0]) / ac[0])
    return np.float32(0)


class _Sequential(abc.ABC):
    """State of a multistep scheduler: steps must come in order from 0 (a new run starts at 0)."""

    _next = 0
    _begin = 0  # the loop's first step (image-to-image: set_begin_index)

    def set_begin_index(self, step_index: int) -> None:
        self._begin = int(step_index)

    def _advance(self, step_index: int) -> None:
        if step_index == self._begin:
            self._reset()
        elif step_index != self._next:
            raise ValueError(f"{type(self).__name__}: step {step_index} after step {self._next - 1}")
        self._next = step_index + 1

    @abc.abstractmethod
    def _reset(self) -> None:
        """Forget the previous steps' model outputs (each scheduler keeps its own)."""


class EulerScheduler:
    """diffusers.EulerDiscreteScheduler as pipelines call it (s_churn = 0: deterministic)."""

    stochastic = False
    cls = "EulerDiscreteScheduler"
    options = EULER_OPTIONS

    def __init__(self, config: dict[str, Any], *, where: str = "scheduler config"):
        o = self.o = _Options(self.cls, self.options, config, where)
        self._check(o)
        self.ac = _vp_alphas_cumprod(o)
        self.train_sigmas = _train_sigmas(self.ac)
        self.n_train = o.base.num_train_timesteps
        self.sigmas = np.concatenate([self.train_sigmas[::-1], [np.float32(0)]]).astype(np.float32)
        self.timesteps = np.linspace(0, self.n_train - 1, self.n_train, dtype=np.float32)[::-1].copy()

    def _check(self, o: _Options) -> None:
        o.only("interpolation_type", "linear")  # log_linear: not implemented
        o.off("use_beta_sigmas")  # scipy's beta ppf; the runtime is numpy only
        o.only("timestep_type", "discrete", "continuous")
        o.only("final_sigmas_type", "zero", "sigma_min")

    @property
    def init_noise_sigma(self) -> np.float32:
        m = self.sigmas.max()
        return m if self.o["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(m * m + np.float32(1))

    def _sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        o, ts = self.o, _float_timesteps(self.o["timestep_spacing"], n, self.n_train, self.o["steps_offset"])
        log_sigmas = np.log(self.train_sigmas)
        sigmas = np.interp(ts, np.arange(0, len(self.train_sigmas)), self.train_sigmas)
        if o["use_karras_sigmas"] or o["use_exponential_sigmas"]:
            convert = _karras if o["use_karras_sigmas"] else _exponential
            sigmas = convert(sigmas, n, o)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        return ts, np.concatenate([sigmas, [_sigma_last(o, self.ac)]]).astype(np.float32)

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        _check_steps(num_inference_steps, self.n_train)
        ts, self.sigmas = self._sigmas(int(num_inference_steps))
        if self.o.o.get("timestep_type") == "continuous" and self.o["prediction_type"] == "v_prediction":
            ts = np.array([np.float32(0.25) * _logf(s) for s in self.sigmas[:-1]])  # EDM's c_noise
        self.timesteps = ts.astype(np.float32)
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        s = self.sigmas[step_index]
        return (sample / np.sqrt(s * s + np.float32(1))).astype(np.float32)

    def set_begin_index(self, step_index: int) -> None:
        """Nothing to do: each step reads only its own sigmas."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """diffusers' add_noise with the begin index: original + noise * sigma (no init_noise_sigma)."""
        return (original + noise * self.sigmas[step_index]).astype(np.float32)

    def _x0(self, out: np.ndarray, x: np.ndarray, s: np.float32) -> np.ndarray:
        p = self.o["prediction_type"]
        if p == "epsilon":
            return x - s * out
        if p == "v_prediction":  # c_out * v + c_skip * x
            return out * (-s / np.sqrt(s * s + np.float32(1))) + x / (s * s + np.float32(1))
        return out

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prev_sample, prev_sample): the pipeline decodes the last step's sample."""
        s, s_next = self.sigmas[step_index], self.sigmas[step_index + 1]
        x = sample.astype(np.float32)
        derivative = (x - self._x0(model_output, x, s)) / s
        prev = (x + derivative * (s_next - s)).astype(np.float32)
        return prev, prev


class EulerAncestralScheduler(EulerScheduler):
    """diffusers.EulerAncestralDiscreteScheduler: an Euler step to sigma_down, then `noise` * sigma_up."""

    stochastic = True
    cls = "EulerAncestralDiscreteScheduler"
    options = EULER_ANCESTRAL_OPTIONS

    def _check(self, o: _Options) -> None:
        o.only("prediction_type", "epsilon", "v_prediction")  # diffusers: "sample" not implemented

    def _sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ts = _float_timesteps(self.o["timestep_spacing"], n, self.n_train, self.o["steps_offset"])
        sigmas = np.interp(ts, np.arange(0, len(self.train_sigmas)), self.train_sigmas)
        return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        s, s_to = self.sigmas[step_index], self.sigmas[step_index + 1]
        x = sample.astype(np.float32)
        s2, t2 = s * s, s_to * s_to
        up = np.sqrt(t2 * (s2 - t2) / s2)
        down = np.sqrt(t2 - up * up)
        prev = x + (x - self._x0(model_output, x, s)) / s * (down - s)
        if noise is not None:
            prev = prev + noise * up
        elif up != 0:  # only the last step (sigma_to = 0) adds no noise
            raise ValueError("EulerAncestralScheduler.step needs noise for every step but the last")
        prev = prev.astype(np.float32)
        return prev, prev


class DPMSolverMultistepScheduler(_Sequential):
    """diffusers.DPMSolverMultistepScheduler, algorithm dpmsolver++ (deterministic), orders 1 to 3,
    midpoint or heun; the previous data predictions are kept here (set_timesteps or step 0 resets)."""

    stochastic = False
    init_noise_sigma = 1.0
    cls = "DPMSolverMultistepScheduler"

    def __init__(self, config: dict[str, Any], *, where: str = "scheduler config"):
        o = self.o = _Options(self.cls, DPM_OPTIONS, config, where)
        # diffusers maps deis to dpmsolver++ and the UniPC/DEIS solver types to midpoint
        o.o["algorithm_type"] = {"deis": "dpmsolver++"}.get(o["algorithm_type"], o["algorithm_type"])
        o.o["solver_type"] = "midpoint" if o["solver_type"] in ("logrho", "bh1", "bh2") else o["solver_type"]
        o.only("algorithm_type", "dpmsolver++")  # dpmsolver (deprecated), sde-*: not implemented
        o.only("solver_type", "midpoint", "heun")
        o.only("solver_order", 1, 2, 3)
        o.off("use_beta_sigmas")  # scipy's beta ppf; the runtime is numpy only
        o.off("use_flow_sigmas")
        o.only("variance_type", None)
        o.only("final_sigmas_type", "zero", "sigma_min")
        self.ac = _vp_alphas_cumprod(o)
        self.n_train = o.base.num_train_timesteps
        alpha_t, sigma_t = np.sqrt(self.ac), np.sqrt(np.float32(1) - self.ac)
        self.lambda_t = (np.log(alpha_t) - np.log(sigma_t)).astype(np.float32)
        self.sigmas = _train_sigmas(self.ac)
        self.timesteps = np.linspace(0, self.n_train - 1, self.n_train, dtype=np.float32)[::-1].copy()
        self._outputs: list[np.ndarray] = []

    def _reset(self) -> None:
        self._outputs = []

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        o, n_train, n = self.o, self.n_train, num_inference_steps
        _check_steps(n, n_train)
        clipped = int(np.searchsorted(self.lambda_t[::-1], o["lambda_min_clipped"], side="left"))
        last = n_train - clipped
        spacing = o["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + o["steps_offset"]
        else:
            ts = np.arange(last, 0, -n_train / n).round().copy().astype(np.int64) - 1
        train = _train_sigmas(self.ac)
        log_sigmas = np.log(train)
        if o["use_karras_sigmas"] or o["use_exponential_sigmas"] or o["use_lu_lambdas"]:
            if o["use_lu_lambdas"]:  # uniform in log-SNR (Lu et al.): linear between the end lambdas
                lam = np.flip(log_sigmas.copy())
                ramp = np.linspace(0, 1, n)
                sigmas = np.exp(lam[0].item() + ramp * (lam[-1].item() - lam[0].item()))
            else:
                sigmas = (_karras if o["use_karras_sigmas"] else _exponential)(np.flip(train).copy(), n, o)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if o["beta_schedule"] != "squaredcos_cap_v2" and not o["use_exponential_sigmas"]:
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(train)), train)
        self.sigmas = np.concatenate([sigmas, [_sigma_last(o, self.ac)]]).astype(np.float32)
        self.timesteps = ts.astype(np.int64)
        self._outputs, self._next, self._begin = [], 0, 0
        return self.timesteps

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """diffusers' add_noise with the begin index: alpha_t x + sigma_t noise at the step's sigma."""
        alpha, sigma = self._alpha_sigma(self.sigmas[step_index])
        return (alpha * original + sigma * noise).astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
        return alpha, sigma * alpha

    def _lambda(self, i: int) -> tuple[np.float32, np.float32, np.float32]:
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        return alpha, sigma, _logf(alpha) - _logf(sigma)  # sigma 0 at the end: lambda = inf, as in torch

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prev_sample, prev_sample): the pipeline decodes the last step's sample."""
        o, i, n = self.o, step_index, len(self.timesteps)
        self._advance(i)
        order = o["solver_order"]
        lower_final = i == n - 1 and (
            o["euler_at_final"] or (o["lower_order_final"] and n < 15) or o["final_sigmas_type"] == "zero"
        )
        lower_second = i == n - 2 and o["lower_order_final"] and n < 15
        x = sample.astype(np.float32)
        alpha_s, sigma_s, lam_s = self._lambda(i)
        p = o["prediction_type"]
        if p == "epsilon":
            x0 = (x - sigma_s * model_output) / alpha_s
        elif p == "v_prediction":
            x0 = alpha_s * x - sigma_s * model_output
        else:
            x0 = model_output
        self._outputs = [*self._outputs, x0][-order:]
        done = min(i - self._begin, order)  # diffusers' lower_order_nums before this step
        alpha_t, sigma_t, lam_t = self._lambda(i + 1)
        h = lam_t - lam_s
        em1 = _expf(-h) - np.float32(1)
        if order == 1 or done < 1 or lower_final:
            prev = (sigma_t / sigma_s) * x - (alpha_t * em1) * x0
        elif order == 2 or done < 2 or lower_second:
            m0, m1 = self._outputs[-1], self._outputs[-2]
            r0 = (lam_s - self._lambda(i - 1)[2]) / h
            d1 = (np.float32(1) / r0) * (m0 - m1)
            if o["solver_type"] == "midpoint":
                prev = (sigma_t / sigma_s) * x - (alpha_t * em1) * m0 - np.float32(0.5) * (alpha_t * em1) * d1
            else:
                prev = (sigma_t / sigma_s) * x - (alpha_t * em1) * m0 + (alpha_t * (em1 / h + 1)) * d1
        else:
            m0, m1, m2 = self._outputs[-1], self._outputs[-2], self._outputs[-3]
            lam_s1, lam_s2 = self._lambda(i - 1)[2], self._lambda(i - 2)[2]
            r0, r1 = (lam_s - lam_s1) / h, (lam_s1 - lam_s2) / h
            d1_0, d1_1 = (np.float32(1) / r0) * (m0 - m1), (np.float32(1) / r1) * (m1 - m2)
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (np.float32(1) / (r0 + r1)) * (d1_0 - d1_1)
            prev = (
                (sigma_t / sigma_s) * x
                - (alpha_t * em1) * m0
                + (alpha_t * (em1 / h + 1)) * d1
                - (alpha_t * ((em1 + h) / (h * h) - np.float32(0.5))) * d2
            )
        prev = prev.astype(np.float32)
        return prev, prev


class PNDMScheduler(_Sequential):
    """diffusers.PNDMScheduler: PLMS (skip_prk_steps, as SD 1.x ships it) or Runge-Kutta warm-up
    steps then PLMS; its timesteps repeat some values, one model call per entry."""

    stochastic = False
    init_noise_sigma = 1.0
    cls = "PNDMScheduler"

    def __init__(self, config: dict[str, Any], *, where: str = "scheduler config"):
        o = self.o = _Options(self.cls, PNDM_OPTIONS, config, where)
        o.only("prediction_type", "epsilon", "v_prediction")
        self.ac = alphas_cumprod(o.base)
        self.final_alpha_cumprod = np.float32(1.0) if o["set_alpha_to_one"] else self.ac[0]
        self.n_train = o.base.num_train_timesteps
        self.timesteps = np.arange(0, self.n_train)[::-1].copy()
        self.prk_timesteps = np.array([], dtype=np.int64)
        self._reset()

    def _reset(self) -> None:
        self.ets: list[np.ndarray] = []
        self.counter, self.cur_model_output, self.cur_sample = 0, 0, None

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        o, n_train, n = self.o, self.n_train, num_inference_steps
        skip = bool(o["skip_prk_steps"])
        _check_steps(n, n_train, 1 if skip else 4)  # the Runge-Kutta warm-up takes the last 4
        if o["timestep_spacing"] == "linspace":
            ts = np.linspace(0, n_train - 1, n).round().astype(np.int64)
        elif o["timestep_spacing"] == "leading":
            ts = (np.arange(0, n) * (n_train // n)).round() + o["steps_offset"]
        else:
            ts = np.round(np.arange(n_train, 0, -n_train / n))[::-1].astype(np.int64) - 1
        if skip:
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            prk = np.array(ts[-4:]).repeat(2) + np.tile(np.array([0, n_train // n // 2]), 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].astype(np.int64)
            plms = ts[:-3][::-1].copy()
        self.num_inference_steps = n
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self._reset()
        self._next, self._begin = 0, 0
        return self.timesteps

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """diffusers' add_noise at the step_index-th timestep: sqrt(a) x + sqrt(1 - a) noise."""
        return _alpha_noise(self.ac, int(self.timesteps[step_index]), original, noise)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prev_sample, prev_sample): the pipeline decodes the last step's sample."""
        self._advance(step_index)
        t = int(self.timesteps[step_index])
        if self.counter < len(self.prk_timesteps) and not self.o["skip_prk_steps"]:
            prev = self._prk(model_output, t, sample)
        else:
            prev = self._plms(model_output, t, sample)
        self.counter += 1
        prev = prev.astype(np.float32)
        return prev, prev

    def _prk(self, out: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        c, ratio = self.counter, self.n_train // self.num_inference_steps
        prev_t = t - (0 if c % 2 else ratio // 2)
        t = int(self.prk_timesteps[c // 4 * 4])
        if c % 4 == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * out
            self.ets.append(out)
            self.cur_sample = sample
        elif c % 4 in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * out
        else:
            out = self.cur_model_output + 1 / 6 * out
            self.cur_model_output = 0
        cur = self.cur_sample if self.cur_sample is not None else sample
        return self._prev(cur, t, prev_t, out)

    def _plms(self, out: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        ratio = self.n_train // self.num_inference_steps
        prev_t = t - ratio
        if self.counter != 1:
            self.ets = [*self.ets[-3:], out]
        else:  # the second call re-evaluates the first timestep (a 2nd-order start)
            prev_t, t = t, t + ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            out = (out + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            out = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            out = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._prev(sample, t, prev_t, out)

    def _prev(self, sample: np.ndarray, t: int, prev_t: int, out: np.ndarray) -> np.ndarray:
        """Formula (9) of the PNDM paper, as diffusers' _get_prev_sample."""
        a = self.ac[t]
        a_prev = self.ac[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b, b_prev = np.float32(1) - a, np.float32(1) - a_prev
        if self.o["prediction_type"] == "v_prediction":
            out = np.sqrt(a) * out + np.sqrt(b) * sample
        coeff = np.sqrt(a_prev / a)
        denom = a * np.sqrt(b_prev) + np.sqrt(a * b * a_prev)
        return coeff * sample - (a_prev - a) * out / denom


class FlowMatchEulerScheduler:
    """diffusers.FlowMatchEulerDiscreteScheduler (SD3, Flux): x + (sigma_next - sigma) * v.

    set_timesteps returns sigmas * num_train_timesteps, what the SD3 pipeline feeds its transformer
    (Flux's pipeline divides them by 1000 itself); `mu` (use_dynamic_shifting: Flux) comes from the
    image's sequence length, `mu_for`. The latents are not scaled (init_noise_sigma 1)."""

    init_noise_sigma = 1.0
    cls = "FlowMatchEulerDiscreteScheduler"
    truncate_strength = False  # the SD3 / Flux img2img pipelines' get_timesteps (check_strength)

    def __init__(self, config: dict[str, Any], *, where: str = "scheduler config"):
        o = self.o = _Options(self.cls, FLOW_OPTIONS, config, where)
        o.off("invert_sigmas")
        o.off("use_beta_sigmas")  # scipy's beta ppf; the runtime is numpy only
        o.only("time_shift_type", "exponential", "linear")
        n_train = self.n_train = int(o["num_train_timesteps"])
        self.stochastic = bool(o["stochastic_sampling"])
        sigmas = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy() / np.float32(n_train)
        if not o["use_dynamic_shifting"]:
            shift = float(o["shift"])  # a Python float against float32, as torch computes it
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.sigma_min, self.sigma_max = sigmas[-1].item(), sigmas[0].item()
        self.sigmas, self.timesteps = sigmas, sigmas * np.float32(n_train)

    @property
    def dynamic_shifting(self) -> bool:
        """set_timesteps needs mu (mu_for the image's token count): Flux, SD3.5 with it on."""
        return bool(self.o["use_dynamic_shifting"])

    def mu_for(self, image_seq_len: int) -> float:
        """Flux's calculate_shift: mu linear in the latent sequence length between the config's ends."""
        o = self.o
        m = (o["max_shift"] - o["base_shift"]) / (o["max_image_seq_len"] - o["base_image_seq_len"])
        return image_seq_len * m + (o["base_shift"] - m * o["base_image_seq_len"])

    def set_timesteps(
        self, num_inference_steps: int, mu: float | None = None, sigmas: np.ndarray | None = None
    ) -> np.ndarray:
        """`sigmas`: the pipeline's own (Flux: linspace(1, 1/n, n)), shifted like the default ones."""
        o, n = self.o, num_inference_steps
        _check_steps(n, self.n_train)
        if o["use_dynamic_shifting"] and mu is None:
            raise InputError(f"{o.where}: use_dynamic_shifting needs mu (mu_for(image_seq_len))")
        if sigmas is not None:
            sigmas = np.asarray(sigmas).astype(np.float32)
        else:
            ts = np.linspace(self.sigma_max * self.n_train, self.sigma_min * self.n_train, n)
            sigmas = ts / self.n_train
        if o["use_dynamic_shifting"]:
            e = math.exp(mu) if o["time_shift_type"] == "exponential" else mu
            sigmas = e / (e + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = o["shift"] * sigmas / (1 + (o["shift"] - 1) * sigmas)
        if o["shift_terminal"]:  # stretch so the last sigma is shift_terminal
            one_minus_z = 1 - sigmas
            if one_minus_z[-1] == 0:  # one step at sigma 1: diffusers' schedule turns NaN
                raise InputError(f"num_inference_steps={n}: shift_terminal ({o.where}) needs 2 or more")
            sigmas = 1 - one_minus_z / (one_minus_z[-1] / (1 - o["shift_terminal"]))
        if o["use_karras_sigmas"] or o["use_exponential_sigmas"]:
            sigmas = (_karras if o["use_karras_sigmas"] else _exponential)(sigmas, n, o)
        sigmas = sigmas.astype(np.float32)
        self.timesteps = sigmas * np.float32(self.n_train)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        return self.timesteps

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def set_begin_index(self, step_index: int) -> None:
        """Nothing to do: each step reads only its own sigmas."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """diffusers' scale_noise at the step_index-th sigma (image-to-image's start):
        sigma * noise + (1 - sigma) * original."""
        sigma = self.sigmas[step_index]
        return (sigma * noise + (np.float32(1) - sigma) * original).astype(np.float32)

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prev_sample, prev_sample); stochastic_sampling: x0 re-noised to sigma_next with `noise`."""
        s, s_next = self.sigmas[step_index], self.sigmas[step_index + 1]
        x = sample.astype(np.float32)
        if not self.stochastic:
            prev = x + (s_next - s) * model_output
        else:
            x0 = x - s * model_output
            if noise is None and s_next != 0:
                raise ValueError("FlowMatchEulerScheduler.step needs noise for every step but the last")
            prev = (np.float32(1) - s_next) * x0 + (0 if noise is None else s_next * noise)
        prev = prev.astype(np.float32)
        return prev, prev


_CLASSES: dict[str, Any] = {
    "euler": EulerScheduler,
    "euler_ancestral": EulerAncestralScheduler,
    "dpm_multistep": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "flow_euler": FlowMatchEulerScheduler,
}


def trial_timesteps(scheduler: Any, steps: int) -> np.ndarray:
    """The timesteps of `steps` steps from a copy of `scheduler` (its own range check; the caller's
    scheduler state is untouched). A dynamically shifted FlowMatch schedule gets a stand-in mu: the
    step count, not the image size, is what is checked here."""
    import copy

    mu = {"mu": 1.0} if getattr(scheduler, "dynamic_shifting", False) else {}
    return copy.deepcopy(scheduler).set_timesteps(int(steps), **mu)


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
    if kind in _CLASSES:
        return _CLASSES[kind](config, where=where)
    raise InputError(f"{where}: scheduler kind {kind!r} is not supported ({', '.join(KINDS)})")
