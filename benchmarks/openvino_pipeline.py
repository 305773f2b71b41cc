"""OpenVINO the way its own tools run a pipeline's UNet, side by side per call: dynamic shapes f32
(what dd-compile's pipelines ran before), static shapes f32 and static bf16 (the INFERENCE_PRECISION_HINT;
optimum-intel / openvino.genai reshape and hint the same way), against ONNX Runtime fp32, on the
same fp32 graph and the same feeds, interleaved rounds in one process (optimizer/timing.py).

    python benchmarks/openvino_pipeline.py                          # the bundled demo's UNet, b1 and b4
    python benchmarks/openvino_pipeline.py --models demo,sd15 --threads 2
    python benchmarks/openvino_pipeline.py --models sd15 --sd15-px 256 --repeats 5

- `demo`: the bundled LCM student's UNet (optimizer/demo/t2i/student_lcm4; embedded guidance, so
  the UNet runs at batch B), exported by the project's own path, 32 px (8x8 latents).
- `sd15`: SD 1.5's UNet2DConditionModel config (860M parameters, random weights from
  torch.manual_seed, no hub) as an LCM UNet (time_cond_proj_dim 256, batch 1), latents px / 8;
  configs and feeds from benchmarks/real_components.py. About 3.4 GB per copy: the four runners
  hold about 12 GB together, and the export takes minutes on 2 cores.

Each runner is compiled (activated) before the rounds, so no compile is timed; the compile
seconds are recorded beside the timings. rel. L2 is each output against ONNX Runtime fp32's.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime as dt
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
log = logging.getLogger("openvino_pipeline")
FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    """The ISA flags this comparison turns on (as `grep -o -w -E ... /proc/cpuinfo | sort -u`)."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split())
    return sorted(f for f in FLAGS if f in have)


def demo_unet(work: Path, batch: int) -> tuple[Path, Any, dict[str, np.ndarray], str]:
    from optimizer.t2i.components import dummy_inputs
    from optimizer.t2i.export import export_component
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.source import demo_source

    loaded = load_pipeline(demo_source())
    c = loaded.spec.component("unet")
    path = work / "demo_unet.fp32.onnx"
    if not path.exists():  # one export for every batch size
        export_component("unet", loaded.module("unet"), c.io, c.config, path)
    feeds = dummy_inputs(c.io, np.random.default_rng(0))
    feeds = {k: np.repeat(v[:1], batch, axis=0) for k, v in feeds.items()}
    feeds["timestep"] = np.full(feeds["timestep"].shape, 999, feeds["timestep"].dtype)  # LCM's first step
    side = c.io.dims["latent_height"].opt * loaded.spec.vae_scale_factor
    return path, c.io, feeds, f"demo LCM student UNet ({side} px, batch {batch}, embedded guidance)"


def sd15_unet(work: Path, px: int) -> tuple[Path, Any, dict[str, np.ndarray], str]:
    import real_components as rc

    from optimizer.t2i.export import export_component

    side = px // 8
    t0 = time.perf_counter()
    module = rc.build("lcm_unet", "full")
    config = rc.model_config("lcm_unet", module)
    spec = rc.io_spec("lcm_unet", config, "full", side)
    path = export_component("unet", module, spec, config, work / "sd15_lcm_unet.fp32.onnx")
    del module
    gc.collect()
    log.info("sd15: built and exported in %.0f s", time.perf_counter() - t0)
    feeds = rc.inputs("lcm_unet", config, "full", rc.SEED, side)
    return path, spec, feeds, f"SD 1.5-size LCM UNet, random weights ({px} px, batch 1, embedded guidance)"


def runners(path: Path, spec: Any, batch: int, threads: int, bf16: bool) -> dict[str, Any]:
    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from engines.openvino_runner import OpenVINORunner

    kw = dict(batch_sizes=[batch], threads=threads)
    out: dict[str, Any] = {
        "ORT fp32": OnnxRuntimeRunner(path, spec, threads=threads),
        "OpenVINO f32 dynamic": OpenVINORunner(path, spec, static=False, **kw),
        "OpenVINO f32 static": OpenVINORunner(path, spec, **kw),
    }
    if bf16:
        out["OpenVINO bf16 static"] = OpenVINORunner(path, spec, precision_hint="bf16", **kw)
    return out


def measure(
    name: str, path: Path, spec: Any, feeds: dict[str, np.ndarray], label: str, args: argparse.Namespace
) -> dict[str, Any]:
    from engines.openvino_runner import cpu_capabilities
    from optimizer.metrics import rel_l2
    from optimizer.timing import time_interleaved

    batch = int(feeds["sample"].shape[0])
    rs = runners(path, spec, batch, args.threads, "BF16" in cpu_capabilities())
    compile_s = {}
    try:
        for k, r in rs.items():
            t0 = time.perf_counter()
            r.activate()
            compile_s[k] = round(time.perf_counter() - t0, 2)
        out = spec.output_names[0]
        ref = rs["ORT fp32"].infer(feeds)[out]
        err = {k: rel_l2(r.infer(feeds)[out], ref) for k, r in rs.items()}
        fns = {k: (lambda r=r: r.infer(feeds)) for k, r in rs.items()}
        load0 = os.getloadavg()
        t = time_interleaved(fns, warmup=2, repeats=args.repeats, max_seconds=args.max_seconds)
        load1 = os.getloadavg()
    finally:
        for r in rs.values():
            r.deactivate()
    base, dyn = t["ORT fp32"].median_ms, t["OpenVINO f32 dynamic"].median_ms
    rows = {
        k: {
            **v.to_dict(),
            "x_ort_fp32": base / v.median_ms,
            "x_openvino_dynamic": dyn / v.median_ms,
            "rel_l2_vs_ort_fp32": err[k],
            "activate_s": compile_s[k],
        }
        for k, v in t.items()
    }
    log.info("%s: %s", name, {k: f"{v['median_ms']:.2f} ms, {v['x_ort_fp32']:.2f}x" for k, v in rows.items()})
    return {
        "model": name,
        "label": label,
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "threads": args.threads,
        "load_avg_before": load0,
        "load_avg_after": load1,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo", help="comma-separated: demo, sd15")
    ap.add_argument("--batch-sizes", default="1,4", help="the demo UNet's batches (sd15: batch 1)")
    ap.add_argument("--sd15-px", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import onnxruntime
    import openvino

    from engines.openvino_runner import cpu_capabilities

    results = []
    with tempfile.TemporaryDirectory(prefix="dd.openvino_pipeline.") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            if name == "demo":
                for b in (int(x) for x in args.batch_sizes.split(",")):
                    results.append(measure(f"demo b{b}", *demo_unet(work, b), args))
            elif name == "sd15":
                results.append(measure(f"sd15 {args.sd15_px}px", *sd15_unet(work, args.sd15_px), args))
            else:
                ap.error(f"--models: unknown model {name!r} (demo, sd15)")
            gc.collect()
    report = {
        "what": "per-call UNet: OpenVINO dynamic f32 vs static f32 vs static bf16 vs ONNX Runtime fp32",
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/openvino_pipeline.py " + " ".join(argv or sys.argv[1:]),
        "cpu_flags": cpu_flags(),
        "openvino_capabilities": sorted(cpu_capabilities()),
        "usable_cores": len(os.sched_getaffinity(0)),
        "versions": {"openvino": openvino.__version__, "onnxruntime": onnxruntime.__version__},
        "results": results,
    }
    print(f"\nCPU flags: {' '.join(report['cpu_flags'])}; OpenVINO: {report['openvino_capabilities']}")
    head = ("model", "variant", "ms", "spread", "n", "x ORT", "x dyn", "rel L2")
    print("{:<12} {:<22} {:>9} {:>6} {:>3} {:>6} {:>6} {:>8}".format(*head))
    for r in results:
        for k, v in r["rows"].items():
            print(
                f"{r['model']:<12} {k:<22} {v['median_ms']:>9.2f} {v['spread']:>6.2f} {v['n']:>3} "
                f"{v['x_ort_fp32']:>6.2f} {v['x_openvino_dynamic']:>6.2f} {v['rel_l2_vs_ort_fp32']:>8.1e}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
