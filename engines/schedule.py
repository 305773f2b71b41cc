"""The student's sampling schedule and its few-step sampler, in numpy.

The same `Sampler` drives every runner (onnxruntime, tensorrt, torch), so "engine sampler vs
torch student sampler" compares backends, never two implementations of the math.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

SAMPLER_KINDS = ("ddim", "consistency")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class SamplingSchedule:
    kind: str  # "ddim" (deterministic, eta=0) or "consistency" (LCM multistep, fresh noise per step)
    timesteps: tuple[int, ...]  # model timestep inputs, first (noisiest) to last
    alphas_cumprod: tuple[float, ...]  # alpha_bar at each of `timesteps`
    prediction_type: str  # what the model outputs: "epsilon", "v_prediction" or "sample"
    final_alpha_cumprod: float = 1.0  # alpha_bar after the last step (1.0: a clean sample)
    sigma_data: float = 0.5  # consistency boundary condition (Song et al. 2023, App. C)
    timestep_scaling: float = 10.0  # LCM's scaling of t inside c_skip/c_out
    clip_sample: float | None = None  # clamp x0 to [-c, c] at each step (None: no clamp)

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"sampler kind {self.kind!r} not in {SAMPLER_KINDS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {self.prediction_type!r} not in {PREDICTION_TYPES}")
        if len(self.timesteps) != len(self.alphas_cumprod) or not self.timesteps:
            raise ValueError("timesteps and alphas_cumprod must be non-empty and of equal length")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        d["alphas_cumprod"] = list(self.alphas_cumprod)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingSchedule:
        d = dict(d)
        d["timesteps"] = tuple(int(t) for t in d["timesteps"])
        d["alphas_cumprod"] = tuple(float(a) for a in d["alphas_cumprod"])
        return cls(**d)

    @classmethod
    def from_alphas(
        cls, alphas_cumprod: np.ndarray, timesteps: list[int], kind: str, prediction_type: str, **kw: Any
    ) -> SamplingSchedule:
        """Pick alpha_bar at the given timesteps from a scheduler's full table."""
        return cls(
            kind=kind,
            timesteps=tuple(int(t) for t in timesteps),
            alphas_cumprod=tuple(float(alphas_cumprod[t]) for t in timesteps),
            prediction_type=prediction_type,
            **kw,
        )


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced, ending at T-1 ("trailing" spacing, Lin et al. 2023 Table 2)."""
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]


def predict_x0_eps(
    x: np.ndarray, out: np.ndarray, a: float, prediction_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """Model output -> (x0, eps) at alpha_bar a; z = sqrt(a) x0 + sqrt(1-a) eps."""
    sa, so = np.float32(np.sqrt(a)), np.float32(np.sqrt(1.0 - a))
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho, eq. 9)
        return sa * x - so * out, sa * out + so * x
    if prediction_type == "epsilon":
        return (x - so * out) / sa, out
    return out, (x - sa * out) / max(so, np.float32(1e-8))


class InferFn(Protocol):
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def draw_noise(seeds: list[int], shape: tuple[int, ...], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed noise so a sample does not depend on its batch: (x_T [B,...], per-step [S-1,B,...])."""
    init, per_step = [], []
    for s in seeds:
        rng = np.random.default_rng(s)
        init.append(rng.standard_normal(shape, dtype=np.float32))
        per_step.append(rng.standard_normal((max(steps - 1, 0), *shape), dtype=np.float32))
    return np.stack(init), np.stack(per_step, axis=1)


MAX_SEED = 2**63 - 1


def check_sampler_inputs(
    seeds: Any,
    noise: Any,
    step_noise: Any,
    cond: Any,
    sample_shape: tuple[int, ...],
    schedule: SamplingSchedule,
) -> None:
    """Refuse, naming the argument, what would silently give NaN images or a deep numpy error:
    empty or negative seeds, an empty batch, a wrong shape or dtype, NaN/Inf noise."""
    from engines.errors import InputError

    if (seeds is None) == (noise is None):
        raise InputError("pass exactly one of seeds= or noise=")
    if seeds is not None:
        if isinstance(seeds, str | bytes | dict) or not hasattr(seeds, "__len__"):
            raise InputError(f"seeds: expected a list of integers, got {type(seeds).__name__}")
        if len(seeds) == 0:
            raise InputError("seeds: empty list (need at least one seed)")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= int(s) <= MAX_SEED:
                raise InputError(f"seeds: {s!r} is not an integer in [0, 2^63 - 1]")
        batch = len(seeds)
    else:
        batch = _check_array("noise", noise, (None, *sample_shape))
    if step_noise is not None:
        if seeds is not None:
            raise InputError("step_noise: only with noise= (seeds= draws its own)")
        _check_array("step_noise", step_noise, (max(schedule.steps - 1, 0), batch, *sample_shape))
    for k, v in (cond or {}).items():
        if not isinstance(v, np.ndarray) or v.ndim == 0 or len(v) != batch:
            raise InputError(f"cond[{k!r}]: expected an array with {batch} rows (one per sample)")
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            raise InputError(f"cond[{k!r}]: contains NaN or Inf")


def _check_array(name: str, a: Any, shape: tuple[int | None, ...]) -> int:
    from engines.errors import InputError

    if not isinstance(a, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"{name}: expected floating-point values, got dtype {a.dtype}")
    want = ["B" if d is None else d for d in shape]
    if a.ndim != len(shape) or any(d is not None and a.shape[i] != d for i, d in enumerate(shape)):
        raise InputError(f"{name}: shape {list(a.shape)} does not match the sample shape: expected {want}")
    if shape[0] is None and a.shape[0] == 0:
        raise InputError(f"{name}: empty batch (shape {list(a.shape)})")
    if not np.isfinite(a).all():
        raise InputError(f"{name}: contains NaN or Inf")
    return int(a.shape[0])


class StudentScheduler:
    """A student's own SamplingSchedule behind the runtime scheduler interface (engines/schedulers.py):
    DDIM (eta = 0) or consistency multistep, at exactly its distilled timesteps."""

    init_noise_sigma = 1.0

    def __init__(self, schedule: SamplingSchedule):
        self.schedule = schedule
        self.stochastic = schedule.kind == "consistency"  # fresh noise at every step but the last
        self._alphas = [*schedule.alphas_cumprod, schedule.final_alpha_cumprod]

    def set_timesteps(self, num_inference_steps: int | None = None) -> np.ndarray:
        from engines.errors import InputError

        n = self.schedule.steps
        if num_inference_steps is not None and num_inference_steps != n:
            raise InputError(f"num_inference_steps={num_inference_steps}: this student was distilled for {n}")
        return np.asarray(self.schedule.timesteps, dtype=np.int64)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        sch, i, x = self.schedule, step_index, sample
        t, a, a_next = sch.timesteps[i], self._alphas[i], self._alphas[i + 1]
        x0, eps = predict_x0_eps(x, model_output, a, sch.prediction_type)
        if sch.clip_sample is not None:
            x0 = np.clip(x0, -sch.clip_sample, sch.clip_sample)
        last = i == sch.steps - 1
        if sch.kind == "ddim":  # DDIM, eta = 0 (Song et al. 2021, eq. 12)
            x = x0 if last else np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
        else:  # consistency multistep (Song et al. 2023, Alg. 1; LCM boundary scalings)
            c = (t * sch.timestep_scaling) ** 2
            c_skip = sch.sigma_data**2 / (c + sch.sigma_data**2)
            c_out = np.sqrt(c) / np.sqrt(c + sch.sigma_data**2)
            denoised = c_skip * x + c_out * x0
            x = denoised if last else np.sqrt(a_next) * denoised + np.sqrt(1 - a_next) * noise
        x = x.astype(np.float32)
        return x, x


class Sampler:
    """Noise -> samples in the model's data space, with any runner exposing `infer(feeds)` (the
    compile stages' torch reference and engine checks, the Triton sampler model); the step math is
    StudentScheduler's, the runtime pipeline's too."""

    def __init__(
        self,
        schedule: SamplingSchedule,
        runner: InferFn,
        *,
        output_name: str = "out_sample",
        max_batch: int | None = None,
    ):
        self.schedule, self.runner = schedule, runner
        self.output_name, self.max_batch = output_name, max_batch

    def _model(self, x: np.ndarray, t: int, cond: dict[str, np.ndarray]) -> np.ndarray:
        n = x.shape[0]
        step = self.max_batch or n
        outs = []
        for i in range(0, n, step):
            feeds = {"sample": x[i : i + step], "timestep": np.full((min(step, n - i),), t, np.float32)}
            feeds.update({k: v[i : i + step] for k, v in cond.items()})
            outs.append(self.runner.infer(feeds)[self.output_name])
        return np.concatenate(outs).astype(np.float32)

    def __call__(
        self,
        noise: np.ndarray,
        step_noise: np.ndarray | None = None,
        cond: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        sch, cond = self.schedule, cond or {}
        if sch.kind == "consistency" and sch.steps > 1 and step_noise is None:
            raise ValueError("a consistency sampler needs step_noise [steps-1, B, ...] (see draw_noise)")
        sched = StudentScheduler(sch)
        x = noise.astype(np.float32)
        for i, t in enumerate(sch.timesteps):
            out = self._model(x, t, cond)
            last = i == sch.steps - 1
            x, _ = sched.step(out, i, x, None if last or step_noise is None else step_noise[i])
        return x

    def from_seeds(
        self, seeds: list[int], sample_shape: tuple[int, ...], cond: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        noise, step_noise = draw_noise(seeds, sample_shape, self.schedule.steps)
        return self(noise, step_noise, cond)


def to_images(samples: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> images in [0, 1]."""
    return np.clip((samples + 1.0) / 2.0, 0.0, 1.0)
