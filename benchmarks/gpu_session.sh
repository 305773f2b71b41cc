#!/usr/bin/env bash
# One prepared GPU session (an H100/H200 lent for ~15 minutes, no TensorRT on it):
#   1. torch-CUDA teacher baselines on the demo teacher (benchmarks/gpu_check.py: eager fp32/fp16,
#      CUDA graph, torch.compile), alone on the GPU so the timings are clean;
#   2. dd-distill on CUDA, four demo runs side by side (progressive to 4 and to 1 step,
#      consistency, smaller student), each under its own time cap;
#   3. a one-process torchrun (nccl) smoke run of the DDP path.
# Results land in $OUT (or ./gpu_session) as gpu_check.json and distill.tar.gz (checkpoints,
# reports, plots, logs).
#
#   bash benchmarks/gpu_session.sh [DISTILL_SECONDS]
#
# Wheels the image lacks (diffusers, polygraphy, importlib_metadata) may sit in .whl/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_session}
CAP=${1:-290}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
W=$(mktemp -d)
nvidia-smi -L || true
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"

t0=$(date +%s)
timeout 180 python3 benchmarks/gpu_check.py --out "$W/gpu_check" --no-tensorrt 2>&1 | tail -40
cp "$W/gpu_check/gpu_check.json" "$OUT/" 2>/dev/null
echo "gpu_check: $(( $(date +%s) - t0 )) s"

distill() {  # name, args...
    local name=$1; shift
    ( timeout "$CAP" python3 -m optimizer.distill --demo -o "$W/$name/student.ckpt" \
        --threads 1 "$@" > "$W/$name.log" 2>&1; echo "exit $?" >> "$W/$name.log" ) &
}
NAMES="pd4 pd4L pd1 cd4 kd4"
for n in $NAMES; do mkdir -p "$W/$n"; done
t0=$(date +%s)
distill pd4 --steps 4                       # the defaults, as on the CPU
distill pd4L --steps 4 --iters 1500         # longer rounds
distill pd1 --steps 1 --iters 800           # 64 -> 1 step, six rounds
distill cd4 --steps 4 --method consistency --iters 4000
distill kd4 --steps 4 --width 0.5
wait
echo "distill: $(( $(date +%s) - t0 )) s"
for n in $NAMES; do echo "== $n"; grep -E "round|FID|fid|exit|Error|error" "$W/$n.log" | tail -12; done

timeout 60 torchrun --nproc_per_node 1 -m optimizer.distill --demo -o "$W/ddp/student.ckpt" --steps 4 \
    --iters 20 --eval-samples 0 > "$W/ddp.log" 2>&1; echo "torchrun exit $?" | tee -a "$W/ddp.log"
tail -5 "$W/ddp.log"
rm -f "$W"/*/*.distill/state.safetensors
tar czf "$OUT/distill.tar.gz" -C "$W" $NAMES $(for n in $NAMES; do echo $n.log; done) ddp.log
ls -la "$OUT"
