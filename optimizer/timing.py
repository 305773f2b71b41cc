"""The one timing loop dd-compile and dd-bench share: warm-up, then interleaved rounds (A B A B) so
drift hits every variant alike, until every median is stable or the time budget ends.

Stable (one definition everywhere): at least `min_samples` samples, and the median of the last half
of them within `rel_tol` of the median of all of them: a median still drifting (a machine warming
up, a neighbour's load starting) shows as a gap between the two. A speedup is only stated between
two stable timings (`comparable`).

CPU: perf_counter around whole calls; CUDA: `sync` after each call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StopRule:
    """When an interleaved measurement ends."""

    warmup: int = 2  # untimed calls per variant before the first round
    min_rounds: int = 3  # always run, even past the budget
    max_rounds: int = 200
    min_samples: int = 5  # fewer samples never count as stable
    rel_tol: float = 0.05  # stable: median of the last half within rel_tol of the whole median
    max_seconds: float = 30.0  # budget; checked at round boundaries once min_rounds are done
    # per round a variant repeats its call for at least this long (>= 1 call): cheap variants
    # collect many samples (a meaningful p99) while heavy ones still alternate with them
    slice_s: float = 0.0
    until_stable: bool = True  # False: run max_rounds (or until the budget ends)


def is_stable(samples_ms: list[float], min_samples: int, rel_tol: float) -> bool:
    n = len(samples_ms)
    if n < max(min_samples, 2):
        return False
    whole = statistics.median(samples_ms)
    last_half = statistics.median(samples_ms[(n + 1) // 2 :])  # strictly the later half
    return abs(last_half - whole) <= rel_tol * whole


@dataclass
class Timing:
    name: str
    samples_ms: list[float] = field(default_factory=list)
    stable: bool | None = None  # set by the loop (None: not judged)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile_ms(self, q: float) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the measurement was."""
        return (self.quantile_ms(0.9) - self.quantile_ms(0.1)) / max(self.median_ms, 1e-9)

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.quantile_ms(0.1),
            "p50_ms": self.quantile_ms(0.5),
            "p90_ms": self.quantile_ms(0.9),
            "p99_ms": self.quantile_ms(0.99),
            "n": len(self.samples_ms),
            "spread": self.spread,
            "stable": self.stable,
        }


@dataclass
class TimingRun:
    timings: dict[str, Timing]
    rounds: int
    seconds: float

    @property
    def stable(self) -> dict[str, bool]:
        return {k: bool(t.stable) for k, t in self.timings.items()}


def time_until_stable(
    fns: dict[str, Callable[[], object]],
    rule: StopRule,
    *,
    sync: Callable[[], None] | None = None,
    on_round: Callable[[TimingRun], None] | None = None,
) -> TimingRun:
    """Warm up each callable, then time them in interleaved rounds until `rule` says stop."""
    for fn in fns.values():
        for _ in range(rule.warmup):
            fn()
    if sync:
        sync()
    run = TimingRun({k: Timing(k) for k in fns}, 0, 0.0)
    start = time.perf_counter()
    while run.rounds < rule.max_rounds:
        for k, fn in fns.items():
            t_slice = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                if sync:
                    sync()
                t1 = time.perf_counter()
                run.timings[k].samples_ms.append((t1 - t0) * 1e3)
                if t1 - t_slice >= rule.slice_s:
                    break
        run.rounds += 1
        for t in run.timings.values():
            t.stable = is_stable(t.samples_ms, rule.min_samples, rule.rel_tol)
        run.seconds = time.perf_counter() - start
        if on_round:
            on_round(run)
        if run.rounds >= rule.min_rounds and (
            run.seconds >= rule.max_seconds or (rule.until_stable and all(run.stable.values()))
        ):
            break
    return run


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 30.0,
    min_repeats: int = 3,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """A fixed count: `repeats` interleaved rounds, fewer (not under `min_repeats`) once
    `max_seconds` is spent. The same loop; for callers that compare candidates, not report."""
    rule = StopRule(
        warmup=warmup,
        min_rounds=min_repeats,
        max_rounds=repeats,
        max_seconds=max_seconds,
        until_stable=False,
    )
    return time_until_stable(fns, rule, sync=sync).timings


def comparable(base: dict | None, other: dict | None, min_samples: int) -> str | None:
    """Why a speedup between two timing dicts (`Timing.to_dict()`-like) must not be stated, or None.

    Both need `min_samples` samples and a stable median; a rough ratio is not printed as a result."""
    for who, t in (("the teacher", base), ("this variant", other)):
        if t is None or not t.get("median_ms", t.get("p50_ms")):
            return f"no timing of {who}"
        if (t.get("n") or 0) < min_samples:
            return f"{who}: {t.get('n') or 0} repeats (< {min_samples})"
        if not t.get("stable"):
            return f"{who}: median not stable when the time budget ended ({t.get('n')} repeats)"
    return None
