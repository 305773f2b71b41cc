"""What a TensorRT engine was built for, and whether it can run here.

An engine runs only on the TensorRT version and GPU it was built for unless it was built
version-compatible (newer TensorRT of the same major, or 10 -> 11) or hardware-compatible
(`ampere_plus`: any sm >= 8.0; `same_compute_capability`). `check_engine_compatible` compares the
manifest's record with the running TensorRT/GPU before deserializing and refuses with the reason.
Pure python apart from `running_target`: tested without TensorRT.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from engines.cuda_utils import check_cuda_device, device_info, import_tensorrt
from engines.errors import IntegrityError
from engines.manifest import Artifact

log = logging.getLogger(__name__)

HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")
# Version-compatible engines also run across these major versions (TensorRT support matrix).
CROSS_MAJOR_OK = {(8, 10), (10, 11)}


@dataclass(frozen=True)
class TrtTarget:
    """What an engine was built for, or what is running now."""

    tensorrt: str  # "11.4.0.106"
    gpu: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    cuda: str  # CUDA runtime version, "12.8"
    hardware_compatibility_level: str = "none"
    version_compatible: bool = False

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    @property
    def key(self) -> str:
        """File-name key: the hardware scope and TensorRT major.minor, e.g. "sm90-trt11.4"."""
        hw = "ampere_plus" if self.hardware_compatibility_level == "ampere_plus" else self.sm
        major_minor = ".".join(self.tensorrt.split(".")[:2])
        return f"{hw}-trt{major_minor}" + ("-vc" if self.version_compatible else "")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sm": self.sm, "key": self.key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrtTarget:
        fields = (
            "tensorrt",
            "gpu",
            "compute_capability",
            "cuda",
            "hardware_compatibility_level",
            "version_compatible",
        )
        missing = [k for k in fields[:4] if k not in d]
        if missing:
            raise IntegrityError(f"engine record lacks {missing} (rebuild the engine)")
        return cls(**{k: d[k] for k in fields if k in d})


def _ver(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _cc(v: str) -> tuple[int, int]:
    major, _, minor = v.partition(".")
    return int(major), int(minor or 0)


def compatibility_problem(built: TrtTarget, running: TrtTarget) -> str | None:
    """Why an engine built for `built` cannot run on `running`, or None when it can."""
    b, r = _ver(built.tensorrt), _ver(running.tensorrt)
    if built.version_compatible:
        if r < b:
            return (
                f"engine was built with TensorRT {built.tensorrt}, newer than the running "
                f"{running.tensorrt} (version-compatible engines run only on newer TensorRT)"
            )
        if r[0] != b[0] and (b[0], r[0]) not in CROSS_MAJOR_OK:
            return (
                f"engine was built with TensorRT {built.tensorrt}; a version-compatible engine "
                f"cannot run on TensorRT {running.tensorrt} (another major version)"
            )
    elif b != r:
        return (
            f"engine was built with TensorRT {built.tensorrt} but {running.tensorrt} is running; "
            "rebuild it here, or build with version_compatible=True"
        )
    level = built.hardware_compatibility_level
    if level not in HARDWARE_LEVELS:
        return f"unknown hardware compatibility level {level!r} in the engine record"
    if level == "ampere_plus":
        if _cc(running.compute_capability) < (8, 0):
            return (
                f"engine is ampere_plus but {running.gpu} is sm{running.sm[2:]} "
                "(ampere_plus engines need compute capability >= 8.0)"
            )
    elif _cc(built.compute_capability) != _cc(running.compute_capability):
        return (
            f"engine was built for {built.gpu} ({built.sm}) but this GPU is {running.gpu} "
            f"({running.sm}); rebuild it here, or build with hardware_compatibility_level="
            "'ampere_plus'"
        )
    return None


def running_target(device: int = 0) -> TrtTarget:
    """The TensorRT version and GPU of this process (needs tensorrt and a CUDA device)."""
    trt = import_tensorrt()
    check_cuda_device()
    dev = device_info(device)
    return TrtTarget(
        tensorrt=trt.__version__,
        gpu=dev.name,
        compute_capability=dev.compute_capability,
        cuda=dev.cuda_runtime,
    )


def check_engine_compatible(artifact: Artifact, running: TrtTarget | None = None) -> None:
    """Refuse (IntegrityError, one line) an engine that cannot run on this TensorRT/GPU."""
    if artifact.kind != "engine" or not artifact.target:
        raise IntegrityError(f"artifact {artifact.name!r} is not a TensorRT engine record with a target")
    built = TrtTarget.from_dict(artifact.target)
    running = running or running_target()
    problem = compatibility_problem(built, running)
    if problem:
        raise IntegrityError(f"{artifact.path}: {problem}")
    if built.hardware_compatibility_level == "none" and built.gpu != running.gpu:
        # Same compute capability, other GPU model: it runs, but tactics were timed elsewhere.
        log.warning(
            "%s was built on %s and runs on %s: it works, but rebuild for best speed",
            artifact.path,
            built.gpu,
            running.gpu,
        )
