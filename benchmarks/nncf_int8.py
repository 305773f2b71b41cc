"""NNCF (OpenVINO's post-training quantizer) as a second INT8 path, judged by dd-compile's int8 bar.

    PYTHONPATH=.:NNCF_SITE python benchmarks/nncf_int8.py [--threads 1 --batch 16 --json r.json]

Builds the demo UNet's graphs as benchmarks/cpu_targets.py does (fp32 export, dd-compile's Q/DQ
int8 on the same calibration feeds), runs nncf.quantize on the fp32 ONNX with those very feeds,
then on held-out trajectory feeds (other seeds, batch 16): call rel. L2 vs ORT fp32 (int8 bar
5e-2) and per-call speed vs ORT fp32, all OpenVINO static-shape, interleaved in one process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from engines.onnxruntime_runner import OnnxRuntimeRunner
from optimizer.metrics import rel_l2
from optimizer.quantize import calibration_feeds
from optimizer.timing import StopRule, time_until_stable

INT8_BAR = 5e-2  # dd-compile's default call-level int8 bar (ARCHITECTURE.md)
log = logging.getLogger("nncf_int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    import nncf
    import onnx

    from engines.openvino_runner import OpenVINORunner

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_targets import build_graphs, cpu_flags
    from precision import build

    with tempfile.TemporaryDirectory(prefix="dd.nncf.") as tmp:
        work = Path(tmp)
        _, spec, shape, graphs = build_graphs("demo", work)
        _, schedule = build("demo")
        with OnnxRuntimeRunner(graphs["fp32"], spec, threads=a.threads) as r:
            calib = calibration_feeds(r, spec, schedule, shape, list(range(16)), 8)  # dd-compile's feeds
            held = calibration_feeds(r, spec, schedule, shape, list(range(100, 100 + a.batch)), a.batch)
        results = {}
        for mode, kw in {
            "default": {},
            "mixed preset": {"preset": nncf.QuantizationPreset.MIXED},
        }.items():
            q = nncf.quantize(
                onnx.load(str(graphs["fp32"])), nncf.Dataset(calib), subset_size=len(calib), **kw
            )
            path = work / f"student.nncf.{mode.replace(' ', '_')}.onnx"
            onnx.save(q, str(path))
            graphs[f"nncf {mode}"] = path
        runners = {
            "ORT fp32": OnnxRuntimeRunner(graphs["fp32"], spec, threads=a.threads),
            "OpenVINO dd-compile int8 Q/DQ": OpenVINORunner(
                graphs["int8"], spec, batch_sizes=[a.batch], threads=a.threads
            ),
            **{
                f"OpenVINO {k}": OpenVINORunner(graphs[k], spec, batch_sizes=[a.batch], threads=a.threads)
                for k in graphs
                if k.startswith("nncf")
            },
        }
        for r in runners.values():
            r.activate()
        name = spec.output_names[0]
        ref = [runners["ORT fp32"].infer(f)[name] for f in held]
        for k, r in runners.items():
            out = [r.infer(f)[name] for f in held]
            err = max(rel_l2(o, x) for o, x in zip(out, ref, strict=True))
            results[k] = {"call_rel_l2_max": float(err), "passes_int8_bar": bool(err <= INT8_BAR)}
        f0 = held[0]
        rule = StopRule(
            warmup=3, min_rounds=5, max_rounds=200, min_samples=5, max_seconds=a.seconds, slice_s=0.1
        )
        run = time_until_stable({k: (lambda r=r: r.infer(f0, check=False)) for k, r in runners.items()}, rule)
        base = run.timings["ORT fp32"].median_ms
        for k, t in run.timings.items():
            results[k].update(
                median_ms=t.median_ms,
                stable=bool(t.stable),
                n=len(t.samples_ms),
                vs_ort_fp32=base / t.median_ms,
            )
        for r in runners.values():
            r.deactivate()
    rep = {
        "batch": a.batch,
        "threads": a.threads,
        "isa": cpu_flags(),
        "load_avg": os.getloadavg(),
        "nncf": nncf.__version__,
        "results": results,
    }
    for k, v in results.items():
        print(
            f"{k:<34} rel. L2 {v['call_rel_l2_max']:.2e} ({'pass' if v['passes_int8_bar'] else 'FAIL'} "
            f"<= {INT8_BAR:g})  {v['median_ms']:.2f} ms  {v['vs_ort_fp32']:.2f}x ORT fp32"
            + ("" if v["stable"] else " (median not stable)")
        )
    print(f"b{a.batch}, {a.threads} thread(s), load {rep['load_avg']}, ISA {rep['isa']}")
    if a.json:
        a.json.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
