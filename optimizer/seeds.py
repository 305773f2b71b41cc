"""Which seeds each compile stage draws from (one place, so they stay disjoint).

Calibration, call-level validation and the INT8 search each draw from their own range, so the
inputs a graph was tuned on are never the ones the report judges it by. The report's samples
(sample parity, FID) are seeds base .. base + n.
"""

from __future__ import annotations

from dataclasses import dataclass

CALIBRATE_OFFSET = 10_000
VALIDATE_OFFSET = 20_000
INT8_CHECK_OFFSET = 30_000


def fit_count(n: int, lo: int, hi: int) -> int:
    """The fewest seeds >= n that split into batches of `hi` with every batch in [lo, hi].

    Trajectories are recorded batch by batch and their feeds must lie in the exported batch
    range (`--batch-sizes 16` alone exports [16, 16]: 8 calibration seeds would be one batch of 8).
    """
    n = max(n, lo)
    rest = n % hi
    return n if rest == 0 or rest >= lo else n + (lo - rest)


@dataclass(frozen=True)
class SeedPlan:
    base: int = 0  # --seed
    calibrate: int = 8  # trajectories captured for calibration
    validate: int = 4  # trajectories whose feeds the call-level parity replays
    int8_check: int = 16  # samples the INT8 search scores candidate graphs on
    batch_range: tuple[int, int] = (1, 16)  # the exported batch axis [min, max]

    def _range(self, offset: int, n: int) -> list[int]:
        n = fit_count(n, *self.batch_range)
        return list(range(offset + self.base, offset + self.base + n))

    def calibration(self) -> list[int]:
        return self._range(CALIBRATE_OFFSET, self.calibrate)

    def validation(self) -> list[int]:
        return self._range(VALIDATE_OFFSET, self.validate)

    def int8_samples(self) -> list[int]:
        return self._range(INT8_CHECK_OFFSET, self.int8_check)

    def samples(self, n: int) -> list[int]:
        """The report's samples; the first n of a longer list are the same noise (drawn per seed)."""
        return list(range(self.base, self.base + n))
