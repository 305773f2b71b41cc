"""Speedup against the PyTorch teacher, measured in the same process as each variant.

Per call: one denoiser evaluation at batch b. End to end: noise -> sample with each side's own
sampler (the teacher at its reference step count, the student at its few steps). Same harness
(engines.schedule.Sampler) on both sides, interleaved repeats, medians.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.base import Runner
from engines.schedule import Sampler, SamplingSchedule, draw_noise
from optimizer.timing import time_interleaved

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedConfig:
    batch_sizes: tuple[int, ...] = (1, 16)
    warmup: int = 2
    repeats: int = 7
    max_seconds: float = 8.0  # per batch size and level; fewer repeats once exceeded (min 3)


def _e2e(
    runner: Runner,
    schedule: SamplingSchedule,
    shape: tuple[int, ...],
    b: int,
    cond: dict[str, np.ndarray] | None,
):
    sampler = Sampler(schedule, runner, output_name=runner.spec.output_names[0])
    noise, step_noise = draw_noise(list(range(b)), shape, schedule.steps)
    return lambda: sampler(noise, step_noise, cond)


def measure(
    teacher: tuple[Runner, SamplingSchedule] | None,
    variants: dict[str, tuple[Runner, SamplingSchedule]],
    sample_shape: tuple[int, ...],
    cond_fn: Any,
    config: SpeedConfig = SpeedConfig(),
) -> dict[str, dict[str, Any]]:
    """name -> {"per_call": {b: timing}, "end_to_end": {b: timing}}; "teacher" among names."""
    everyone = dict(variants)
    if teacher is not None:
        everyone = {"teacher": teacher, **variants}
    out: dict[str, dict[str, Any]] = {k: {"per_call": {}, "end_to_end": {}} for k in everyone}
    rng = np.random.default_rng(0)
    for b in config.batch_sizes:
        cond = cond_fn(b) if cond_fn else {}
        x = rng.standard_normal((b, *sample_shape)).astype(np.float32)
        calls = {}
        for name, (runner, sch) in everyone.items():
            feeds = {"sample": x, "timestep": np.full((b,), sch.timesteps[0], np.float32), **cond}
            calls[name] = lambda r=runner, f=feeds: r.infer(f, check=False)
        for name, t in time_interleaved(
            calls, warmup=config.warmup, repeats=config.repeats, max_seconds=config.max_seconds
        ).items():
            out[name]["per_call"][b] = t.to_dict()
        e2e = {name: _e2e(r, sch, sample_shape, b, cond or None) for name, (r, sch) in everyone.items()}
        for name, t in time_interleaved(
            e2e, warmup=1, repeats=config.repeats, max_seconds=config.max_seconds
        ).items():
            out[name]["end_to_end"][b] = t.to_dict()
        log.info(
            "timed batch %d: %s",
            b,
            ", ".join(
                f"{k} {v['per_call'][b]['median_ms']:.2f}/{v['end_to_end'][b]['median_ms']:.1f} ms"
                for k, v in out.items()
            ),
        )
    return out


def speedups(timings: dict[str, dict[str, Any]], name: str) -> dict[str, dict[int, float]]:
    """Teacher median / variant median, per level and batch size."""
    t, v = timings["teacher"], timings[name]
    return {
        lvl: {b: t[lvl][b]["median_ms"] / v[lvl][b]["median_ms"] for b in v[lvl]}
        for lvl in ("per_call", "end_to_end")
    }
