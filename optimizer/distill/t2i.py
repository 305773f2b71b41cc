"""Distilling a text-to-image teacher (a diffusers StableDiffusionPipeline folder) into a student
that needs no classifier-free-guidance batch and few steps.

Methods (both w-conditioned through diffusers' timestep_cond; guided.py holds the math):
  guided-progressive  Meng et al. 2023, two stages. Stage 1 regresses the teacher's guided
                      prediction (1 + w) eps_c - w eps_u at w from the --guidance range; stage 2
                      halves the steps per round with Salimans & Ho's x-target (progressive.py),
                      the previous student (at the same w) as the teacher.
  lcm                 Luo et al. 2023: consistency distillation through the teacher's
                      skipping-step guided DDIM solver (consistency.py), EMA target, Huber loss.
The student is written as a diffusers pipeline folder that diffusers itself runs without CFG:
StableDiffusionPipeline (trailing DDIM) or LatentConsistencyModelPipeline, the teacher's text
encoder, tokenizer and VAE beside the student UNet, and distill.json with the record.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines.errors import InputError
from engines.schedule import SamplingSchedule
from optimizer.distill.consistency import SolverGrid, cd_loss, default_huber_c, ema_update
from optimizer.distill.distill_report import summarize_losses
from optimizer.distill.guided import draw_w, guided_eps, make_w_student, student_eps, w_from_scale
from optimizer.distill.progressive import RoundGrid, pd_loss
from optimizer.distill.trainer import Dist, Phase, Trainer, init_distributed, load_module

log = logging.getLogger(__name__)

METHODS = ("guided-progressive", "lcm")


@dataclass
class T2IDistillConfig:
    method: str = "guided-progressive"
    steps: int = 4
    # diffusers guidance scales drawn in training (w = s - 1)
    guidance: tuple[float, float] = (2.0, 8.0)
    # the guidance scale the student is judged (and recorded) at
    eval_guidance: float = 4.0
    # guided-progressive: stage 1 student's step count, halved per round down to `steps`
    start_steps: int = 32
    stage1_iters: int = 1000
    round_iters: int = 400
    lcm_iters: int = 2000
    solver_steps: int = 50
    batch: int = 64
    lr: float = 1e-4
    # LCM's EMA target decay (train_lcm_distill_sd_wds.py default 0.95)
    ema_decay: float = 0.95
    # LCM-LoRA: > 0 trains only rank-r adapters on the frozen UNet (no w input: guidance fixed
    # at eval_guidance, as the LCM-LoRA script trains without timestep_cond)
    lora_rank: int = 0
    # also adapt the convolutions (LCM-LoRA adapts attention and, optionally, conv layers)
    lora_conv: bool = False
    seed: int = 0
    threads: int = 1
    # unused since training runs through trainer.Trainer (its progress bar shows loss and ETA);
    # kept so configs that set it still load
    log_every: int = 100
    checkpoint_every: int = 100  # iterations between training-state checkpoints
    resume: bool = False  # continue from <out stem>.distill/state.safetensors
    stop_after: int | None = None  # stop (as a kill would) after this many iterations in total

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.steps < 1:
            raise InputError(f"--steps {self.steps}: must be >= 1")
        if self.lora_rank < 0 or (self.lora_rank and self.method != "lcm"):
            raise InputError(f"--lora-rank {self.lora_rank}: must be > 0, with --method lcm (LCM-LoRA)")
        g = tuple(self.guidance)
        if len(g) != 2 or not all(math.isfinite(v) for v in g) or not 1.0 <= g[0] <= g[1]:
            raise InputError(f"--guidance {g}: need a range LO:HI of guidance scales with 1 <= LO <= HI")
        its = (self.stage1_iters, self.round_iters, self.lcm_iters, self.batch, self.checkpoint_every)
        if min(its) < 1:
            raise InputError("--iters, --batch-size and --checkpoint-every must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr {self.lr}: must be > 0")
        if self.method == "guided-progressive":
            n = self.start_steps
            while n > self.steps and n % 2 == 0:
                n //= 2
            if n != self.steps or self.start_steps <= self.steps:
                raise InputError(
                    f"start steps {self.start_steps} is not steps * 2^k with k >= 1 (steps={self.steps})"
                )

    def training_key(self) -> dict[str, Any]:
        """What must match for --resume to continue a run (as DistillConfig.training_key)."""
        d = asdict(self)
        for k in ("resume", "stop_after", "threads", "log_every"):
            d.pop(k)
        return d


class WDenoiser(nn.Module):
    """model(sample, timestep, encoder_hidden_states, w) for the samplers in sampling.py."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, w):
        return student_eps(self.unet, sample, timestep, encoder_hidden_states, w)


@dataclass
class TextToImageTeacher:
    pipe: Any  # diffusers StableDiffusionPipeline, frozen
    folder: Path

    @classmethod
    def load(cls, folder: str | Path) -> TextToImageTeacher:
        from diffusers import StableDiffusionPipeline

        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise InputError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"{folder}: cannot load as a StableDiffusionPipeline: {e}") from None
        if pipe.unet.config.get("time_cond_proj_dim"):
            raise InputError(f"{folder}: the UNet already takes a guidance embedding: it is distilled")
        pipe.set_progress_bar_config(disable=True)
        for m in (pipe.unet, pipe.text_encoder, pipe.vae):
            m.eval().requires_grad_(False)
        return cls(pipe, folder)

    @property
    def unet(self) -> nn.Module:
        return self.pipe.unet

    @property
    def alphas(self) -> np.ndarray:
        return self.pipe.scheduler.alphas_cumprod.numpy()

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.pipe.text_encoder(ids.input_ids)[0]

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> scaled latents (a posterior sample, as SD training does)."""
        vae = self.pipe.vae
        return (
            vae.encode(torch.from_numpy(images)).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1).numpy()


# (rng, n) -> (images [n, 3, H, W] in [-1, 1] as numpy, or scaled latents as a torch.Tensor; prompts)
BatchFn = Callable[[np.random.Generator, int], tuple[np.ndarray | torch.Tensor, list[str]]]


def demo_batches() -> BatchFn:
    """The bundled demo's training pairs: coloured digits and their grammar prompts."""
    from optimizer.demo.t2i.data import ColouredDigits

    data = ColouredDigits.load()

    def fn(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        x, ex = data.batch(rng, n)
        return x, [e.prompt for e in ex]

    return fn


@dataclass
class RoundRecord:
    phase: str
    steps: int
    iters: int
    seconds: float
    loss_first: float
    loss_last: float
    quality: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # the phase's position in the run (its checkpoints and RNG streams)
    loss_curve: list[float] = field(default_factory=list)  # at most 50 means (summarize_losses)
    samples: str | None = None  # the phase's prompt-by-seed grid (demo), relative to the work folder


# (distiller, the phase's student UNet, its record so far) -> fields to add to the record; rank 0
PhaseHook = Callable[["T2IDistiller", nn.Module, dict[str, Any]], dict[str, Any]]


class TextDenoiser(nn.Module):
    """The LoRA student (no w input): model(sample, timestep, encoder_hidden_states, w) -> eps."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, w=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


def t2i_dist() -> Dist:
    """The DDP context under torchrun. Text-to-image distillation runs on the CPU (the teacher
    pipeline stays there), so the process group is gloo even where CUDA is present."""
    import torch.distributed as td

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        td.init_process_group(backend="gloo")
    d = init_distributed()
    return Dist(rank=d.rank, world=d.world, device=torch.device("cpu"))


def work_dir_for(out: str | Path) -> Path:
    """<out stem>.distill/ beside the output, as the pixel flow (DistillConfig.work_dir)."""
    out = Path(out)
    return out.with_name(out.stem + ".distill")


class T2IDistiller:
    """One method per phase, each trained by trainer.Trainer: per-iteration generators, atomic
    safetensors checkpoints in `work` that `cfg.resume` continues bit for bit, the NaN guard
    (TrainingDiverged), DDP and the progress bar. Without `work`, checkpoints go to a temporary
    folder (API use: run() then save())."""

    def __init__(
        self,
        teacher: TextToImageTeacher,
        batches: BatchFn,
        cfg: T2IDistillConfig,
        *,
        work: Path | None = None,
        dist: Dist | None = None,
        data_key: dict[str, Any] | None = None,
        on_phase: PhaseHook | None = None,
    ):
        from optimizer.t2i.student import folder_sha256

        self.teacher, self.batches, self.cfg = teacher, batches, cfg
        self.dist = dist or Dist()
        self.on_phase = on_phase
        # the stream of `_batch()` without a generator (inspection, tests); training draws each
        # iteration from trainer.iteration_generator instead
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.uncond = teacher.encode_text([""])  # [1, L, D]
        if work is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dd-distill-t2i-")
            work = Path(self._tmp.name)
        self.work = Path(work)
        self.trainer = Trainer(
            self.work,
            None,
            cfg.batch,
            cfg.seed,
            cfg.checkpoint_every,
            self.dist,
            cfg.stop_after,
            draw=self._draw,
        )
        # what must match for --resume; JSON round trip: compared with the key read back
        self.key = json.loads(
            json.dumps(
                {
                    **cfg.training_key(),
                    "teacher_unet_sha256": folder_sha256(teacher.folder / "unet"),
                    **(data_key or {}),
                }
            )
        )
        if cfg.resume:
            self.trainer.try_resume(self.key)
        self.phase_index = 0  # the next phase's position
        self.last_record: dict[str, Any] = {}  # what the last save wrote

    @property
    def records(self) -> list[RoundRecord]:
        names = {f.name for f in fields(RoundRecord)}
        return [
            RoundRecord(**{k: v for k, v in r.items() if k in names}) for r in self.trainer.meta["records"]
        ]

    # -- one training batch: latents, text embeddings, w ---------------------------------------
    def _batch(
        self, gen: torch.Generator | None = None, n: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if gen is None:
            gen, rng = self.gen, self.rng
        else:  # the data source's numpy stream, seeded from the iteration's generator
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        x, prompts = self.batches(rng, n or self.cfg.batch)
        z0 = x if isinstance(x, torch.Tensor) else self.teacher.encode_images(x, gen)
        text_c = self.teacher.encode_text(prompts)
        text_u = self.uncond.expand(len(prompts), -1, -1)
        return z0, text_c, text_u, draw_w(len(prompts), self.cfg.guidance, gen)

    def _draw(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z0, text_c, text_u, w = self._batch(gen, n)
        return z0, {"text_c": text_c, "text_u": text_u, "w": w}

    def _phase(
        self,
        kind: str,
        steps: int,
        student: nn.Module,
        trainable: nn.Module,
        iters: int,
        loss,
        state: dict[str, nn.Module],
        next_modules: dict[str, nn.Module],
        after_step: Callable[[], None] | None = None,
    ) -> None:
        """Train one phase (unless a resumed run finished it), record it, checkpoint the next
        phase's start. `loss(net, z0, text_c, text_u, w, gen)`; `net` is `trainable` (DDP-wrapped
        when distributed)."""
        tr, index = self.trainer, self.phase_index
        phase = Phase(
            index,
            f"{kind} ({steps} steps)",
            iters,
            self.cfg.lr,
            trainable,
            lambda net, z0, g, c: loss(net, z0, c["text_c"], c["text_u"], c["w"], g),
            state,
            after_step=after_step,
            anneal=False,  # constant lr, what the bundled students were measured with
        )
        if not tr.done(index):
            losses = tr.run(phase, self.key)
            k = max(1, min(50, iters // 5))
            rec: dict[str, Any] = asdict(
                RoundRecord(
                    kind,
                    steps,
                    iters,
                    round(tr.meta["seconds"].get(str(index), 0.0), 1),
                    float(np.mean(losses[:k])),
                    float(np.mean(losses[-k:])),
                    index=index,
                    loss_curve=summarize_losses(losses).get("loss_curve", []),
                )
            )
            if self.on_phase is not None and self.dist.main:
                student.eval()
                rec.update(self.on_phase(self, student, rec))
                student.train()
            tr.finish_phase(self.key, phase, next_modules, rec)
        self.phase_index += 1

    # -- guided progressive ---------------------------------------------------------------------
    def stage1(self) -> nn.Module:
        """Meng et al. stage 1: one w-conditioned pass regresses the two-pass guided teacher."""
        student = make_w_student(self.teacher.unet).train()
        T = self.teacher.num_train_timesteps
        alphas = torch.from_numpy(self.teacher.alphas.astype(np.float32))

        def loss(net, z0, text_c, text_u, w, gen):
            t = torch.randint(0, T, (len(z0),), generator=gen)
            a = alphas[t].reshape(-1, 1, 1, 1)
            eps = torch.randn(z0.shape, generator=gen)
            z = a.sqrt() * z0 + (1 - a).sqrt() * eps
            with torch.no_grad():
                target = guided_eps(self.teacher.unet, z, t, text_c, text_u, w)
            return nn.functional.mse_loss(net(z, t, text_c, w), target)

        self._phase(
            "stage1-guided",
            self.cfg.start_steps,
            student,
            WDenoiser(student),
            self.cfg.stage1_iters,
            loss,
            {"student": student},
            {"student": student, "round_teacher": student},
        )
        return student

    def progressive_round(self, student: nn.Module, steps: int, last: bool = False) -> nn.Module:
        """Salimans & Ho round at fixed (text, w) per sample: 2 steps of the student as it enters
        the round (frozen copy) -> 1 step; trains `student` in place and returns it."""
        round_teacher = copy.deepcopy(student).eval().requires_grad_(False)
        grid = RoundGrid(self.teacher.alphas, self.teacher.num_train_timesteps, steps)

        def loss(net, z0, text_c, text_u, w, gen):
            def s_fn(z, t):
                return net(z, t, text_c, w)

            def t_fn(z, t):
                return student_eps(round_teacher, z, t, text_c, w)

            return pd_loss(s_fn, t_fn, grid, z0, gen, "epsilon", "epsilon")

        self._phase(
            "progressive",
            steps,
            student,
            WDenoiser(student),
            self.cfg.round_iters,
            loss,
            {"student": student, "round_teacher": round_teacher},
            {"student": student} if last else {"student": student, "round_teacher": student},
        )
        return student

    def guided_progressive(self) -> nn.Module:
        student = self.stage1()
        n = self.cfg.start_steps
        while n > self.cfg.steps:
            n //= 2
            student = self.progressive_round(student, n, last=n == self.cfg.steps)
        return student

    # -- LCM --------------------------------------------------------------------------------------
    def lcm(self) -> nn.Module:
        if self.cfg.lora_rank:
            return self.lcm_lora()
        student = make_w_student(self.teacher.unet).train()
        target = copy.deepcopy(student).eval().requires_grad_(False)
        grid = SolverGrid(self.teacher.alphas, self.teacher.num_train_timesteps, self.cfg.solver_steps)
        cfg = self.teacher.unet.config
        huber = default_huber_c(int(cfg.in_channels * cfg.sample_size**2))

        def loss(net, z0, text_c, text_u, w, gen):
            return cd_loss(
                lambda z, t: net(z, t, text_c, w),
                lambda z, t: guided_eps(self.teacher.unet, z, t, text_c, text_u, w),
                lambda z, t: student_eps(target, z, t, text_c, w),
                grid,
                z0,
                gen,
                "epsilon",
                huber,
            )

        self._phase(
            "lcm",
            self.cfg.steps,
            student,
            WDenoiser(student),
            self.cfg.lcm_iters,
            loss,
            {"student": student, "target": target},
            {"student": student},
            after_step=lambda: ema_update(target, student, self.cfg.ema_decay),
        )
        return student

    def lcm_lora(self) -> nn.Module:
        """LCM-LoRA (Luo et al. 2023b, arXiv 2311.05556): the LCM objective, UNet frozen, only
        low-rank adapters trained; the online network (adapters under no_grad) is the target, as
        in diffusers' train_lcm_distill_lora_sd_wds.py."""
        # the adapters' random init from --seed, not from whatever the global RNG holds
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            student = add_lora(copy.deepcopy(self.teacher.unet), self.cfg.lora_rank, self.cfg.lora_conv)
        online = TextDenoiser(student)
        grid = SolverGrid(self.teacher.alphas, self.teacher.num_train_timesteps, self.cfg.solver_steps)
        cfg = self.teacher.unet.config
        huber = default_huber_c(int(cfg.in_channels * cfg.sample_size**2))
        w_fixed = w_from_scale(self.cfg.eval_guidance)

        def loss(net, z0, text_c, text_u, w, gen):
            w = torch.full_like(w, w_fixed)
            return cd_loss(
                lambda z, t: net(z, t, text_c),
                lambda z, t: guided_eps(self.teacher.unet, z, t, text_c, text_u, w),
                lambda z, t: online(z, t, text_c),  # called under no_grad by cd_loss
                grid,
                z0,
                gen,
                "epsilon",
                huber,
            )

        self._phase(
            "lcm-lora",
            self.cfg.steps,
            student,
            online,
            self.cfg.lcm_iters,
            loss,
            {"student": student},
            {"student": student},
        )
        return student

    def run(self) -> nn.Module:
        student = self.guided_progressive() if self.cfg.method == "guided-progressive" else self.lcm()
        tr = self.trainer
        if tr.resume_tensors is not None and tr.meta["phase"] >= self.phase_index:
            # resumed after the last phase had finished: its weights are in the state
            load_module("student", student, tr.resume_tensors)
        if self.dist.enabled:
            from optimizer.distill.run import _check_ranks_agree

            _check_ranks_agree(student)
        return student.eval()

    # -- output -----------------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """The student takes w as an input (timestep_cond); an LCM-LoRA student has it in its weights."""
        return not self.cfg.lora_rank

    def sampling_guidance(self) -> float:
        """The guidance scale the student samples at: its embedded w, or 1 (no CFG batch) for
        LCM-LoRA, trained at eval_guidance with the guidance baked in."""
        return self.cfg.eval_guidance if self.embedded else 1.0

    def student_pipeline(self, student: nn.Module):
        """A diffusers pipeline diffusers runs as it is: embedded guidance, no CFG batch. LCM-LoRA:
        StableDiffusionPipeline with the LCMScheduler, as diffusers runs LCM-LoRA (its
        LatentConsistencyModelPipeline needs a UNet with time_cond_proj_dim)."""
        from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

        p = self.teacher.pipe
        parts = dict(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=student)
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        sched = self.student_scheduler()
        if self.cfg.method == "lcm" and self.embedded:
            pipe = LatentConsistencyModelPipeline(**parts, scheduler=sched, **extra)
        else:
            pipe = StableDiffusionPipeline(**parts, scheduler=sched, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def student_scheduler(self):
        from diffusers import DDIMScheduler, LCMScheduler

        config = self.teacher.pipe.scheduler.config
        if self.cfg.method == "lcm":
            return LCMScheduler.from_config(config, original_inference_steps=self.cfg.solver_steps)
        # trailing spacing and a clean final step: the grid progressive.RoundGrid trained on
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)

    def student_schedule(self) -> SamplingSchedule:
        """The student's sampler as engines.schedule describes it (what dd-compile runs)."""
        from engines.schedule import trailing_timesteps
        from optimizer.distill.consistency import lcm_timesteps

        if self.cfg.method == "lcm":
            ts = lcm_timesteps(dict(self.student_scheduler().config), self.cfg.steps, self.cfg.solver_steps)
            return SamplingSchedule.from_alphas(self.teacher.alphas, ts, "consistency", "epsilon")
        ts = trailing_timesteps(self.teacher.num_train_timesteps, self.cfg.steps)
        return SamplingSchedule.from_alphas(self.teacher.alphas, ts, "ddim", "epsilon")

    def record(self, lora: dict[str, Any], quality: dict[str, Any] | None) -> dict[str, Any]:
        from engines.fileio import sha256_file

        reused = {}
        for comp in ("text_encoder", "vae", "tokenizer"):
            for f in sorted((self.teacher.folder / comp).glob("*")):
                reused[f"{comp}/{f.name}"] = sha256_file(f)
        tr = self.trainer
        return {
            "format": "dd-compile.t2i-student/1",
            "method": self.cfg.method,
            "steps": self.cfg.steps,
            "guidance_mode": "embedded" if self.embedded else "none",
            "lora": lora,
            # what the student samples at (dd-compile reads it); LCM-LoRA: 1, no CFG batch
            "guidance_scale": self.sampling_guidance(),
            # the teacher's guided target the student was trained on (baked in for LCM-LoRA)
            "trained_guidance_scale": self.cfg.eval_guidance,
            "w": w_from_scale(self.cfg.eval_guidance),
            "teacher": {"path": str(self.teacher.folder.resolve()), "components_sha256": reused},
            "config": asdict(self.cfg),
            "world_size": self.dist.world,
            "seconds": round(sum(tr.meta["seconds"].values()), 1),
            "rounds": [asdict(r) for r in self.records],
            "plots": self.plots(),
            "quality": quality or {},
        }

    def save(self, student: nn.Module, out: Path, quality: dict[str, Any] | None = None) -> Path:
        """The student as a diffusers pipeline folder (with distill.json), swapped in by rename."""
        from engines.outdir import check_target, claim

        out = Path(out)
        check_target(out, "t2i-student", "-o", protect=[self.teacher.folder])
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        lora: dict[str, Any] = {}
        if self.cfg.lora_rank:
            lora = save_lora(student, tmp / "lora")
            student = fuse_lora(student)  # the deployable student: adapters merged into the UNet
        self.student_pipeline(student).save_pretrained(str(tmp))
        record = self.last_record = self.record(lora, quality)
        (tmp / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
        claim(tmp, "t2i-student", record["teacher"]["path"])
        # replace only a folder this tool wrote (check_target above): move it aside, swap, delete
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return out

    def save_checkpoint(self, student: nn.Module, out: Path, quality: dict[str, Any] | None = None) -> Path:
        """The student as the text-to-image student.ckpt dd-compile reads (optimizer/t2i/student.py:
        format 2, the UNet plus the teacher folder and its component hashes). LoRA: the adapters
        fused into the UNet; the diffusers LoRA file goes to the work folder (lora/)."""
        from optimizer.t2i.student import save_t2i_student

        lora: dict[str, Any] = {}
        if self.cfg.lora_rank:
            tmp = self.work / f".lora.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            lora = save_lora(student, tmp)
            shutil.rmtree(self.work / "lora", ignore_errors=True)
            os.replace(tmp, self.work / "lora")
            lora["folder"] = str((self.work / "lora").resolve())
            student = fuse_lora(student)
        sched = self.student_scheduler()
        embedded = self.embedded
        self.last_record = self.record(lora, quality)
        return save_t2i_student(
            out,
            student,
            self.teacher.folder.resolve(),
            scheduler_class=type(sched).__name__,
            scheduler_config=dict(sched.config),
            schedule=self.student_schedule(),
            guidance="embedded" if embedded else "none",
            # a LoRA student has its guidance baked in: no scale to give it (the record keeps it)
            guidance_scale=self.cfg.eval_guidance if embedded else None,
            distillation=self.last_record,
        )

    def finish(self, student: nn.Module, out: Path, quality: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the student (rank 0: `out` ending in .ckpt -> student.ckpt, else a pipeline
        folder), the loss plot and report.json in the work folder; drop the resumable state."""
        from engines.fileio import write_json_atomic
        from optimizer.distill.distill_report import save_loss_plot

        out = Path(out)
        record: dict[str, Any] = {}
        if self.dist.main:
            tr = self.trainer
            names = tr.meta.get("names", {})
            save_loss_plot(
                self.work / "losses.png", {names.get(k, k): v for k, v in tr.meta["losses"].items()}
            )
            if is_checkpoint_path(out):
                self.save_checkpoint(student, out, quality)
            else:
                self.save(student, out, quality)
            record = self.last_record
            write_json_atomic(self.work / "report.json", record)
            tr.state_path.unlink(missing_ok=True)  # finished: nothing to resume
        self.dist.barrier()
        return record

    def plots(self) -> dict[str, Any]:
        """The work folder's pngs that exist: the loss plot (written by finish), the per-phase
        sample grids and the teacher's (demo), by phase index."""

        def there(name: str) -> str | None:
            return name if (self.work / name).is_file() else None

        return {
            "work_dir": str(self.work.resolve()),
            "losses": there("losses.png"),
            "teacher_samples": there("teacher_samples.png"),
            "samples": {str(r.index): r.samples for r in self.records if r.samples},
        }


def is_checkpoint_path(out: str | Path) -> bool:
    """`-o student.ckpt` writes the student.ckpt file dd-compile reads; anything else a folder."""
    return Path(out).suffix.lower() == ".ckpt"


def sample_student(
    pipe,
    prompts: list[str],
    latents: torch.Tensor,
    steps: int,
    guidance: float,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Images [N, 3, H, W] in [-1, 1] from a student pipeline (diffusers runs it, no CFG);
    `generator`: the LCM sampler's per-step noise (default: the global RNG)."""
    kw: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
    if generator is not None:
        kw["generator"] = generator
    out = []
    for i in range(0, len(prompts), 100):
        res = pipe(prompts[i : i + 100], latents=latents[i : i + 100], **kw).images
        out.append(res.transpose(0, 3, 1, 2) * 2.0 - 1.0)
    return np.concatenate(out).astype(np.float32)


LORA_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(unet: nn.Module, rank: int, conv: bool = False) -> nn.Module:
    """peft LoRA adapters on the UNet's attention projections (and convs); base weights frozen."""
    from peft import LoraConfig

    targets = list(LORA_ATTENTION) + (
        ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"] if conv else []
    )
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    )
    return unet


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet: nn.Module, folder: Path) -> dict[str, Any]:
    """The adapter as diffusers writes it: `pipe.load_lora_weights(folder)` plugs it into any
    pipeline with the same base UNet."""
    from diffusers import StableDiffusionPipeline

    state = lora_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state)
    n = sum(v.numel() for v in state.values())
    base = sum(p.numel() for name, p in unet.named_parameters() if "lora_" not in name)
    f = folder / "pytorch_lora_weights.safetensors"
    return {
        "rank": unet.peft_config["default"].r,
        "params": n,
        "unet_params": base,
        "bytes": f.stat().st_size,
    }


def fuse_lora(unet: nn.Module) -> nn.Module:
    """A plain UNet2DConditionModel with the adapters merged into its weights (export-ready)."""
    fused = copy.deepcopy(unet)
    fused.fuse_lora()
    fused.unload_lora()  # back to nn.Linear / nn.Conv2d holding the merged weights
    return fused.eval()
