"""OpenVINO runner (CPU): the same validated ONNX graphs, compiled once per batch size.

OpenVINO reads our fp32, fp16 and Q/DQ int8 ONNX graphs as they are. It runs them fastest with
static shapes (measured on the demo UNet, b16, 1 thread: dynamic shapes 0.55x ONNX Runtime fp32,
static 1.06x), so the runner compiles one model per batch size it is told about, reshaped from
the IO spec, and falls back to one dynamic-shape compile for any other batch. `precision="bf16"`
sets INFERENCE_PRECISION_HINT to bf16 (AVX512-BF16 / AMX CPUs only: refused elsewhere);
`cache_dir` is OpenVINO's CACHE_DIR (compiled blobs reused across sessions).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.errors import BackendUnavailable, InputError
from engines.iospec import IOSpec

PRECISION_HINTS = ("f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


def import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable("openvino is not installed: pip install 'dd-compile[openvino]'") from None
    return ov


def cpu_capabilities() -> set[str]:
    """OpenVINO's CPU OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8, FP16)."""
    ov = import_openvino()
    return {str(c).upper() for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def check_precision_hint(hint: str) -> None:
    if hint not in PRECISION_HINTS:
        raise InputError(f"openvino precision hint {hint!r}: choose from {', '.join(PRECISION_HINTS)}")
    if hint == "bf16" and "BF16" not in cpu_capabilities():
        raise BackendUnavailable(
            "bf16 needs a CPU with AVX512-BF16 or AMX; this CPU's OpenVINO capabilities are "
            f"{sorted(cpu_capabilities())}"
        )


class OpenVINORunner(Runner):
    backend = "openvino"

    def __init__(
        self,
        model_path: str | Path,
        spec: IOSpec,
        *,
        batch_sizes: Iterable[int] = (),
        precision_hint: str = "f32",
        performance_hint: str = "LATENCY",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        name: str | None = None,
    ):
        super().__init__(spec, name=name or f"openvino:{Path(model_path).name}:{precision_hint}")
        if performance_hint not in PERFORMANCE_HINTS:
            raise InputError(
                f"openvino performance hint {performance_hint!r}: choose from {', '.join(PERFORMANCE_HINTS)}"
            )
        if precision_hint not in PRECISION_HINTS:
            raise InputError(
                f"openvino precision hint {precision_hint!r}: choose from {', '.join(PRECISION_HINTS)}"
            )
        self.model_path = Path(model_path)
        self.batch_sizes = sorted({int(b) for b in batch_sizes})
        self.precision_hint, self.performance_hint = precision_hint, performance_hint
        self.threads, self.cache_dir = threads, cache_dir
        self._static: dict[int, Any] = {}  # batch -> (output names, infer request)
        self._dynamic: Any = None
        self._core: Any = None

    def config(self) -> dict[str, str]:
        cfg = {
            "INFERENCE_PRECISION_HINT": self.precision_hint,
            "PERFORMANCE_HINT": self.performance_hint,
        }
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = str(self.threads)
        if self.cache_dir is not None:
            cfg["CACHE_DIR"] = str(self.cache_dir)
        return cfg

    def _static_shapes(self, batch: int) -> dict[str, list[int]]:
        sizes = {k: r.opt for k, r in self.spec.dims.items()}
        sizes["batch"] = batch
        return {t.name: list(t.concrete(sizes)) for t in self.spec.inputs}

    def _compile(self, batch: int | None) -> tuple[Any, Any]:
        model = self._core.read_model(str(self.model_path))
        if batch is not None:
            model.reshape(self._static_shapes(batch))
        # the graph's output names, read before compiling: OpenVINO may rename a tensor it
        # folds (an output fed by an Identity takes its producer's name)
        names = [o.get_any_name() for o in model.outputs]
        compiled = self._core.compile_model(model, "CPU", self.config())
        return names, compiled.create_infer_request()

    def activate_impl(self) -> None:
        ov = import_openvino()
        check_precision_hint(self.precision_hint)
        if self.cache_dir is not None:
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
        self._core = ov.Core()
        for b in self.batch_sizes:
            self._static[b] = self._compile(b)

    def _request(self, batch: int) -> tuple[Any, Any]:
        if batch in self._static:
            return self._static[batch]
        if self._dynamic is None:  # a batch nobody asked to specialise for: one dynamic compile
            self._dynamic = self._compile(None)
        return self._dynamic

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = int(next(iter(feeds.values())).shape[0])
        names, request = self._request(batch)
        request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        # copies: the request's output buffers are reused by the next call
        return {n: np.array(request.get_output_tensor(i).data) for i, n in enumerate(names)}

    def deactivate_impl(self) -> None:
        self._static, self._dynamic, self._core = {}, None, None
