"""Threads as a measured dimension, shared by dd-compile and dd-bench.

Each CPU variant gets one session per thread count of the grid (a session's intra-op pool is fixed
when it is built); all (variant, threads) pairs of a batch size are timed per call, interleaved in
one process by the one timing loop (optimizer.timing). Then plain arithmetic on the medians:

- images/s = batch / median; images/s/core = images/s / threads;
- serving images/s = images/s x (cores // threads): a CPU box serves with cores // threads
  replicas of t threads each, so per-core efficiency decides, not single-process speed;
- the recommendation is the passing, stable (variant, threads, batch) with the most serving images/s;
- a precision "pays" at a thread count when it is >= PAYS x its backend's fp32 at the same threads
  and batch, both medians stable (the stability tolerance is 5%: a smaller gain is noise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from optimizer.timing import StopRule, time_until_stable

log = logging.getLogger(__name__)

PAYS = 1.05  # a lower precision pays when at least this much faster than fp32 (same threads, batch)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_grid(cores: int | None = None) -> tuple[int, ...]:
    """1 thread and every usable core: the two ends a CPU deployment chooses between."""
    return tuple(sorted({1, cores or usable_cores()}))


def parse_grid(text: str, option: str = "--threads-grid") -> tuple[int, ...]:
    """'1,2' -> (1, 2); ValueError naming the option on anything else."""
    try:
        grid = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"{option} {text!r}: comma-separated thread counts, e.g. 1,2") from None
    if not grid or min(grid) < 1:
        raise ValueError(f"{option} {text!r}: thread counts must be >= 1")
    return grid


@dataclass(frozen=True)
class GridPoint:
    """One (variant, threads, batch) per-call median."""

    variant: str  # "onnxruntime int8"
    backend: str
    precision: str
    threads: int
    batch: int
    median_ms: float
    stable: bool
    n: int = 0
    passed: bool = True  # the variant's parity verdict (a failing variant is never recommended)

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.median_ms / 1e3)

    @property
    def images_per_s_per_core(self) -> float:
        return self.images_per_s / self.threads

    def replicas(self, cores: int) -> int:
        return max(1, cores // self.threads)

    def serving_images_per_s(self, cores: int) -> float:
        return self.images_per_s * self.replicas(cores)

    def to_dict(self, cores: int) -> dict[str, Any]:
        return {
            **asdict(self),
            "images_per_s": round(self.images_per_s, 3),
            "images_per_s_per_core": round(self.images_per_s_per_core, 3),
            "replicas": self.replicas(cores),
            "serving_images_per_s": round(self.serving_images_per_s(cores), 3),
        }


def recommend(points: Iterable[GridPoint], cores: int) -> dict[str, Any] | None:
    """The passing, stable point with the most serving images/s (ties: fewer threads)."""
    cands = [p for p in points if p.passed and p.stable]
    if not cands:
        return None
    best = max(cands, key=lambda p: (p.serving_images_per_s(cores), -p.threads))
    return {
        **best.to_dict(cores),
        "rule": f"most images/s served on {cores} cores by cores // threads replicas of one "
        "passing variant at one batch size (stable medians only)",
        "summary": f"{best.variant} at {best.threads} thread{'s' * (best.threads > 1)} x "
        f"{best.replicas(cores)} replica{'s' * (best.replicas(cores) > 1)}, batch {best.batch}: "
        f"{best.serving_images_per_s(cores):.1f} images/s "
        f"({best.images_per_s_per_core:.1f} images/s/core)",
    }


def precision_verdicts(points: Iterable[GridPoint]) -> dict[str, dict[str, Any]]:
    """variant -> {"vs_fp32": {threads: {batch: ratio or None}}, "verdict": one line}: each lower
    precision against its backend's fp32 at the same threads and batch (None: a median unstable)."""
    pts = list(points)
    by = {(p.backend, p.precision, p.threads, p.batch): p for p in pts}
    out: dict[str, dict[str, Any]] = {}
    for v in sorted({(p.backend, p.precision, p.variant) for p in pts if p.precision != "fp32"}):
        backend, prec, name = v
        ratios: dict[int, dict[int, float | None]] = {}
        for p in (p for p in pts if p.variant == name):
            base = by.get((backend, "fp32", p.threads, p.batch))
            if base is None:
                continue
            ok = p.stable and base.stable
            ratios.setdefault(p.threads, {})[p.batch] = round(base.median_ms / p.median_ms, 3) if ok else None
        if not ratios:
            continue
        b = max(b for r in ratios.values() for b in r)  # judged at the largest batch
        at = {t: r.get(b) for t, r in sorted(ratios.items())}
        pays = [f"{t} ({x:.2f}x)" for t, x in at.items() if x is not None and x >= PAYS]
        not_ = [f"{t} ({x:.2f}x)" for t, x in at.items() if x is not None and x < PAYS]
        unk = [str(t) for t, x in at.items() if x is None]
        parts = []
        if pays:
            parts.append(f"pays at {', '.join(pays)} threads")
        if not_:
            parts.append(f"not at {', '.join(not_)} threads")
        if unk:
            parts.append(f"unjudged at {', '.join(unk)} threads (median not stable)")
        out[name] = {
            "vs_fp32": ratios,
            "batch": b,
            "verdict": f"{prec} vs {backend} fp32 at batch {b}: " + "; ".join(parts),
        }
    return out


def time_grid(
    open_runner: Callable[[str, int], Any],
    variants: dict[str, dict[str, Any]],
    grid: Iterable[int],
    batch_sizes: Iterable[int],
    feeds_fn: Callable[[int], dict[str, np.ndarray]],
    rule: StopRule,
) -> list[GridPoint]:
    """Per-call medians of every variant at every thread count, interleaved per batch size.

    variants: name -> {"backend", "precision", "passed"}; open_runner(name, threads) -> an
    activated runner with that many intra-op threads (closed here when done)."""
    grid = list(grid)
    runners = {(n, t): open_runner(n, t) for n in variants for t in grid}
    points: list[GridPoint] = []
    try:
        for b in batch_sizes:
            feeds = feeds_fn(b)
            fns = {
                f"{n} @{t}": (lambda r=r, f=feeds: r.infer(f, check=False)) for (n, t), r in runners.items()
            }
            run = time_until_stable(fns, rule)
            for (n, t), _ in runners.items():
                tm = run.timings[f"{n} @{t}"]
                meta = variants[n]
                points.append(
                    GridPoint(
                        variant=n,
                        backend=meta["backend"],
                        precision=meta["precision"],
                        threads=t,
                        batch=b,
                        median_ms=tm.median_ms,
                        stable=bool(tm.stable),
                        n=len(tm.samples_ms),
                        passed=bool(meta.get("passed", True)),
                    )
                )
            log.info("threads grid b=%d: %d rounds in %.1f s", b, run.rounds, run.seconds)
    finally:
        for r in runners.values():
            r.deactivate()
    return points


def summary(points: list[GridPoint], cores: int, grid: Iterable[int]) -> dict[str, Any]:
    """What report.json / bench.json record: the grid, every point, the verdicts, the pick."""
    return {
        "grid": list(grid),
        "cores": cores,
        "pays_threshold": PAYS,
        "points": [p.to_dict(cores) for p in points],
        "verdicts": precision_verdicts(points),
        "recommendation": recommend(points, cores),
    }


def table_rows(s: dict[str, Any]) -> list[tuple[str, ...]]:
    """Terminal rows: variant, threads, batch, ms, images/s, images/s/core, serving, vs fp32."""
    ratio = {
        (name, int(t), int(b)): x
        for name, v in s["verdicts"].items()
        for t, r in v["vs_fp32"].items()
        for b, x in r.items()
    }
    rows = [("variant", "threads", "batch", "ms/call", "img/s", "img/s/core", "served img/s", "vs fp32")]
    for p in sorted(s["points"], key=lambda p: (p["batch"], p["variant"], p["threads"])):
        x = ratio.get((p["variant"], p["threads"], p["batch"]))
        rows.append(
            (
                p["variant"],
                str(p["threads"]),
                str(p["batch"]),
                f"{p['median_ms']:.2f}" + ("" if p["stable"] else " ~"),
                f"{p['images_per_s']:.1f}",
                f"{p['images_per_s_per_core']:.1f}",
                f"{p['serving_images_per_s']:.1f} ({p['replicas']}x)",
                "-" if p["precision"] == "fp32" else (f"{x:.2f}x" if x else "n/a"),
            )
        )
    return rows
