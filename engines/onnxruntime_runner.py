"""ONNX Runtime runner: CPU everywhere; CUDA / TensorRT execution providers where installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.errors import BackendUnavailable
from engines.iospec import IOSpec
from engines.lora import graph_zero_feeds

PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _shapes_arg(shapes: dict[str, tuple[int, ...]]) -> str:
    """ORT's profile-shape syntax: "sample:1x4x32x32,timestep:1"."""
    return ",".join(f"{n}:{'x'.join(str(d) for d in s)}" for n, s in shapes.items())


def default_provider_options(
    backend: str, spec: IOSpec | None = None, cache_dir: str | Path | None = None, device_id: int = 0
) -> dict[str, dict[str, Any]]:
    """Provider options per execution provider (ORT docs: TensorRT-ExecutionProvider, CUDA EP).

    TensorRT EP: engine and timing caches in `cache_dir` (reused across sessions, keyed by ORT on
    the graph, GPU and TensorRT version); no fp16/int8 flags, since precision lives in the graph
    (FP16 types, Q/DQ); explicit min/opt/max profile shapes from the IO spec so one engine covers
    every batch size instead of a rebuild per new shape.
    """
    opts: dict[str, dict[str, Any]] = {}
    if backend in ("onnxruntime-cuda", "onnxruntime-trt"):
        opts["CUDAExecutionProvider"] = {"device_id": device_id}
    if backend == "onnxruntime-trt":
        trt: dict[str, Any] = {
            "device_id": device_id,
            "trt_fp16_enable": False,
            "trt_int8_enable": False,
            "trt_builder_optimization_level": 3,
        }
        if cache_dir is not None:  # created at activation
            trt.update(
                {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache_dir),
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(cache_dir),
                }
            )
        if spec is not None and spec.dims:
            trt.update(
                {
                    "trt_profile_min_shapes": _shapes_arg(spec.profile("min")),
                    "trt_profile_opt_shapes": _shapes_arg(spec.profile("opt")),
                    "trt_profile_max_shapes": _shapes_arg(spec.profile("max")),
                }
            )
        opts["TensorrtExecutionProvider"] = trt
    return opts


def import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed: pip install 'dd-compile[runtime]'") from None
    return ort


def check_providers(backend: str) -> set[str]:
    """onnxruntime's available providers; BackendUnavailable when `backend`'s first one is missing."""
    wanted = PROVIDERS[backend][0]
    have = set(import_ort().get_available_providers())
    if wanted not in have:
        extra = "gpu" if "CUDA" in wanted or "Tensorrt" in wanted else "runtime"
        raise BackendUnavailable(
            f"{backend}: onnxruntime has no {wanted} here (available: {sorted(have)}); "
            f"install dd-compile[{extra}] on a machine with a CUDA device"
        )
    return have


def session_options(threads: int | None = None) -> Any:
    ort = import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    # Busy-waiting threads starve other processes on shared machines (seen: 30x slowdowns).
    so.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("DD_ORT_SPINNING", "0"))
    return so


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        spec: IOSpec,
        *,
        backend: str = "onnxruntime",
        threads: int | None = None,
        provider_options: dict[str, dict[str, Any]] | None = None,
        cache_dir: str | Path | None = None,
        name: str | None = None,
    ):
        super().__init__(spec, name=name or f"{backend}:{Path(model_path).name}")
        if backend not in PROVIDERS:
            raise ValueError(f"unknown onnxruntime backend {backend!r}; choose from {list(PROVIDERS)}")
        self.model_path, self.backend, self.threads = Path(model_path), backend, threads
        # TensorRT EP caches default to a folder beside the model (the output folder's onnx/).
        if cache_dir is None and backend == "onnxruntime-trt":
            cache_dir = self.model_path.parent / "trt_ep_cache"
        self.provider_options = provider_options or default_provider_options(backend, spec, cache_dir)
        self.session: Any = None

    def activate_impl(self) -> None:
        ort = import_ort()
        wanted = PROVIDERS[self.backend]
        have = check_providers(self.backend)
        providers = [(p, self.provider_options.get(p, {})) for p in wanted if p in have]
        for opts in self.provider_options.values():
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                if opts.get(key):
                    Path(opts[key]).mkdir(parents=True, exist_ok=True)
        self.session = ort.InferenceSession(
            str(self.model_path), session_options(self.threads), providers=providers
        )
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.lora_defaults = graph_zero_feeds(
            (i.name, i.shape, types.get(i.type, np.float32)) for i in self.session.get_inputs()
        )

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def deactivate_impl(self) -> None:
        self.session = None
