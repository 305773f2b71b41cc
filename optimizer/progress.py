"""Stage lines for people: "[3/8] validate (41 s in; quantize took 12 s)", one per stage of a run.

Both flows announce their stages through one `Stages`; it also holds the test hook
`DD_COMPILE_FAULT_AT=<stage>`, which kills the process with SIGKILL as it enters that stage, so tests
check that a run killed anywhere leaves the previous publication intact.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence

log = logging.getLogger("dd-compile")
FAULT_ENV = "DD_COMPILE_FAULT_AT"


class Stages:
    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.t0 = time.perf_counter()
        self.current: tuple[str, float] | None = None
        self.took: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        done = ""
        if self.current is not None:
            prev, since = self.current
            self.took[prev] = now - since
            done = f"; {prev} took {now - since:.0f} s"
        i = self.names.index(name) + 1 if name in self.names else len(self.took) + 1
        log.info("[%d/%d] %s (%.0f s in%s)", i, len(self.names), name, now - self.t0, done)
        self.current = (name, now)
        fault_at(name)


def fault_at(name: str) -> None:
    """The test hook (module docstring): SIGKILL when DD_COMPILE_FAULT_AT names this point."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
