"""What a text-to-image SOURCE is: a diffusers pipeline folder or a student.ckpt naming its teacher.

Resolves the student pipeline, its teacher pipeline (for the distribution check and the speed
baseline), the student's steps and guidance scale, and the shape profile (--size / --resolutions),
all checked before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.iospec import DimRange
from optimizer.t2i.components import Profile, vae_scale_factor
from optimizer.t2i.load import LoadedPipeline, _read_json, check_layout, load_pipeline

DEMO_T2I = Path(__file__).parents[1] / "demo" / "t2i"


@dataclass
class TeacherInfo:
    path: Path
    reference_steps: int
    guidance_scale: float


@dataclass
class T2ISource:
    path: Path  # what the user gave
    student: LoadedPipeline
    steps: int
    guidance_scale: float
    teacher: TeacherInfo | None
    distillation: dict[str, Any]


def is_t2i_source(source: Path) -> bool:
    """A pipeline folder (model_index.json) or a student.ckpt with the t2i 'pipeline' field."""
    if source.is_dir():  # a pixel DDPMPipeline folder has a model_index.json too, not a text encoder
        index = source / "model_index.json"
        return index.exists() and '"text_encoder"' in index.read_text(errors="replace")
    if source.is_file() and source.suffix in (".ckpt", ".safetensors"):
        from optimizer.t2i.student import is_t2i_checkpoint

        try:
            return is_t2i_checkpoint(source)
        except InputError:
            return False  # the pixel flow reports what is wrong with it
    return False


def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        hw = (int(h), int(w))
    except ValueError:
        raise InputError(f"{option} {text!r}: expected HxW in pixels, e.g. 512x512") from None
    if min(hw) < 1:
        raise InputError(f"{option} {text!r}: sizes must be >= 1")
    return hw


def make_profile(
    student_dir: Path,
    unet_config: dict[str, Any],
    size: tuple[int, int] | None,
    resolutions: tuple[int, ...] | None,
    batch_sizes: tuple[int, ...],
) -> tuple[Profile, tuple[int, int]]:
    """The engines' shape range and the size validation runs at; bad sizes are one-line errors."""
    vae_cfg = _read_json(student_dir / "vae" / "config.json")
    k = vae_scale_factor(vae_cfg)
    mult = k * 2 ** (len(unet_config["block_out_channels"]) - 1)  # the UNet's skips need this
    s = unet_config.get("sample_size") or 64
    default = (int(s) * k,) * 2 if isinstance(s, int) else (int(s[0]) * k, int(s[1]) * k)
    if resolutions:
        for r in resolutions:
            if r % mult:
                raise InputError(f"--resolutions {r}: not a multiple of {mult} (VAE factor {k} x UNet's)")
        lo, hi = min(resolutions), max(resolutions)
        size = size or (resolutions[0], resolutions[0])
        rng_h = rng_w = (lo, hi)
    else:
        size = size or default
        rng_h, rng_w = (size[0], size[0]), (size[1], size[1])
    for name, v, (lo, hi) in (("height", size[0], rng_h), ("width", size[1], rng_w)):
        if v % mult:
            raise InputError(f"--size {size[0]}x{size[1]}: {name} {v} is not a multiple of {mult}")
        if not lo <= v <= hi:
            raise InputError(f"--size {size[0]}x{size[1]}: {name} {v} outside the profile [{lo}, {hi}]")

    def lat(r: tuple[int, int], v: int) -> DimRange:
        return DimRange(r[0] // k, v // k, r[1] // k)

    batch = DimRange(min(batch_sizes), min(batch_sizes), max(batch_sizes))
    return Profile(batch, lat(rng_h, size[0]), lat(rng_w, size[1])), size


def _teacher_info(path: Path) -> TeacherInfo:
    check_layout(path)
    info = path / "teacher.json"
    d = _read_json(info) if info.exists() else {}
    return TeacherInfo(
        path=path,
        reference_steps=int(d.get("reference_steps", 50)),
        guidance_scale=float(d.get("reference_guidance_scale", 7.5)),
    )


def resolve(
    source: Path,
    *,
    steps: int | None,
    guidance_scale: float | None,
    teacher: Path | None,
    size: tuple[int, int] | None,
    resolutions: tuple[int, ...] | None,
    batch_sizes: tuple[int, ...],
) -> T2ISource:
    from optimizer.t2i.student import load_t2i_student, teacher_dir_of

    distill: dict[str, Any] = {}
    if source.is_dir():
        check_layout(source)
        unet_cfg = _read_json(source / "unet" / "config.json")
        student_dir = source
        dj = source / "distill.json"  # dd-distill's record in a student pipeline folder
        if dj.exists():
            try:
                distill = json.loads(dj.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{dj}: not valid JSON ({e})") from None
        rec_teacher = (distill.get("teacher") or {}).get("path")
        if teacher is None and rec_teacher:
            teacher = Path(rec_teacher) if Path(rec_teacher).is_dir() else source / rec_teacher
        # no record: the folder is its own teacher, at its reference steps and guidance
        teacher = teacher or source
        scale = guidance_scale if guidance_scale is not None else distill.get("guidance_scale")
        n = steps or distill.get("steps")
        if n is None:
            raise InputError(f"{source}: a pipeline folder needs --steps N (the student's step count)")
    else:
        from optimizer.checkpoint import load_checkpoint

        ck = load_checkpoint(source, weights=False)
        rec = ck.pipeline or {}
        student_dir = teacher_dir_of(source, rec["path"])
        unet_cfg = ck.model_config
        teacher = teacher or student_dir
        scale = guidance_scale if guidance_scale is not None else rec.get("guidance_scale")
        n = steps or ck.schedule.steps
        distill = ck.distillation
    profile, _ = make_profile(student_dir, unet_cfg, size, resolutions, batch_sizes)
    # dd-distill's record names the mode: an LCM-LoRA folder (no time_cond_proj_dim) has its
    # guidance in its weights ("none"), not the CFG a plain UNet would default to
    mode = distill.get("guidance_mode") if source.is_dir() else None
    loaded = (
        load_pipeline(source, profile=profile, guidance=mode if mode in ("none", "embedded") else None)
        if source.is_dir()
        else load_t2i_student(source, profile=profile)
    )
    tinfo = _teacher_info(Path(teacher)) if teacher is not None else None
    if scale is None:
        scale = {"cfg": tinfo.guidance_scale if tinfo else 7.5, "embedded": 8.5, "none": 0.0}[
            loaded.spec.guidance
        ]
    if loaded.spec.guidance == "none" and scale > 1:
        raise InputError(f"--guidance-scale {scale}: the pipeline has no guidance (mode 'none'): use <= 1")
    return T2ISource(source, loaded, int(n), float(scale), tinfo, distill)


def demo_source() -> Path:
    """The bundled distilled LCM student if present, else the demo teacher (run with --steps 4)."""
    student = DEMO_T2I / "student_lcm4"
    if (student / "model_index.json").exists():
        return student
    teacher = DEMO_T2I / "teacher"
    if not (teacher / "model_index.json").exists():
        raise InputError(f"{teacher}: the bundled text-to-image demo is missing (reinstall dd-compile)")
    return teacher
