#!/usr/bin/env bash
# The google/ddpm-cifar10-32 UNet config (random weights, 35.7M params) through dd-compile:
# export + fp32/fp16 parity (+ int8 with PRECISION=fp32,fp16,int8), side by side with the teacher.
# EXTRA adds dd-compile options, e.g. EXTRA="--threads 1" (with int8: the per-node sensitivity pass
# over its 109 candidate nodes takes ~6 min on 2 cores; --int8-selection graph-order skips it).
set -euo pipefail
OUT=${1:-runs/cifar_parity}
mkdir -p "$OUT"
python - "$OUT/teacher" <<'PY'
import os, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from diffusers import DDPMScheduler, UNet2DModel
from optimizer.model_zoo import DDPM_CIFAR10_32
torch.manual_seed(0)
UNet2DModel(**DDPM_CIFAR10_32).save_pretrained(f"{sys.argv[1]}/unet")
DDPMScheduler(num_train_timesteps=1000).save_pretrained(f"{sys.argv[1]}/scheduler")  # google's: linear, epsilon
PY
# Random weights: the student-vs-teacher quality bars mean nothing, parity bars stay as they are.
dd-compile "$OUT/teacher" --steps 4 -o "$OUT/out" --precision "${PRECISION:-fp32,fp16}" \
  --batch-sizes 1,4 --samples 8 --fid-samples 8 --bench-seconds 10 \
  --bar paired_psnr=-100 --bar fid_margin=1e9 ${EXTRA:-}
