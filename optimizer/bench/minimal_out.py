"""A minimal dd-compile output without distillation or quantization: a diffusers model saved as
the teacher folder, the same weights as student.ckpt, its fp32 ONNX export and out/manifest.json.

For the bench's tests and benchmarks/ scripts (random-weight configs such as ddpm-cifar10-32),
where timing, not quality, is measured. `dd-compile` writes the full output (fp16/int8, engines).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engines.fileio import sha256_file, write_text_atomic
from engines.manifest import Manifest
from engines.schedule import SamplingSchedule, trailing_timesteps

log = logging.getLogger(__name__)


def write_teacher(model: Any, scheduler: Any, folder: str | Path, reference_steps: int) -> Path:
    """diffusers save_pretrained layout: unet/ + scheduler/ + teacher.json."""
    folder = Path(folder)
    model.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    write_text_atomic(
        folder / "teacher.json",
        json.dumps({"reference_sampler": "ddim", "reference_steps": reference_steps}),
    )
    return folder


def build_minimal_out(
    model: Any,
    scheduler: Any,
    out_dir: str | Path,
    *,
    student_steps: int = 4,
    reference_steps: int = 64,
    batch_sizes: list[int] | None = None,
    teacher_dir: str | Path | None = None,
) -> Manifest:
    """Teacher folder, student.ckpt (same weights, DDIM at `student_steps`), fp32 ONNX."""
    from optimizer.checkpoint import StudentCheckpoint, TeacherRef, save_checkpoint
    from optimizer.compile.export import export_onnx
    from optimizer.model_io import io_spec_for, sample_shape
    from optimizer.models import Denoiser, alphas_cumprod

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = write_teacher(model, scheduler, teacher_dir or out / "teacher", reference_steps)
    cls, cfg = type(model).__name__, dict(model.config)
    T = scheduler.config.num_train_timesteps
    schedule = SamplingSchedule.from_alphas(
        alphas_cumprod(scheduler),
        trailing_timesteps(T, student_steps),
        kind="ddim",
        prediction_type=scheduler.config.prediction_type,
    )
    weights = next((teacher / "unet").glob("*.safetensors"))
    ckpt = StudentCheckpoint(
        cls,
        cfg,
        type(scheduler).__name__,
        dict(scheduler.config),
        schedule,
        TeacherRef(str(teacher), sha256_file(weights), "ddim", reference_steps),
        {"method": "none (bench fixture: student = teacher weights)"},
    )
    ckpt_path = save_checkpoint(ckpt, model, out / "student.ckpt")
    spec = io_spec_for(cls, cfg, batch_sizes or [1, 16])
    onnx_path = export_onnx(Denoiser(model), spec, out / "onnx" / "student.fp32.onnx")
    meta = {
        "sample_shape": list(sample_shape(cls, cfg)),
        "student_checkpoint": str(ckpt_path),
        "teacher": {"path": str(teacher), "reference_steps": reference_steps},
    }
    m = Manifest(out, spec, schedule, meta)
    m.add("onnx/fp32", onnx_path, "onnx", precision="fp32", config={"stage": "export"})
    m.save()
    return m
