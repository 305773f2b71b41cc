"""CUDA runtime helpers for the TensorRT backend, through cuda-python (`cuda.bindings.runtime`).

No torch: the runtime must run where only tensorrt + cuda-python are installed. Every cudart call
returns `(cudaError_t, *values)`; `call()` turns a failure into one readable line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from engines.errors import BackendUnavailable

TRT_EXTRA = "pip install --extra-index-url https://pypi.nvidia.com 'dd-compile[tensorrt]'"


def import_cudart() -> Any:
    """cuda-python's runtime module (cuda.bindings.runtime since 12.6; cuda.cudart before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise BackendUnavailable(
                f"cuda-python is not installed (the TensorRT backend needs it): {TRT_EXTRA}"
            ) from None
    return cudart


def import_tensorrt() -> Any:
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable(f"TensorRT is not installed: {TRT_EXTRA} on a machine with an NVIDIA GPU")
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # wheel present but its libraries (libnvinfer) are not
        raise BackendUnavailable(
            f"TensorRT is installed but cannot be imported ({e}); reinstall it: {TRT_EXTRA}"
        ) from None
    return trt


def call(ret: Any, what: str) -> Any:
    """Check a cudart return tuple; give back its value (or values, or None)."""
    cudart = import_cudart()
    err = ret[0] if isinstance(ret, tuple) else ret
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise RuntimeError(f"CUDA error in {what}: {name}")
    if not isinstance(ret, tuple) or len(ret) == 1:
        return None
    return ret[1] if len(ret) == 2 else ret[1:]


def device_count() -> tuple[int, str]:
    """(number of CUDA devices, cudart's reason when 0): no driver, no device, ..."""
    cudart = import_cudart()
    err, n = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        return 0, name.decode() if isinstance(name, bytes) else str(name)
    return int(n), "" if n else "cudaGetDeviceCount returned 0"


def check_cuda_device() -> None:
    """Raise BackendUnavailable with one line unless cuda-python sees at least one CUDA device."""
    n, why = device_count()
    if n == 0:
        raise BackendUnavailable(
            f"no CUDA device is visible ({why}); TensorRT needs an NVIDIA GPU "
            "and driver (use --backend onnxruntime on this machine)"
        )


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"  # cudart encodes 12.8 as 12080


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "9.0"
    total_bytes: int
    free_bytes: int
    cuda_runtime: str  # "12.8"
    cuda_driver: str  # highest CUDA version the driver supports

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


def device_info(device: int = 0) -> DeviceInfo:
    cudart = import_cudart()
    call(cudart.cudaSetDevice(device), "cudaSetDevice")
    prop = call(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    free, total = call(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(
        name=name.strip("\x00").strip(),
        compute_capability=f"{prop.major}.{prop.minor}",
        total_bytes=int(total),
        free_bytes=int(free),
        cuda_runtime=_version(call(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
        cuda_driver=_version(call(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")),
    )


class CudaEventTimer:
    """GPU time between two events recorded on a stream (excludes Python and launch overhead)."""

    def __init__(self) -> None:
        cudart = import_cudart()
        self._cudart = cudart
        self.start = call(cudart.cudaEventCreate(), "cudaEventCreate")
        self.end = call(cudart.cudaEventCreate(), "cudaEventCreate")

    def record_start(self, stream: Any) -> None:
        call(self._cudart.cudaEventRecord(self.start, stream), "cudaEventRecord")

    def record_end(self, stream: Any) -> None:
        call(self._cudart.cudaEventRecord(self.end, stream), "cudaEventRecord")

    def elapsed_ms(self) -> float:
        call(self._cudart.cudaEventSynchronize(self.end), "cudaEventSynchronize")
        return float(call(self._cudart.cudaEventElapsedTime(self.start, self.end), "cudaEventElapsedTime"))

    def free(self) -> None:
        for ev in (self.start, self.end):
            self._cudart.cudaEventDestroy(ev)
