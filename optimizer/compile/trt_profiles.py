"""Pure-python parts of the TensorRT build: its options (`TrtBuildConfig`), optimization profiles
from the IO spec, the mapping of those options onto Polygraphy's `CreateConfig`, the free-memory
preflight, and per-target timing caches. Nothing here imports tensorrt, so all of it is tested on
CPU-only machines.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InputError
from engines.fileio import write_json_atomic
from engines.iospec import IOSpec
from engines.trt_target import HARDWARE_LEVELS, TrtTarget, _ver

log = logging.getLogger(__name__)

Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max
ProfileShapes = dict[str, Shapes]  # input name -> (min, opt, max)
PROFILE_MODES = ("range", "per-batch")
GiB = 1 << 30
DEFAULT_WORKSPACE_ESTIMATE = 1 * GiB  # what the estimate assumes when no pool limit is set
BUILD_WEIGHT_COPIES = 2  # the builder holds the network's weights and the engine's while timing


@dataclass(frozen=True)
class TrtBuildConfig:
    builder_optimization_level: int = 3  # 0..5; TensorRT's default 3. Higher: longer build, maybe faster
    workspace_bytes: int | None = None  # WORKSPACE memory pool limit; None: TensorRT's default
    batch_sizes: tuple[int, ...] | None = None  # None: the IO spec's batch range
    profile_mode: str = "range"  # "range": one profile min..max; "per-batch": one exact profile per size
    hardware_compatibility_level: str = "none"  # "none" | "ampere_plus" | "same_compute_capability"
    version_compatible: bool = False  # runs on newer TensorRT (same major, or 10 -> 11)
    refittable: bool = False  # weights can be refit without a rebuild
    timing_cache: str | None = None  # explicit cache file; None: one per target in cache_dir
    cache_dir: str | None = None  # None: beside the engine
    memory_check: bool = True  # refuse builds that would not fit in free GPU memory

    def to_dict(self) -> dict[str, Any]:
        """What determines the engine (the manifest's cache key): not where caches live."""
        d = asdict(self)
        for k in ("timing_cache", "cache_dir", "memory_check"):
            d.pop(k)
        d["batch_sizes"] = list(self.batch_sizes) if self.batch_sizes else None
        return d


# -- optimization profiles -------------------------------------------------------------------------
def profiles_from_spec(
    spec: IOSpec, batch_sizes: list[int] | tuple[int, ...] | None = None, mode: str = "range"
) -> list[ProfileShapes]:
    """TensorRT optimization profiles from the IO spec.

    "range": one profile, batch from min to max of `batch_sizes` (opt = the largest, the size the
    sampler runs most); "per-batch": one exact profile per batch size (best kernels for each size,
    and a fixed shape per profile suits CUDA graphs). Other dynamic axes (height, width, sequence)
    keep the spec's own min/opt/max.
    """
    if mode not in PROFILE_MODES:
        raise InputError(f"profile mode {mode!r} not in {PROFILE_MODES}")
    if batch_sizes is not None:
        bad = [b for b in batch_sizes if not isinstance(b, int | np.integer) or b < 1]
        if bad or not batch_sizes:
            raise InputError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    uses_batch = any("batch" in t.shape for t in spec.inputs)
    if batch_sizes is None or not uses_batch:
        if mode == "per-batch" and uses_batch:
            r = spec.dims["batch"]
            batch_sizes = sorted({r.min, r.opt, r.max})
        else:
            return [spec.profiles()]
    sizes = sorted(set(int(b) for b in batch_sizes))
    if mode == "range":
        return [spec.with_batch_range(sizes).profiles()]
    out = []
    for b in sizes:
        one = spec.with_batch_range([b])  # min = opt = max = b
        out.append(one.profiles())
    return out


def to_polygraphy_profiles(profiles: list[ProfileShapes]) -> list[Any]:
    """Polygraphy `Profile` objects (constructible without tensorrt)."""
    from polygraphy.backend.trt import Profile

    out = []
    for prof in profiles:
        p = Profile()
        for name, (lo, opt, hi) in prof.items():
            p.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
        out.append(p)
    return out


def profiles_to_json(profiles: list[ProfileShapes]) -> list[dict[str, dict[str, list[int]]]]:
    return [
        {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in p.items()} for p in profiles
    ]


# -- option mapping --------------------------------------------------------------------------------
def validate_config(config: TrtBuildConfig) -> None:
    problems = []
    if not 0 <= config.builder_optimization_level <= 5:
        problems.append(f"builder_optimization_level {config.builder_optimization_level} not in 0..5")
    if config.hardware_compatibility_level not in HARDWARE_LEVELS:
        problems.append(
            f"hardware_compatibility_level {config.hardware_compatibility_level!r} not in {HARDWARE_LEVELS}"
        )
    if config.workspace_bytes is not None and config.workspace_bytes <= 0:
        problems.append(f"workspace_bytes must be positive, got {config.workspace_bytes}")
    if config.profile_mode not in PROFILE_MODES:
        problems.append(f"profile_mode {config.profile_mode!r} not in {PROFILE_MODES}")
    if problems:
        raise InputError("invalid TensorRT build config: " + "; ".join(problems))


def create_config_kwargs(
    config: TrtBuildConfig,
    profiles: list[ProfileShapes],
    timing_cache: Path | None,
    trt: Any = None,
) -> dict[str, Any]:
    """Keyword arguments for polygraphy's `CreateConfig`.

    Enum-valued options are given by name when `trt` is None (for inspection and tests) and as
    TensorRT enums when the tensorrt module is passed. No precision flags: TensorRT 11 builds
    strongly typed networks only; precision comes from the ONNX graph (FP16 types, Q/DQ nodes).
    """
    validate_config(config)
    kw: dict[str, Any] = {
        "profiles": to_polygraphy_profiles(profiles),
        "builder_optimization_level": config.builder_optimization_level,
        "refittable": config.refittable,
        "version_compatible": config.version_compatible,
    }
    if config.hardware_compatibility_level != "none":
        name = config.hardware_compatibility_level.upper()  # AMPERE_PLUS, SAME_COMPUTE_CAPABILITY
        kw["hardware_compatibility_level"] = getattr(trt.HardwareCompatibilityLevel, name) if trt else name
    if config.workspace_bytes is not None:
        pool = trt.MemoryPoolType.WORKSPACE if trt else "WORKSPACE"
        kw["memory_pool_limits"] = {pool: int(config.workspace_bytes)}
    if timing_cache is not None:
        kw["load_timing_cache"] = str(timing_cache)
    return kw


def build_flags(config: TrtBuildConfig) -> list[str]:
    """The flags recorded in the manifest (what `CreateConfig` turns on)."""
    flags = ["STRONGLY_TYPED"]
    if config.version_compatible:
        flags.append("VERSION_COMPATIBLE")
    if config.refittable:
        flags.append("REFIT")
    if config.hardware_compatibility_level != "none":
        flags.append(f"HARDWARE_COMPATIBILITY_LEVEL={config.hardware_compatibility_level.upper()}")
    return flags


# -- memory preflight ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int  # the engine's weights, at the precision the graph gives them
    activation_bytes: int  # activations at the max profile
    workspace_bytes: int  # tactic workspace (the pool limit, or a default guess)
    max_batch: int

    @property
    def total_bytes(self) -> int:
        return BUILD_WEIGHT_COPIES * self.weights_bytes + self.activation_bytes + self.workspace_bytes

    def describe(self) -> str:
        return (
            f"{self.total_bytes / GiB:.2f} GiB = {BUILD_WEIGHT_COPIES} x weights "
            f"{self.weights_bytes / GiB:.2f} GiB + activations at batch {self.max_batch} "
            f"{self.activation_bytes / GiB:.2f} GiB "
            f"+ workspace {self.workspace_bytes / GiB:.2f} GiB"
        )


def _itemsize(elem_type: int) -> int:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def onnx_weight_bytes(model: Any) -> int:
    """Bytes of the initializers as TensorRT will store them: a weight feeding a QuantizeLinear is
    stored quantized (1 byte); others keep their ONNX dtype (fp32 4, fp16 2)."""
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input}
    total = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
        total += count * (1 if init.name in quantized else _itemsize(init.data_type))
    return total


def _largest_activation(model: Any, max_shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of the largest intermediate tensor at the max profile, by ONNX shape inference."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        if inp.name in max_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, max_shapes[inp.name], strict=True):
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    largest = 0
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if not dims or any(d <= 0 for d in dims) or not tt.elem_type:
            continue
        largest = max(largest, int(np.prod(dims, dtype=np.int64)) * _itemsize(tt.elem_type))
    return largest


def estimate_build_memory(
    onnx_path: str | Path, profiles: list[ProfileShapes], workspace_bytes: int | None = None
) -> MemoryEstimate:
    """Coarse GPU memory a build needs: weights x precision, activations at the largest max shape
    of any profile, and the tactic workspace. An estimate to fail early with advice, not a bound."""
    import onnx

    onnx_path = Path(onnx_path)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise InputError(f"{onnx_path}: cannot read ONNX ({type(e).__name__}: {e})") from None
    weights = onnx_weight_bytes(model)
    ext = onnx_path.with_name(onnx_path.name + ".data")
    if ext.exists() and weights == 0:
        weights = ext.stat().st_size
    max_batch, act = 1, 0
    for prof in profiles:
        max_shapes = {n: s[2] for n, s in prof.items()}
        io = sum(int(np.prod(s, dtype=np.int64)) * 4 for s in max_shapes.values())
        try:
            largest = _largest_activation(model, max_shapes)
        except Exception as e:  # noqa: BLE001 - shape inference is best effort here
            log.warning(
                "%s: shape inference failed (%s); activation estimate uses inputs only",
                onnx_path,
                e,
            )
            largest = io
        # input + output of the largest layer + one scratch copy, plus the network IO.
        act = max(act, 3 * largest + io)
        max_batch = max([max_batch, *(s[2][0] for s in prof.values() if s[2])])
    ws = workspace_bytes if workspace_bytes is not None else DEFAULT_WORKSPACE_ESTIMATE
    return MemoryEstimate(weights, act, ws, max_batch)


def check_memory(estimate: MemoryEstimate, free_bytes: int, *, headroom: float = 0.9) -> None:
    """Refuse a build that would not fit in `headroom` x free GPU memory; say what to change."""
    budget = int(free_bytes * headroom)
    if estimate.total_bytes <= budget:
        return
    advice = []
    fixed = BUILD_WEIGHT_COPIES * estimate.weights_bytes + estimate.workspace_bytes
    per_sample = estimate.activation_bytes / max(estimate.max_batch, 1)
    fit = int((budget - fixed) // per_sample) if per_sample > 0 and budget > fixed else 0
    if 1 <= fit < estimate.max_batch:
        advice.append(f"lower the largest --batch-sizes to {fit}")
    if estimate.workspace_bytes > GiB // 4:
        advice.append("set a smaller workspace limit (workspace_bytes, e.g. 256 MiB)")
    if BUILD_WEIGHT_COPIES * estimate.weights_bytes > budget:
        advice.append("build a smaller precision (fp16 or int8 graph) or use a GPU with more memory")
    advice.append("lower builder_optimization_level, or free GPU memory held by other processes")
    raise InputError(
        f"TensorRT build needs about {estimate.describe()}, but only "
        f"{free_bytes / GiB:.2f} GiB of GPU memory is free: " + "; ".join(advice)
    )


# -- timing caches, one per target -----------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "gpu"


def timing_cache_path(cache_dir: str | Path, target: TrtTarget) -> Path:
    """One cache per GPU model and TensorRT major.minor: tactic timings do not transfer."""
    major_minor = ".".join(target.tensorrt.split(".")[:2])
    return Path(cache_dir) / f"timing.{_slug(target.gpu)}.{target.sm}.trt{major_minor}.cache"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def check_timing_cache(path: str | Path, target: TrtTarget) -> None:
    """Refuse a timing cache recorded on another GPU model or TensorRT version."""
    path = Path(path)
    if not path.exists():
        return
    side = _sidecar(path)
    if not side.exists():
        raise InputError(
            f"{path}: timing cache of unknown origin (no {side.name}); delete it or "
            "point timing_cache elsewhere"
        )
    try:
        rec = json.loads(side.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{side}: not valid JSON; delete the timing cache and its record") from None
    problems = []
    if rec.get("gpu") != target.gpu or rec.get("compute_capability") != target.compute_capability:
        sm = "sm" + str(rec.get("compute_capability", "?")).replace(".", "")
        problems.append(f"recorded on {rec.get('gpu')} ({sm}), this GPU is {target.gpu} ({target.sm})")
    if _ver(str(rec.get("tensorrt", "0")))[:2] != _ver(target.tensorrt)[:2]:
        problems.append(f"recorded with TensorRT {rec.get('tensorrt')}, running {target.tensorrt}")
    if problems:
        raise InputError(
            f"{path}: timing cache refused: "
            + "; ".join(problems)
            + " (timings do not transfer across GPU models; use a per-target cache)"
        )


def record_timing_cache(path: str | Path, target: TrtTarget) -> None:
    write_json_atomic(
        _sidecar(Path(path)),
        {
            "gpu": target.gpu,
            "compute_capability": target.compute_capability,
            "tensorrt": target.tensorrt,
            "cuda": target.cuda,
        },
    )
