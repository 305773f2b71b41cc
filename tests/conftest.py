"""Shared fixtures; gpu/tensorrt tests skip with the reason where CUDA or TensorRT is absent."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere

import importlib.util

import pytest


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    has_cuda = _cuda_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none visible to torch)"))
        if "tensorrt" in item.keywords:
            if not has_trt:
                item.add_marker(pytest.mark.skip(
                    reason="needs TensorRT: pip install --extra-index-url https://pypi.nvidia.com "
                           "'dd-compile[tensorrt]' on a machine with an NVIDIA GPU"))
            elif not has_cuda:
                item.add_marker(pytest.mark.skip(reason="TensorRT is installed but no CUDA device is visible"))
