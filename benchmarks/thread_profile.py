"""Why thread scaling differs by precision: ONNX Runtime's per-op profile of dd-compile's graphs at
1 and at N threads, in one process (sessions built per thread count, runs interleaved).

    python benchmarks/thread_profile.py OUT_DIR [--batch 16 --threads-grid 1,2 --runs 20 --json p.json]

OUT_DIR is a dd-compile output (its manifest's onnx/fp32, onnx/fp16, onnx/int8). Per op type: total
kernel ms per call at each thread count, the share of the call, and the scaling (ms at 1 thread /
ms at N). The wall time per call is printed beside the sum of kernel times (the rest: framework).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from engines.manifest import Manifest
from engines.onnxruntime_runner import session_options
from optimizer.bench.fingerprint import fingerprint

log = logging.getLogger("thread_profile")


def _feeds(sess, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        dt = np.float16 if "float16" in i.type else np.int64 if "int64" in i.type else np.float32
        out[i.name] = (rng.standard_normal(shape) * (500 if i.name == "timestep" else 1)).astype(dt)
    return out


def profile_all(paths: dict[str, Path], grid: list[int], batch: int, runs: int, tmp: Path) -> dict[str, Any]:
    """precision -> threads -> {wall_ms_median, kernel_ms: {op type: ms per call}}: one profiled
    session per (precision, threads), their runs interleaved round-robin so drift hits all alike."""
    import time

    import onnxruntime as ort

    sessions, walls = {}, {}
    for p, path in paths.items():
        for t in grid:
            so = session_options(t)
            so.enable_profiling = True
            so.profile_file_prefix = str(tmp / f"{p}.{t}t")
            sessions[(p, t)] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            walls[(p, t)] = []
    feeds = {k: _feeds(s, batch) for k, s in sessions.items()}
    for _ in range(3):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            walls[k].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {p: {} for p in paths}
    for (p, t), s in sessions.items():
        events = json.loads(Path(s.end_profiling()).read_text())
        per_op: dict[str, float] = defaultdict(float)
        n_run = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"] / 1e3
        n_run = max(n_run, 1)  # the profile covers the warm-ups too: divide by every run it saw
        out[p][t] = {
            "wall_ms_median": float(np.median(walls[(p, t)])),
            "kernel_ms": {k: v / n_run for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads-grid", default="1,2")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    m = Manifest.load(a.out_dir)
    grid = [int(x) for x in a.threads_grid.split(",")]
    fp = fingerprint(max(grid))
    res: dict[str, Any] = {
        "batch": a.batch,
        "grid": grid,
        "load_avg": os.getloadavg(),
        "isa": fp["cpu"]["isa"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {p: m.verify(m.get(f"onnx/{p}")) for p in a.precisions.split(",")}
        res.update(profile_all(paths, grid, a.batch, a.runs, Path(tmp)))
    lo, hi = grid[0], grid[-1]
    for p in a.precisions.split(","):
        r = res[p]
        w_lo, w_hi = r[lo]["wall_ms_median"], r[hi]["wall_ms_median"]
        print(
            f"\n{p} b{a.batch}: wall {w_lo:.2f} ms at {lo}t, {w_hi:.2f} ms at {hi}t "
            f"(scaling {w_lo / w_hi:.2f}x)"
        )
        print(f"{'op':<22}{'ms @' + str(lo):>10}{'ms @' + str(hi):>10}{'share':>8}{'scaling':>9}")
        tot = sum(r[lo]["kernel_ms"].values())
        for op, ms in r[lo]["kernel_ms"].items():
            ms_hi = r[hi]["kernel_ms"].get(op, float("nan"))
            if ms / tot < 0.005:
                continue
            print(f"{op:<22}{ms:>10.2f}{ms_hi:>10.2f}{ms / tot:>8.1%}{ms / ms_hi:>8.2f}x")
        print(f"{'(sum of kernels)':<22}{tot:>10.2f}{sum(r[hi]['kernel_ms'].values()):>10.2f}")
    print(f"\nload average {res['load_avg']}; ISA {[k for k, v in res['isa'].items() if v]}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
