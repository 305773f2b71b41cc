"""student.ckpt: one safetensors file whose metadata holds the JSON record of the student.

Metadata key "dd_compile" -> {format_version, model: {class, config}, scheduler: {class, config},
schedule (engines.schedule.SamplingSchedule), teacher: {path, sha256, reference_sampler,
reference_steps}, distillation: {...}}. Loading never unpickles: a pickle/torch.save file is
refused with a one-line error.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.fileio import atomic_path
from engines.schedule import SamplingSchedule

FORMAT_VERSION = 1
META_KEY = "dd_compile"
SUPPORTED_MODELS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


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

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": {"class": self.model_class, "config": clean_config(self.model_config)},
            "scheduler": {"class": self.scheduler_class, "config": clean_config(self.scheduler_config)},
            "schedule": self.schedule.to_dict(),
            "teacher": vars(self.teacher),
            "distillation": self.distillation,
        }

    def build_model(self) -> Any:
        """The diffusers model with the checkpoint's weights, in eval mode."""
        from optimizer.models import model_from_config

        model = model_from_config(self.model_class, self.model_config)
        where = self.path or "checkpoint"
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
        return model.eval()


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
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and 8 + n + max(ends) > size:
        raise InputError(f"{path}: truncated ({size} bytes, tensors need {8 + n + max(ends)})")
    return header


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
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this dd-compile reads version {FORMAT_VERSION})"
        )
    for key in ("model", "scheduler", "schedule", "teacher"):
        if key not in meta:
            raise InputError(f"{path}: metadata lacks {key!r}")
    cls = meta["model"].get("class")
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
    )
