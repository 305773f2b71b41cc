"""Check a GPU target in one run: torch-CUDA teacher baselines, then the TensorRT pipeline.

    python benchmarks/gpu_check.py --out gpu_check/            # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check.py --device cpu --no-compile   # smoke run of the script itself

1. Teacher baselines (torch only, no TensorRT needed), per batch size, one UNet call each:
   eager fp32, eager fp16, CUDA graph fp32 (static buffers, `torch.cuda.CUDAGraph`), and
   `torch.compile` fp32; parity of each against eager fp32 (rel. L2); and the teacher's reference
   sampler end to end (DDIM, its own step count) in eager fp32.
2. TensorRT: `dd-compile --demo --backend tensorrt` through `optimizer.compile.stages.run`: one strongly
   typed engine per precision (fp32/fp16/int8 graphs as ONNX Runtime validated them), three parity
   levels and the speedup against the torch teacher. Without TensorRT this step records the
   one-line reason and the run goes on.
3. Optionally the ONNX Runtime CUDA / TensorRT execution providers (--ort-backends).

Writes <out>/gpu_check.json and prints a table. Timings: warm-up, interleaved repeats, medians,
synchronizing around each call (optimizer.timing.time_interleaved).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engines.errors import DDCompileError  # noqa: E402
from engines.fileio import write_json_atomic  # noqa: E402
from optimizer.metrics import rel_l2  # noqa: E402
from optimizer.timing import time_interleaved  # noqa: E402

log = logging.getLogger("gpu_check")


def load_demo_teacher(path: Path | None) -> tuple[torch.nn.Module, Any, int, str]:
    """(denoiser, scheduler, reference steps, where it came from). Without trained weights, the demo
    architecture with random weights: timings do not depend on the weights, parity is relative."""
    from optimizer.compile.stages import DEMO_DIR
    from optimizer.models import Denoiser, load_teacher

    path = path or DEMO_DIR / "teacher"
    if (path / "unet").exists():
        t = load_teacher(path)
        return Denoiser(t.model).eval(), t.scheduler, t.reference_steps, str(path)
    from diffusers import DDPMScheduler

    from optimizer.demo.train_teacher import REFERENCE_STEPS, TeacherConfig, build_unet

    torch.manual_seed(0)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return (
        Denoiser(build_unet(TeacherConfig())).eval(),
        sched,
        REFERENCE_STEPS,
        "random weights (no teacher/)",
    )


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return rel_l2(a.float().cpu().numpy(), b.float().cpu().numpy())


def teacher_baselines(
    den: torch.nn.Module,
    scheduler: Any,
    ref_steps: int,
    batch_sizes: list[int],
    device: str,
    repeats: int,
    compile_: bool,
) -> dict[str, Any]:
    cfg = den.model.config
    shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
    den32 = den.to(device).float()
    den16 = None
    if device == "cuda":
        import copy

        den16 = copy.deepcopy(den32).half()
    compiled = torch.compile(den32) if compile_ else None
    sync = torch.cuda.synchronize if device == "cuda" else None
    out: dict[str, Any] = {
        "sample_shape": list(shape),
        "per_call": {},
        "parity_rel_l2": {},
        "e2e": {},
    }
    for b in batch_sizes:
        g = torch.Generator(device="cpu").manual_seed(b)
        x = torch.randn((b, *shape), generator=g).to(device)
        t = torch.full((b,), 500.0, device=device)
        fns: dict[str, Any] = {}
        with torch.inference_mode():
            ref = den32(x, t)
            fns["eager_fp32"] = lambda x=x, t=t: den32(x, t)
            if den16 is not None:
                x16, t16 = x.half(), t.half()
                out["parity_rel_l2"].setdefault("eager_fp16", {})[b] = _rel_l2(den16(x16, t16), ref)
                fns["eager_fp16"] = lambda x16=x16, t16=t16: den16(x16, t16)
        if device == "cuda":
            # CUDA graph: static input buffers, capture on a side stream after warm-up (torch docs).
            sx, st = x.clone(), t.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode():
                for _ in range(3):
                    den32(sx, st)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                sy = den32(sx, st)
            graph.replay()
            torch.cuda.synchronize()
            out["parity_rel_l2"].setdefault("cuda_graph_fp32", {})[b] = _rel_l2(sy, ref)
            fns["cuda_graph_fp32"] = graph.replay
        if compiled is not None:
            with torch.inference_mode():
                y = compiled(x, t)  # compiles here, outside the timed loop
            out["parity_rel_l2"].setdefault("torch_compile_fp32", {})[b] = _rel_l2(y, ref)

            def run_compiled(x=x, t=t):
                with torch.inference_mode():
                    return compiled(x, t)

            fns["torch_compile_fp32"] = run_compiled

        def wrap(fn):
            def call():
                with torch.inference_mode():
                    return fn()

            return call

        timings = time_interleaved(
            {k: wrap(f) for k, f in fns.items()},
            warmup=3,
            repeats=repeats,
            max_seconds=60,
            sync=sync,
        )
        for k, tm in timings.items():
            out["per_call"].setdefault(k, {})[b] = tm.to_dict()
        # The teacher's reference sampler, end to end (noise -> sample), eager fp32.
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(
            scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
        )
        ddim.set_timesteps(ref_steps)

        def sample(x=x, b=b, ddim=ddim):
            with torch.inference_mode():
                z = x.clone()
                for ts in ddim.timesteps:
                    z = ddim.step(den32(z, torch.full((b,), float(ts), device=device)), ts, z).prev_sample
                return z

        e2e = time_interleaved(
            {"teacher_e2e_fp32": sample},
            warmup=1,
            repeats=max(3, repeats // 10),
            max_seconds=60,
            sync=sync,
        )
        out["e2e"][b] = {"steps": ref_steps, **e2e["teacher_e2e_fp32"].to_dict()}
    return out


def tensorrt_pipeline(out: Path, batch_sizes: list[int], backend: str) -> dict[str, Any]:
    """The dd-compile pipeline on the demo with `backend`: its report, or why it could not run."""
    from optimizer.compile.stages import CompileConfig, demo_source, report_summary, run

    source, steps = demo_source()
    try:
        report = run(
            source,
            CompileConfig(out=out / backend, backend=backend, batch_sizes=tuple(batch_sizes), steps=steps),
        )
    except DDCompileError as e:  # BackendUnavailable / InputError: one line, recorded
        return {"ran": False, "reason": str(e), "error": type(e).__name__}
    return {"ran": True, "summary": report_summary(report), "report": json.loads(report.to_json())}


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            compute_capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    for mod in ("tensorrt", "onnxruntime", "polygraphy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report whatever stops the import
            env[mod] = f"unavailable ({type(e).__name__})"
    return env


def print_table(res: dict[str, Any]) -> None:
    base = res["teacher"]["per_call"]
    sizes = sorted({b for v in base.values() for b in v})
    print(
        f"\n{'variant':22}" + "".join(f"{'b=' + str(b):>14}" for b in sizes) + "   (median ms per UNet call)"
    )
    for name, per in base.items():
        print(
            f"{name:22}"
            + "".join(f"{per[b]['median_ms']:14.3f}" if b in per else f"{'-':>14}" for b in sizes)
        )
    for b, e in res["teacher"]["e2e"].items():
        print(f"teacher e2e ({e['steps']} steps) b={b}: {e['median_ms']:.1f} ms")
    for k, v in res.items():
        if k.startswith("pipeline/"):
            print(f"{k}: " + (f"passed={v['summary']['passed']}" if v["ran"] else f"not run: {v['reason']}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu")
    )
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--teacher", type=Path, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT pipeline")
    ap.add_argument("--ort-backends", default="", help="also run e.g. onnxruntime-cuda,onnxruntime-trt")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch: use --device cpu for a smoke run", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    den, sched, ref_steps, origin = load_demo_teacher(args.teacher)
    res: dict[str, Any] = {"environment": environment(args.device), "teacher_source": origin}
    res["teacher"] = teacher_baselines(
        den, sched, ref_steps, sizes, args.device, args.repeats, compile_=not args.no_compile
    )
    backends = ([] if args.no_tensorrt else ["tensorrt"]) + [b for b in args.ort_backends.split(",") if b]
    for backend in backends:
        res[f"pipeline/{backend}"] = tensorrt_pipeline(args.out, sizes, backend)
    write_json_atomic(args.out / "gpu_check.json", json.loads(json.dumps(res, default=str)))
    print_table(res)
    print(f"\nwrote {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
