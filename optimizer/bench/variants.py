"""What dd-bench measures: the student engines listed in the manifest and the PyTorch teacher
baselines, each a `VariantSpec` (JSON-able, so a subprocess can rebuild it for the memory probe)
opened into a runner with the shared `engines` interface."""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from engines.base import Runner
from engines.errors import InputError
from engines.iospec import IOSpec
from engines.manifest import Manifest
from engines.schedule import SamplingSchedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantSpec:
    name: str  # unique row label, e.g. "onnxruntime/int8", "teacher/torch-compile/fp16"
    model: str  # "student" | "teacher"
    role: str  # "engine" (a compiled student) | "baseline" (PyTorch teacher)
    backend: str  # "onnxruntime", "onnxruntime-cuda", "tensorrt", "torch", "torch-compile"
    precision: str  # "fp32", "fp16", "int8"
    artifact: str | None = None  # manifest artifact name (engines only)
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def ort_has(provider: str) -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime as ort

    return provider in ort.get_available_providers()


class BenchContext:
    """The manifest, the teacher (loaded once, lazily) and the run's threads/device."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        teacher_path: str | Path | None,
        threads: int | None,
        device: str,
        batch_sizes: list[int],
    ):
        self.manifest, self.threads, self.device = manifest, threads, device
        self.batch_sizes = batch_sizes
        self.copy_teacher = True  # False in a one-variant process (memprobe): no second copy
        self.teacher_path = Path(teacher_path) if teacher_path else None
        if self.manifest.io_spec is None or self.manifest.schedule is None:
            raise InputError(f"{manifest.path}: manifest has no io_spec/schedule (not a dd-compile output)")
        if "sample_shape" not in manifest.meta:
            raise InputError(f"{manifest.path}: manifest meta lacks 'sample_shape'")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.meta["sample_shape"])

    @cached_property
    def teacher(self) -> Any:
        from optimizer.models import load_teacher

        return load_teacher(self.teacher_path)

    @cached_property
    def teacher_spec(self) -> IOSpec:
        from optimizer.model_io import io_spec_for

        t = self.teacher
        return io_spec_for(t.model_class, dict(t.model.config), self.batch_sizes)

    @property
    def reference_steps(self) -> int:
        return int(self.teacher.reference_steps)

    def spec(self, v: VariantSpec) -> IOSpec:
        if v.model == "teacher":
            return self.teacher_spec
        spec = self.manifest.io_spec
        if v.backend.startswith("onnxruntime"):
            # ONNX graphs are exported with a dynamic batch axis; the manifest's batch range is the
            # TensorRT profile, so widen it for ONNX Runtime to cover the requested batch sizes.
            r = spec.dims.get("batch")
            lo, hi = min(self.batch_sizes), max(self.batch_sizes)
            if r is not None:
                lo, hi = min(lo, r.min), max(hi, r.max)
            spec = spec.with_batch_range([lo, hi])
        return spec

    def schedule(self, v: VariantSpec) -> SamplingSchedule:
        if v.model == "teacher":
            return self.teacher.schedule(self.reference_steps)  # DDIM at its reference steps
        return self.manifest.schedule

    def batch_supported(self, v: VariantSpec, batch: int) -> str | None:
        """None if `v` can run `batch`, else why not (TensorRT engines: their profile range)."""
        r = self.spec(v).dims.get("batch")
        if r is not None and not (r.min <= batch <= r.max):
            return f"batch {batch} outside the engine's profile [{r.min}, {r.max}]"
        return None

    def open(self, v: VariantSpec, threads: int | None = None) -> Runner:
        """A new (inactive) runner for `v`; threads: a CPU session's intra-op threads (None: the run's)."""
        threads = threads or self.threads
        if v.model == "student":
            art = self.manifest.get(v.artifact or "")
            if art is None:
                raise InputError(f"{self.manifest.path}: no artifact {v.artifact!r}")
            if v.backend.startswith("onnxruntime"):
                from engines.onnxruntime_runner import OnnxRuntimeRunner

                return OnnxRuntimeRunner(
                    self.manifest.verify(art),
                    self.spec(v),
                    backend=v.backend,
                    threads=threads,
                    name=v.name,
                )
            from engines.runtime import make_runner

            if v.backend == "openvino":
                return make_runner(self.manifest, art, v.backend, threads=threads)
            return make_runner(self.manifest, art, v.backend)
        return self._torch_teacher(v)

    def _torch_teacher(self, v: VariantSpec) -> Runner:
        import torch

        from engines.torch_runner import TorchRunner
        from optimizer.models import Denoiser

        if self.threads:
            torch.set_num_threads(self.threads)
        # Each variant owns a copy: TorchRunner moves its module to its own device/dtype in place.
        model = copy.deepcopy(self.teacher.model) if self.copy_teacher else self.teacher.model
        module: Any = Denoiser(model).eval()
        dtype = {"fp32": "float32", "fp16": "float16"}[v.precision]
        if v.backend == "torch-compile":
            # On CUDA "reduce-overhead" captures CUDA graphs: the fp16 + CUDA graph baseline.
            mode = "reduce-overhead" if v.device.startswith("cuda") else "default"
            module = module.to(v.device, getattr(torch, dtype))
            module = torch.compile(module, mode=mode, dynamic=False)
        return TorchRunner(module, self.spec(v), device=v.device, dtype=dtype, name=v.name)


def discover(
    ctx: BenchContext, *, backends: list[str] | None, teacher: bool, compile_: str
) -> tuple[list[VariantSpec], list[tuple[VariantSpec, str]]]:
    """(variants to measure, [(variant, why skipped)]) for this machine."""
    cuda = ctx.device.startswith("cuda")
    run: list[VariantSpec] = []
    skipped: list[tuple[VariantSpec, str]] = []

    def wanted(backend: str) -> bool:
        return backends is None or backend in backends

    for art in ctx.manifest.find("onnx"):
        prec = art.precision or "fp32"
        for be in ("onnxruntime", "onnxruntime-cuda"):
            if not wanted(be) or (be == "onnxruntime-cuda" and not cuda):
                continue
            v = VariantSpec(
                f"{be}/{prec}",
                "student",
                "engine",
                be,
                prec,
                art.name,
                "cuda" if be != "onnxruntime" else "cpu",
            )
            if be == "onnxruntime-cuda" and not ort_has("CUDAExecutionProvider"):
                skipped.append(
                    (v, "onnxruntime has no CUDAExecutionProvider (pip install 'dd-compile[gpu]')")
                )
            else:
                run.append(v)
    for art in ctx.manifest.find("engine", backend="tensorrt"):
        if not wanted("tensorrt"):
            continue
        prec = art.precision or "fp32"
        sm = (art.target or {}).get("sm") or (art.target or {}).get("compute_capability")
        v = VariantSpec(
            f"tensorrt/{prec}" + (f"/sm{sm}" if sm else ""),
            "student",
            "engine",
            "tensorrt",
            prec,
            art.name,
            "cuda",
        )
        if importlib.util.find_spec("tensorrt") is None:
            skipped.append((v, "tensorrt is not installed (pip install 'dd-compile[tensorrt]')"))
        elif not cuda:
            skipped.append((v, "no CUDA device"))
        else:
            run.append(v)
    if teacher:
        dev = ctx.device
        run.append(
            VariantSpec("teacher/torch-eager/fp32", "teacher", "baseline", "torch", "fp32", device=dev)
        )
        if cuda:
            run.append(
                VariantSpec("teacher/torch-eager/fp16", "teacher", "baseline", "torch", "fp16", device=dev)
            )
        prec = "fp16" if cuda else "fp32"
        v = VariantSpec(
            f"teacher/torch-compile/{prec}",
            "teacher",
            "baseline",
            "torch-compile",
            prec,
            device=dev,
        )
        if compile_ == "on" or (compile_ == "auto" and cuda):
            run.append(v)
        elif compile_ == "auto":
            skipped.append(
                (
                    v,
                    "torch.compile on CPU is off by default: inductor's C++ build of a "
                    "UNet takes minutes on a small CPU (--compile on to include it)",
                )
            )
    if not any(v.role == "engine" for v in run):
        have = sorted(a.name for a in ctx.manifest.artifacts.values())
        log.warning(
            "%s: no student engine to bench here (artifacts: %s)",
            ctx.manifest.path,
            ", ".join(have) or "none",
        )
    return run, skipped
