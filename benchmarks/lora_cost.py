"""What LoRA inputs cost per UNet call on ONNX Runtime or OpenVINO: the plain graph, the same graph with LoRA
inputs (dd-compile --lora-rank) and no adapter, and with adapters of total rank 8 and 64 on every
slotted layer, interleaved rounds in one process (optimizer/timing.py), same feeds. Also records
that the graph with inputs and no adapter gives the plain graph's output (max abs difference).

    python benchmarks/lora_cost.py                             # the bundled demo's UNet, b1 and b4
    python benchmarks/lora_cost.py --models demo,sd15 --sd15-px 256
    python benchmarks/lora_cost.py --backend openvino --hint bf16

`sd15`: SD 1.5's UNet config as an LCM UNet (860M parameters, random weights; 3.4 GB, its weights
in external data: the inputs are added to the proto only), benchmarks/openvino_pipeline.py's.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime as dt
import gc
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
log = logging.getLogger("lora_cost")
RANKS = (8, 64)


def slotted_copy(plain: Path, targets: dict[str, tuple[int, int]], max_rank: int) -> tuple[Path, Any]:
    """A copy of the plain graph's proto beside it (external weights shared) with LoRA inputs."""
    from optimizer.t2i.lora_slots import slot_graph

    dest = plain.with_name(plain.name.replace(".fp32.onnx", ".lora.fp32.onnx"))
    shutil.copyfile(plain, dest)
    return dest, slot_graph(dest, targets, max_rank)


def adapter_feeds_of_rank(slots: Any, rank: int, seed: int) -> dict[str, np.ndarray]:
    from engines.lora import Adapter, LoraLayer, adapter_feeds

    rng = np.random.default_rng(seed)
    layers = {
        m: LoraLayer(
            rng.standard_normal((rank, s.features_in)).astype(np.float32) * 0.01,
            rng.standard_normal((s.features_out, rank)).astype(np.float32) * 0.01,
            1.0,
        )
        for m, s in slots.layers.items()
    }
    return adapter_feeds("unet", slots, [(Adapter("bench", Path("-"), {"unet": layers}), 1.0)])


def measure(
    name: str, plain: Path, targets: dict, spec: Any, feeds: dict[str, np.ndarray], label: str, args: Any
) -> dict:
    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from optimizer.timing import time_interleaved

    path, slots = slotted_copy(plain, targets, max(RANKS))
    # one session per graph (a 3.4 GB UNet twice is what 24 GB holds): the slotted one runs with no
    # adapter and each rank's feeds, set before its call
    if args.backend == "openvino":  # static compiles at the feeds' shapes, the LoRA rank dynamic
        from engines.openvino_runner import OpenVINORunner

        kw = dict(batch_sizes=[int(feeds["sample"].shape[0])], threads=args.threads, precision_hint=args.hint)
        plain_r, slotted = OpenVINORunner(plain, spec, **kw), OpenVINORunner(path, spec, **kw)
    else:
        plain_r = OnnxRuntimeRunner(plain, spec, threads=args.threads)
        slotted = OnnxRuntimeRunner(path, spec, threads=args.threads)
    rs = {"plain": plain_r, "slotted": slotted}
    lora = {0: {}, **{r: adapter_feeds_of_rank(slots, r, r) for r in RANKS}}

    def call(r: Any, extra: dict) -> Any:
        r.extra_feeds = extra
        return r.infer(feeds)

    try:
        for r in rs.values():
            r.activate()
        out = spec.output_names[0]
        base = call(plain_r, {})[out]
        none = call(slotted, {})[out]
        fns = {"plain": lambda: call(plain_r, {})}
        for r, extra in lora.items():
            fns["LoRA inputs, no adapter" if r == 0 else f"LoRA inputs, rank {r}"] = lambda e=extra: call(
                slotted, e
            )
        load0 = os.getloadavg()
        t = time_interleaved(fns, warmup=2, repeats=args.repeats, max_seconds=args.max_seconds)
        load1 = os.getloadavg()
    finally:
        for r in rs.values():
            r.deactivate()
    ref = t["plain"].median_ms
    rows = {k: {**v.to_dict(), "x_plain": v.median_ms / ref} for k, v in t.items()}
    log.info("%s: %s", name, {k: f"{v['median_ms']:.2f} ms ({v['x_plain']:.3f}x)" for k, v in rows.items()})
    return {
        "model": name,
        "label": label,
        "layers": len(slots.layers),
        "no_adapter_max_abs_vs_plain": float(np.abs(none - base).max()),
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "threads": args.threads,
        "backend": args.backend if args.backend != "openvino" else f"openvino ({args.hint})",
        "load_avg_before": load0,
        "load_avg_after": load1,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    import openvino_pipeline as ovp

    from optimizer.t2i.lora_slots import target_layers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo", help="comma-separated: demo, sd15")
    p.add_argument("--sd15-px", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", choices=("onnxruntime", "openvino"), default="onnxruntime")
    p.add_argument("--hint", choices=("f32", "bf16"), default="f32", help="OpenVINO's precision hint")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument(
        "-o", "--out", type=Path, default=HERE / "results" / f"cpu_lora_cost_{dt.date.today()}.json"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = []
    with tempfile.TemporaryDirectory(prefix="dd-lora-cost.") as d:
        work = Path(d)
        for name in args.models.split(","):
            if name == "demo":
                from optimizer.t2i.load import load_pipeline
                from optimizer.t2i.source import demo_source

                targets = target_layers(load_pipeline(demo_source()).module("unet"), text_encoder=False)
                for b in (1, 4):
                    path, spec, feeds, label = ovp.demo_unet(work, b)
                    results.append(measure(f"demo_b{b}", path, targets, spec, feeds, label, args))
            elif name == "sd15":
                import real_components as rc

                targets = target_layers(rc.build("lcm_unet", "full"), text_encoder=False)  # names, shapes
                gc.collect()
                path, spec, feeds, label = ovp.sd15_unet(work, args.sd15_px)
                results.append(measure("sd15", path, targets, spec, feeds, label, args))
            else:
                p.error(f"--models: unknown {name!r} (demo, sd15)")
    doc = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu_flags": ovp.cpu_flags(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
