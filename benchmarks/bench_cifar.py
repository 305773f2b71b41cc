"""Bench the ddpm-cifar10-32 UNet config (35.7M parameters, random weights) on this machine.

    PYTHONPATH=. python benchmarks/bench_cifar.py --out runs/cifar [--threads 2] [--seconds 60]

Builds a minimal dd-compile output (teacher folder, student.ckpt = teacher weights with a 4-step
DDIM schedule, fp32 ONNX; see optimizer/bench/minimal_out.py) unless OUT/manifest.json exists,
then runs `dd-bench OUT`. Point `dd-bench` at a full dd-compile output for fp16/int8 variants.
Timing, not quality: the weights are random.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from optimizer.model_zoo import DDPM_CIFAR10_32 as CIFAR_UNET  # noqa: E402


def build(out: Path, student_steps: int, reference_steps: int) -> None:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from optimizer.bench.minimal_out import build_minimal_out

    torch.manual_seed(0)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    model = UNet2DModel(**CIFAR_UNET).eval()
    t0 = time.perf_counter()
    build_minimal_out(
        model,
        DDPMScheduler(num_train_timesteps=1000),
        out,
        student_steps=student_steps,
        reference_steps=reference_steps,
        batch_sizes=[1, 64],
    )
    logging.info("built %s in %.0f s", out, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/cifar"))
    ap.add_argument("--student-steps", type=int, default=4)
    ap.add_argument("--reference-steps", type=int, default=64)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help="after --: passed to dd-bench (default: --batch-sizes 1,4 --seconds 60)",
    )
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (a.out / "manifest.json").exists():
        build(a.out, a.student_steps, a.reference_steps)
    if a.build_only:
        return
    extra = [x for x in a.bench_args if x != "--"] or ["--batch-sizes", "1,4", "--seconds", "60"]
    t0 = time.perf_counter()
    # a minimal output is timed, never validated: dd-bench benches it only when told so (recorded)
    cmd = [sys.executable, "-m", "optimizer.bench.cli", str(a.out), "--allow-unvalidated", *extra]
    rc = subprocess.call(cmd)
    logging.info("dd-bench took %.0f s", time.perf_counter() - t0)
    sys.exit(rc)


if __name__ == "__main__":
    main()
