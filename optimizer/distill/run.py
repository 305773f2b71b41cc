"""distill(config) -> student.ckpt: the rounds of one method, evaluated and written atomically."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.errors import InputError
from engines.fileio import write_json_atomic
from engines.outdir import check_target, claim
from engines.schedule import SamplingSchedule, trailing_timesteps
from optimizer.checkpoint import StudentCheckpoint, TeacherRef, save_checkpoint
from optimizer.distill import conditioning, consistency, progressive, smaller
from optimizer.distill.conditioning import bind
from optimizer.distill.config import METHODS, DistillConfig
from optimizer.distill.distill_report import Evaluator, save_grid, save_loss_plot, summarize_losses
from optimizer.distill.trainer import Dist, Phase, Trainer, init_distributed
from optimizer.model_io import sample_shape
from optimizer.models import Denoiser, alphas_cumprod, load_teacher

log = logging.getLogger(__name__)

ZERO_SNR_TERMINAL = 1e-6  # alpha_bar(T) above this counts as non-zero terminal SNR


def _check(cfg: DistillConfig) -> None:
    if cfg.method not in METHODS:
        raise InputError(f"--method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    if cfg.steps < 1:
        raise InputError(f"--steps {cfg.steps}: expected >= 1")
    if min(cfg.iters, *(cfg.round_iters or [1])) < 1 or cfg.batch_size < 1 or cfg.checkpoint_every < 1:
        raise InputError("--iters, --batch-size and --checkpoint-every must be >= 1")
    if not cfg.lr > 0:
        raise InputError(f"--lr {cfg.lr}: expected > 0")


def _alphas(teacher: Any, cfg: DistillConfig) -> tuple[np.ndarray, bool, dict[str, Any]]:
    """The alpha_bar table the student trains and samples with, and its scheduler config.

    Zero terminal SNR (Lin et al. 2023, arXiv 2305.08891, Alg. 1; diffusers
    rescale_zero_terminal_snr) where 1-2 steps are asked for: the first step then starts from pure
    noise, as sampling does. Needs v- or x-prediction (epsilon is undefined at SNR 0).
    """
    table = alphas_cumprod(teacher.scheduler)
    sched_cfg = dict(teacher.scheduler.config)
    want = cfg.zero_snr if cfg.zero_snr is not None else (cfg.steps <= 2 and table[-1] > ZERO_SNR_TERMINAL)
    if want and teacher.prediction_type == "epsilon":
        # an epsilon teacher cannot give x0 at SNR 0 (x0 = (z - eps) / 0)
        if cfg.zero_snr:
            raise InputError(
                f"{cfg.teacher}: --zero-snr needs a v- or x-prediction teacher "
                "(epsilon is undefined at zero SNR)"
            )
        log.warning(
            "epsilon teacher: keeping its schedule (terminal SNR %.3g), no zero-SNR rescale",
            table[-1] / (1 - table[-1]),
        )
        want = False
    if not want:
        return table, False, sched_cfg
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = rescale_zero_terminal_snr(teacher.scheduler.betas.double())
    table = torch.cumprod(1.0 - betas, 0).numpy()
    sched_cfg["rescale_betas_zero_snr"] = True
    log.info(
        "zero terminal SNR: alpha_bar(T) %.3g -> 0 (rescaled schedule)",
        alphas_cumprod(teacher.scheduler)[-1],
    )
    return table, True, sched_cfg


def _student_prediction(teacher_pred: str, zero_snr: bool, steps: int) -> str:
    # epsilon-prediction is unstable at 1-2 steps and undefined at zero SNR (Salimans & Ho 2022,
    # Sec. 4): switch such students to v-prediction
    if teacher_pred == "epsilon" and (zero_snr or steps <= 2):
        log.info("student predicts v (the teacher predicts epsilon)")
        return "v_prediction"
    return teacher_pred


def _load_data(
    cfg: DistillConfig,
    teacher: Any,
    shape: tuple[int, int, int],
    dist: Dist,
    cond: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    from optimizer.distill.data import data_free_images, load_images

    if cfg.data is not None:
        return load_images(cfg.data, shape)
    if cfg.demo:
        from optimizer.compile.quality import load_digits_images

        return load_digits_images()[0]
    n = cfg.data_free_samples
    c = conditioning.rows(cond, n) if cond else None  # sample i drawn for conditioning row i
    if dist.enabled:  # rank 0 samples, everyone receives the same images
        x = torch.zeros((n, *shape))
        if dist.main:
            x = torch.from_numpy(data_free_images(teacher, n, shape, cfg.seed, cond=c))
        torch.distributed.broadcast(x, 0)
        return x.numpy()
    return data_free_images(teacher, n, shape, cfg.seed, cond=c)


@dataclass
class DistillResult:
    path: Path  # the student.ckpt written (by rank 0)
    model: torch.nn.Module  # the student (diffusers model), identical on every rank
    record: dict[str, Any]  # the checkpoint's distillation record


def distill(cfg: DistillConfig, dist: Dist | None = None) -> Path:
    """Run the distillation `cfg` describes; write cfg.out (rank 0) and return its path."""
    return run_distillation(cfg, dist).path


def run_distillation(cfg: DistillConfig, dist: Dist | None = None) -> DistillResult:
    return Distiller(cfg, dist).run()


class Distiller:
    """One distillation run. The constructor loads the teacher, the data and the student and
    resumes the training state; `run` trains the phases (each a method: `kd`, `progressive_round`,
    `consistency`) and `finish` writes the checkpoint. A new method is a new phase method."""

    def __init__(self, cfg: DistillConfig, dist: Dist | None = None):
        _check(cfg)
        self.cfg = cfg
        self.dist = dist = dist or init_distributed()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.t_start = time.perf_counter()
        self.teacher = teacher = self._load_teacher()
        self.cond_np = self._load_conditioning()
        teacher.model.to(dist.device).requires_grad_(False).eval()
        self.shape = sample_shape(teacher.model_class, dict(teacher.model.config))
        self.T = int(teacher.scheduler.config.num_train_timesteps)
        self.table, self.zero_snr, self.sched_cfg = _alphas(teacher, cfg)
        self.t_pred = teacher.prediction_type
        self.s_pred = _student_prediction(self.t_pred, self.zero_snr, cfg.steps)

        # <stem>.distill/ is written only if new, empty or marked ours (engines/outdir.py); the main
        # rank checks and claims it (the only rank that writes there)
        self.work = cfg.work_dir
        if dist.main:
            check_target(self.work, "distill", "-o (its <stem>.distill/ folder)", protect=[cfg.teacher])
            claim(self.work, "distill", Path(cfg.out).name)
        self.data = torch.from_numpy(_load_data(cfg, teacher, self.shape, dist, self.cond_np)).to(dist.device)
        self.trainer = Trainer(
            self.work,
            self.data,
            cfg.batch_size,
            cfg.seed,
            cfg.checkpoint_every,
            dist,
            cfg.stop_after,
            cond=self._training_conditioning(),
        )
        # JSON round trip: the key is compared with the one read back from the state's JSON
        self.key = json.loads(json.dumps({**cfg.training_key(), "teacher_sha256": teacher.weights_sha256}))
        if cfg.resume:
            self.trainer.try_resume(self.key)
        self.evaluator = self._evaluator()

        self.student_model = self._student_model()
        self.student_model.to(dist.device).requires_grad_(True).train()
        self.student = Denoiser(self.student_model)
        self.teacher_net = Denoiser(teacher.model)
        self.record = self._record_header()
        self.phase_index = 0  # the next phase's position (checkpoints and RNG streams are keyed by it)
        self.schedule: SamplingSchedule | None = None  # the student's sampler, set by the last phase

    # -- setup ------------------------------------------------------------------------------------

    def _load_teacher(self) -> Any:
        cfg = self.cfg
        teacher = load_teacher(cfg.teacher)
        if teacher.model_class not in ("UNet2DModel", "UNet2DConditionModel"):
            raise InputError(
                f"{cfg.teacher}: dd-distill supports UNet2DModel and UNet2DConditionModel teachers "
                f"(got {teacher.model_class})"
            )
        return teacher

    def _load_conditioning(self) -> dict[str, np.ndarray] | None:
        cfg, teacher = self.cfg, self.teacher
        cond_keys = conditioning.required_keys(teacher.model_class, dict(teacher.model.config))
        if cond_keys:
            if cfg.cond is None:
                raise InputError(
                    f"{cfg.teacher}: a conditional teacher ({teacher.model_class}) needs --cond, an "
                    f".npz with {cond_keys} (one row per training image)"
                )
            return conditioning.load_conditioning(cfg.cond, cond_keys, dict(teacher.model.config))
        if cfg.cond is not None:
            raise InputError(f"{cfg.cond}: --cond given, but {cfg.teacher} is unconditional")
        return None

    def _training_conditioning(self) -> dict[str, torch.Tensor] | None:
        cfg, cond_np, data = self.cfg, self.cond_np, self.data
        if cond_np is None:
            return None
        if cfg.data is not None and len(next(iter(cond_np.values()))) != len(data):
            raise InputError(
                f"{cfg.cond}: {len(next(iter(cond_np.values())))} conditioning rows for "
                f"{len(data)} images in {cfg.data} (one row per image)"
            )
        return {k: v.to(self.dist.device) for k, v in conditioning.rows(cond_np, len(data)).items()}

    def _evaluator(self) -> Evaluator | None:
        cfg, data = self.cfg, self.data
        if not (self.dist.main and cfg.eval_samples > 0):
            return None
        ref, ref_name = (
            data.cpu().numpy(),
            ("--data" if cfg.data else "data-free teacher samples") + f" ({len(data)} images)",
        )
        if cfg.demo:
            from optimizer.compile.quality import load_digits_images

            ref, ref_name = load_digits_images()[0], "all 1797 sklearn digits"
        return Evaluator(
            self.teacher,
            Denoiser(self.teacher.model),
            self.shape,
            cfg.eval_samples,
            ref,
            ref_name,
            self.dist.device,
            cond=conditioning.rows(self.cond_np, cfg.eval_samples) if self.cond_np is not None else None,
        )

    @property
    def smaller(self) -> bool:
        return self.cfg.width < 1.0 or self.cfg.layers_per_block is not None

    def _student_model(self) -> torch.nn.Module:
        teacher = self.teacher
        if not self.smaller:
            return copy.deepcopy(teacher.model)
        s_cfg = smaller.smaller_config(dict(teacher.model.config), self.cfg.width, self.cfg.layers_per_block)
        student_model = type(teacher.model).from_config(s_cfg)
        counts = smaller.init_from_teacher(student_model, teacher.model)
        log.info(
            "smaller student: %d -> %d parameters; from the teacher: %s",
            smaller.parameter_count(teacher.model),
            smaller.parameter_count(student_model),
            counts,
        )
        return student_model

    def _record_header(self) -> dict[str, Any]:
        cfg = self.cfg
        record: dict[str, Any] = {
            "method": cfg.method,
            "steps": cfg.steps,
            "student_prediction_type": self.s_pred,
            "zero_terminal_snr": self.zero_snr,
            "config": cfg.to_dict(),
            "world_size": self.dist.world,
            "teacher_parameters": smaller.parameter_count(self.teacher.model),
            "student_parameters": smaller.parameter_count(self.student_model),
            "data": cfg.data
            or (
                "all 1797 sklearn digits"
                if cfg.demo
                else f"data-free: {cfg.data_free_samples} teacher reference samples"
            ),
        }
        if self.evaluator is not None:
            record["quality"] = self.evaluator.header()
        return record

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> DistillResult:
        if self.smaller:
            self.kd()
        if self.cfg.method == "progressive":
            self.progressive()
        else:
            self.consistency()
        return self.finish()

    def ddim(self, steps: int) -> SamplingSchedule:
        return _ddim_schedule(self.table, self.T, steps, self.s_pred)

    def evaluate_round(
        self, name: str, net: torch.nn.Module, schedule: SamplingSchedule, extra: dict
    ) -> dict:
        """The round's record: its losses and time, and (rank 0, --eval-samples) FID/PSNR + a grid."""
        trainer, evaluator, teacher = self.trainer, self.evaluator, self.teacher
        rec = {"round": name, **extra}
        losses = trainer.meta["losses"].get(str(extra["phase"]), [])
        rec.update(summarize_losses(losses))
        rec["seconds"] = round(trainer.meta["seconds"].get(str(extra["phase"]), 0.0), 1)
        if evaluator is not None:
            m, x = evaluator.measure(net, schedule)
            rec.update(m)
            save_grid(
                self.work / f"round{extra['phase']}_samples.png",
                [
                    (f"teacher-{teacher.reference_steps}", evaluator.teacher_ref),
                    (f"teacher-{schedule.steps}", evaluator.teacher_samples(schedule.steps)),
                    (f"student-{schedule.steps}", x),
                ],
            )
            log.info(
                "%s: FID student %.3f | teacher DDIM-%d %.3f | teacher-%d %.3f; PSNR %.2f dB",
                name,
                m["fid_student"],
                schedule.steps,
                m["fid_teacher_ddim"],
                teacher.reference_steps,
                m["fid_teacher_reference"],
                m["psnr_student_vs_teacher_db"],
            )
        return rec

    def run_phase(
        self,
        phase: Phase,
        record_name: str,
        schedule: SamplingSchedule | None,
        extra: dict,
        next_modules: dict[str, torch.nn.Module],
        before_eval: Any = None,
    ) -> None:
        """Train a phase (unless a resumed run already finished it), evaluate the student with
        `schedule` (None: no evaluation) and checkpoint the start of the next phase."""
        trainer = self.trainer
        if not trainer.done(phase.index):
            trainer.run(phase, self.key)
            if before_eval is not None:
                before_eval()
            rec = None
            if self.dist.main and schedule is not None:
                rec = self.evaluate_round(
                    record_name, self.student, schedule, {"phase": phase.index, **extra, "iters": phase.iters}
                )
            trainer.finish_phase(self.key, phase, next_modules, rec)
        self.phase_index += 1

    def kd(self) -> None:
        """Knowledge distillation into the smaller student (BK-SDM): outputs and features."""
        cfg, student, teacher_net, t_pred = self.cfg, self.student, self.teacher_net, self.t_pred
        kd_net = smaller.KDStudent(student, self.student_model, self.teacher.model).to(self.dist.device)
        t_tap = smaller.FeatureTap(self.teacher.model)
        a_table = torch.from_numpy(self.table.astype(np.float32))
        phase = Phase(
            self.phase_index,
            "KD (smaller student)",
            cfg.kd_iters or cfg.iters,
            cfg.kd_lr,
            kd_net,
            lambda net, x, g, c: smaller.kd_loss(
                bind(net, c), bind(teacher_net, c), t_tap, x, g, a_table, t_pred, cfg.feature_weight
            ),
            {"kd": kd_net},
        )

        def remove_taps() -> None:  # before sampling: the taps would keep every step's features
            t_tap.remove()
            kd_net.tap.remove()

        ref_steps = self.teacher.reference_steps
        self.run_phase(
            phase,
            "KD",
            # the KD student is evaluated at the teacher's steps when it predicts what the teacher does
            self.ddim(ref_steps) if t_pred == self.s_pred else None,
            {"student_steps": ref_steps},
            {"student": student} if cfg.method == "progressive" else {"student": student, "target": student},
            before_eval=remove_taps,
        )
        remove_taps()  # (removing twice is harmless)

    def progressive(self) -> None:
        """Progressive distillation (Salimans & Ho 2022): rounds halving the step count."""
        cfg = self.cfg
        t_steps = cfg.teacher_steps or progressive.default_teacher_steps(
            self.teacher.reference_steps, cfg.steps
        )
        plan = progressive.round_plan(t_steps, cfg.steps)
        prev = t_steps
        for r, n in enumerate(plan):
            self.progressive_round(r, len(plan), prev, n)
            prev = n
        self.schedule = self.ddim(cfg.steps)

    def progressive_round(self, r: int, n_rounds: int, prev: int, n: int) -> None:
        """Round r: the student learns in n steps what the round's teacher does in prev."""
        student, s_pred = self.student, self.s_pred
        is_last = r == n_rounds - 1
        grid = progressive.RoundGrid(self.table, self.T, n)
        round_teacher = self.teacher_net if r == 0 else copy.deepcopy(student).requires_grad_(False).eval()
        mods = {"student": student} if r == 0 else {"student": student, "round_teacher": round_teacher}
        tp = self.t_pred if r == 0 else s_pred
        name = f"round {r + 1}/{n_rounds} ({prev}->{n} steps)"
        phase = Phase(
            self.phase_index,
            name,
            self.cfg.iters_of_round(r, n_rounds),
            self.cfg.lr,
            student,
            lambda net, x, g, c: progressive.pd_loss(
                bind(net, c), bind(round_teacher, c), grid, x, g, s_pred, tp
            ),
            mods,
        )
        self.run_phase(
            phase,
            name,
            self.ddim(n),
            {"teacher_steps": prev, "student_steps": n},
            {"student": student} if is_last else {"student": student, "round_teacher": student},
        )

    def consistency(self) -> None:
        """Consistency distillation (LCM-style): a solver grid, an EMA target, a Huber loss."""
        cfg, student, teacher_net, s_pred = self.cfg, self.student, self.teacher_net, self.s_pred
        if s_pred != self.t_pred:
            raise InputError(
                "consistency distillation keeps the teacher's prediction type; "
                "use an x- or v-prediction teacher for 1-2 steps"
            )
        grid = consistency.SolverGrid(self.table, self.T, cfg.solver_steps)
        target = copy.deepcopy(student).requires_grad_(False).eval()
        huber_c = cfg.huber_c or consistency.default_huber_c(int(np.prod(self.shape)))
        ts = consistency.lcm_timesteps(self.sched_cfg, cfg.steps, cfg.solver_steps)
        self.schedule = SamplingSchedule.from_alphas(
            self.table, ts, kind="consistency", prediction_type=s_pred
        )
        name = f"consistency ({cfg.solver_steps}-step solver, {cfg.steps}-step sampler)"
        phase = Phase(
            self.phase_index,
            name,
            cfg.iters,
            cfg.lr,
            student,
            lambda net, x, g, c: consistency.cd_loss(
                bind(net, c), bind(teacher_net, c), bind(target, c), grid, x, g, s_pred, huber_c
            ),
            {"student": student, "target": target},
            after_step=lambda: consistency.ema_update(target, student, cfg.ema_decay),
        )
        self.run_phase(
            phase, name, self.schedule, {"student_steps": cfg.steps, "huber_c": huber_c}, {"student": student}
        )
        self.record["solver_steps"] = cfg.solver_steps

    def finish(self) -> DistillResult:
        """Write student.ckpt, the report, the loss plot (rank 0); drop the resumable state."""
        cfg, trainer, dist, teacher, record = self.cfg, self.trainer, self.dist, self.teacher, self.record
        student_model, work = self.student_model, self.work
        if trainer.resume_tensors is not None and trainer.meta["phase"] >= self.phase_index:
            # resumed after the last phase had already finished
            from optimizer.distill.trainer import load_module

            load_module("student", self.student, trainer.resume_tensors)

        if dist.enabled:
            _check_ranks_agree(student_model)
        record["rounds"] = trainer.meta["records"]
        record["seconds"] = round(sum(trainer.meta["seconds"].values()), 1)
        record["wall_seconds_this_run"] = round(time.perf_counter() - self.t_start, 1)
        out = Path(cfg.out)
        if dist.main:
            ckpt = StudentCheckpoint(
                model_class=teacher.model_class,
                model_config={k: v for k, v in dict(student_model.config).items() if not k.startswith("_")},
                scheduler_class=type(teacher.scheduler).__name__,
                scheduler_config=self.sched_cfg,
                schedule=self.schedule,
                teacher=TeacherRef(
                    path=_teacher_ref_path(teacher.path, out, cfg.demo),
                    sha256=teacher.weights_sha256,
                    reference_sampler=teacher.reference_sampler,
                    reference_steps=teacher.reference_steps,
                ),
                distillation=record,
            )
            student_model.eval()
            save_checkpoint(ckpt, student_model, out)
            write_json_atomic(work / "report.json", record)
            names = trainer.meta.get("names", {})
            save_loss_plot(
                work / "losses.png", {names.get(k, k): v for k, v in trainer.meta["losses"].items()}
            )
            (work / "state.safetensors").unlink(missing_ok=True)  # finished: nothing to resume
            log.info(
                "wrote %s (%s, %d steps) in %.0f s; report in %s",
                out,
                cfg.method,
                cfg.steps,
                time.perf_counter() - self.t_start,
                work,
            )
        dist.barrier()
        return DistillResult(out, student_model, record)


def _teacher_ref_path(teacher: Path, out: Path, demo: bool) -> str:
    """Absolute, except for the bundled demo: relative to the checkpoint's folder, so the shipped
    student finds its teacher wherever the package is installed (optimizer.compile.stages resolves it)."""
    if demo:
        return os.path.relpath(teacher.resolve(), out.resolve().parent)
    return str(teacher.resolve())


def _ddim_schedule(table: np.ndarray, T: int, steps: int, pred: str) -> SamplingSchedule:
    return SamplingSchedule.from_alphas(
        table, trailing_timesteps(T, steps), kind="ddim", prediction_type=pred
    )


def _check_ranks_agree(model: torch.nn.Module) -> None:
    """DDP keeps replicas identical; check it (a checksum per rank) rather than assume it."""
    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    all_s = [torch.zeros_like(s) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(all_s, s)
    if any(not torch.equal(a, all_s[0]) for a in all_s):
        raise RuntimeError(f"DDP ranks disagree on the final weights: {[float(a) for a in all_s]}")
