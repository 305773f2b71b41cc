"""Process-wide state a compile run changes (torch threads, torch's global seed), set and restored
in one place, so a run called from Python leaves its caller's process as it found it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def process_state(threads: int | None, seed: int) -> Iterator[None]:
    import torch

    threads_before, rng_before = torch.get_num_threads(), torch.random.get_rng_state()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.random.set_rng_state(rng_before)
