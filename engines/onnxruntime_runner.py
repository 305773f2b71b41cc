"""ONNX Runtime runner: CPU everywhere; CUDA / TensorRT execution providers where installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.errors import BackendUnavailable
from engines.iospec import IOSpec

PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed: pip install 'dd-compile[runtime]'") from None
    return ort


def session_options(threads: int | None = None) -> Any:
    ort = import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    # Busy-waiting threads starve other processes on shared machines (seen: 30x slowdowns).
    so.add_session_config_entry("session.intra_op.allow_spinning",
                                os.environ.get("DD_ORT_SPINNING", "0"))
    return so


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model_path: str | Path, spec: IOSpec, *, backend: str = "onnxruntime",
                 threads: int | None = None, provider_options: dict[str, dict[str, Any]] | None = None,
                 name: str | None = None):
        super().__init__(spec, name=name or f"{backend}:{Path(model_path).name}")
        if backend not in PROVIDERS:
            raise ValueError(f"unknown onnxruntime backend {backend!r}; choose from {list(PROVIDERS)}")
        self.model_path, self.backend, self.threads = Path(model_path), backend, threads
        self.provider_options = provider_options or {}
        self.session: Any = None

    def activate_impl(self) -> None:
        ort = import_ort()
        wanted = PROVIDERS[self.backend]
        have = set(ort.get_available_providers())
        if wanted[0] not in have:
            extra = "gpu" if "CUDA" in wanted[0] or "Tensorrt" in wanted[0] else "runtime"
            raise BackendUnavailable(
                f"{self.backend}: onnxruntime has no {wanted[0]} here (available: {sorted(have)}); "
                f"install dd-compile[{extra}] on a machine with a CUDA device")
        providers = [(p, self.provider_options.get(p, {})) for p in wanted if p in have]
        self.session = ort.InferenceSession(str(self.model_path), session_options(self.threads),
                                            providers=providers)

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))

    def deactivate_impl(self) -> None:
        self.session = None
