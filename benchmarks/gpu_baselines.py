"""PyTorch teacher baselines on one NVIDIA GPU: eager fp32, eager fp16, fp16 + CUDA graph,
torch.compile fp16 - for the ddpm-cifar10-32 UNet at batch 64 and the SD 1.5 UNet at 64x64 latents,
batch 2 (one image with classifier-free guidance). Random weights: timing only.

    PYTHONPATH=. python benchmarks/gpu_baselines.py --out runs/gpu_baselines.json

Sized for about 10 minutes on an H100/H200 (torch.compile of the SD UNet dominates); --quick
skips torch.compile. Device-resident inputs, CUDA events around each call, warm-up first: the
figures are the model alone, without host-device copies. Exits with code 2 without CUDA.
Reference (issue 6, H100, 2026-11-26): cifar b64 fp16 CUDA graph 7.6 ms, torch.compile 6.4 ms;
SD1.5 UNet b2 fp16 CUDA graph 11.9 ms.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("gpu_baselines")

from optimizer.model_zoo import DDPM_CIFAR10_32 as CIFAR_UNET  # noqa: E402
from optimizer.model_zoo import SD15_UNET  # noqa: E402


def cuda_time(fn: Callable[[], Any], warmup: int, seconds: float, max_iters: int = 500) -> list[float]:
    """Milliseconds per call from CUDA events, after `warmup` calls, for about `seconds`."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out: list[float] = []
    end = time.perf_counter() + seconds
    while len(out) < max_iters and (len(out) < 10 or time.perf_counter() < end):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        out.append(e0.elapsed_time(e1))
    return out


def variants(name: str, seconds: float, quick: bool) -> dict[str, Any]:
    import torch
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    if name == "ddpm-cifar10-32":
        model, batch = UNet2DModel(**CIFAR_UNET), 64
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        extra: dict[str, torch.Tensor] = {}
    else:
        model, batch = UNet2DConditionModel(**SD15_UNET), 2
        x = torch.randn(batch, 4, 64, 64, device="cuda")
        extra = {"encoder_hidden_states": torch.randn(batch, 77, 768, device="cuda")}
    t = torch.full((batch,), 500.0, device="cuda")
    model = model.to("cuda").eval()
    res: dict[str, Any] = {"batch": batch, "params": sum(p.numel() for p in model.parameters())}

    def record(label: str, fn: Callable[[], Any], warmup: int = 3) -> None:
        from optimizer.timing import Timing

        t0 = time.perf_counter()
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time(fn, warmup, seconds)
        tm = Timing(label, ms).to_dict()
        tm["warmup_s"] = round(time.perf_counter() - t0 - sum(ms) / 1e3, 2)
        tm["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        res[label] = tm
        log.info(
            "%s %s: p50 %.2f ms (p10 %.2f, p90 %.2f, n=%d), peak %d MiB",
            name,
            label,
            tm["p50_ms"],
            tm["p10_ms"],
            tm["p90_ms"],
            tm["n"],
            tm["peak_mem_mb"],
        )

    with torch.inference_mode():
        record("eager_fp32", lambda: model(x, t, **extra, return_dict=False))
        model = model.half()
        xh, th = x.half(), t.half()
        eh = {k: v.half() for k, v in extra.items()}
        record("eager_fp16", lambda: model(xh, th, **eh, return_dict=False))
    # fp16 + CUDA graph: capture one call on static tensors, replay it (Nvidia's recipe:
    # warm up on a side stream first, so lazy initialisation is not captured).
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(s):
        for _ in range(3):
            model(xh, th, **eh, return_dict=False)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        model(xh, th, **eh, return_dict=False)
    record("fp16_cuda_graph", graph.replay)
    del graph
    if not quick:
        for mode in ("max-autotune-no-cudagraphs", "reduce-overhead"):
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=mode, fullgraph=False, dynamic=False)
            with torch.inference_mode():
                record(
                    f"compile_fp16_{mode}",
                    lambda c=compiled: c(xh, th, **eh, return_dict=False),
                    warmup=5,
                )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_baselines.json"))
    ap.add_argument("--seconds", type=float, default=5.0, help="timing per variant (after warm-up)")
    ap.add_argument("--quick", action="store_true", help="skip torch.compile (about 1 minute)")
    ap.add_argument("--models", default="ddpm-cifar10-32,sd15-unet")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_baselines.py: error: needs a CUDA device; torch sees none "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda})",
            file=sys.stderr,
        )
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = True  # what a user's fp32 baseline gets by default on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    from optimizer.bench.fingerprint import fingerprint

    report: dict[str, Any] = {"fingerprint": fingerprint(), "seconds": a.seconds, "models": {}}
    for name in a.models.split(","):
        report["models"][name] = variants(name, a.seconds, a.quick)
    from engines.fileio import write_json_atomic

    write_json_atomic(a.out, report)
    print(f"{'model':18} {'variant':40} {'p50 ms':>8} {'p90 ms':>8} {'MiB':>6}")
    for name, r in report["models"].items():
        for k, v in r.items():
            if isinstance(v, dict):
                print(f"{name:18} {k:40} {v['p50_ms']:8.2f} {v['p90_ms']:8.2f} {v['peak_mem_mb']:6d}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
