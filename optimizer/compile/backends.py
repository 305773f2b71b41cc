"""Is a backend usable here? Asked once, before any work, for every family and entry point."""

from __future__ import annotations


def require(backend: str) -> None:
    """Return when `backend` is installed with the device it needs; else BackendUnavailable naming
    what is missing (the package and its extra, cuda-python, polygraphy or a CUDA device)."""
    if backend == "tensorrt":
        from optimizer.compile.build import check_tensorrt_available

        check_tensorrt_available()
    elif backend == "openvino":
        from engines.openvino_runner import import_openvino

        import_openvino()
    else:
        from engines.onnxruntime_runner import check_providers

        check_providers(backend)
