"""The runner interface every backend implements (after polygraphy's BaseRunner).

`infer()` checks the feed against the IO spec once, here; backends write `infer_impl` only.
Runners are context managers: `activate` loads sessions/engines, `deactivate` frees them.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from engines.iospec import IOSpec, TensorSpec


class Runner(abc.ABC):
    backend: str = "base"

    def __init__(self, spec: IOSpec, *, name: str | None = None):
        self.spec = spec
        self.name = name or self.backend
        self.is_active = False
        # a graph's LoRA inputs (engines/lora.py): zeros a backend sets at activation where the
        # caller feeds none (no adapter), and the adapters' feeds, given with every call
        self.lora_defaults: dict[str, np.ndarray] = {}
        self.extra_feeds: dict[str, np.ndarray] = {}

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.spec.inputs

    def infer(self, feeds: dict[str, np.ndarray], *, check: bool = True) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate the runner (use it as a context manager)")
        if check:
            self.spec.check_feeds(feeds)
        if self.lora_defaults or self.extra_feeds:
            feeds = {**self.lora_defaults, **feeds, **self.extra_feeds}
        return self.infer_impl(feeds)

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def deactivate_impl(self) -> None:  # noqa: B027 (optional hook: most backends free nothing)
        pass
