"""INT8 graph with explicit, symmetric Q/DQ on the inputs of Conv/MatMul/Gemm, chosen by measuring.

Placement follows what TensorRT's explicit quantization fuses (Q/DQ on the activation and weight
inputs of Conv/MatMul/Gemm; weights per output channel; zero point 0) and is made with
onnxruntime.quantization.quantize_static (QDQ format, QInt8 activations and weights), after
quant_pre_process, then `isolate_qdq` (below). Which nodes get Q/DQ is decided here:

1. candidates: Conv/MatMul/Gemm whose second input is a weight (activation x activation MatMuls in
   attention stay float: per-tensor int8 on softmax outputs is what breaks diffusion samples);
2. `require_int8_kernel`: drop candidates whose DQ->op->Q group ONNX Runtime's CPU provider does not
   fuse into an integer kernel (they would run in float and pay Q/DQ for nothing: measured slower);
3. sensitivity: call-level rel. L2 vs FP32 with only that node quantized;
4. the largest least-sensitive prefix whose call-level error (and `parity_check`, e.g. the
   sample-level PSNR) stays within budget, found by bisection.

Why `isolate_qdq` (measured, benchmarks/int8_speed.py): on x86 without AVX-VNNI-INT8, MLAS has no
fast S8S8 GEMM (MlasGemmQuantGetDispatch falls back to the generic C++ kernel: 7x slower convs when
forced with session.qdqisint8allowed=1), so ORT's QDQS8ToU8Transformer rewrites each signed Q->DQ
pair to uint8 (zero point 128) before its QDQ fusions and runs U8S8 kernels. It only rewrites a Q
with exactly one DQ consumer (onnxruntime/core/optimizer/qdq_transformer/qdq_s8_to_u8.cc), and
EnsureUniqueDQForNodeUnit gives every consumer of a shared DQ its own copy first, so a Q whose DQ
also feeds Shape/Concat/GroupNorm stays int8 and its Conv is never fused (9 of 35 convs of the
demo UNet: 1x1 shortcuts on concatenated skips, the stride-2 downsample's consumer, ...).
quantize_static puts one shared Q/DQ on a tensor for all its consumers, so we rewrite the graph:
float consumers read the float tensor (also more accurate: skips and norms see unquantized values)
and each quantized consumer gets its own Q->DQ pair, with its own scale copy so that ORT's common
subexpression elimination does not merge the pairs again (that kept all 24 attention MatMuls in
float). The graph stays what TensorRT wants (Q/DQ on Conv/MatMul/Gemm inputs, same scales).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InputError
from engines.fileio import atomic_path
from optimizer.quantize.calibration import ort_reader
from optimizer.quantize.result import (
    KeptNode,
    PrecisionResult,
    call_error,
    copy_metadata,
    module_path,
    run_model,
)

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Int8Config:
    # minmax | percentile | entropy; measured (int8_speed.py --explore): on the demo,
    # percentile (99.999) cost 0.7 dB sample PSNR and entropy chose the min/max range anyway
    calibration: str = "minmax"
    percentile: float = 99.999  # for calibration="percentile"
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    require_int8_kernel: bool = True  # quantize only nodes ORT CPU runs as integer kernels
    target_call_rel_l2: float = 4e-2  # the int8 bar is 5e-2: keep a margin for unseen inputs
    min_psnr_db: float = 25.0  # what parity_check (sample-level PSNR, dB) must reach
    sensitivity: str = "single"  # "single": measure each node alone | "none": graph order
    sensitivity_feeds: int = 4  # calibration feeds used per sensitivity measurement
    order: str = "error-per-mac"  # "error-per-mac": error cost per unit of work moved to int8 | "error"
    preprocess: bool = True  # quant_pre_process (folds constants; ORT fuses more QDQ groups after it)
    isolate_qdq: bool = True  # Q/DQ only in front of quantized nodes, one pair each (see module doc)
    # "measure": also build the other Q/DQ placement (shared <-> isolated) for the selected nodes
    # and keep the one ONNX Runtime runs faster here, if it passes the same bars (on the demo UNet
    # the shared one ran 1.23-1.26x fp32 vs 1.14-1.21x isolated: the isolated pairs multiply Q/DQ
    # and layout transposes). "fixed": keep `isolate_qdq` (TensorRT targets: ORT CPU timings say
    # nothing about an engine).
    placement: str = "measure"
    placement_repeats: int = 15  # interleaved timed runs per placement (medians)

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_METHODS:
            raise InputError(f"int8 calibration {self.calibration!r} not in {CALIBRATION_METHODS}")
        if self.sensitivity not in ("single", "none"):
            raise InputError(f"int8 sensitivity {self.sensitivity!r} not in ('single', 'none')")
        if self.order not in ("error-per-mac", "error"):
            raise InputError(f"int8 order {self.order!r} not in ('error-per-mac', 'error')")
        if self.placement not in ("measure", "fixed"):
            raise InputError(f"int8 placement {self.placement!r} not in ('measure', 'fixed')")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["op_types"] = list(self.op_types)
        return d


@contextlib.contextmanager
def _in_dir(d: Path) -> Iterator[None]:
    """ORT's quantization tools write temp files into the cwd: run them somewhere disposable."""
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


def isolate_qdq(model: Any, quantized: set[str]) -> int:
    """Rewrite `model` (in place) so activation Q/DQ feed only the quantized nodes, one pair each.

    - a Q/DQ on an activation: consumers not in `quantized` read the float tensor again; every
      quantized consumer but the first gets its own copy of the Q->DQ pair;
    - the output Q/DQ of a quantized node is kept when its DQ feeds one consumer (ORT fuses
      DQ->Conv->Q into QLinearConv); with several consumers it is treated like any activation
      (that node then has no integer kernel on x86 and `require_int8_kernel` drops it).
    Returns the number of rewired inputs plus new pairs. Q/DQ left without consumers are removed.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    new_inits: list[Any] = []
    extra: dict[str, list[Any]] = {}  # Q name -> new nodes placed right after it (keeps topological order)
    changes = 0
    for q in list(g.node):
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.output[0] in graph_outputs:
            continue
        if any(d.output[0] in graph_outputs for d in dqs):
            continue
        users = [(dq, c) for dq in dqs for c in consumers.get(dq.output[0], [])]
        src = producer.get(q.input[0])
        if src is not None and src.name in quantized and len(users) == 1:
            continue  # output quantization of a fusable node
        quantized_users = []
        for dq, c in users:
            if c.name in quantized:
                quantized_users.append((dq, c))
                continue
            for j, x in enumerate(c.input):
                if x == dq.output[0]:
                    c.input[j] = q.input[0]
                    changes += 1
        for dq, c in quantized_users[1:]:
            q2, dq2 = type(q)(), type(dq)()
            q2.CopyFrom(q)
            dq2.CopyFrom(dq)
            q2.name, q2.output[0] = f"{q.name}_for_{c.name}", f"{q.output[0]}_for_{c.name}"
            dq2.name, dq2.output[0] = f"{dq.name}_for_{c.name}", f"{dq.output[0]}_for_{c.name}"
            dq2.input[0] = q2.output[0]
            # Own scale/zero-point copies: ORT's common-subexpression elimination would otherwise
            # merge the identical Q nodes back into one shared Q.
            for j in (1, 2):
                if j < len(q.input) and q.input[j] in inits:
                    t = type(inits[q.input[j]])()
                    t.CopyFrom(inits[q.input[j]])
                    t.name = f"{q.input[j]}_for_{c.name}"
                    new_inits.append(t)
                    q2.input[j] = dq2.input[j] = t.name
            for j, x in enumerate(c.input):
                if x == dq.output[0]:
                    c.input[j] = dq2.output[0]
            extra.setdefault(q.name, []).extend([q2, dq2])
            changes += 1
    nodes = []
    for n in g.node:
        nodes.append(n)
        nodes.extend(extra.get(n.name, []))
    orphans: set[str] = set()  # scales/zero points of removed Q/DQ nodes
    while True:  # drop Q/DQ whose outputs nobody reads any more
        used = {i for n in nodes for i in n.input} | graph_outputs
        kept = [
            n
            for n in nodes
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in used for o in n.output)
        ]
        if len(kept) == len(nodes):
            break
        kept_ids = {id(n) for n in kept}
        orphans |= {i for n in nodes if id(n) not in kept_ids for i in n.input[1:]}
        nodes = kept
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    used = {i for n in nodes for i in n.input}
    for name in orphans - used:
        if name in inits:
            g.initializer.remove(inits[name])
    return changes


def node_macs(model: Any) -> dict[str, float]:
    """Multiply-accumulates per sample of each Conv/MatMul/Gemm with a weight, from inferred shapes
    (unknown dims count as 1): what moving that node to int8 can save."""
    import onnx

    m = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
        for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)
    }
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    out: dict[str, float] = {}
    for n in m.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w, y = inits[n.input[1]], shapes.get(n.output[0])
        if not y:
            out[n.name] = float(np.prod(w))
            continue
        if (
            n.op_type == "Conv"
        ):  # each output element: C_in/groups * kH * kW MACs (W is [C_out, C_in/g, kH, kW])
            out[n.name] = float(np.prod(y[1:]) * np.prod(w[1:]))
        else:  # [..., M, N] outputs, K = the weight's contracted dim
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            k = w[-1] if trans_b else w[0]
            out[n.name] = float(np.prod(y[1:]) * k)
    return out


class _Quantizer:
    """quantize_static with one calibration (cached) and changing node sets."""

    def __init__(self, src: Path, work: Path, calib: list[dict[str, np.ndarray]], cfg: Int8Config):
        import onnx
        from onnxruntime.quantization import CalibrationMethod

        src = Path(src).resolve()  # pre-processing runs inside `work` (_in_dir): no relative paths
        self.work, self.calib, self.cfg = work, calib, cfg
        self.orig = onnx.load(str(src))
        self.model_path = src
        if cfg.preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = work / "pre.onnx"
            with _in_dir(work):  # symbolic shape inference fails on dynamo graphs: skip it
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            m = onnx.load(str(pre))
            copy_metadata(self.orig, m)  # pre-processing drops the module-path metadata
            onnx.save(m, str(pre))
            self.model_path = pre
        self.model = onnx.load(str(self.model_path))
        self.method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[cfg.calibration]
        self.cache = work / f"calib.{cfg.calibration}.json"
        self._n = 0
        self._full: Any = None  # quantize_static graph of every candidate (see subset)
        self._full_key: tuple[str, ...] | None = None

    def candidates(self) -> tuple[list[Any], list[Any]]:
        """(weight ops, activation x activation ops) among op_types."""
        inits = {i.name for i in self.model.graph.initializer}
        consts = {o for n in self.model.graph.node if n.op_type == "Constant" for o in n.output}
        w, aa = [], []
        for n in self.model.graph.node:
            if n.op_type in self.cfg.op_types:
                (w if len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts) else aa).append(n)
        return w, aa

    def quantize(self, nodes: list[str], isolate: bool | None = None) -> Path:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        self._n += 1
        out = self.work / f"q{self._n}.onnx"
        if not nodes:  # ORT reads an empty list as "every node": write the float graph instead
            import shutil

            shutil.copy(self.model_path, out)
            return out
        extra = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,  # zero point 0 (TensorRT)
            "CalibTensorRangeSymmetric": True,
        }
        if self.cfg.calibration == "percentile":
            extra["CalibPercentile"] = self.cfg.percentile
        with _in_dir(self.work):
            quantize_static(
                str(self.model_path),
                str(out),
                ort_reader(self.calib),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(self.cfg.op_types),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=list(nodes),
                calibrate_method=self.method,
                extra_options=extra,
                calibration_cache_path=str(self.cache),
            )
        if self.cfg.isolate_qdq if isolate is None else isolate:
            import onnx

            m = onnx.load(str(out))
            isolate_qdq(m, set(nodes))
            onnx.save(m, str(out))
        return out

    def subset(self, nodes: list[str], universe: list[str]) -> Path:
        """The isolated-placement graph of `nodes` (a subset of `universe`), cut out of one
        quantize_static graph of the whole universe instead of a quantize_static run of its own.

        Same result as quantize(nodes) with isolate_qdq (tested): every tensor has one calibrated
        range, so a scale does not depend on which other nodes are quantized. quantize_static runs
        calibration-free passes over the whole graph each time (~20 s on a 36M-parameter UNet); a
        cut is a graph rewrite, which makes the per-node sensitivity pass affordable on big graphs.
        """
        import onnx

        key = tuple(universe)
        if self._full_key != key:
            self._full = onnx.load(str(self.quantize(list(universe), isolate=False)))
            self._full_key = key
        if not nodes:
            return self.quantize([])
        m = type(self._full)()
        m.CopyFrom(self._full)
        keep, cut = set(nodes), set(universe) - set(nodes)
        float_nodes = {n.name: n for n in self.model.graph.node}
        float_inits = {i.name: i for i in self.model.graph.initializer}
        have = {i.name for i in m.graph.initializer}
        # quantize_static's bias DQ outputs the float bias's own name: restore it under another one
        produced = {o for n in m.graph.node for o in n.output}
        restored: set[str] = set()
        for n in m.graph.node:
            if n.name not in cut or n.name not in float_nodes:
                continue
            orig = float_nodes[n.name]  # back to its float inputs (weights, bias, activation)
            del n.input[:]
            for i in orig.input:
                if i in float_inits:
                    name = f"{i}_float" if i in produced else i
                    if name not in have:
                        t = type(float_inits[i])()
                        t.CopyFrom(float_inits[i])
                        t.name = name
                        m.graph.initializer.append(t)
                        have.add(name)
                    i = name
                n.input.append(i)
            if list(n.output) != list(orig.output):  # quantize_static renamed a graph output
                restored |= set(orig.output)  # to put Q/DQ after it: drop that Q/DQ again
                del n.output[:]
                n.output.extend(orig.output)
        if restored:
            drop = [n for n in m.graph.node if n.name not in float_nodes and restored & set(n.output)]
            for n in drop:
                m.graph.node.remove(n)
        isolate_qdq(m, keep)
        used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
        dead = [i for i in m.graph.initializer if i.name not in used]  # int8 weights, int32 biases
        for i in dead:
            m.graph.initializer.remove(i)
        self._n += 1
        out = self.work / f"q{self._n}.onnx"
        onnx.save(m, str(out))
        return out


def unfused_nodes(qdq_path: Path, names: list[str]) -> list[str]:
    """Nodes of `names` that ORT's CPU provider still runs in float after its QDQ fusions."""
    import onnx
    import onnxruntime as ort

    from engines.onnxruntime_runner import session_options

    so = session_options()
    # EXTENDED: QDQ fusions happen, hardware-specific layout rewrites (NCHWc) do not.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opt = qdq_path.with_suffix(".opt.onnx")
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(qdq_path), so, providers=["CPUExecutionProvider"])
    left = {n.name for n in onnx.load(str(opt)).graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}
    return [n for n in names if n in left]


def check_symmetric(model: Any) -> None:
    """TensorRT rejects non-zero zero points: fail loudly if the quantizer produced one."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            if np.any(numpy_helper.to_array(inits[n.input[2]]) != 0):
                raise ValueError(f"{n.name}: non-zero zero point (asymmetric quantization)")


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
    result = PrecisionResult(path=out_path, precision="int8", config=config.to_dict())
    with tempfile.TemporaryDirectory(prefix="ddq.int8.") as d:
        work = Path(d)
        qz = _Quantizer(fp32_onnx, work, calib, config)
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
    qz: _Quantizer,
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
        runs = {cur: _session_fn(path, feed), other: _session_fn(alt, feed)}
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


def _session_fn(path: Path, feed: dict[str, np.ndarray]) -> Callable[[], Any]:
    import onnxruntime as ort

    from engines.onnxruntime_runner import session_options

    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    f = {k: v for k, v in feed.items() if k in names}
    return lambda: sess.run(None, f)


def _kept(node: Any, reason: str, figure: float | None, note: str) -> KeptNode:
    """A node left in float, named by its module path, with why and the figure behind it."""
    return KeptNode(node.name, node.op_type, module_path(node), reason, figure, note)
