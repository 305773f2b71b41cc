"""student.ckpt: one safetensors file whose metadata holds the JSON record of the student.

Metadata key "dd_compile" -> {format_version, model: {class, config}, scheduler: {class, config},
schedule (engines.schedule.SamplingSchedule), teacher: {path, sha256, reference_sampler,
reference_steps}, distillation: {...}, pipeline (version 2, text-to-image students only):
{path, components: {text_encoder, tokenizer, vae: sha256}, guidance, guidance_scale}}. Version-1
files (no pipeline field) still load. Loading never unpickles: a pickle/torch.save file is
refused with a one-line error.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.fileio import atomic_path
from engines.schedule import SamplingSchedule
from optimizer.model_io import SUPPORTED_MODELS

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 2 added the optional 'pipeline' field
META_KEY = "dd_compile"


def clean_config(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config as plain JSON: private keys (_name_or_path, _diffusers_version...) dropped."""
    return json.loads(
        json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str)
    )


@dataclass
class TeacherRef:
    path: str | None
    sha256: str | None
    reference_sampler: str = "ddim"
    reference_steps: int = 64


@dataclass
class StudentCheckpoint:
    model_class: str
    model_config: dict[str, Any]
    scheduler_class: str
    scheduler_config: dict[str, Any]
    schedule: SamplingSchedule
    teacher: TeacherRef
    distillation: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, Any] | None = None  # name -> torch.Tensor
    path: Path | None = None
    pipeline: dict[str, Any] | None = None  # text-to-image: the teacher pipeline it plugs into

    def metadata(self) -> dict[str, Any]:
        meta = {
            "format_version": FORMAT_VERSION,
            "model": {"class": self.model_class, "config": clean_config(self.model_config)},
            "scheduler": {"class": self.scheduler_class, "config": clean_config(self.scheduler_config)},
            "schedule": self.schedule.to_dict(),
            "teacher": vars(self.teacher),
            "distillation": self.distillation,
        }
        if self.pipeline is not None:
            meta["pipeline"] = self.pipeline
        return meta

    def build_model(self, *, probe: bool = True) -> Any:
        """The diffusers model with the checkpoint's weights, in eval mode; `probe`: checked to run."""
        from optimizer.models import model_from_config

        where = self.path or "checkpoint"
        try:
            model = model_from_config(self.model_class, self.model_config)
        except InputError:
            raise
        except Exception as e:  # diffusers' own checks (unknown block type, bad sizes): the config's fault
            raise InputError(
                f"{where}: model.config is not a valid {self.model_class} config ({type(e).__name__}: {e})"
            ) from None
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state_dict or {}))
        if missing:
            raise InputError(
                f"{where}: {len(missing)} tensor(s) missing for {self.model_class}, e.g. {missing[0]!r}"
            )
        for k, v in expected.items():
            if tuple(self.state_dict[k].shape) != tuple(v.shape):
                raise InputError(
                    f"{where}: tensor {k!r} has shape {tuple(self.state_dict[k].shape)}, "
                    f"the config needs {tuple(v.shape)}"
                )
        unexpected = sorted(set(self.state_dict) - set(expected))
        if unexpected:
            raise InputError(f"{where}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")
        model.load_state_dict(self.state_dict, strict=True)
        model.eval()
        if probe:
            probe_forward(model, self.model_class, self.model_config, where)
        return model


def probe_forward(model: Any, model_class: str, config: dict[str, Any], where: Any) -> None:
    """One batch-1 call on the IO spec's inputs: a config that builds but cannot run (a size the
    blocks cannot divide, a retyped field) is refused here, naming the file, not mid-export."""
    import numpy as np
    import torch

    from optimizer.model_io import conditioning_feeds, io_spec_for
    from optimizer.models import Denoiser

    try:
        spec = io_spec_for(model_class, config, [1], seq_len=4)
        shape = spec.outputs[0].concrete({"batch": 1})
        feeds = {"sample": np.zeros(spec.inputs[0].concrete({"batch": 1}), np.float32)}
        feeds["timestep"] = np.full((1,), 10.0, np.float32)
        feeds.update(conditioning_feeds(spec, 1, np.random.default_rng(0)))
        with torch.no_grad():
            out = Denoiser(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    except Exception as e:
        raise InputError(
            f"{where}: model.config describes a {model_class} that does not run "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if tuple(out.shape) != tuple(shape):
        raise InputError(f"{where}: model output shape {tuple(out.shape)}, its config implies {tuple(shape)}")


def save_checkpoint(ckpt: StudentCheckpoint, model: Any, path: str | Path) -> Path:
    """Write the model's weights and the record atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {META_KEY: json.dumps(ckpt.metadata())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header ourselves, so each malformation gets its own message."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(
            f"{path}: is a directory, expected a student.ckpt file "
            "(for a diffusers folder, pass it with --steps)"
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: file too short ({size} bytes) to be a safetensors checkpoint")
        (n,) = struct.unpack("<Q", head)
        # a safetensors header length may start with 0x80 too: call it pickle only if it is not one
        if (head[:1] == b"\x80" or head[:2] == b"PK") and (n > size - 8 or n > 100 << 20):
            raise InputError(
                f"{path}: is a pickle/torch.save file; dd-compile never unpickles "
                "checkpoints (convert it to safetensors with save_checkpoint)"
            )
        if n > size - 8 or n > 100 << 20:
            raise InputError(f"{path}: not a safetensors file (header length {n} exceeds file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: not a safetensors file (header is not JSON)") from None
    _check_header(path, header, size - 8 - n)
    return header


_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header(path: Path, header: Any, data_bytes: int) -> None:
    """The safetensors header's structure and types, each tensor's byte range inside the file."""
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path}: safetensors __metadata__ must map names to strings")
    end_max = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name[:80]!r}"
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise InputError(f"{where}: header entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise InputError(f"{where}: unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise InputError(f"{where}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise InputError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise InputError(
                f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes, shape needs more/less"
            )
        end_max = max(end_max, offsets[1])
    if end_max > data_bytes:
        raise InputError(
            f"{path}: truncated ({8 + data_bytes} bytes after the header length, tensors need {end_max})"
        )


def _check_type(path: Path, field: str, value: Any, types: type | tuple[type, ...], what: str) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    if not ok:
        raise InputError(f"{path}: metadata field {field!r} must be {what}, got {type(value).__name__}")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _check_finite_number(path: Path, field: str, value: Any) -> None:
    _check_type(path, field, value, (int, float), "a number")
    if not math.isfinite(value):
        raise InputError(f"{path}: metadata field {field!r} is not finite ({value})")


_META_KEYS = {"format_version", "model", "scheduler", "schedule", "teacher", "distillation", "pipeline"}
PIPELINE_COMPONENTS = ("text_encoder", "tokenizer", "vae")  # what a t2i student reuses of its teacher
GUIDANCE_VALUES = ("cfg", "embedded", "none")
_SCHEDULE_KEYS = {f.name for f in fields(SamplingSchedule)}
_TEACHER_KEYS = {f.name for f in fields(TeacherRef)}


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Structure and types of the dd_compile record, each problem naming its field."""
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        raise InputError(
            f"{path}: unknown metadata key {unknown[0][:80]!r} (known: {', '.join(sorted(_META_KEYS))})"
        )
    for key in ("model", "scheduler", "schedule", "teacher"):
        if key not in meta:
            raise InputError(f"{path}: metadata lacks {key!r}")
        _check_type(path, key, meta[key], dict, "an object")
    for key in ("model", "scheduler"):
        sub = meta[key]
        extra = sorted(set(sub) - {"class", "config"})
        if extra or "class" not in sub or "config" not in sub:
            raise InputError(f"{path}: metadata field {key!r} must hold exactly 'class' and 'config'")
        _check_type(path, f"{key}.class", sub["class"], str, "a string")
        _check_type(path, f"{key}.config", sub["config"], dict, "an object")
    sch = meta["schedule"]
    unknown = sorted(set(sch) - _SCHEDULE_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown schedule field {unknown[0][:80]!r}")
    for key in ("kind", "timesteps", "alphas_cumprod", "prediction_type"):
        if key not in sch:
            raise InputError(f"{path}: metadata lacks 'schedule.{key}'")
    for key in ("kind", "prediction_type"):
        _check_type(path, f"schedule.{key}", sch[key], str, "a string")
    for key in ("timesteps", "alphas_cumprod"):
        _check_type(path, f"schedule.{key}", sch[key], list, "a list")
        if not sch[key]:
            raise InputError(f"{path}: metadata field 'schedule.{key}' is empty")
    if not all(_is_int(t) and t >= 0 for t in sch["timesteps"]):
        raise InputError(f"{path}: metadata field 'schedule.timesteps' must be non-negative integers")
    for i, a in enumerate(sch["alphas_cumprod"]):
        _check_finite_number(path, f"schedule.alphas_cumprod[{i}]", a)
        # 0 is legal: a zero-terminal-SNR schedule's first step starts from pure noise
        if not 0 <= a <= 1:
            raise InputError(f"{path}: metadata field 'schedule.alphas_cumprod[{i}]' = {a} is not in [0, 1]")
    for key in ("final_alpha_cumprod", "sigma_data", "timestep_scaling"):
        if key in sch:
            _check_finite_number(path, f"schedule.{key}", sch[key])
    if sch.get("clip_sample") is not None:
        _check_finite_number(path, "schedule.clip_sample", sch["clip_sample"])
        if sch["clip_sample"] <= 0:
            raise InputError(f"{path}: metadata field 'schedule.clip_sample' must be > 0")
    t = meta["teacher"]
    unknown = sorted(set(t) - _TEACHER_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown teacher field {unknown[0][:80]!r}")
    for key in ("path", "sha256"):
        if key not in t:
            raise InputError(f"{path}: metadata lacks 'teacher.{key}'")
        if t[key] is not None:
            _check_type(path, f"teacher.{key}", t[key], str, "a string or null")
    if "reference_sampler" in t:
        _check_type(path, "teacher.reference_sampler", t["reference_sampler"], str, "a string")
    if "reference_steps" in t:
        _check_type(path, "teacher.reference_steps", t["reference_steps"], int, "an integer")
        if t["reference_steps"] < 1:
            raise InputError(f"{path}: metadata field 'teacher.reference_steps' must be >= 1")
    if meta.get("distillation") is not None:
        _check_type(path, "distillation", meta["distillation"], dict, "an object")
    if "pipeline" in meta:
        if meta.get("format_version") == 1:
            raise InputError(f"{path}: metadata field 'pipeline' needs format version 2, the file says 1")
        _check_pipeline(path, meta["pipeline"])


def _check_pipeline(path: Path, p: Any) -> None:
    """The text-to-image field: teacher pipeline folder, component sha256s, guidance mode and scale."""
    _check_type(path, "pipeline", p, dict, "an object")
    keys = {"path", "components", "guidance", "guidance_scale"}
    if set(p) != keys:
        odd = sorted(set(p) ^ keys)[0]
        raise InputError(
            f"{path}: metadata field 'pipeline' must hold exactly {', '.join(sorted(keys))} "
            f"({odd[:80]!r} is {'missing' if odd in keys else 'unknown'})"
        )
    _check_type(path, "pipeline.path", p["path"], str, "a string")
    if not p["path"]:
        raise InputError(f"{path}: metadata field 'pipeline.path' is empty")
    comps = p["components"]
    _check_type(path, "pipeline.components", comps, dict, "an object")
    if set(comps) != set(PIPELINE_COMPONENTS):
        raise InputError(
            f"{path}: metadata field 'pipeline.components' must name exactly {', '.join(PIPELINE_COMPONENTS)}"
        )
    for name, h in comps.items():
        _check_type(path, f"pipeline.components.{name}", h, str, "a string")
        if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise InputError(
                f"{path}: metadata field 'pipeline.components.{name}' is not a sha256 hex digest"
            )
    _check_type(path, "pipeline.guidance", p["guidance"], str, "a string")
    if p["guidance"] not in GUIDANCE_VALUES:
        raise InputError(
            f"{path}: metadata field 'pipeline.guidance' is {p['guidance'][:40]!r}, "
            f"not one of {', '.join(GUIDANCE_VALUES)}"
        )
    if p["guidance_scale"] is not None:
        _check_finite_number(path, "pipeline.guidance_scale", p["guidance_scale"])


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    header = _read_header(path)
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise InputError(f"{path}: safetensors file without dd-compile metadata (not a student.ckpt)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"{path}: dd-compile metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: dd-compile metadata is a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise InputError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this dd-compile reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    _check_meta(path, meta)
    cls = meta["model"]["class"]
    if cls not in SUPPORTED_MODELS:
        raise InputError(
            f"{path}: model class {cls!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    return meta


def load_checkpoint(path: str | Path, *, weights: bool = True) -> StudentCheckpoint:
    path = Path(path)
    meta = read_metadata(path)
    state = None
    if weights:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: cannot read tensors ({e})") from None
    try:
        schedule = SamplingSchedule.from_dict(meta["schedule"])
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(f"{path}: invalid sampling schedule ({e})") from None
    return StudentCheckpoint(
        model_class=meta["model"]["class"],
        model_config=meta["model"]["config"],
        scheduler_class=meta["scheduler"]["class"],
        scheduler_config=meta["scheduler"]["config"],
        schedule=schedule,
        teacher=TeacherRef(**meta["teacher"]),
        distillation=meta.get("distillation") or {},
        state_dict=state,
        path=path,
        pipeline=meta.get("pipeline"),
    )


def check_teacher(ckpt: StudentCheckpoint, teacher: Any) -> None:
    """Refuse a teacher that cannot be compared with this student: other inputs or outputs (another
    architecture, sample size, channels, conditioning) or too few training timesteps."""
    from optimizer.model_io import io_spec_for

    def io(model_class: str, config: dict[str, Any]) -> str:
        spec = io_spec_for(model_class, config)
        return ", ".join(f"{t.name} {list(t.shape[1:])}" for t in (*spec.inputs, *spec.outputs))

    try:
        theirs = io(teacher.model_class, dict(teacher.model.config))
    except Exception as e:
        raise InputError(
            f"{teacher.path}: teacher config has no usable IO ({type(e).__name__}: {e})"
        ) from None
    ours = io(ckpt.model_class, ckpt.model_config)
    if theirs != ours:
        raise InputError(
            f"{teacher.path}: not this student's teacher: a {teacher.model_class} with {theirs}; "
            f"the student {ckpt.path} is a {ckpt.model_class} with {ours} (pass --teacher DIR)"
        )
    n_train = int(teacher.scheduler.config.num_train_timesteps)
    if max(ckpt.schedule.timesteps) >= n_train:
        raise InputError(
            f"{teacher.path}: teacher has {n_train} training timesteps, the student samples at "
            f"t={max(ckpt.schedule.timesteps)}"
        )
