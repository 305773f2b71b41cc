#!/usr/bin/env bash
# Bench the demo on this CPU with 1 and 2 threads, then merge the two targets into one table.
#   benchmarks/bench_demo.sh [RUN_DIR]        (default runs/bench_demo; about 5 minutes on 2 cores)
# Uses the distilled demo student when present (dd-compile --demo), else the demo teacher packed
# as a 4-step DDIM student; dd-compile writes the fp32/fp16/int8 ONNX graphs dd-bench measures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
RUN=${1:-runs/bench_demo}
OUT=$RUN/out
if [ ! -f "$OUT/manifest.json" ]; then
  if [ -f optimizer/demo/student/student.ckpt ]; then
    python -m optimizer.cli --demo -o "$OUT" --precision fp32,fp16,int8
  else
    python -m optimizer.cli optimizer/demo/teacher --steps 4 -o "$OUT" --precision fp32,fp16,int8
  fi
fi
for t in 1 2; do
  python -m optimizer.bench.cli "$OUT" --threads $t --batch-sizes 1,8,32 --seconds 40 \
    --target "cpu x${t}t" -o "$RUN/cpu_${t}t"
done
python -m optimizer.bench.cli merge "$RUN/cpu_1t/bench.json" "$RUN/cpu_2t/bench.json" -o "$RUN/targets.md"
python -m optimizer.bench.cli merge "$RUN/cpu_1t/bench.json" "$RUN/cpu_2t/bench.json" --phase call \
  -o "$RUN/targets_call.md"
