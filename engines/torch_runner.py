"""Torch runner: the PyTorch student (or teacher) behind the same interface, for reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.base import Runner
from engines.errors import BackendUnavailable
from engines.iospec import IOSpec


class TorchRunner(Runner):
    backend = "torch"

    def __init__(
        self,
        module: Any,
        spec: IOSpec,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        name: str | None = None,
    ):
        super().__init__(spec, name=name or "torch")
        self.module, self.device, self.dtype = module, device, dtype

    def activate_impl(self) -> None:
        try:
            import torch
        except ImportError:
            raise BackendUnavailable(
                "torch is not installed: pip install 'dd-compile[cpu]' torch==2.13.0"
            ) from None
        self._torch = torch
        self.module.to(self.device, getattr(torch, self.dtype)).eval()

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        dt = getattr(torch, self.dtype)
        args = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}
        args = {k: v.to(dt) if v.is_floating_point() else v for k, v in args.items()}
        with torch.inference_mode():
            out = self.module(**args)
        return {self.spec.outputs[0].name: out.float().cpu().numpy()}
