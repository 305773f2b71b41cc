"""Batches within the exported range, and what fits in memory before any work starts."""

from __future__ import annotations

import logging
import os

import numpy as np

from engines.errors import InputError
from engines.iospec import IOSpec

log = logging.getLogger(__name__)

# Live memory per sample as a multiple of the denoiser's inputs + outputs. A floor, not an
# estimate: the demo teacher (torch CPU, batch 2048) peaked at ~320x its IO per sample (165 kB vs
# 512 B), and ONNX Runtime's arena and the validation copies come on top. Under-estimating only
# lets through a request that may still run out of memory later; over-estimating would refuse a
# batch that fits, so the factor stays below what was measured.
ACTIVATION_FACTOR = 256


class BatchWindow:
    """A runner seen through the exported batch range [lo, hi]: a smaller batch is padded (its last
    row repeated, the padding's outputs dropped), a larger one split. Rows are independent in a
    denoiser (no batch statistics in eval mode), so the kept outputs are the unpadded ones."""

    def __init__(self, runner, lo: int, hi: int):
        self.runner, self.lo, self.hi = runner, lo, hi
        self.spec = runner.spec

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(feeds["sample"])
        if self.lo <= n <= self.hi:
            return self.runner.infer(feeds)
        if n > self.hi:
            parts = [
                self.infer({k: v[i : i + self.hi] for k, v in feeds.items()}) for i in range(0, n, self.hi)
            ]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        idx = np.concatenate([np.arange(n), np.full(self.lo - n, n - 1)])
        out = self.runner.infer({k: v[idx] for k, v in feeds.items()})
        return {k: v[:n] for k, v in out.items()}


def bytes_per_sample(spec: IOSpec) -> int:
    """Inputs + outputs of one denoiser call at batch 1, from the IO spec."""
    dims = {k: r.min for k, r in spec.dims.items()}
    dims["batch"] = 1
    return sum(
        int(np.prod(t.concrete(dims))) * np.dtype(t.dtype).itemsize for t in (*spec.inputs, *spec.outputs)
    )


def available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None  # not knowable here (e.g. Windows without psutil): no check


def check_batch_memory(spec: IOSpec, batch_sizes: tuple[int, ...], available: int | None = None) -> None:
    """Refuse, before any work, a batch size whose lower-bound memory exceeds what is available."""
    available = available_memory() if available is None else available
    if available is None:
        return
    per = bytes_per_sample(spec) * ACTIVATION_FACTOR
    b = max(batch_sizes)
    if b * per > available:
        fits = max(1, available // per)
        raise InputError(
            f"--batch-sizes {b}: needs at least {b * per / 1e9:.1f} GB ({per / 1e3:.0f} kB per sample, "
            f"{ACTIVATION_FACTOR}x its inputs+outputs), {available / 1e9:.1f} GB available; "
            f"batch sizes up to {fits} fit"
        )
