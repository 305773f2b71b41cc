"""Train the bundled demo teacher: a ~1M-parameter diffusers UNet2DModel on scikit-learn's digits.

    python -m optimizer.demo.train_teacher --out optimizer/demo/teacher --seed 0 --iters 3000

8x8 1-channel images (0..16 scaled to [-1, 1]), v-prediction, DDPMScheduler with the cosine
(squaredcos_cap_v2) schedule, Adam with warm-up + cosine decay, EMA of the weights (saved).
The output is a diffusers save_pretrained layout, written to a temporary folder and renamed
into place at the end:

    out/unet/{config.json, diffusion_pytorch_model.safetensors}   EMA weights
    out/scheduler/scheduler_config.json
    out/teacher.json   reference sampler + steps, seed, iters, train_seconds, FID measured

Also home to the teacher's reference sampler (``ddim_sample``) and the fixed per-sample noise
(``fixed_noise``) that benchmarks/teacher_quality.py and the tests use.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_TEACHER_DIR = Path(__file__).parent / "teacher"
REFERENCE_SAMPLER = "ddim"
REFERENCE_STEPS = 64


@dataclass
class TeacherConfig:
    block_out_channels: tuple[int, ...] = (32, 64)  # 8x8 level, 4x4 level: ~1.0M parameters
    layers_per_block: int = 2
    norm_num_groups: int = 8  # must divide every block_out_channels entry
    attention_head_dim: int = 32
    batch_size: int = 128
    lr: float = 2e-4
    warmup_iters: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.999  # with the usual warm-up: min(decay, (1 + k) / (10 + k))
    grad_clip: float = 1.0


def build_unet(cfg: TeacherConfig):
    from diffusers import UNet2DModel

    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ValueError(f"norm_num_groups={cfg.norm_num_groups} does not divide {c}")
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),  # attention at 4x4 only
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
    )


def fixed_noise(n: int, seed: int = 0, shape: tuple[int, ...] = (1, 8, 8)) -> torch.Tensor:
    """Noise [n, *shape] where sample i comes from its own generator seeded ``seed + i``, so a
    sample's noise does not depend on how many samples are drawn or how they are batched."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]
    )


@torch.no_grad()
def ddim_sample(
    unet: torch.nn.Module,
    scheduler_config: Any,
    noise: torch.Tensor,
    steps: int,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Deterministic DDIM (eta=0, trailing timestep spacing) from ``noise``; returns x0 samples
    (not clipped: clip to [-1, 1] to turn them into images)."""
    from diffusers import DDIMScheduler

    out = []
    for i in range(0, len(noise), batch_size):
        sched = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        x = noise[i : i + batch_size].clone()
        for t in sched.timesteps:
            v = unet(x, t, return_dict=False)[0]
            x = sched.step(v, t, x).prev_sample
        out.append(x)
    return torch.cat(out)


def fid_record(
    ddim_fids: dict[int, float], n_samples: int, noise_seed: int, floor: float, n_real: int
) -> dict[str, Any]:
    """The teacher.json "fid" entry (shared by this script and benchmarks/teacher_quality.py)."""
    return {
        "feature_extractor": "optimizer/demo/digits_classifier.safetensors (64-d penultimate)",
        "reference_set": f"all {n_real} sklearn digits",
        "n_samples": n_samples,
        "noise_seed": noise_seed,
        "sampler": "DDIMScheduler eta=0, timestep_spacing=trailing, samples clipped to [-1, 1]",
        "ddim": {str(s): round(v, 3) for s, v in ddim_fids.items()},
        "real_vs_real_floor": round(floor, 3),
    }


def measure_fid(
    unet: torch.nn.Module,
    scheduler_config: Any,
    steps_list: list[int],
    n_samples: int = 1000,
    noise_seed: int = 0,
) -> dict[str, Any]:
    """FID of DDIM samples at each step count vs all 1797 digits, digit-classifier features."""
    from optimizer.compile.quality import (
        fid,
        load_digits_feature_extractor,
        load_digits_images,
        real_vs_real_floor,
    )

    extractor = load_digits_feature_extractor()
    real, _ = load_digits_images()
    noise = fixed_noise(n_samples, noise_seed)
    fids: dict[int, float] = {}
    unet.eval()
    for steps in steps_list:
        t0 = time.perf_counter()
        x = ddim_sample(unet, scheduler_config, noise, steps).clamp(-1, 1).numpy()
        fids[steps] = fid(x, real, extractor)
        log.info("DDIM %3d steps: FID %.3f  (%.1f s)", steps, fids[steps], time.perf_counter() - t0)
    return fid_record(fids, n_samples, noise_seed, real_vs_real_floor(extractor), len(real))


def _lr_at(it: int, iters: int, cfg: TeacherConfig) -> float:
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, iters - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def train(
    iters: int,
    seed: int,
    cfg: TeacherConfig,
    unet: torch.nn.Module | None = None,
    cond: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
):
    """Train and return (ema_unet, scheduler, seconds).

    `unet`: another diffusers UNet to train (default: build_unet(cfg)); `cond(labels)`: keyword
    inputs of a conditional UNet for a batch's digit labels (e.g. one embedding per class)."""
    from optimizer.compile.quality import load_digits_images

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_images()
    data = torch.from_numpy(images)  # [1797, 1, 8, 8] in [-1, 1]
    targets = torch.as_tensor(labels)
    unet = (unet if unet is not None else build_unet(cfg)).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_scheduler()
    n_params = sum(p.numel() for p in unet.parameters())
    log.info(
        "%s: %d parameters; %d iterations at batch %d",
        type(unet).__name__, n_params, iters, cfg.batch_size,
    )  # fmt: skip
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    T = scheduler.config.num_train_timesteps

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=iters, mininterval=5.0, desc="train teacher") if tqdm else None
    log_every = max(1, iters // 30)

    perm, pos = torch.randperm(len(data), generator=gen), 0
    t0 = time.perf_counter()
    for it in range(iters):
        # 1. A batch without replacement within each pass over the data.
        if pos + cfg.batch_size > len(data):
            perm, pos = torch.randperm(len(data), generator=gen), 0
        idx = perm[pos : pos + cfg.batch_size]
        x0, kw = data[idx], (cond(targets[idx]) if cond is not None else {})
        pos += cfg.batch_size
        # 2. Forward diffusion at uniform timesteps; v target (Salimans & Ho 2022, eq. 9 ff.).
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (len(x0),), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        # 3. Step with the scheduled learning rate.
        for group in opt.param_groups:
            group["lr"] = _lr_at(it, iters, cfg)
        loss = torch.nn.functional.mse_loss(unet(x_t, t, **kw, return_dict=False)[0], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        # 4. EMA of the weights, with warm-up so early weights do not linger.
        decay = min(cfg.ema_decay, (1 + it) / (10 + it))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1.0 - decay)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        elif (it + 1) % log_every == 0 or it + 1 == iters:
            elapsed = time.perf_counter() - t0
            eta = elapsed / (it + 1) * (iters - it - 1)
            log.info(
                "iter %d/%d  loss %.4f  lr %.2e  %.0fs elapsed  ETA %.0fs",
                it + 1, iters, loss.item(), _lr_at(it, iters, cfg), elapsed, eta,
            )  # fmt: skip
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("trained in %.0f s (final loss %.4f)", seconds, loss.item())
    return ema, scheduler, seconds


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an existing ``out``."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_TEACHER_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=1000,
        help="samples for the FID written to teacher.json (0: skip)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover - very old torch
        pass

    import diffusers

    cfg = TeacherConfig()
    ema, scheduler, seconds = train(args.iters, args.seed, cfg)

    out: Path = args.out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ema.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")

    fid_result: dict[str, Any] = {}
    if args.eval_samples > 0:
        fid_result = measure_fid(ema, scheduler.config, [REFERENCE_STEPS, 4], args.eval_samples)
    info = {
        "reference_sampler": REFERENCE_SAMPLER,
        "reference_steps": REFERENCE_STEPS,
        "seed": args.seed,
        "iters": args.iters,
        "train_seconds": round(seconds, 1),
        "train_threads": args.threads,
        "parameters": sum(p.numel() for p in ema.parameters()),
        "data": "sklearn.datasets.load_digits, 8x8x1, 0..16 -> [-1, 1]",
        "train_config": asdict(cfg),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "fid": fid_result,
    }
    (tmp / "teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    _replace_dir(tmp, out)
    log.info("saved %s", out)


if __name__ == "__main__":
    main()  # `python -m` imported optimizer/__init__.py first: OMP_WAIT_POLICY is already set
