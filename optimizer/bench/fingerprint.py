"""Hardware fingerprint: CPU model, cores, ISA flags, GPU and library versions.

Numbers from two machines are only comparable with this next to them: a Zen 4 with AVX-512 VNNI
runs INT8 very differently from a Zen 2 without it, TensorRT plans are tied to a compute capability.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any

from optimizer.versions import library_versions

# ISA flags that decide which int8/fp16/bf16 kernels ORT and torch can use on x86.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
)
LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx", "diffusers", "numpy")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass  # not Linux: model from platform, no flags
    return model, flags


def _gpus() -> list[dict[str, Any]]:
    """Visible CUDA devices via torch (when imported/installed) and the driver via nvidia-smi."""
    gpus: list[dict[str, Any]] = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append(
                    {
                        "name": p.name,
                        "compute_capability": f"{p.major}.{p.minor}",
                        "memory_mb": round(p.total_memory / 2**20),
                        "cuda": torch.version.cuda,
                    }
                )
    except ImportError:
        pass
    if gpus and shutil.which("nvidia-smi"):
        try:
            drv = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.split()
            for g, d in zip(gpus, drv, strict=False):
                g["driver"] = d
        except (OSError, subprocess.SubprocessError):
            pass
    return gpus


def fingerprint(threads: int | None = None) -> dict[str, Any]:
    model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": {
            "model": model,
            "arch": platform.machine(),
            "logical_cores": os.cpu_count(),
            "usable_cores": usable,
            "threads_used": threads,
            "isa": {f: f in flags for f in ISA_FLAGS},
        },
        "gpus": _gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": library_versions(LIBRARIES),
    }


def target_name(fp: dict[str, Any], device: str) -> str:
    """Default column name for merge tables, e.g. 'AMD EPYC x2t' or 'NVIDIA H100 80GB HBM3'."""
    if device.startswith("cuda") and fp["gpus"]:
        return fp["gpus"][0]["name"]
    threads = fp["cpu"]["threads_used"] or fp["cpu"]["usable_cores"]
    return f"{fp['cpu']['model']} x{threads}t"
