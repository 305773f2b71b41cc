"""FP16 graph with measured FP32 islands.

1. Run the FP32 graph on the calibration feeds; record every tensor's |max|, non-finite values
   and the share of values fp16 would flush to zero.
2. Keep in FP32 every node that reads or writes a tensor beyond `max_abs` (fp16's 65504 with
   headroom) or that would lose more than `max_flush_fraction` of its values to underflow.
3. Convert with onnxruntime.transformers.float16 (keep_io_types, node_block_list): it produced
   graphs ORT loads here, where onnxconverter-common's converter inserted mistyped Casts.
4. Verify call-level error against the FP32 graph. If it is over the target, compare the fp16
   graph's intermediates with the FP32 ones and move the nodes that amplify error most (output
   error minus worst input error; fragile reductions show up here when they matter) to FP32,
   then convert and verify again, within `max_rounds` and `max_fp32_fraction`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.errors import InputError
from engines.fileio import atomic_path
from optimizer.metrics import rel_l2
from optimizer.quantize.calibration import (
    FP16_MAX,
    TensorStats,
    run_with_intermediates,
    tensor_stats,
)
from optimizer.quantize.onnx_graph import call_error, copy_metadata, module_path, run_model, toposort
from optimizer.quantize.precision_result import KeptNode, PrecisionResult

if TYPE_CHECKING:
    from optimizer.bars import ParityBars

log = logging.getLogger(__name__)

# How far inside the fp16 call bar the island search aims (`Fp16Config.from_bars`): islands are
# chosen on the calibration feeds, the bar is judged on validation trajectories; bar / 2 (1e-2 -> 5e-3).
FP16_CALL_HEADROOM = 2.0

# Ops whose float inputs are indices/shapes, or which only move data: never worth an island.
_NO_MATH = {
    "Shape",
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Slice",
    "Gather",
    "Expand",
    "Identity",
    "Flatten",
    "Split",
    "Cast",
    "Constant",
    "ConstantOfShape",
}


@dataclass(frozen=True)
class Fp16Config:
    max_abs: float = FP16_MAX / 4  # keep FP32 where |x| exceeds this (headroom: sums and squares)
    max_flush_fraction: float = 0.01  # keep FP32 where more of a tensor would flush to zero
    # call-level goal vs FP32; the default is from_bars(ParityBars()) (fp16 bar 1e-2)
    target_rel_l2: float = 5e-3
    max_rounds: int = 4  # verify/widen rounds
    widen_per_round: int = 4  # nodes moved to FP32 per round, by measured error amplification
    max_fp32_fraction: float = 0.25  # give up widening past this share of math nodes in FP32
    analysis_feeds: int = 2  # calibration feeds used to compare intermediates when widening
    max_phase_error: float = 1e-3  # radians: fp16's spacing at a Sin/Cos argument's |max| above this -> FP32

    @classmethod
    def from_bars(
        cls, bars: ParityBars, *, call_headroom: float = FP16_CALL_HEADROOM, **fields: Any
    ) -> Fp16Config:
        """The search target derived from the fp16 call bar (`--bar call.fp16=...`): bar /
        `call_headroom`. A target given in `fields` wins."""
        return cls(**{"target_rel_l2": bars.call_rel_l2["fp16"] / call_headroom, **fields})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _drop_roundtrip_casts(model: Any) -> int:
    """Remove Cast(fp32->fp16) -> Cast(fp16->fp32) pairs between two FP32 islands.

    The converter casts around each blocked node separately, so a chain of FP32 nodes still
    round-trips through fp16 between them: a strongly typed runtime (TensorRT 11, onnx's reference
    evaluator) overflows there, while ORT's CPU provider happens to drop the pair itself.
    """
    import onnx

    g = model.graph
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def cast_to(n: Any) -> int | None:
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    drop, rename = set(), {}
    for a in g.node:
        if cast_to(a) != onnx.TensorProto.FLOAT16 or a.output[0] in outputs:
            continue
        users = consumers.get(a.output[0], [])
        if users and all(cast_to(b) == onnx.TensorProto.FLOAT and b.output[0] not in outputs for b in users):
            drop.add(id(a))
            for b in users:
                drop.add(id(b))
                rename[b.output[0]] = a.input[0]
    if not rename:
        return 0
    keep = [n for n in g.node if id(n) not in drop]
    for n in keep:
        for i, x in enumerate(n.input):
            while x in rename:
                x = rename[x]
            n.input[i] = x
    del g.node[:]
    g.node.extend(keep)
    return len(rename)


def _convert(model: Any, block: set[str]) -> Any:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m16 = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=sorted(block), disable_shape_infer=False
    )
    copy_metadata(model, m16)
    _drop_roundtrip_casts(m16)
    toposort(m16)
    return m16


def _range_islands(model: Any, stats: dict[str, TensorStats], cfg: Fp16Config) -> dict[str, KeptNode]:
    kept: dict[str, KeptNode] = {}
    for n in model.graph.node:
        if n.op_type in _NO_MATH:
            continue
        tensors = [t for t in (*n.input, *n.output) if t in stats]
        if not tensors:
            continue
        worst = max(tensors, key=lambda t: stats[t].absmax)
        s = stats[worst]
        if s.nonfinite:
            kept[n.name] = KeptNode(
                n.name, n.op_type, module_path(n), "nonfinite", None, f"non-finite values in FP32 at {worst}"
            )
        elif s.absmax > cfg.max_abs:
            kept[n.name] = KeptNode(
                n.name,
                n.op_type,
                module_path(n),
                "range",
                s.absmax,
                f"|{worst}| reaches {s.absmax:.4g} > {cfg.max_abs:.4g}",
            )
        else:
            flush = max(stats[t].flush_fraction for t in tensors)
            if flush > cfg.max_flush_fraction:
                kept[n.name] = KeptNode(
                    n.name,
                    n.op_type,
                    module_path(n),
                    "underflow",
                    flush,
                    f"{flush:.1%} of values below fp16's smallest subnormal",
                )
    return kept


def _phase_islands(model: Any, stats: dict[str, TensorStats], cfg: Fp16Config) -> dict[str, KeptNode]:
    """Sin/Cos of large arguments (timestep embeddings: t * freq up to ~1000) need absolute
    precision: fp16's spacing is |x| * 2^-10 (0.5 at 999), a phase error no range check sees.
    Keep in FP32 each such Sin/Cos and the producers of its argument whose spacing is too coarse."""
    producer = {o: n for n in model.graph.node for o in n.output}
    kept: dict[str, KeptNode] = {}

    def spacing(t: str) -> float:
        return stats[t].absmax * 2.0**-10 if t in stats else 0.0

    for n in model.graph.node:
        if n.op_type not in ("Sin", "Cos") or spacing(n.input[0]) <= cfg.max_phase_error:
            continue
        fig = spacing(n.input[0])
        todo = [n]
        while todo:
            m = todo.pop()
            if m.name in kept:
                continue
            kept[m.name] = KeptNode(
                m.name,
                m.op_type,
                module_path(m),
                "phase",
                fig,
                f"fp16 spacing {fig:.3g} rad at the Sin/Cos argument",
            )
            todo += [producer[i] for i in m.input if i in producer and spacing(i) > cfg.max_phase_error]
    return kept


def _amplification(model: Any, m16: Any, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Per node: rel. L2 of its fp16 output minus the worst rel. L2 among its inputs."""
    names = {o for n in model.graph.node if n.op_type not in _NO_MATH for o in n.output}
    names |= {i for n in model.graph.node for i in n.input}
    ref = run_with_intermediates(model, feeds)
    got = run_with_intermediates(m16, feeds)
    err: dict[str, float] = {}
    for r, g in zip(ref, got, strict=True):
        for k, v in r.items():
            if k in g and k in names and np.issubdtype(v.dtype, np.floating) and v.shape == g[k].shape:
                err[k] = max(err.get(k, 0.0), rel_l2(g[k].astype(np.float32), v))
    amp: dict[str, float] = {}
    for n in model.graph.node:
        if n.op_type in _NO_MATH or not n.output or n.output[0] not in err:
            continue
        e_in = max((err.get(i, 0.0) for i in n.input), default=0.0)
        amp[n.name] = err[n.output[0]] - e_in if np.isfinite(err[n.output[0]]) else float("inf")
    return amp


def quantize_fp16(
    fp32_onnx: Path, out_path: Path, calib: list[dict[str, np.ndarray]], config: Fp16Config = Fp16Config()
) -> PrecisionResult:
    """FP32 ONNX -> mixed FP16/FP32 ONNX at `out_path` (FP32 inputs/outputs), verified on `calib`."""
    import onnx

    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise InputError(f"{fp32_onnx}: ONNX model not found")
    if not calib:
        raise InputError(f"{fp32_onnx}: FP16 conversion needs calibration feeds (got none)")
    model = onnx.load(str(fp32_onnx))
    out_name = model.graph.output[0].name
    stats = tensor_stats(model, calib)
    refs = run_model(model, calib, out_name)
    kept = {**_phase_islands(model, stats, config), **_range_islands(model, stats, config)}
    math_nodes = [n for n in model.graph.node if n.op_type not in _NO_MATH]
    budget = max(1, int(config.max_fp32_fraction * len(math_nodes)))
    result = PrecisionResult(
        path=out_path,
        precision="fp16",
        config=config.to_dict(),
        calibration={
            "feeds": len(calib),
            "samples": int(sum(next(iter(f.values())).shape[0] for f in calib)),
            "timesteps": sorted({float(t) for f in calib for t in np.unique(f.get("timestep", []))}),
            "max_abs_fp32": max((s.absmax for s in stats.values()), default=0.0),
        },
    )
    m16 = None
    for rnd in range(config.max_rounds + 1):
        m16 = _convert(model, set(kept))
        outs = run_model(m16, calib, out_name)
        err, max_abs = call_error(outs, refs)
        result.history.append({"round": rnd, "fp32_nodes": len(kept), "call_rel_l2": err})
        log.info("fp16 round %d: %d nodes in FP32, call rel. L2 %.3g", rnd, len(kept), err)
        result.call_rel_l2, result.call_max_abs = err, max_abs
        if err <= config.target_rel_l2 or rnd == config.max_rounds or len(kept) >= budget:
            break
        amp = _amplification(model, m16, calib[: config.analysis_feeds])
        by_name = {n.name: n for n in model.graph.node}
        ranked = [k for k in sorted(amp, key=amp.get, reverse=True) if k not in kept and amp[k] > 0]
        for k in ranked[: min(config.widen_per_round, budget - len(kept))]:
            n = by_name[k]
            kept[k] = KeptNode(
                k,
                n.op_type,
                module_path(n),
                "sensitivity",
                float(amp[k]),
                f"round {rnd + 1}: adds {amp[k]:.3g} rel. L2 in fp16",
            )
        if not ranked:
            break
    result.passed = bool(np.isfinite(result.call_rel_l2) and result.call_rel_l2 <= config.target_rel_l2)
    result.kept_float = list(kept.values())
    n16 = len(math_nodes) - len(kept)
    result.counts = {"fp16": n16, "fp32": len(kept)}
    with atomic_path(out_path, suffix=".onnx") as tmp:
        onnx.save(m16, str(tmp))
        onnx.checker.check_model(str(tmp))
    log.info(
        "fp16: %s (%d math nodes fp16, %d fp32, call rel. L2 %.3g)",
        out_path,
        n16,
        len(kept),
        result.call_rel_l2,
    )
    return result
