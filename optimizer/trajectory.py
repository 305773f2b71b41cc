"""Inputs the student actually sees: (sample, timestep, cond) captured along its own sampling
trajectory. Used for calibration (quantize) and call-level parity (validate)."""

from __future__ import annotations

import numpy as np

from engines.base import Runner
from engines.schedule import Sampler, SamplingSchedule, draw_noise


class _Recorder:
    def __init__(self, runner: Runner):
        self.runner, self.feeds = runner, []

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({k: v.copy() for k, v in feeds.items()})
        return self.runner.infer(feeds)


def record_trajectory(runner: Runner, schedule: SamplingSchedule, sample_shape: tuple[int, ...],
                      seeds: list[int], cond: dict[str, np.ndarray] | None = None,
                      batch: int | None = None) -> list[dict[str, np.ndarray]]:
    """One feed per (batch chunk, timestep): every step of the student's sampler, several seeds."""
    rec = _Recorder(runner)
    sampler = Sampler(schedule, rec, output_name=runner.spec.output_names[0], max_batch=batch)
    noise, step_noise = draw_noise(seeds, sample_shape, schedule.steps)
    sampler(noise, step_noise, cond)
    return rec.feeds
