"""dd-distill for text-to-image teachers (a diffusers pipeline folder with model_index.json).

    dd-distill TEACHER_PIPE -o student.ckpt --steps 4 --method guided-progressive --guidance 2:8
    dd-distill TEACHER_PIPE -o student/ --steps 4 --method lcm --lora-rank 16 --prompts p.txt
    dd-distill --demo t2i -o student/ [--resume]

Training pairs: --data DIR (imagefolder: metadata.jsonl with file_name + text), or --prompts FILE
(data-free: the teacher samples its own latents), or, for the bundled demo, its coloured digits.
`-o x.ckpt` writes the text-to-image student.ckpt dd-compile reads (optimizer/t2i/student.py);
any other -o a diffusers pipeline folder. Training state, the loss plot, report.json and (demo)
the per-phase sample grids go to <stem>.distill/ beside it, as for pixel teachers; --resume
continues from its state.safetensors. With the demo's judge, each run records adherence and FID
of the student, the teacher at its reference sampler and the teacher at the student's steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InputError
from optimizer.distill.t2i import (
    PhaseHook,
    T2IDistillConfig,
    T2IDistiller,
    TextToImageTeacher,
    demo_batches,
    is_checkpoint_path,
    sample_student,
    t2i_dist,
    work_dir_for,
)

log = logging.getLogger("dd-distill")

DEMO_T2I_TEACHER = Path(__file__).resolve().parents[1] / "demo" / "t2i" / "teacher"
GRID_PROMPTS, GRID_SEEDS = 6, 8  # the per-phase sample grid (demo): rows, columns


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


@dataclass
class DemoJudgeSet:
    """The demo's digit-and-colour judge with its fixed prompts, latents and real-image features:
    made once, it scores any pipeline the same way (the final judging and every phase's)."""

    judge: Any
    examples: list[Any]
    latents: Any
    real_features: np.ndarray

    @classmethod
    def make(cls, n: int) -> DemoJudgeSet:
        from optimizer.demo.t2i.classifier import load_judge
        from optimizer.demo.t2i.data import evaluation_prompts
        from optimizer.demo.t2i.evaluate import fixed_latents, real_images

        judge = load_judge()
        return cls(
            judge,
            evaluation_prompts(n, seed=1),
            fixed_latents(n, seed=1),
            judge(real_images(2000, seed=8)[0]),
        )

    def images(self, pipe, steps: int, guidance: float) -> np.ndarray:
        from optimizer.demo.t2i.evaluate import sample_pipeline

        return sample_pipeline(pipe, self.examples, self.latents, steps, guidance)

    def score(self, imgs: np.ndarray) -> dict[str, Any]:
        from optimizer.compile.quality import frechet_distance

        return {
            "adherence": self.judge.adherence(imgs, self.examples).to_dict(),
            "fid": frechet_distance(self.judge(imgs), self.real_features),
        }


def judge_quality(
    teacher: TextToImageTeacher,
    student_pipe,
    cfg: T2IDistillConfig,
    n: int,
    student_guidance: float | None = None,
) -> dict[str, Any]:
    """Adherence + FID with the demo's digit-and-colour judge: student, teacher-50 CFG, teacher at
    the student's steps with CFG; the same prompts and latents for all three. `student_guidance`:
    the scale the student samples at (default the teacher's; 1 for LCM-LoRA)."""
    from optimizer.compile.quality import paired_psnr
    from optimizer.demo.t2i.train import REFERENCE_STEPS

    js = DemoJudgeSet.make(n)
    s = cfg.eval_guidance
    log.info(
        "judging student, teacher-%d and teacher-%d at guidance %.1f on %d prompts",
        REFERENCE_STEPS,
        cfg.steps,
        s,
        n,
    )
    imgs = {
        "teacher_reference": js.images(teacher.pipe, REFERENCE_STEPS, s),
        "teacher_at_student_steps": js.images(teacher.pipe, cfg.steps, s),
        "student": js.images(student_pipe, cfg.steps, s if student_guidance is None else student_guidance),
    }
    out: dict[str, Any] = {"n": n, "guidance_scale": s, "reference_steps": REFERENCE_STEPS}
    for k, v in imgs.items():
        out[k] = js.score(v)
    out["student"]["paired_psnr_to_teacher_db"] = paired_psnr(imgs["student"], imgs["teacher_reference"])
    out["fid_ratio_student_to_teacher"] = out["student"]["fid"] / max(out["teacher_reference"]["fid"], 1e-9)
    return out


def _check_output(run: T2IRun, teacher: TextToImageTeacher, work: Path) -> None:
    """Everything about -o that can be refused, refused before any training (one line, exit 2)."""
    from engines.outdir import check_target

    out = run.out
    if is_checkpoint_path(out):
        if out.is_dir():
            raise InputError(
                f"-o {out}: is an existing folder; a .ckpt output is a student.ckpt file "
                "(for a student pipeline folder, give -o a name without .ckpt)"
            )
        for parent in out.resolve().parents:
            if parent.exists() and not parent.is_dir():
                raise InputError(f"-o {out}: lies under {parent}, which is an existing file")
        from optimizer.t2i.load import check_layout
        from optimizer.t2i.student import component_hashes

        # what save_t2i_student needs of the teacher (its layout and component folders)
        try:
            check_layout(teacher.folder)
            component_hashes(teacher.folder)
        except InputError as e:
            raise InputError(f"-o {out}: a student.ckpt names its teacher's components: {e}") from None
    else:
        check_target(out, "t2i-student", "-o", protect=[run.teacher])
    check_target(work, "distill", "-o (its <stem>.distill/ folder)", protect=[run.teacher])


def _grid_hook(
    teacher: TextToImageTeacher,
    cfg: T2IDistillConfig,
    work: Path,
    prompts: int = GRID_PROMPTS,
    seeds: int = GRID_SEEDS,
    reference_steps: int | None = None,
    phase_prompts: int = 0,
) -> PhaseHook:
    """The demo's prompt-by-seed grid per phase: `prompts` rows, `seeds` columns, the same
    latents in every phase; the teacher at its reference sampler with CFG once, beside them."""
    import torch

    from optimizer.demo.t2i.data import evaluation_prompts
    from optimizer.demo.t2i.evaluate import fixed_latents
    from optimizer.demo.t2i.train import REFERENCE_STEPS
    from optimizer.distill.distill_report import save_grid

    ref_steps = reference_steps or REFERENCE_STEPS
    texts = [e.prompt for e in evaluation_prompts(prompts, seed=1)]
    c = teacher.unet.config
    lat = fixed_latents(seeds, seed=1, shape=(c.in_channels, c.sample_size, c.sample_size))

    def grid(pipe, steps: int, guidance: float) -> list[tuple[str, np.ndarray]]:
        g = torch.Generator().manual_seed(0)  # the LCM sampler's step noise, the same per phase
        return [(p[:18], sample_student(pipe, [p] * seeds, lat, steps, guidance, g)) for p in texts]

    judged: list[DemoJudgeSet] = []  # made at the first phase, reused by the others

    def quality(pipe, steps: int, guidance: float) -> dict[str, Any]:
        """The phase's student judged like the final one, at its own steps."""
        if not judged:
            judged.append(DemoJudgeSet.make(phase_prompts))
        js = judged[0]
        return {
            "n": len(js.examples),
            "steps": steps,
            "guidance_scale": guidance,
            **js.score(js.images(pipe, steps, guidance)),
        }

    def hook(d: T2IDistiller, student, rec: dict[str, Any]) -> dict[str, Any]:
        ref = work / "teacher_samples.png"
        if not ref.exists():
            save_grid(ref, grid(teacher.pipe, ref_steps, cfg.eval_guidance))
        name = f"phase{rec['index']}_samples.png"
        pipe = d.student_pipeline(student)
        save_grid(work / name, grid(pipe, rec["steps"], d.sampling_guidance()))
        log.info(
            "%s: sample grid %s (teacher DDIM-%d with CFG: %s)", rec["phase"], work / name, ref_steps, ref
        )
        out: dict[str, Any] = {"samples": name}
        if phase_prompts:
            q = out["quality"] = quality(pipe, rec["steps"], d.sampling_guidance())
            a = q["adherence"]
            log.info(
                "%s at %d steps: adherence digit %.3f colour %.3f, FID %.1f (%d prompts)",
                rec["phase"],
                rec["steps"],
                a["digit"],
                a["colour"],
                q["fid"],
                q["n"],
            )
        return out

    return hook


def _data_key(run: T2IRun) -> dict[str, Any]:
    """The training pairs' identity for --resume (a resumed run must draw from the same data)."""
    return {
        "data": str(run.data.resolve()) if run.data else None,
        "prompts": str(run.prompts.resolve()) if run.prompts else None,
        "data_free_samples": run.data_free_samples if run.prompts else None,
        "demo": run.demo,
    }


def run_t2i(run: T2IRun) -> dict[str, Any]:
    """Train (resumable, DDP under torchrun) and write the student: `-o x.ckpt` -> student.ckpt,
    else a pipeline folder; returns the distillation record (rank 0; {} on other ranks)."""
    import torch

    from engines.outdir import claim
    from optimizer.distill.t2i_data import imagefolder_batches, read_prompts, teacher_sample_batches

    if run.prompts and run.data:
        raise InputError("--prompts and --data: give one source of training pairs, not both")
    torch.set_num_threads(run.cfg.threads)
    dist = t2i_dist()
    teacher = TextToImageTeacher.load(run.teacher)
    work = work_dir_for(run.out)
    if dist.main:
        _check_output(run, teacher, work)  # before any training
    size = teacher.pipe.unet.config.sample_size * teacher.pipe.vae_scale_factor
    if run.data:
        batches = imagefolder_batches(run.data, size)
    elif run.prompts:
        # every rank samples the same latents (same seed, CPU): no broadcast needed
        batches = teacher_sample_batches(
            teacher, read_prompts(run.prompts), run.data_free_samples, run.cfg.guidance, seed=run.cfg.seed
        )
    elif run.demo:
        batches = demo_batches()
    else:
        raise InputError(
            "a text-to-image teacher needs --prompts FILE (data-free) or --data DIR (imagefolder)"
        )
    if dist.main:
        claim(work, "distill", run.out.name)
    dist.barrier()
    judged = run.demo and run.evaluate > 0
    d = T2IDistiller(
        teacher,
        batches,
        run.cfg,
        work=work,
        dist=dist,
        data_key=_data_key(run),
        on_phase=_grid_hook(teacher, run.cfg, work, phase_prompts=run.evaluate) if judged else None,
    )
    student = d.run()
    quality = {}
    if judged and dist.main:
        quality = judge_quality(
            teacher, d.student_pipeline(student), run.cfg, run.evaluate, d.sampling_guidance()
        )
    record = d.finish(student, run.out, quality)
    if dist.main:
        log.info("student written to %s (work folder %s)", run.out, work)
    return record
