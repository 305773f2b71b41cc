"""INT8 speed on the CPU: ORT FP32 vs INT8 Q/DQ placements, side by side in one process, with the
per-op profile that explains the ratio and the sample-level PSNR vs the torch student.

    python benchmarks/int8_speed.py                           # demo teacher (else random weights)
    python benchmarks/int8_speed.py --teacher /path/teacher   # any diffusers teacher folder
    python benchmarks/int8_speed.py --ceiling --json out.json # + every fusable node in int8

Variants: `ort-fp32`; `int8-shared` (quantize_static's shared Q/DQ, the previous placement);
`int8` (Int8Config() defaults: isolated Q/DQ, sensitivity selection within the bars); with
--ceiling, `int8-all` (every node ORT fuses, no accuracy budget: the speed ceiling).
Timing: interleaved (A B A B ...), medians; with 1 intra-op thread ORT runs on the calling thread,
so the thread CPU time is also reported: it is far less disturbed by other processes on a shared
machine than the wall clock. Read the spread column; never compare numbers across machines.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import collections
import importlib.util
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from engines.onnxruntime_runner import OnnxRuntimeRunner, session_options
from engines.schedule import Sampler
from engines.torch_runner import TorchRunner
from optimizer.compile.export import export_onnx
from optimizer.model_io import conditioning_feeds, io_spec_for, sample_shape
from optimizer.models import Denoiser, load_teacher
from optimizer.quantize import Int8Config, calibration_feeds, quantize_int8
from optimizer.quantize.onnx_graph import call_error, run_model

log = logging.getLogger("int8_speed")
HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "optimizer" / "demo" / "teacher"
COUNTED = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "MatMulIntegerToFloat",
    "Conv",
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "QuantizeLinear",
    "DequantizeLinear",
    "Transpose",
)


def _precision_bench():  # benchmarks/ is not a package: reuse build() and psnr() from precision.py
    spec = importlib.util.spec_from_file_location("precision_bench", HERE / "precision.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _session(path: Path, threads: int, profile_prefix: Path | None = None):
    import onnxruntime as ort

    so = session_options(threads or None)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_variants(
    paths: dict[str, Path],
    feeds: dict[str, np.ndarray],
    threads: int,
    repeats: int,
    inner: int = 3,
    warmup: int = 5,
) -> dict[str, dict[str, float]]:
    """Interleaved medians per call: wall ms, thread CPU ms (meaningful with 1 thread), spread."""
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(inner):
                s.run(None, feeds)
            wall[k].append((time.perf_counter() - t0) * 1e3 / inner)
            cpu[k].append((time.thread_time() - c0) * 1e3 / inner)
    out = {}
    for k in sessions:
        w = sorted(wall[k])
        med = statistics.median(w)
        out[k] = {
            "wall_ms": med,
            "cpu_ms": statistics.median(cpu[k]),
            "spread": (w[int(0.9 * (len(w) - 1))] - w[int(0.1 * (len(w) - 1))]) / med,
        }
    return out


def node_profile(path: Path, feeds: dict[str, np.ndarray], runs: int = 20) -> dict[str, tuple[str, float]]:
    """ORT profiler, 1 thread: per node of the optimized graph, (op type, ms per call)."""
    with tempfile.TemporaryDirectory(prefix="ddq.prof.") as d:
        s = _session(path, 1, Path(d) / "p")
        for _ in range(runs):
            s.run(None, feeds)
        events = json.loads(Path(s.end_profiling()).read_text())
    dur: collections.Counter = collections.Counter()
    op: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            dur[name] += e["dur"]
            op[name] = e["args"]["op_name"]
    return {k: (op[k], us / runs / 1e3) for k, us in dur.items()}


def op_profile(nodes: dict[str, tuple[str, float]]) -> dict[str, tuple[float, int]]:
    """Per op type: (ms per call, nodes)."""
    dur: collections.Counter = collections.Counter()
    n: collections.Counter = collections.Counter()
    for op, ms in nodes.values():
        dur[op] += ms
        n[op] += 1
    return {op: (ms, n[op]) for op, ms in dur.most_common()}


def conv_bound(model, fp32: dict, int8: dict) -> dict[str, float]:
    """Why INT8 cannot pay more here, from the two node profiles (batch 16, 1 thread).

    - each Conv's int8 kernel (QLinearConv, named after the node) vs its fp32 kernel (ORT's NCHWc
      conv, named after its output): how much faster integer math is on this CPU;
    - the share of fp32 time in convs (with their NCHWc reorders);
    - `free_qdq_bound`: the int8 graph's speed-up if its Q/DQ nodes and the layout transposes it
      adds cost nothing (profiled fp32 total / (int8 total - Q - DQ - extra Transpose time)).
    """
    ratios = []
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        f = fp32.get(f"{n.output[0]}_nchwc") or fp32.get(n.name)
        q = next(
            (
                v
                for k, v in int8.items()
                if v[0] == "QLinearConv" and (k == n.name or k.startswith(n.name + "_token"))
            ),
            None,
        )
        if f and q:
            ratios.append(f[1] / q[1])

    def ms(prof: dict, *ops: str) -> float:
        return sum(v[1] for v in prof.values() if v[0] in ops)

    total_f, total_q = ms(fp32, *{v[0] for v in fp32.values()}), ms(int8, *{v[0] for v in int8.values()})
    overhead = ms(int8, "QuantizeLinear", "DequantizeLinear") + ms(int8, "Transpose") - ms(fp32, "Transpose")
    out = {
        "fp32_conv_share": ms(fp32, "Conv", "ReorderInput", "ReorderOutput") / total_f,
        "qdq_and_layout_ms": overhead,
        "free_qdq_bound": total_f / (total_q - overhead),
        "matched_convs": len(ratios),
    }
    if ratios:
        out |= {
            "kernel_ratio_min": min(ratios),
            "kernel_ratio_median": float(np.median(ratios)),
            "kernel_ratio_max": max(ratios),
        }
    return out


def optimized_counts(path: Path) -> dict[str, int]:
    """Op counts of the graph ORT actually runs (ORT_ENABLE_ALL, this CPU)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ddq.opt.") as d:
        so = session_options()
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.log_severity_level = 3  # the "hardware specific optimizations" warning is expected here
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        c = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {k: c.get(k, 0) for k in COUNTED} | {"nodes": sum(c.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=DEMO, help="diffusers teacher folder (default: the demo)")
    ap.add_argument("--steps", type=int, default=4, help="student steps (DDIM, trailing timesteps)")
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 0],
        help="ORT intra-op threads (0: ORT default)",
    )
    ap.add_argument("--seeds", type=int, default=16, help="calibration seeds")
    ap.add_argument("--eval-seeds", type=int, default=32, help="seeds for the sample-level PSNR")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ceiling", action="store_true", help="also time every fusable node in int8")
    ap.add_argument(
        "--explore",
        action="store_true",
        help="also: Conv-only / Conv+Gemm selections, shared Q/DQ, percentile and entropy calibration",
    )
    ap.add_argument("--out", type=Path, default=None, help="keep the ONNX files here")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = ap.parse_args()
    # onnxruntime.quantization logs through the root logger: keep it at WARNING, ours at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for ours in ("int8_speed", "optimizer"):
        logging.getLogger(ours).setLevel(logging.INFO)
    torch.set_num_threads(1)

    pb = _precision_bench()
    if (args.teacher / "unet" / "config.json").exists():
        t = load_teacher(args.teacher)
        model, schedule, weights = t.model, t.schedule(args.steps), str(args.teacher)
    else:
        model, schedule = pb.build("demo")  # random weights: speed is right, accuracy is not
        weights = "random"
    cls = type(model).__name__
    spec = io_spec_for(cls, dict(model.config))
    shape = sample_shape(cls, dict(model.config))
    work = args.out or Path(tempfile.mkdtemp(prefix="ddq.int8speed."))
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(Denoiser(model), spec, work / "student.fp32.onnx")
    with OnnxRuntimeRunner(fp32, spec) as r:
        calib = calibration_feeds(r, spec, schedule, shape, list(range(args.seeds)), 8)
    eval_seeds = list(range(1000, 1000 + args.eval_seeds))
    with TorchRunner(Denoiser(model), spec) as tr:
        ref = Sampler(schedule, tr, max_batch=16).from_seeds(eval_seeds, shape)

    def sample_psnr(path: Path) -> float:
        with OnnxRuntimeRunner(path, spec) as r:
            return pb.psnr(Sampler(schedule, r, max_batch=16).from_seeds(eval_seeds, shape), ref)

    configs = {"int8-shared": Int8Config(isolate_qdq=False), "int8": Int8Config()}
    if args.explore:  # the placements and calibrations the defaults were chosen against
        configs["int8-conv"] = Int8Config(op_types=("Conv",))
        configs["int8-conv-shared"] = Int8Config(op_types=("Conv",), isolate_qdq=False)
        configs["int8-conv-gemm-shared"] = Int8Config(op_types=("Conv", "Gemm"), isolate_qdq=False)
        configs["int8-shared-percentile"] = Int8Config(isolate_qdq=False, calibration="percentile")
        configs["int8-shared-entropy"] = Int8Config(isolate_qdq=False, calibration="entropy")
    if args.ceiling:  # no accuracy budget: every node ORT fuses, in graph order
        configs["int8-all"] = Int8Config(
            sensitivity="none", target_call_rel_l2=float("inf"), min_psnr_db=-1e9
        )
    paths, results = {"ort-fp32": fp32}, {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        res = quantize_int8(
            fp32,
            work / f"student.{name}.onnx",
            calib,
            cfg,
            parity_check=None if name == "int8-all" else sample_psnr,
        )
        log.info("%s: %s in %.0f s", name, res.counts, time.perf_counter() - t0)
        paths[name], results[name] = res.path, res
    out_name = spec.output_names[0]
    refs = run_model(fp32, calib, out_name)
    quality = {
        k: {
            "sample_psnr_db": sample_psnr(p),
            "call_rel_l2": call_error(run_model(p, calib, out_name), refs)[0],
        }
        for k, p in paths.items()
    }
    counts = {k: optimized_counts(p) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    timings: dict[str, dict] = {}
    for b in args.batch:
        feeds = {
            "sample": rng.standard_normal((b, *shape)).astype(np.float32),
            "timestep": np.full((b,), schedule.timesteps[0], np.float32),
        }
        feeds.update(conditioning_feeds(spec, b, rng))
        for th in args.threads:
            timings[f"b{b}.t{th}"] = time_variants(paths, feeds, th, args.repeats)
    b0 = args.batch[-1]
    feeds = {
        "sample": rng.standard_normal((b0, *shape)).astype(np.float32),
        "timestep": np.full((b0,), schedule.timesteps[0], np.float32),
    }
    feeds.update(conditioning_feeds(spec, b0, rng))
    nodes = {k: node_profile(paths[k], feeds) for k in ("ort-fp32", "int8")}
    profiles = {k: op_profile(v) for k, v in nodes.items()}
    bound = conv_bound(onnx.load(str(paths["ort-fp32"])), nodes["ort-fp32"], nodes["int8"])

    print(
        f"\n{cls} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"weights: {weights}), ORT {__import__('onnxruntime').__version__}, "
        f"{os.cpu_count()} CPUs (shared machines: noisy)"
    )
    print(f"{'variant':<12} {'int8 nodes':>10} {'call relL2':>10} {'PSNR dB':>8}  ORT-optimized graph")
    for k in paths:
        c = counts[k]
        n8 = results[k].counts.get("int8", 0) if k in results else 0
        print(
            f"{k:<12} {n8:>10} {quality[k]['call_rel_l2']:>10.2e} "
            f"{quality[k]['sample_psnr_db']:>8.1f}  "
            + " ".join(f"{op}={c[op]}" for op in COUNTED if c[op])
            + f" nodes={c['nodes']}"
        )
    print(
        f"\n{'batch.threads':<14} {'variant':<12} {'wall ms':>8} {'spread':>7} {'cpu ms':>7} "
        f"{'x fp32 (wall)':>13} {'x fp32 (cpu)':>12}"
    )
    for key, t in timings.items():
        base = t["ort-fp32"]
        for k, v in t.items():
            print(
                f"{key:<14} {k:<12} {v['wall_ms']:>8.2f} {v['spread']:>7.2f} {v['cpu_ms']:>7.2f} "
                f"{base['wall_ms'] / v['wall_ms']:>13.2f} {base['cpu_ms'] / v['cpu_ms']:>12.2f}"
            )
    print(f"\nper-op profile, batch {b0}, 1 thread (ms per call, nodes): fp32 | int8")
    ops = sorted(
        set(profiles["ort-fp32"]) | set(profiles["int8"]),
        key=lambda o: -max(profiles["ort-fp32"].get(o, (0, 0))[0], profiles["int8"].get(o, (0, 0))[0]),
    )
    for op in ops[:18]:
        a, b = profiles["ort-fp32"].get(op, (0.0, 0)), profiles["int8"].get(op, (0.0, 0))
        print(f"  {op:<24} {a[0]:>7.3f} ({a[1]:>3}) | {b[0]:>7.3f} ({b[1]:>3})")
    tot = {k: sum(v[0] for v in p.values()) for k, p in profiles.items()}
    print(f"  {'total kernel time':<24} {tot['ort-fp32']:>7.3f}       | {tot['int8']:>7.3f}")
    if bound.get("matched_convs"):
        print(
            f"\nconvs: int8 kernels {bound['kernel_ratio_min']:.2f}-{bound['kernel_ratio_max']:.2f}x "
            f"(median {bound['kernel_ratio_median']:.2f}x) faster than their fp32 kernels "
            f"({bound['matched_convs']} convs); convs are {bound['fp32_conv_share']:.0%} of fp32 time"
        )
    print(
        f"int8: Q/DQ + extra transposes {bound['qdq_and_layout_ms']:.2f} ms; were they free, the int8 "
        f"graph would run {bound['free_qdq_bound']:.2f}x fp32 (profiled kernel time)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "weights": weights,
                    "quality": quality,
                    "optimized_counts": counts,
                    "timings": timings,
                    "conv_bound": bound,
                    "profiles": {k: {op: list(v) for op, v in p.items()} for k, p in profiles.items()},
                    "int8": {
                        k: {
                            "counts": r.counts,
                            "kept": collections.Counter(x.reason for x in r.kept_float),
                            "history": r.history,
                        }
                        for k, r in results.items()
                    },
                },
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
