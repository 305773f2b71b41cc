"""Stage `build`: a validated ONNX graph -> engines/student.<precision>.<target>.plan (TensorRT).

TensorRT 11 builds strongly typed networks only: no FP16/INT8 builder flags, no calibrators. The
precision is the graph's (FP16 types, explicit Q/DQ), so the graph ONNX Runtime validated is the
graph compiled here. Built through Polygraphy's loaders, which track TensorRT's API changes:

    engine_bytes_from_network(network_from_onnx_path(p, strongly_typed=True),
                              config=CreateConfig(profiles=..., ...), save_timing_cache=...)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.cuda_utils import (
    TRT_EXTRA,
    check_cuda_device,
    device_info,
    import_cudart,
    import_tensorrt,
)
from engines.errors import BackendUnavailable, InputError
from engines.fileio import atomic_path, sha256_file
from engines.iospec import IOSpec
from engines.trt_target import TrtTarget, running_target
from optimizer.compile.trt_profiles import (
    ProfileShapes,
    TrtBuildConfig,
    build_flags,
    check_memory,
    check_timing_cache,
    create_config_kwargs,
    estimate_build_memory,
    profiles_from_spec,
    profiles_to_json,
    record_timing_cache,
    timing_cache_path,
    validate_config,
)

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class EngineResult:
    path: Path
    precision: str
    onnx_sha256: str
    target: TrtTarget
    profiles: list[ProfileShapes]
    flags: list[str]
    build_seconds: float
    engine_bytes: int
    config: TrtBuildConfig
    timing_cache: Path | None = None
    libraries: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return engine_artifact_name(self.precision, self.target)

    def to_manifest(self) -> dict[str, Any]:
        """Keyword arguments for `Manifest.add(**result.to_manifest())`."""
        return {
            "name": self.name,
            "path": self.path,
            "kind": "engine",
            "precision": self.precision,
            "backend": "tensorrt",
            "target": self.target.to_dict(),
            "input_sha256": self.onnx_sha256,
            "config": self.config.to_dict(),
            "libraries": self.libraries,
            "extra": {
                "tensorrt_version": self.target.tensorrt,
                "gpu": self.target.gpu,
                "compute_capability": self.target.compute_capability,
                "cuda": self.target.cuda,
                "profiles": profiles_to_json(self.profiles),
                "flags": self.flags,
                "build_seconds": round(self.build_seconds, 3),
                "engine_bytes": self.engine_bytes,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            },
        }


def check_tensorrt_available() -> None:
    """Raise BackendUnavailable with one line naming what is missing: the tensorrt package (and the
    extra that installs it), cuda-python, polygraphy, or a CUDA device."""
    import_tensorrt()
    import_cudart()
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise BackendUnavailable(
            f"polygraphy is not installed (the TensorRT build uses it): {TRT_EXTRA}"
        ) from None
    check_cuda_device()


def precision_of(onnx_path: Path) -> str:
    """student.<precision>.onnx -> precision."""
    parts = onnx_path.name.split(".")
    if len(parts) >= 3 and parts[-2] in PRECISIONS:
        return parts[-2]
    raise InputError(
        f"{onnx_path}: cannot tell the precision from the name (expected "
        f"<name>.<{'|'.join(PRECISIONS)}>.onnx); pass precision="
    )


def build_target(config: TrtBuildConfig) -> TrtTarget:
    """The target an engine built here with `config` gets (needs TensorRT and a GPU)."""
    t = running_target()
    return TrtTarget(
        tensorrt=t.tensorrt,
        gpu=t.gpu,
        compute_capability=t.compute_capability,
        cuda=t.cuda,
        hardware_compatibility_level=config.hardware_compatibility_level,
        version_compatible=config.version_compatible,
    )


def engine_artifact_name(precision: str, target: TrtTarget) -> str:
    """The manifest key of an engine: "engine/tensorrt/<precision>/<target key>"."""
    return f"engine/tensorrt/{precision}/{target.key}"


def engine_path_for(out: Path, precision: str, target: TrtTarget, stem: str = "student") -> Path:
    """A directory -> <dir>/<stem>.<precision>.<target>.plan; a file path is kept. A pipeline's
    engines are named by component (unet.int8.<target>.plan)."""
    return out / f"{stem}.{precision}.{target.key}.plan" if out.suffix != ".plan" else out


def build_engine(
    onnx_path: Path,
    spec: IOSpec,
    out_path: Path,
    config: TrtBuildConfig,
    *,
    precision: str | None = None,
    stem: str = "student",
    extra_profiles: ProfileShapes | None = None,
) -> EngineResult:
    """Build a strongly typed engine from `onnx_path`; write it atomically to `out_path` (a .plan
    file, or a folder in which it is named student.<precision>.<target>.plan). `extra_profiles`:
    (min, opt, max) of inputs outside the IO spec (a graph's LoRA inputs), in every profile."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.exists():
        raise InputError(f"{onnx_path}: no such ONNX file")
    validate_config(config)
    precision = precision or precision_of(onnx_path)
    check_tensorrt_available()
    trt = import_tensorrt()
    from polygraphy.backend.trt import (
        CreateConfig,
        engine_bytes_from_network,
        network_from_onnx_path,
    )

    target = build_target(config)
    out_path = engine_path_for(out_path, precision, target, stem)
    profiles = [
        {**p, **(extra_profiles or {})}
        for p in profiles_from_spec(spec, config.batch_sizes, config.profile_mode)
    ]

    if config.memory_check:
        estimate = estimate_build_memory(onnx_path, profiles, config.workspace_bytes)
        free = device_info().free_bytes
        log.info("build memory estimate %s; free %.2f GiB", estimate.describe(), free / (1 << 30))
        check_memory(estimate, free)

    cache = (
        Path(config.timing_cache)
        if config.timing_cache
        else timing_cache_path(Path(config.cache_dir) if config.cache_dir else out_path.parent, target)
    )
    check_timing_cache(cache, target)
    cache.parent.mkdir(parents=True, exist_ok=True)

    kwargs = create_config_kwargs(config, profiles, cache if cache.exists() else None, trt=trt)
    network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
    t0 = time.perf_counter()
    try:
        plan = engine_bytes_from_network(network, config=CreateConfig(**kwargs), save_timing_cache=str(cache))
    except Exception as e:  # polygraphy raises PolygraphyException after logging TensorRT's errors
        raise RuntimeError(f"{onnx_path}: TensorRT build failed: {e}") from e
    seconds = time.perf_counter() - t0
    with atomic_path(out_path, suffix=".plan") as tmp:
        with open(tmp, "wb") as f:
            f.write(plan)
    record_timing_cache(cache, target)
    import polygraphy

    size = out_path.stat().st_size
    log.info("built %s (%.1f MB) in %.1f s", out_path, size / 1e6, seconds)
    return EngineResult(
        path=out_path,
        precision=precision,
        onnx_sha256=sha256_file(onnx_path),
        target=target,
        profiles=profiles,
        flags=build_flags(config),
        build_seconds=seconds,
        engine_bytes=size,
        config=config,
        timing_cache=cache,
        libraries={"tensorrt": trt.__version__, "polygraphy": polygraphy.__version__},
    )
