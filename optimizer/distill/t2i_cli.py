"""dd-distill for text-to-image teachers (a diffusers pipeline folder with model_index.json).

    dd-distill TEACHER_PIPE -o student/ --steps 4 --method guided-progressive --guidance 2:8
    dd-distill TEACHER_PIPE -o student/ --steps 4 --method lcm --lora-rank 16 --prompts p.txt
    dd-distill --demo t2i -o student/

Training pairs: --data DIR (imagefolder: metadata.jsonl with file_name + text), or --prompts FILE
(data-free: the teacher samples its own latents), or, for the bundled demo, its coloured digits.
The student is a diffusers pipeline folder; with the demo's judge, each run records adherence and
FID of the student, the teacher at its reference sampler and the teacher at the student's steps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import InputError
from optimizer.distill.t2i import T2IDistillConfig, T2IDistiller, TextToImageTeacher, demo_batches

log = logging.getLogger("dd-distill")

DEMO_T2I_TEACHER = Path(__file__).resolve().parents[1] / "demo" / "t2i" / "teacher"


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


@dataclass
class T2IRun:
    teacher: Path
    out: Path
    cfg: T2IDistillConfig
    prompts: Path | None = None
    data: Path | None = None
    data_free_samples: int = 2000
    evaluate: int = 300  # demo judge samples (0: skip)
    demo: bool = False


def judge_quality(teacher: TextToImageTeacher, student_pipe, cfg: T2IDistillConfig, n: int) -> dict[str, Any]:
    """Adherence + FID with the demo's digit-and-colour judge: student, teacher-50 CFG, teacher at
    the student's steps with CFG; the same prompts and latents for all three."""
    from optimizer.compile.quality import frechet_distance, paired_psnr
    from optimizer.demo.t2i.classifier import load_judge
    from optimizer.demo.t2i.data import evaluation_prompts
    from optimizer.demo.t2i.evaluate import fixed_latents, real_images, sample_pipeline
    from optimizer.demo.t2i.train import REFERENCE_STEPS

    judge = load_judge()
    ex = evaluation_prompts(n, seed=1)
    lat = fixed_latents(n, seed=1)
    real, _ = real_images(2000, seed=8)
    real_f = judge(real)
    s = cfg.eval_guidance
    log.info(
        "judging student, teacher-%d and teacher-%d at guidance %.1f on %d prompts",
        REFERENCE_STEPS,
        cfg.steps,
        s,
        n,
    )
    imgs = {
        "teacher_reference": sample_pipeline(teacher.pipe, ex, lat, REFERENCE_STEPS, s),
        "teacher_at_student_steps": sample_pipeline(teacher.pipe, ex, lat, cfg.steps, s),
        "student": sample_pipeline(student_pipe, ex, lat, cfg.steps, s),
    }
    out: dict[str, Any] = {"n": n, "guidance_scale": s, "reference_steps": REFERENCE_STEPS}
    for k, v in imgs.items():
        out[k] = {"adherence": judge.adherence(v, ex).to_dict(), "fid": frechet_distance(judge(v), real_f)}
    out["student"]["paired_psnr_to_teacher_db"] = paired_psnr(imgs["student"], imgs["teacher_reference"])
    out["fid_ratio_student_to_teacher"] = out["student"]["fid"] / max(out["teacher_reference"]["fid"], 1e-9)
    return out


def run_t2i(run: T2IRun) -> dict[str, Any]:
    import torch

    from optimizer.distill.t2i_data import imagefolder_batches, read_prompts, teacher_sample_batches

    if run.prompts and run.data:
        raise InputError("--prompts and --data: give one source of training pairs, not both")
    from engines.outdir import check_target

    torch.set_num_threads(run.cfg.threads)
    teacher = TextToImageTeacher.load(run.teacher)
    check_target(run.out, "t2i-student", "-o", protect=[run.teacher])  # before any training
    size = teacher.pipe.unet.config.sample_size * teacher.pipe.vae_scale_factor
    if run.data:
        batches = imagefolder_batches(run.data, size)
    elif run.prompts:
        batches = teacher_sample_batches(
            teacher, read_prompts(run.prompts), run.data_free_samples, run.cfg.guidance, seed=run.cfg.seed
        )
    elif run.demo:
        batches = demo_batches()
    else:
        raise InputError(
            "a text-to-image teacher needs --prompts FILE (data-free) or --data DIR (imagefolder)"
        )
    d = T2IDistiller(teacher, batches, run.cfg)
    student = d.run()
    quality = (
        judge_quality(teacher, d.student_pipeline(student), run.cfg, run.evaluate)
        if run.demo and run.evaluate
        else {}
    )
    d.save(student, run.out, quality)
    log.info("student written to %s", run.out)
    return json.loads((run.out / "distill.json").read_text())
