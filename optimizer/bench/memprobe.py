"""Peak memory of one variant, measured in a fresh process (run by measure.probe_memory).

Meaning of the numbers: a new Python process imports what the variant needs (onnxruntime only for
ORT engines, torch + diffusers for the teacher), records its RSS ("after_import"), then loads the
variant and runs one call at each batch size in ascending order; after each, the process's peak
RSS (VmHWM) is read. So `peak_rss_mb[b]` is what a process serving this variant at batch <= b
needs on the host, and `delta_rss_mb[b]` the part the model, session and activations add. A
separate process per variant keeps earlier variants' allocations and caches out of the figure.

    python -m optimizer.bench.memprobe '<json request>'   -> one JSON line on stdout
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _device_used_mb() -> float | None:
    """This process's GPU memory per nvidia-smi (ORT/TensorRT allocate outside torch's stats)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, mb = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mb)
    return None


def probe(req: dict[str, Any]) -> dict[str, Any]:
    from engines.manifest import Manifest
    from optimizer.bench.variants import BenchContext, VariantSpec

    v = VariantSpec(**req["variant"])
    batches = sorted(req["batch_sizes"])
    if v.model == "teacher":
        import diffusers  # noqa: F401
        import torch
    else:
        import onnxruntime  # noqa: F401
    ctx = BenchContext(
        Manifest.load(req["manifest"]),
        teacher_path=req.get("teacher"),
        threads=req.get("threads"),
        device=v.device,
        batch_sizes=batches,
    )
    ctx.copy_teacher = False
    after_import = _status_kb("VmRSS") / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    import numpy as np

    from engines.schedule import draw_noise
    from optimizer.model_io import conditioning_feeds

    cuda_torch = v.model == "teacher" and v.device.startswith("cuda")
    peak, dev = {}, {}
    rng = np.random.default_rng(0)
    with ctx.open(v) as runner:
        for b in batches:
            if ctx.batch_supported(v, b):
                continue
            spec = ctx.spec(v)
            x, _ = draw_noise(list(range(b)), ctx.sample_shape, 1)
            feeds = {
                "sample": x.astype(spec.input("sample").dtype),
                "timestep": np.full((b,), 500, np.float32),
            }
            feeds.update(conditioning_feeds(spec, b, rng))
            if cuda_torch:
                torch.cuda.reset_peak_memory_stats()
            runner.infer(feeds)
            peak[b] = _status_kb("VmHWM") / 1024
            if cuda_torch:
                dev[b] = torch.cuda.max_memory_allocated() / 2**20
            elif v.device.startswith("cuda"):
                dev[b] = _device_used_mb()
    return {
        "method": "fresh process per variant: import, load, one call per batch (ascending); "
        "peak RSS from /proc/self/status VmHWM"
        + (
            "; device: torch.cuda.max_memory_allocated"
            if cuda_torch
            else "; device: nvidia-smi used_memory of the process"
            if v.device.startswith("cuda")
            else ""
        ),
        "after_import_rss_mb": round(after_import, 1),
        "peak_rss_mb": {str(b): round(m, 1) for b, m in peak.items()},
        "delta_rss_mb": {str(b): round(m - after_import, 1) for b, m in peak.items()},
        "device_peak_mb": {str(b): (round(m, 1) if m is not None else None) for b, m in dev.items()}
        if v.device.startswith("cuda")
        else None,
    }


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
