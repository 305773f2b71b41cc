"""Side-by-side timing: warm-up, interleaved repeats (A B A B) so drift hits every variant alike,
medians and spread. CPU: perf_counter around whole calls; CUDA: synchronize around them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timing:
    name: str
    samples_ms: list[float] = field(default_factory=list)

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
        }


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 30.0,
    min_repeats: int = 3,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time each callable `repeats` times, interleaved; stop early once `max_seconds` is spent
    (after `min_repeats` rounds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()
    out = {k: Timing(k) for k in fns}
    start = time.perf_counter()
    for i in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            out[k].samples_ms.append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    return out
