"""CPU targets side by side: torch eager / torch.compile / ONNX Runtime / OpenVINO, per precision,
per batch size and per thread count, in one process (ORT fp32 = 1.00 at each batch and threads).

    python benchmarks/cpu_targets.py                        # the demo UNet, threads 1 and all cores
    python benchmarks/cpu_targets.py --model cifar --batch-sizes 8
    python benchmarks/cpu_targets.py --threads-grid 1,2 --repeats 30 --json results.json

Every variant runs the same graphs dd-compile validates (fp32 export, fp16 with fp32 islands, INT8
Q/DQ); OpenVINO compiles them with static shapes per batch (and once with dynamic shapes, to show
what that costs) and with the bf16 inference hint where the CPU has AVX512-BF16/AMX. The rel. L2
column is the variant's output vs torch fp32 on the same inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.torch_runner import TorchRunner
from optimizer.bench.fingerprint import ISA_FLAGS
from optimizer.compile.export import export_onnx
from optimizer.metrics import rel_l2
from optimizer.model_io import conditioning_feeds, io_spec_for, sample_shape
from optimizer.models import Denoiser
from optimizer.quantize import Fp16Config, Int8Config, calibration_feeds, quantize_fp16, quantize_int8
from optimizer.timing import time_interleaved

log = logging.getLogger("cpu_targets")


def cpu_flags() -> list[str]:
    try:
        flags = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ISA_FLAGS if f in flags]


def build_graphs(model_name: str, work: Path) -> tuple[torch.nn.Module, Any, Any, dict[str, Path]]:
    sys_path_bench = Path(__file__).resolve().parent
    import sys

    sys.path.insert(0, str(sys_path_bench))
    from precision import build  # the same model builders as benchmarks/precision.py

    model, schedule = build(model_name)
    cls = type(model).__name__
    spec = io_spec_for(cls, dict(model.config))
    shape = sample_shape(cls, dict(model.config))
    fp32 = export_onnx(Denoiser(model), spec, work / "student.fp32.onnx")
    with OnnxRuntimeRunner(fp32, spec) as r:
        calib = calibration_feeds(r, spec, schedule, shape, list(range(16)), 8)
    fp16 = quantize_fp16(fp32, work / "student.fp16.onnx", calib, Fp16Config()).path
    int8 = quantize_int8(fp32, work / "student.int8.onnx", calib, Int8Config(sensitivity="none")).path
    return model, spec, shape, {"fp32": fp32, "fp16": fp16, "int8": int8}


def variants(model, spec, graphs: dict[str, Path], batch: int, threads: int, bf16: bool) -> dict[str, Any]:
    from engines.openvino_runner import OpenVINORunner

    torch.set_num_threads(threads)
    eager = TorchRunner(Denoiser(model), spec, name="torch eager")
    compiled = TorchRunner(torch.compile(Denoiser(model)), spec, name="torch.compile")
    out: dict[str, Any] = {"torch eager fp32": eager, "torch.compile fp32": compiled}
    for p, g in graphs.items():
        out[f"ORT {p}"] = OnnxRuntimeRunner(g, spec, threads=threads)
    out["OpenVINO fp32 dynamic"] = OpenVINORunner(graphs["fp32"], spec, threads=threads, static=False)
    out["OpenVINO fp32 static"] = OpenVINORunner(graphs["fp32"], spec, batch_sizes=[batch], threads=threads)
    if bf16:
        out["OpenVINO bf16 static"] = OpenVINORunner(
            graphs["fp32"], spec, batch_sizes=[batch], threads=threads, precision_hint="bf16"
        )
    out["OpenVINO int8 Q/DQ static"] = OpenVINORunner(
        graphs["int8"], spec, batch_sizes=[batch], threads=threads
    )
    return out


def main() -> None:
    from engines.openvino_runner import cpu_capabilities

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("demo", "cifar"), default="demo")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads-grid", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="dd.cpu_targets."))
    model, spec, shape, graphs = build_graphs(args.model, work)
    bf16 = "BF16" in cpu_capabilities()
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        feeds = {
            "sample": rng.standard_normal((b, *shape)).astype(np.float32),
            "timestep": np.full((b,), 500.0, np.float32),
        }
        feeds.update(conditioning_feeds(spec, b, rng))
        for threads in sorted({int(x) for x in args.threads_grid.split(",")}):
            runners = variants(model, spec, graphs, b, threads, bf16)
            for r in runners.values():
                r.activate()
            ref = runners["torch eager fp32"].infer(feeds)[spec.output_names[0]]
            err = {k: rel_l2(r.infer(feeds)[spec.output_names[0]], ref) for k, r in runners.items()}
            fns = {k: (lambda r=r, f=feeds: r.infer(f)) for k, r in runners.items()}
            t = time_interleaved(fns, warmup=3, repeats=args.repeats, max_seconds=args.max_seconds)
            base = t["ORT fp32"].median_ms
            for k, v in t.items():
                rows.append(
                    {
                        "batch": b,
                        "threads": threads,
                        "variant": k,
                        "median_ms": v.median_ms,
                        "spread": v.spread,
                        "n": len(v.samples_ms),
                        "vs_ort_fp32": base / v.median_ms,
                        "vs_torch_eager": t["torch eager fp32"].median_ms / v.median_ms,
                        "images_per_s_per_core": b / (v.median_ms / 1e3) / threads,
                        "rel_l2_vs_torch": err[k],
                    }
                )
            for r in runners.values():
                r.deactivate()
    caps = sorted(cpu_capabilities())
    print(f"\nmodel={args.model}, CPU flags: {' '.join(cpu_flags())}, OpenVINO capabilities: {caps}")
    print(
        f"{'b':>3} {'thr':>3} {'variant':<26} {'ms':>8} {'spread':>6} {'x ORT fp32':>10} {'x eager':>8} "
        f"{'img/s/core':>10} {'rel L2':>8}"
    )
    for r in rows:
        print(
            f"{r['batch']:>3} {r['threads']:>3} {r['variant']:<26} {r['median_ms']:>8.2f} "
            f"{r['spread']:>6.2f} "
            f"{r['vs_ort_fp32']:>10.2f} {r['vs_torch_eager']:>8.2f} {r['images_per_s_per_core']:>10.1f} "
            f"{r['rel_l2_vs_torch']:>8.1e}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"model": args.model, "cpu_flags": cpu_flags(), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
