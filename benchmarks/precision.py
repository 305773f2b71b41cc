"""Precision benchmark: torch eager vs ORT fp32 / fp16 / int8, per call at batch 1 and 16, and the
sample-level PSNR of fp16/int8 vs the torch student (4-step DDIM), side by side in one process.

    python benchmarks/precision.py                    # the demo teacher (random weights if absent)
    python benchmarks/precision.py --model cifar      # google/ddpm-cifar10-32 config, random weights
    python benchmarks/precision.py --calibration percentile   # compare calibration methods
Timings on a shared CPU are noisy: read the spread column.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.schedule import Sampler, SamplingSchedule, trailing_timesteps
from engines.torch_runner import TorchRunner
from optimizer.compile.export import export_onnx
from optimizer.metrics import psnr_db
from optimizer.model_io import conditioning_feeds, io_spec_for, sample_shape
from optimizer.models import Denoiser
from optimizer.quantize import (
    Fp16Config,
    Int8Config,
    calibration_feeds,
    quantize_fp16,
    quantize_int8,
)
from optimizer.timing import time_interleaved

log = logging.getLogger("precision")
DEMO = Path(__file__).resolve().parents[1] / "optimizer" / "demo" / "teacher"


def build(name: str) -> tuple[torch.nn.Module, SamplingSchedule]:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    if name == "demo" and (DEMO / "unet" / "config.json").exists():
        from optimizer.models import load_teacher

        t = load_teacher(DEMO)
        return t.model, t.schedule(4)
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    if name == "cifar":
        from optimizer.model_zoo import DDPM_CIFAR10_32

        m = UNet2DModel(**DDPM_CIFAR10_32)
    else:
        log.warning("no trained demo teacher at %s: random weights", DEMO)
        from optimizer.demo.train_teacher import TeacherConfig, build_unet

        m = build_unet(TeacherConfig())
    T = sched.config.num_train_timesteps
    return m.eval(), SamplingSchedule.from_alphas(
        sched.alphas_cumprod.numpy(), trailing_timesteps(T, 4), kind="ddim", prediction_type="v_prediction"
    )


def psnr(a: np.ndarray, ref: np.ndarray) -> float:
    """Sample PSNR (optimizer.metrics) of images clipped to [-1, 1], as they are shown."""
    return psnr_db(np.clip(a, -1, 1), np.clip(ref, -1, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("demo", "cifar"), default="demo")
    ap.add_argument("--calibration", default="minmax", choices=("minmax", "percentile", "entropy"))
    ap.add_argument("--seeds", type=int, default=16, help="calibration seeds")
    ap.add_argument("--eval-seeds", type=int, default=32, help="seeds for the sample-level PSNR")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (ORT: its default)")
    ap.add_argument("--out", type=Path, default=None, help="keep the ONNX files here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # exporter chatter, not our results
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    model, schedule = build(args.model)
    cls = type(model).__name__
    spec = io_spec_for(cls, dict(model.config))
    shape = sample_shape(cls, dict(model.config))
    work = args.out or Path(tempfile.mkdtemp(prefix="ddq.bench."))
    fp32 = export_onnx(Denoiser(model), spec, work / "student.fp32.onnx")
    with OnnxRuntimeRunner(fp32, spec) as r:
        calib = calibration_feeds(r, spec, schedule, shape, list(range(args.seeds)), 8)

    eval_seeds = list(range(1000, 1000 + args.eval_seeds))
    torch_runner = TorchRunner(Denoiser(model), spec)
    with torch_runner:
        ref_samples = Sampler(schedule, torch_runner, max_batch=16).from_seeds(eval_seeds, shape)

    def sample_psnr(path: Path) -> float:
        with OnnxRuntimeRunner(path, spec) as r:
            return psnr(Sampler(schedule, r, max_batch=16).from_seeds(eval_seeds, shape), ref_samples)

    r16 = quantize_fp16(fp32, work / "student.fp16.onnx", calib, Fp16Config())
    r8 = quantize_int8(
        fp32,
        work / "student.int8.onnx",
        calib,
        Int8Config(calibration=args.calibration),
        parity_check=sample_psnr,
    )
    paths = {"ort-fp32": fp32, "ort-fp16": r16.path, "ort-int8": r8.path}
    quality = {k: sample_psnr(p) for k, p in paths.items()}
    print(
        f"\nmodel={args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
        f"int8 calibration={args.calibration}; fp16: {r16.counts} call rel.L2 {r16.call_rel_l2:.2e}; "
        f"int8: {r8.counts} call rel.L2 {r8.call_rel_l2:.2e}"
    )
    rng = np.random.default_rng(0)
    print(
        f"{'batch':>5} {'variant':<10} {'median ms':>10} {'spread':>7} {'vs fp32':>8} {'vs torch':>8} "
        f"{'sample PSNR dB':>15}"
    )
    for b in (1, 16):
        feeds = {
            "sample": rng.standard_normal((b, *shape)).astype(np.float32),
            "timestep": np.full((b,), schedule.timesteps[0], np.float32),
        }
        feeds.update(conditioning_feeds(spec, b, rng))
        runners = {k: OnnxRuntimeRunner(p, spec) for k, p in paths.items()}
        for r in runners.values():
            r.activate()
        fns = {"torch": lambda feeds=feeds: torch_runner.infer(feeds)}
        torch_runner.activate()
        fns.update({k: (lambda r=r, feeds=feeds: r.infer(feeds)) for k, r in runners.items()})
        t = time_interleaved(fns, warmup=3, repeats=args.repeats, max_seconds=60)
        for k, v in t.items():
            q = quality.get(k)
            print(
                f"{b:>5} {k:<10} {v.median_ms:>10.2f} {v.spread:>7.2f} "
                f"{t['ort-fp32'].median_ms / v.median_ms:>8.2f} {t['torch'].median_ms / v.median_ms:>8.2f} "
                f"{'' if q is None else f'{q:.1f}':>15}"
            )
        torch_runner.deactivate()
        for r in runners.values():
            r.deactivate()
    print(
        "\nint8 kept float:",
        sorted({(k.reason) for k in r8.kept_float}),
        f"{sum(k.reason == 'no-int8-kernel' for k in r8.kept_float)} without an ORT int8 kernel, "
        f"{sum(k.reason == 'sensitivity' for k in r8.kept_float)} by sensitivity",
    )


if __name__ == "__main__":
    main()
