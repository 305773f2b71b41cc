"""What a text-to-image SOURCE is: a diffusers pipeline folder or a student.ckpt naming its teacher.

Resolves the student pipeline, its teacher pipeline (for the distribution check and the speed
baseline), the student's steps and guidance scale, and the shape profile (--size / --resolutions),
all checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.iospec import DimRange
from engines.schedulers import SCHEDULER_CLASSES
from optimizer.t2i.components import Profile, latent_patch, vae_scale_factor
from optimizer.t2i.load import (
    PIPELINE_CLASSES,
    LoadedPipeline,
    _read_json,
    check_configs,
    check_layout,
    check_scheduler,
    check_steps,
    check_tokenizer,
    check_weights,
    component_configs,
    default_guidance,
    family_of_folder,
    load_pipeline,
    sample_size,
)

DEMO_T2I = Path(__file__).parents[1] / "demo" / "t2i"
# the largest --size / --resolutions side in pixels: SD's 512-latent export bound at VAE factor 8
MAX_SIDE = 4096


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
    if source.is_dir():
        index = source / "model_index.json"
        if not index.exists():
            return False
        try:
            d = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return True  # the text-to-image flow refuses it by name, never the pixel flow
        # only a well-formed index of another pipeline (a pixel DDPMPipeline: unet + scheduler, no
        # text encoder) is the pixel flow's; anything else with a model_index.json is checked here
        pixel = (
            isinstance(d, dict)
            and "text_encoder" not in d
            and isinstance(d.get("_class_name"), str)
            and d["_class_name"] not in PIPELINE_CLASSES
        )
        return not pixel
    if source.is_file() and source.suffix in (".ckpt", ".safetensors"):
        from optimizer.t2i.student import is_t2i_checkpoint

        try:
            return is_t2i_checkpoint(source)
        except InputError:
            return False  # the pixel flow reports what is wrong with it
    return False


def denoiser_multiple(config: dict[str, Any]) -> int:
    """What latent sizes must be a multiple of: a UNet's down-sampling (its skips), a DiT's patch."""
    if "block_out_channels" in config:
        return 2 ** (len(config["block_out_channels"]) - 1)
    return latent_patch(config)


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
    unet_where: str | Path | None = None,
) -> tuple[Profile, tuple[int, int]]:
    """The engines' shape range and the size validation runs at; bad sizes are one-line errors."""
    where = unet_where or student_dir / "unet" / "config.json"  # a student.ckpt's UNet
    vae_cfg = _read_json(student_dir / "vae" / "config.json")
    k = vae_scale_factor(vae_cfg)
    mult = k * denoiser_multiple(unet_config)
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise InputError(f"--batch-sizes {','.join(map(str, batch_sizes))}: each must be an integer >= 1")
    native = sample_size(unet_config, where)
    if resolutions:
        for r in resolutions:
            if not mult <= r <= MAX_SIDE:
                raise InputError(f"--resolutions {r}: outside [{mult}, {MAX_SIDE}] pixels")
            if r % mult:
                raise InputError(f"--resolutions {r}: not a multiple of {mult} (VAE factor {k} x UNet's)")
        lo, hi = min(resolutions), max(resolutions)
        size = size or (resolutions[0], resolutions[0])
        rng_h = rng_w = (lo, hi)
    else:
        if size is None and native is None:
            raise InputError(f"{where}: no sample_size (the UNet's native size): give --size HxW")
        size = size or (native[0] * k, native[1] * k)
        rng_h, rng_w = (size[0], size[0]), (size[1], size[1])
    for name, v, (lo, hi) in (("height", size[0], rng_h), ("width", size[1], rng_w)):
        if v % mult:
            raise InputError(f"--size {size[0]}x{size[1]}: {name} {v} is not a multiple of {mult}")
        if v > MAX_SIDE:
            raise InputError(f"--size {size[0]}x{size[1]}: {name} {v} is over the maximum {MAX_SIDE}")
        if not lo <= v <= hi:
            raise InputError(f"--size {size[0]}x{size[1]}: {name} {v} outside the profile [{lo}, {hi}]")

    def lat(r: tuple[int, int], v: int) -> DimRange:
        return DimRange(r[0] // k, v // k, r[1] // k)

    batch = DimRange(min(batch_sizes), min(batch_sizes), max(batch_sizes))
    return Profile(batch, lat(rng_h, size[0]), lat(rng_w, size[1])), size


def _finite(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InputError(f"{what} {v!r}: must be a finite number")
    return float(v)


def _teacher_info(path: Path, checked: bool = False) -> TeacherInfo:
    """The teacher's layout, weights headers, reference steps and guidance (teacher.json), checked
    here: the teacher runs after export (distribution, speed), too late to refuse its files."""
    import diffusers

    check_layout(path)
    if not checked:
        check_weights(path)
        check_tokenizer(path / "tokenizer")
    info = path / "teacher.json"
    d = _read_json(info) if info.exists() else {}
    steps = d.get("reference_steps", 50)
    scale = _finite(d.get("reference_guidance_scale", 7.5), f"{info}: reference_guidance_scale")
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched_cfg = _read_json(sched_file)
    cls = sched_cfg.get("_class_name")
    if cls in SCHEDULER_CLASSES:
        check_steps(
            check_scheduler(sched_cfg, str(sched_file)), steps, f"{info}: reference_steps", str(sched_file)
        )
    else:  # the teacher runs in diffusers: any of its schedulers, by a name diffusers has
        if not isinstance(cls, str) or not cls.endswith("Scheduler") or not hasattr(diffusers, cls):
            raise InputError(f"{sched_file}: _class_name {cls!r} is not a diffusers scheduler")
        n_train = sched_cfg.get("num_train_timesteps", 1000)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_train:
            raise InputError(f"{info}: reference_steps {steps!r}: must be an integer in [1, {n_train}]")
    return TeacherInfo(path=path, reference_steps=steps, guidance_scale=scale)


def resolve(
    source: Path,
    *,
    steps: int | None,
    guidance_scale: float | None,
    teacher: Path | None,
    size: tuple[int, int] | None,
    resolutions: tuple[int, ...] | None,
    batch_sizes: tuple[int, ...],
    max_sequence_length: int | None = None,
    prompt_chunks: int = 1,
) -> T2ISource:
    """Every check of the source and its options, cheapest first; the modules load last. Nothing
    here writes, and nothing after it (export) meets a user error that could be found here."""
    from optimizer.t2i.student import load_t2i_student, recorded_teacher, teacher_dir_of

    if guidance_scale is not None:
        _finite(guidance_scale, "--guidance-scale")
    distill: dict[str, Any] = {}
    if source.is_dir():
        check_layout(source)
        configs = component_configs(source)
        den = family_of_folder(source).denoiser
        unet_cfg, unet_where = configs[den], source / den / "config.json"
        student_dir = source
        dj = source / "distill.json"  # dd-distill's record in a student pipeline folder
        if dj.exists():
            distill = _read_json(dj)
            if teacher is None:  # the recorded teacher, its components checked against the record
                teacher = recorded_teacher(dj, distill)
        # no record: the folder is its own teacher, at its reference steps and guidance
        teacher = teacher or source
        scale = guidance_scale if guidance_scale is not None else distill.get("guidance_scale")
        scale_what = "--guidance-scale" if guidance_scale is not None else f"{dj}: guidance_scale"
        n = steps or distill.get("steps")
        steps_what = "--steps" if steps else f"{dj}: steps"
        if n is None:
            raise InputError(f"{source}: a pipeline folder needs --steps N (the student's step count)")
        sched_where = str(source / "scheduler" / "scheduler_config.json")
        sched_cfg = _read_json(Path(sched_where))
        mode = distill.get("guidance_mode")
        mode = mode if mode in ("none", "embedded") else None
        effective = mode or default_guidance(unet_cfg)
    else:
        from optimizer.checkpoint import load_checkpoint

        ck = load_checkpoint(source, weights=False)
        rec = ck.pipeline or {}
        student_dir = teacher_dir_of(source, rec["path"])
        try:
            check_layout(student_dir)
        except InputError as e:
            raise InputError(f"{source}: its teacher pipeline: {e}") from None
        configs = component_configs(student_dir)
        unet_cfg, unet_where = ck.model_config, f"{source} (student UNet)"
        check_configs(
            {**configs, "unet": unet_cfg}, {"text_encoder": "", "unet": unet_where, "vae_decoder": ""}
        )
        teacher = teacher or student_dir
        scale = guidance_scale if guidance_scale is not None else rec.get("guidance_scale")
        scale_what = (
            "--guidance-scale" if guidance_scale is not None else f"{source}: pipeline.guidance_scale"
        )
        n = steps or ck.schedule.steps
        steps_what = "--steps" if steps else f"{source}: schedule steps"
        sched_where = f"{source} (scheduler)"
        sched_cfg = {"_class_name": ck.scheduler_class, **ck.scheduler_config}
        mode, effective = None, rec.get("guidance")
    classes = family_of_folder(student_dir).schedulers
    n = check_steps(check_scheduler(sched_cfg, sched_where, classes), n, steps_what, sched_where)
    profile, _ = make_profile(student_dir, unet_cfg, size, resolutions, batch_sizes, unet_where)
    if max_sequence_length is not None:
        profile = dataclasses.replace(profile, t5_tokens=max_sequence_length)
    profile = dataclasses.replace(profile, prompt_chunks=prompt_chunks)
    tinfo = _teacher_info(Path(teacher), checked=Path(teacher) == source)
    if scale is None:
        scale = {"cfg": tinfo.guidance_scale, "embedded": 8.5, "none": 0.0}.get(effective, 7.5)
    scale = _finite(scale, scale_what)
    if effective == "none" and scale > 1:
        raise InputError(f"--guidance-scale {scale}: the pipeline has no guidance (mode 'none'): use <= 1")
    # dd-distill's record names the mode: an LCM-LoRA folder (no time_cond_proj_dim) has its
    # guidance in its weights ("none"), not the CFG a plain UNet would default to
    loaded = (
        load_pipeline(source, profile=profile, guidance=mode)
        if source.is_dir()
        else load_t2i_student(source, profile=profile)
    )
    return T2ISource(source, loaded, n, scale, tinfo, distill)


def demo_source() -> Path:
    """The bundled distilled LCM student if present, else the demo teacher (run with --steps 4)."""
    student = DEMO_T2I / "student_lcm4"
    if (student / "model_index.json").exists():
        return student
    teacher = DEMO_T2I / "teacher"
    if not (teacher / "model_index.json").exists():
        raise InputError(f"{teacher}: the bundled text-to-image demo is missing (reinstall dd-compile)")
    return teacher
