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
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines.errors import InputError
from optimizer.distill.consistency import SolverGrid, cd_loss, default_huber_c, ema_update
from optimizer.distill.guided import draw_w, guided_eps, make_w_student, student_eps, w_from_scale
from optimizer.distill.progressive import RoundGrid, pd_loss

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
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.steps < 1:
            raise InputError(f"--steps {self.steps}: must be >= 1")
        if self.lora_rank < 0 or (self.lora_rank and self.method != "lcm"):
            raise InputError(f"--lora-rank {self.lora_rank}: must be > 0, with --method lcm (LCM-LoRA)")
        if self.method == "guided-progressive":
            n = self.start_steps
            while n > self.steps and n % 2 == 0:
                n //= 2
            if n != self.steps or self.start_steps <= self.steps:
                raise InputError(
                    f"start steps {self.start_steps} is not steps * 2^k with k >= 1 (steps={self.steps})"
                )


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


class T2IDistiller:
    """One method per phase; shared state (teacher, data, generators) on the instance."""

    def __init__(self, teacher: TextToImageTeacher, batches: BatchFn, cfg: T2IDistillConfig):
        self.teacher, self.batches, self.cfg = teacher, batches, cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.uncond = teacher.encode_text([""])  # [1, L, D]
        self.records: list[RoundRecord] = []
        # called after each optimizer step (LCM: the EMA target update)
        self.after_step: Callable[[nn.Module], None] | None = None

    # -- one training batch: latents, text embeddings, w ---------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, prompts = self.batches(self.rng, self.cfg.batch)
        z0 = x if isinstance(x, torch.Tensor) else self.teacher.encode_images(x, self.gen)
        text_c = self.teacher.encode_text(prompts)
        text_u = self.uncond.expand(len(prompts), -1, -1)
        return z0, text_c, text_u, draw_w(len(prompts), self.cfg.guidance, self.gen)

    def _train(self, phase: str, steps: int, student: nn.Module, iters: int, loss_fn) -> RoundRecord:
        opt = torch.optim.AdamW(student.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        losses, t0 = [], time.perf_counter()
        student.train()
        for it in range(iters):
            loss = loss_fn(*self._batch())
            if not torch.isfinite(loss):
                raise RuntimeError(f"{phase}: loss is {loss.item()} at iteration {it}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if self.after_step is not None:
                self.after_step(student)
            if it % self.cfg.log_every == 0 or it == iters - 1:
                el = time.perf_counter() - t0
                log.info(
                    "%s (%d steps) %d/%d loss %.4f, %.0f s, ETA %.0f s",
                    phase, steps, it, iters, float(np.mean(losses[-self.cfg.log_every :])), el,
                    el / (it + 1) * (iters - it - 1),
                )  # fmt: skip
        student.eval()
        k = max(1, min(50, iters // 5))
        rec = RoundRecord(
            phase,
            steps,
            iters,
            time.perf_counter() - t0,
            float(np.mean(losses[:k])),
            float(np.mean(losses[-k:])),
        )
        self.records.append(rec)
        return rec

    # -- guided progressive ---------------------------------------------------------------------
    def stage1(self) -> nn.Module:
        """Meng et al. stage 1: one w-conditioned pass regresses the two-pass guided teacher."""
        student = make_w_student(self.teacher.unet)
        T = self.teacher.num_train_timesteps

        def loss(z0, text_c, text_u, w):
            t = torch.randint(0, T, (len(z0),), generator=self.gen)
            a = torch.from_numpy(self.teacher.alphas.astype(np.float32))[t].reshape(-1, 1, 1, 1)
            eps = torch.randn(z0.shape, generator=self.gen)
            z = a.sqrt() * z0 + (1 - a).sqrt() * eps
            with torch.no_grad():
                target = guided_eps(self.teacher.unet, z, t, text_c, text_u, w)
            return nn.functional.mse_loss(student_eps(student, z, t, text_c, w), target)

        self._train("stage1-guided", self.cfg.start_steps, student, self.cfg.stage1_iters, loss)
        return student

    def progressive_round(self, teacher_student: nn.Module, steps: int) -> nn.Module:
        """Salimans & Ho round at fixed (text, w) per sample: 2 teacher steps -> 1 student step."""
        student = copy.deepcopy(teacher_student)
        grid = RoundGrid(self.teacher.alphas, self.teacher.num_train_timesteps, steps)

        def loss(z0, text_c, text_u, w):
            def s_fn(z, t):
                return student_eps(student, z, t, text_c, w)

            def t_fn(z, t):
                return student_eps(teacher_student, z, t, text_c, w)

            return pd_loss(s_fn, t_fn, grid, z0, self.gen, "epsilon", "epsilon")

        self._train("progressive", steps, student, self.cfg.round_iters, loss)
        return student

    def guided_progressive(self) -> nn.Module:
        student = self.stage1()
        n = self.cfg.start_steps
        while n > self.cfg.steps:
            n //= 2
            student = self.progressive_round(student, n)
        return student

    # -- LCM --------------------------------------------------------------------------------------
    def lcm(self) -> nn.Module:
        if self.cfg.lora_rank:
            return self.lcm_lora()
        student = make_w_student(self.teacher.unet)
        target = copy.deepcopy(student).eval().requires_grad_(False)
        grid = SolverGrid(self.teacher.alphas, self.teacher.num_train_timesteps, self.cfg.solver_steps)
        cfg = self.teacher.unet.config
        huber = default_huber_c(int(cfg.in_channels * cfg.sample_size**2))

        def loss(z0, text_c, text_u, w):
            return cd_loss(
                lambda z, t: student_eps(student, z, t, text_c, w),
                lambda z, t: guided_eps(self.teacher.unet, z, t, text_c, text_u, w),
                lambda z, t: student_eps(target, z, t, text_c, w),
                grid,
                z0,
                self.gen,
                "epsilon",
                huber,
            )

        self.after_step = lambda s: ema_update(target, s, self.cfg.ema_decay)
        try:
            self._train("lcm", self.cfg.steps, student, self.cfg.lcm_iters, loss)
        finally:
            self.after_step = None
        return student

    def lcm_lora(self) -> nn.Module:
        """LCM-LoRA (Luo et al. 2023b, arXiv 2311.05556): the LCM objective, UNet frozen, only
        low-rank adapters trained; the online network (adapters under no_grad) is the target, as
        in diffusers' train_lcm_distill_lora_sd_wds.py."""
        student = add_lora(copy.deepcopy(self.teacher.unet), self.cfg.lora_rank, self.cfg.lora_conv)
        grid = SolverGrid(self.teacher.alphas, self.teacher.num_train_timesteps, self.cfg.solver_steps)
        cfg = self.teacher.unet.config
        huber = default_huber_c(int(cfg.in_channels * cfg.sample_size**2))
        w_fixed = w_from_scale(self.cfg.eval_guidance)

        def loss(z0, text_c, text_u, w):
            w = torch.full_like(w, w_fixed)
            return cd_loss(
                lambda z, t: student(z, t, encoder_hidden_states=text_c).sample,
                lambda z, t: guided_eps(self.teacher.unet, z, t, text_c, text_u, w),
                lambda z, t: student(z, t, encoder_hidden_states=text_c).sample,
                grid,
                z0,
                self.gen,
                "epsilon",
                huber,
            )

        self._train("lcm-lora", self.cfg.steps, student, self.cfg.lcm_iters, loss)
        return student

    def run(self) -> nn.Module:
        return self.guided_progressive() if self.cfg.method == "guided-progressive" else self.lcm()

    # -- output -----------------------------------------------------------------------------------
    def student_pipeline(self, student: nn.Module):
        """A diffusers pipeline diffusers runs as it is: embedded guidance, no CFG batch."""
        from diffusers import (
            DDIMScheduler,
            LatentConsistencyModelPipeline,
            LCMScheduler,
            StableDiffusionPipeline,
        )

        p = self.teacher.pipe
        parts = dict(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=student)
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if self.cfg.method == "lcm":
            sched = LCMScheduler.from_config(
                p.scheduler.config, original_inference_steps=self.cfg.solver_steps
            )
            pipe = LatentConsistencyModelPipeline(**parts, scheduler=sched, **extra)
        else:
            # trailing spacing and a clean final step: the grid progressive.RoundGrid trained on
            sched = DDIMScheduler.from_config(
                p.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
            )
            pipe = StableDiffusionPipeline(**parts, scheduler=sched, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, student: nn.Module, out: Path, quality: dict[str, Any] | None = None) -> Path:
        from engines.fileio import sha256_file
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
        reused = {}
        for comp in ("text_encoder", "vae", "tokenizer"):
            for f in sorted((self.teacher.folder / comp).glob("*")):
                reused[f"{comp}/{f.name}"] = sha256_file(f)
        record = {
            "format": "dd-compile.t2i-student/1",
            "method": self.cfg.method,
            "steps": self.cfg.steps,
            "guidance_mode": "none" if self.cfg.lora_rank else "embedded",
            "lora": lora,
            "guidance_scale": self.cfg.eval_guidance,
            "w": w_from_scale(self.cfg.eval_guidance),
            "teacher": {"path": str(self.teacher.folder.resolve()), "components_sha256": reused},
            "config": asdict(self.cfg),
            "rounds": [asdict(r) for r in self.records],
            "quality": quality or {},
        }
        (tmp / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
        claim(tmp, "t2i-student", record["teacher"]["path"])
        # replace only a folder this tool wrote (check_target above): move it aside, swap, delete
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return out


def sample_student(
    pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance: float
) -> np.ndarray:
    """Images [N, 3, H, W] in [-1, 1] from a student pipeline (diffusers runs it, no CFG)."""
    kw: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
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
