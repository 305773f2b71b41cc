"""Process-wide state a compile run changes (torch threads, torch's global seed, the working
directory around ORT's quantizer, Polygraphy's log level), set and restored in one place, so a run
called from Python leaves its caller's process as it found it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def working_dir(d: Path) -> Iterator[None]:
    """ORT's quantization tools write temp files into the cwd: run them somewhere disposable."""
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def polygraphy_quiet() -> Iterator[None]:
    """Polygraphy's comparator logs every output it checks; that is our report's job."""
    from polygraphy.logger import G_LOGGER

    before = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.module_severity = before
