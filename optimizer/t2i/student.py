"""The text-to-image student.ckpt: a distilled UNet plus the name and hashes of its teacher pipeline.

A student reuses its teacher's text encoder, tokenizer and VAE, so the checkpoint (format version
2, optimizer/checkpoint.py) stores only the UNet and, in its "pipeline" field, the teacher folder
and the sha256 of each reused component folder. Loading rebuilds the pipeline from the teacher's
components and the student's UNet, and refuses a teacher whose components changed since.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.fileio import sha256_file
from engines.schedule import SamplingSchedule
from optimizer.checkpoint import (
    PIPELINE_COMPONENTS,
    StudentCheckpoint,
    TeacherRef,
    clean_config,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from optimizer.families import FAMILIES
from optimizer.t2i.components import GUIDANCE_MODES, Profile
from optimizer.t2i.load import (
    LoadedPipeline,
    _read_json,
    check_configs,
    check_layout,
    check_scheduler,
    check_tokenizer_fits,
    check_weights,
    component_configs,
    load_component,
    pipeline_spec,
)

UNET_CLASS = "UNet2DConditionModel"
# the pipeline class diffusers runs a student's scheduler with
PIPELINE_FOR_SCHEDULER = {"LCMScheduler": "LatentConsistencyModelPipeline"}


def folder_sha256(folder: Path) -> str:
    """sha256 over the sorted relative paths and file hashes of every file under `folder`."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for f in files:
        rel = f.relative_to(folder).as_posix()
        h.update(f"{rel}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def component_hashes(pipe_dir: str | Path) -> dict[str, str]:
    """{text_encoder, tokenizer, vae: sha256} of a pipeline folder's reused components."""
    pipe_dir = Path(pipe_dir)
    out = {}
    for name in PIPELINE_COMPONENTS:
        d = pipe_dir / name
        if not d.is_dir():
            raise InputError(f"{pipe_dir}: component {name!r} is missing (no {name}/ folder)")
        out[name] = folder_sha256(d)
    return out


def _reference(teacher_dir: Path) -> TeacherRef:
    info = teacher_dir / "teacher.json"
    d = _read_json(info) if info.exists() else {}
    return TeacherRef(
        path=str(teacher_dir),
        sha256=folder_sha256(teacher_dir / "unet"),
        reference_sampler=str(d.get("reference_sampler", "ddim")),
        reference_steps=int(d.get("reference_steps", 50)),
    )


def save_t2i_student(
    path: str | Path,
    unet: Any,
    teacher_dir: str | Path,
    *,
    scheduler_class: str,
    scheduler_config: dict[str, Any],
    schedule: SamplingSchedule,
    guidance: str,
    guidance_scale: float | None,
    distillation: dict[str, Any],
) -> Path:
    """Write student.ckpt atomically: the UNet's weights and the record naming its teacher pipeline."""
    teacher_dir = Path(teacher_dir)
    check_layout(teacher_dir)
    if guidance not in GUIDANCE_MODES:
        raise InputError(f"guidance {guidance!r}: not one of {', '.join(GUIDANCE_MODES)}")
    if type(unet).__name__ != UNET_CLASS:
        raise InputError(f"student UNet is a {type(unet).__name__}, expected a {UNET_CLASS}")
    ckpt = StudentCheckpoint(
        model_class=UNET_CLASS,
        model_config=clean_config(dict(unet.config)),
        scheduler_class=scheduler_class,
        scheduler_config=clean_config(scheduler_config),
        schedule=schedule,
        teacher=_reference(teacher_dir),
        distillation=distillation,
        pipeline={
            "path": str(teacher_dir),
            "components": component_hashes(teacher_dir),
            "guidance": guidance,
            "guidance_scale": None if guidance_scale is None else float(guidance_scale),
        },
    )
    return save_checkpoint(ckpt, unet, path)


def is_t2i_checkpoint(path: str | Path) -> bool:
    """A student.ckpt with the text-to-image 'pipeline' field (reads the header only)."""
    return "pipeline" in read_metadata(path)


def teacher_dir_of(ckpt_path: Path, recorded: str) -> Path:
    """The recorded teacher folder: absolute as is; relative to the checkpoint's folder, else the cwd."""
    p = Path(recorded)
    if p.is_absolute():
        return p
    beside = ckpt_path.parent / p
    return beside if beside.is_dir() else p


def recorded_teacher(record_path: Path, record: dict[str, Any]) -> Path | None:
    """The teacher folder a dd-distill student folder's distill.json names, its files checked
    against the sha256 recorded at distillation (as load_t2i_student checks a format-2 checkpoint).

    A relative path is relative to the folder holding distill.json, never to the cwd."""
    teacher = record.get("teacher")
    if teacher is None:
        return None
    rec_path = teacher.get("path") if isinstance(teacher, dict) else None
    if not isinstance(rec_path, str) or not rec_path:
        raise InputError(f"{record_path}: teacher.path must be the teacher pipeline folder (a string)")
    p = Path(rec_path)
    folder = p if p.is_absolute() else (record_path.parent / p).resolve()
    if not folder.is_dir():
        raise InputError(
            f"{record_path}: teacher {rec_path!r} not found ({folder}); give --teacher DIR to compare "
            "against another pipeline"
        )
    hashes = teacher.get("components_sha256")
    if hashes is None:
        return folder
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise InputError(f"{record_path}: teacher.components_sha256 must map files to sha256 strings")
    recorded: dict[str, dict[str, str]] = {}
    for rel, sha in hashes.items():
        comp, sep, name = rel.partition("/")
        if comp not in PIPELINE_COMPONENTS or not sep or not name or Path(name).name != name:
            raise InputError(f"{record_path}: teacher.components_sha256: {rel!r} is not <component>/<file>")
        recorded.setdefault(comp, {})[name] = sha
    for comp in PIPELINE_COMPONENTS:
        if comp not in recorded:
            continue  # dd-distill records every reused component; an older record may not have all
        d = folder / comp
        now = {f.name: f for f in sorted(d.glob("*")) if f.is_file()} if d.is_dir() else {}
        for name in sorted(set(now) | set(recorded[comp])):
            want, f = recorded[comp].get(name), now.get(name)
            got = sha256_file(f) if f is not None else None
            if got != want:
                what = "added" if want is None else "removed" if got is None else "changed"
                raise InputError(
                    f"{record_path}: teacher component {comp!r} in {d} changed since distillation "
                    f"({comp}/{name} {what}"
                    + (f": sha256 {got[:12]}..., recorded {want[:12]}...)" if got and want else ")")
                )
    return folder


def load_t2i_student(
    path: str | Path, *, profile: Profile | None = None, guidance: str | None = None
) -> LoadedPipeline:
    """The teacher's text encoder, tokenizer and VAE with the student's UNet and scheduler.

    A teacher component whose sha256 differs from the recorded one is refused, naming both."""
    from optimizer.models import model_from_config

    path = Path(path)
    ckpt = load_checkpoint(path)
    rec = ckpt.pipeline
    if rec is None:
        raise InputError(f"{path}: not a text-to-image student.ckpt (no 'pipeline' metadata field)")
    if ckpt.model_class != UNET_CLASS:
        raise InputError(
            f"{path}: model class {ckpt.model_class!r}, a text-to-image student is a {UNET_CLASS}"
        )
    teacher = teacher_dir_of(path, rec["path"])
    try:
        index = check_layout(teacher)
    except InputError as e:
        raise InputError(f"{path}: its teacher pipeline: {e}") from None
    if index.get("_class_name") not in FAMILIES["sd"].pipeline_classes:
        raise InputError(
            f"{path}: its teacher {teacher} is a {index.get('_class_name')}; student checkpoints "
            "take SD 1.x/2.x teachers (give another family's student as a pipeline folder)"
        )
    now = component_hashes(teacher)
    for name in PIPELINE_COMPONENTS:
        if now[name] != rec["components"][name]:
            raise InputError(
                f"{path}: teacher component {name!r} in {teacher / name} changed since the student "
                f"was saved (sha256 {now[name][:12]}..., recorded {rec['components'][name][:12]}...)"
            )
    where = f"{path} (student UNet)"
    check_weights(teacher)
    configs = component_configs(teacher)
    configs["unet"] = dict(ckpt.model_config)
    te_where, vae_where = str(teacher / "text_encoder" / "config.json"), str(teacher / "vae" / "config.json")
    check_configs(configs, {"text_encoder": te_where, "unet": where, "vae_decoder": vae_where})
    sched_cfg = {"_class_name": ckpt.scheduler_class, **ckpt.scheduler_config}
    check_scheduler(sched_cfg, f"{path} (scheduler)")
    check_tokenizer_fits(teacher, configs)
    try:
        unet = model_from_config(UNET_CLASS, ckpt.model_config)
        unet.load_state_dict(ckpt.state_dict or {}, strict=True)
    except Exception as e:  # a config diffusers refuses, missing/unexpected/misshapen tensors
        raise InputError(f"{where}: does not load ({type(e).__name__}: {str(e)[:200]})") from None
    pipeline_class = PIPELINE_FOR_SCHEDULER.get(ckpt.scheduler_class, index["_class_name"])
    spec = pipeline_spec(
        teacher,
        pipeline_class,
        configs,
        sched_cfg,
        profile=profile,
        guidance=guidance or rec["guidance"],
        unet_where=where,
        index=index,
    )
    return LoadedPipeline(
        path=teacher,
        spec=spec,
        modules={
            "text_encoder": load_component("text_encoder", teacher / "text_encoder"),
            "unet": unet.eval(),
            "vae": load_component("vae", teacher / "vae"),
        },
        tokenizer_dirs={"tokenizer": teacher / "tokenizer"},
    )
