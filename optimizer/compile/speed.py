"""Speedup against the PyTorch teacher.

Per call: one denoiser evaluation at batch b. End to end: noise -> sample with each side's own
sampler (the teacher at its reference step count, the student at its few steps). Same harness
(engines.schedule.Sampler) on both sides and the one timing loop (optimizer.timing): interleaved,
until every median is stable or the budget ends. The teacher is timed again in a fresh process
(optimizer.compile.teacher_baseline) at its best thread count, free of the variants' thread pools; that
figure is the one speedups divide, and the in-run one is checked against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.schedule import Sampler, SamplingSchedule, draw_noise
from optimizer.timing import StopRule, comparable, time_until_stable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedConfig:
    batch_sizes: tuple[int, ...] = (1, 16)
    warmup: int = 2
    repeats: int = 50  # most interleaved rounds per batch size and level
    min_repeats: int = 5  # rounds always run; fewer samples never give a speedup
    rel_tol: float = 0.05  # stable: median of the last half within this of the whole median
    max_seconds: float = 8.0  # per call, per batch size; more rounds stop once exceeded
    # End to end costs the teacher its reference steps per sample (the demo's: 0.55 s at batch 1,
    # 1.8 s at 16 on 2 cores), so 8 s gave it 5 samples and an unstable median: e2e is measured at
    # these batch sizes only (None: the smallest), with its own budget, and in each round a
    # student repeats its sampler for e2e_slice_s, so both sides reach a stable median.
    e2e_batch_sizes: tuple[int, ...] | None = None
    e2e_seconds: float | None = None  # per e2e batch size (None: 2.5 x max_seconds, the demo's 20 s)
    e2e_slice_s: float = 0.25
    # per round a variant repeats its call for at least this long: a cheap student collects enough
    # samples for a stable median in the rounds a 64-step teacher needs for its own
    slice_s: float = 0.02
    fresh_teacher: bool = True  # re-time the teacher in its own process (needs its folder)
    agree_tol: float = 0.10  # in-run vs fresh-process teacher medians
    teacher_threads: tuple[int, ...] = ()  # the fresh process's grid (empty: 1, all cores, in-run)
    # per-call timing of each CPU variant at each of these thread counts, one session per count
    # (optimizer.threads_grid); None: 1 and every usable core; (): not measured
    threads_grid: tuple[int, ...] | None = None

    @property
    def e2e_batches(self) -> tuple[int, ...]:
        if self.e2e_batch_sizes is None:
            return (min(self.batch_sizes),) if self.batch_sizes else ()
        return tuple(b for b in self.e2e_batch_sizes if b in self.batch_sizes)

    @property
    def e2e_budget(self) -> float:
        return 2.5 * self.max_seconds if self.e2e_seconds is None else self.e2e_seconds

    def e2e_rule(self, max_seconds: float | None = None) -> StopRule:
        r = self.rule(warmup=1, max_seconds=self.e2e_budget if max_seconds is None else max_seconds)
        return replace(r, slice_s=self.e2e_slice_s)

    def rule(self, warmup: int | None = None, max_seconds: float | None = None) -> StopRule:
        return StopRule(
            warmup=self.warmup if warmup is None else warmup,
            min_rounds=self.min_repeats,
            max_rounds=max(self.repeats, self.min_repeats),
            min_samples=self.min_repeats,
            rel_tol=self.rel_tol,
            max_seconds=self.max_seconds if max_seconds is None else max_seconds,
            slice_s=self.slice_s,
        )


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


def _time_in_process(
    everyone: dict[str, tuple[Runner, SamplingSchedule]],
    sample_shape: tuple[int, ...],
    cond_fn: Any,
    config: SpeedConfig,
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {k: {"per_call": {}, "end_to_end": {}} for k in everyone}
    rng = np.random.default_rng(0)
    for b in config.batch_sizes:
        cond = cond_fn(b) if cond_fn else {}
        x = rng.standard_normal((b, *sample_shape)).astype(np.float32)
        calls = {}
        for name, (runner, sch) in everyone.items():
            feeds = {"sample": x, "timestep": np.full((b,), sch.timesteps[0], np.float32), **cond}
            calls[name] = lambda r=runner, f=feeds: r.infer(f, check=False)
        for name, t in time_until_stable(calls, config.rule()).timings.items():
            out[name]["per_call"][b] = t.to_dict()
        log.info(
            "timed batch %d per call: %s",
            b,
            ", ".join(f"{k} {v['per_call'][b]['median_ms']:.2f} ms" for k, v in out.items()),
        )
        if b not in config.e2e_batches:
            continue
        e2e = {name: _e2e(r, sch, sample_shape, b, cond or None) for name, (r, sch) in everyone.items()}
        for name, t in time_until_stable(e2e, config.e2e_rule()).timings.items():
            out[name]["end_to_end"][b] = t.to_dict()
        log.info(
            "timed batch %d end to end: %s",
            b,
            ", ".join(f"{k} {v['end_to_end'][b]['median_ms']:.1f} ms" for k, v in out.items()),
        )
    return out


def teacher_baseline(
    in_run: dict[str, dict[int, Any]],
    teacher_dir: str | Path | None,
    steps: int,
    config: SpeedConfig,
) -> dict[str, dict[int, Any]]:
    """The teacher figures speedups divide (optimizer.compile.teacher_baseline.judge): fresh process."""
    import torch

    from optimizer.compile import teacher_baseline as tb

    threads = torch.get_num_threads()
    fresh, why = None, "no teacher folder given" if teacher_dir is None else "disabled (SpeedConfig)"
    if teacher_dir is not None and config.fresh_teacher:
        grid = (
            sorted({*config.teacher_threads, threads}) if config.teacher_threads else tb.thread_grid(threads)
        )
        req = tb.BaselineRequest(
            teacher=str(teacher_dir),
            batch_sizes=list(config.batch_sizes),
            steps=steps,
            threads=grid,
            rule=config.rule(max_seconds=config.max_seconds / len(grid)),
            e2e_batches=list(config.e2e_batches),
            e2e_rule=config.e2e_rule(max_seconds=config.e2e_budget / len(grid)),
        )
        fresh, why = tb.fresh_teacher_timing(req)
    return tb.judge(in_run, fresh, threads, why, config.agree_tol)


def measure(
    teacher: tuple[Runner, SamplingSchedule] | None,
    variants: dict[str, tuple[Runner, SamplingSchedule]],
    sample_shape: tuple[int, ...],
    cond_fn: Any,
    config: SpeedConfig = SpeedConfig(),
    *,
    teacher_dir: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """name -> {"per_call": {b: timing}, "end_to_end": {b: timing}}; "teacher" among names.

    The teacher's timings are its baseline (`teacher_baseline`) with their provenance; each
    variant timing says in "speedup_null_reason" why no speedup may be stated (None: it may)."""
    everyone = dict(variants)
    if teacher is not None:
        everyone = {"teacher": teacher, **variants}
    out = _time_in_process(everyone, sample_shape, cond_fn, config)
    if teacher is None:
        return out
    out["teacher"] = teacher_baseline(out["teacher"], teacher_dir, teacher[1].steps, config)
    for name in variants:
        for lvl in ("per_call", "end_to_end"):
            for b, t in out[name][lvl].items():
                t["speedup_null_reason"] = comparable(out["teacher"][lvl].get(b), t, config.min_repeats)
    return out


def speedups(timings: dict[str, dict[str, Any]], name: str) -> dict[str, dict[int, float | None]]:
    """Teacher median / variant median, per level and batch size; None where either timing is too
    few repeats or not stable (the variant's timing says why in "speedup_null_reason")."""
    t, v = timings["teacher"], timings[name]
    return {
        lvl: {
            b: None if x.get("speedup_null_reason") else t[lvl][b]["median_ms"] / x["median_ms"]
            for b, x in v[lvl].items()
        }
        for lvl in ("per_call", "end_to_end")
    }
