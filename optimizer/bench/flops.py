"""FLOPs per model call (counted once per model) and this machine's matmul peak (measured in the
same run), so each variant reports achieved FLOP/s as a fraction of what the hardware can do.

FlopCounterMode counts matmul-like ops only (mm/bmm/addmm, convolutions, scaled-dot-product
attention) at 2 FLOPs per multiply-add; norms, activations and elementwise ops are not counted.
For a UNet these are >95% of the arithmetic, so the fraction is a slight underestimate.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def count_flops(module: Any, feeds: dict[str, np.ndarray]) -> int:
    """FLOPs of one forward of `module(**feeds)` on CPU in fp32, per image (feeds have batch 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    args = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    module = module.to("cpu", torch.float32).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(**args)
    batch = next(iter(feeds.values())).shape[0]
    return int(counter.get_total_flops() // batch)


def matmul_peak_gflops(
    device: str = "cpu", dtype: str = "float32", seconds: float = 1.5, n: int | None = None
) -> float:
    """Best achieved GFLOP/s of a square matmul (2 n^3 FLOPs), repeated for `seconds`.

    The best, not the median: a peak. Threads follow torch.get_num_threads() (set by the caller to
    what the variants use). On CUDA the timing uses events around each product.
    """
    import torch

    dt = getattr(torch, dtype)
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    flops = 2.0 * n**3
    best = 0.0
    cuda = device.startswith("cuda")
    with torch.inference_mode():
        torch.mm(a, b)  # warm-up: kernel selection, thread pool start
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                torch.mm(a, b)
                e1.record()
                e1.synchronize()
                dt_s = e0.elapsed_time(e1) / 1e3
            else:
                t0 = time.perf_counter()
                torch.mm(a, b)
                dt_s = time.perf_counter() - t0
            best = max(best, flops / dt_s / 1e9)
    log.info("matmul peak %s %s (n=%d): %.1f GFLOP/s", device, dtype, n, best)
    return best
