"""INT8 graph with explicit, symmetric Q/DQ on the inputs of Conv/MatMul/Gemm, chosen by measuring.

Placement follows what TensorRT's explicit quantization fuses (Q/DQ on the activation and weight
inputs of Conv/MatMul/Gemm; weights per output channel; zero point 0) and is made with
onnxruntime.quantization.quantize_static (QDQ format, QInt8 activations and weights), after
quant_pre_process, then `isolate_qdq` (int8_graph.py). Which nodes get Q/DQ is decided here:

1. candidates: Conv/MatMul/Gemm whose second input is a weight (activation x activation MatMuls in
   attention stay float: per-tensor int8 on softmax outputs is what breaks diffusion samples);
2. `require_int8_kernel`: drop candidates whose DQ->op->Q group ONNX Runtime's CPU provider does not
   fuse into an integer kernel (they would run in float and pay Q/DQ for nothing: measured slower);
3. sensitivity: call-level rel. L2 vs FP32 with only that node quantized;
4. the largest least-sensitive prefix whose call-level error (and `parity_check`, e.g. the
   sample-level PSNR) stays within budget, found by bisection.

Graph rewrites (`isolate_qdq`, why it exists) are in int8_graph.py, ORT's quantizer in
int8_quantizer.py, what ORT CPU fuses and how fast it runs in int8_probe.py.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InputError
from engines.fileio import atomic_path
from optimizer.quantize.int8_config import CALIBRATION_METHODS, Int8Config
from optimizer.quantize.int8_graph import check_symmetric, isolate_qdq, node_macs
from optimizer.quantize.int8_probe import session_fn, unfused_nodes
from optimizer.quantize.int8_quantizer import QdqQuantizer
from optimizer.quantize.onnx_graph import call_error, copy_metadata, module_path, run_model
from optimizer.quantize.precision_result import KeptNode, PrecisionResult

log = logging.getLogger(__name__)

# The INT8 pass's public names, importable from here wherever they live.
__all__ = [
    "CALIBRATION_METHODS",
    "Int8Config",
    "QdqQuantizer",
    "check_symmetric",
    "isolate_qdq",
    "node_macs",
    "quantize_int8",
    "unfused_nodes",
]


def quantize_int8(
    fp32_onnx: Path,
    out_path: Path,
    calib: list[dict[str, np.ndarray]],
    config: Int8Config = Int8Config(),
    parity_check: Callable[[Path], float] | None = None,
) -> PrecisionResult:
    """FP32 ONNX -> QDQ INT8 ONNX at `out_path`. `parity_check(path)` returns the sample-level PSNR
    (dB) of a candidate graph vs the torch student; a selection passes when it is >= min_psnr_db."""
    import onnx

    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise InputError(f"{fp32_onnx}: ONNX model not found")
    if not calib:
        raise InputError(f"{fp32_onnx}: INT8 calibration needs feeds (got none)")
    config = config.resolve()  # targets left None: from the default bars
    result = PrecisionResult(path=out_path, precision="int8", config=config.to_dict())
    with tempfile.TemporaryDirectory(prefix="ddq.int8.") as d:
        work = Path(d)
        qz = QdqQuantizer(fp32_onnx, work, calib, config)
        out_name = qz.model.graph.output[0].name
        refs = run_model(qz.model_path, calib, out_name)
        weight_ops, act_ops = qz.candidates()
        kept = {
            n.name: _kept(n, "activation-input", None, "both inputs are activations (attention): kept float")
            for n in act_ops
        }
        names = [n.name for n in weight_ops]
        by_name = {n.name: n for n in weight_ops}
        for _ in range(3 if config.require_int8_kernel else 0):  # dropping a node can change others' fusion
            slow = unfused_nodes(qz.quantize(names), names) if names else []
            for s in slow:
                n = by_name[s]
                note = "ORT CPU would run it in float between Q/DQ (slower, less accurate)"
                kept[s] = _kept(n, "no-int8-kernel", None, note)
            names = [n for n in names if n not in slow]
            if not slow:
                break
        # Sensitivity: error with only that node quantized (least sensitive first).
        sens: dict[str, float] = {}
        sub = calib[: config.sensitivity_feeds]
        macs = node_macs(qz.model)
        universe = list(names)

        def build(nodes: list[str]) -> Path:
            # Isolated placement: cut from one quantized graph (fast); shared: quantize_static.
            return qz.subset(nodes, universe) if config.isolate_qdq else qz.quantize(nodes)

        if config.sensitivity == "single" and len(names) > 1:
            for i, nm in enumerate(names):
                one = build([nm])
                sens[nm] = call_error(run_model(one, sub, out_name), refs[: len(sub)])[0]
                one.unlink()  # a full-size model each: do not fill the disk on big graphs
                if (i + 1) % 10 == 0 or i + 1 == len(names):
                    log.info("int8: sensitivity %d/%d nodes measured", i + 1, len(names))
            # Greedy knapsack (Dantzig 1957): spend the error budget where it moves the most work
            # to int8. Ordering by error alone fills the budget with tiny MatMul/Gemm nodes whose
            # Q/DQ cost as much as they save, and leaves the big convs in float.
            per = (
                (lambda k: sens[k] / max(macs.get(k, 1.0), 1.0))
                if config.order == "error-per-mac"
                else (lambda k: sens[k])
            )
            names.sort(key=per)
        tried: dict[int, tuple[float, float | None, Path]] = {}

        def evaluate(k: int) -> bool:
            path = build(names[:k])
            err, _ = call_error(run_model(path, calib, out_name), refs)
            psnr = parity_check(path) if (parity_check is not None and k > 0) else None
            tried[k] = (err, psnr, path)
            ok = err <= config.target_call_rel_l2 and (psnr is None or psnr >= config.min_psnr_db)
            result.history.append({"quantized": k, "call_rel_l2": err, "psnr_db": psnr, "passed": ok})
            log.info(
                "int8: %d/%d nodes quantized: call rel. L2 %.3g%s -> %s",
                k,
                len(names),
                err,
                "" if psnr is None else f", PSNR {psnr:.1f} dB",
                "ok" if ok else "over budget",
            )
            if not ok and k > 0:  # never the result: free the disk (143 MB a graph on the cifar UNet)
                path.unlink(missing_ok=True)
            return ok

        # invariant: lo passes (0 = float graph), search the largest passing k
        lo, hi = 0, len(names)
        if hi and evaluate(hi):
            lo = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if evaluate(mid):
                    lo = mid
                else:
                    hi = mid
            if lo == 0 and 0 not in tried:
                evaluate(0)
        err, psnr, path = tried[lo]
        if config.placement == "measure" and lo > 0:
            path, err, psnr = _choose_placement(
                qz, names[:lo], path, err, psnr, calib, refs, out_name, parity_check, config, result
            )
        for nm in names[lo:]:
            n = by_name[nm]
            note = "call rel. L2 when quantized alone" if nm in sens else "over the error budget"
            kept[nm] = _kept(n, "sensitivity", sens.get(nm), note)
        final = onnx.load(str(path))
        check_symmetric(final)
        copy_metadata(qz.model, final)
        out_err, max_abs = call_error(run_model(final, calib, out_name), refs)
        result.call_rel_l2, result.call_max_abs = out_err, max_abs
        for nm in result.placement.get("unfused", []):  # shared Q/DQ that ORT leaves in float
            n = by_name[nm]
            kept[nm] = _kept(
                n, "no-int8-kernel", None, "shared Q/DQ placement: ORT CPU runs it in float between Q/DQ"
            )
        lo -= len(result.placement.get("unfused", []))
        result.kept_float = list(kept.values())
        result.counts = {"int8": lo, "float": len(kept)}
        result.calibration = {
            "method": config.calibration,
            "feeds": len(calib),
            "samples": int(sum(next(iter(f.values())).shape[0] for f in calib)),
            "timesteps": sorted({float(t) for f in calib for t in np.unique(f.get("timestep", []))}),
            "sensitivity": {k: v for k, v in sorted(sens.items(), key=lambda kv: kv[1])},
            "sample_psnr_db": psnr,
        }
        result.passed = (
            lo > 0 and out_err <= config.target_call_rel_l2 and (psnr is None or psnr >= config.min_psnr_db)
        )
        with atomic_path(out_path, suffix=".onnx") as tmp:
            onnx.save(final, str(tmp))
            onnx.checker.check_model(str(tmp))
    log.info("int8: %s (%d nodes int8, %d float, call rel. L2 %.3g)", out_path, lo, len(kept), out_err)
    return result


def _choose_placement(
    qz: QdqQuantizer,
    nodes: list[str],
    path: Path,
    err: float,
    psnr: float | None,
    calib: list[dict[str, np.ndarray]],
    refs: list[np.ndarray],
    out_name: str,
    parity_check: Callable[[Path], float] | None,
    config: Int8Config,
    result: PrecisionResult,
) -> tuple[Path, float, float | None]:
    """The same nodes with the other Q/DQ placement: keep it if it passes and runs faster here."""
    from optimizer.timing import time_interleaved

    cur = "isolated" if config.isolate_qdq else "shared"
    other = "shared" if config.isolate_qdq else "isolated"
    alt = qz.quantize(nodes, isolate=not config.isolate_qdq)
    alt_err, _ = call_error(run_model(alt, calib, out_name), refs)
    alt_psnr = parity_check(alt) if parity_check is not None else None
    ok = alt_err <= config.target_call_rel_l2 and (alt_psnr is None or alt_psnr >= config.min_psnr_db)
    unfused = unfused_nodes(alt, nodes) if ok else nodes
    ok = ok and len(unfused) < len(nodes)  # a "faster" graph with no int8 kernel left is no INT8
    info: dict[str, Any] = {"placements": {cur: {"call_rel_l2": err, "psnr_db": psnr}}}
    info["placements"][other] = {
        "call_rel_l2": alt_err,
        "psnr_db": alt_psnr,
        "int8_kernels": len(nodes) - len(unfused),
        "passed": ok,
    }
    chosen = cur
    if ok:
        feed = max(calib, key=lambda f: next(iter(f.values())).shape[0])  # the largest batch
        runs = {cur: session_fn(path, feed), other: session_fn(alt, feed)}
        stats = time_interleaved(runs, repeats=config.placement_repeats, warmup=2)
        ms = {k: stats[k].median_ms for k in runs}
        info["median_ms"] = {k: round(v, 3) for k, v in ms.items()}
        info["batch"] = int(next(iter(feed.values())).shape[0])
        if ms[other] < 0.97 * ms[cur]:  # a clear win only: timings on shared machines are noisy
            chosen = other
    info["chosen"] = chosen
    if chosen != cur:
        info["unfused"] = unfused
        path, err, psnr = alt, alt_err, alt_psnr
    log.info(
        "int8: Q/DQ placement %s (%s)",
        chosen,
        ", ".join(f"{k} {v:.2f} ms" for k, v in info.get("median_ms", {}).items())
        or f"{other} over the bars",
    )
    result.placement = info
    return path, err, psnr


def _kept(node: Any, reason: str, figure: float | None, note: str) -> KeptNode:
    """A node left in float, named by its module path, with why and the figure behind it."""
    return KeptNode(node.name, node.op_type, module_path(node), reason, figure, note)
