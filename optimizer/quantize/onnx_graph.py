"""What a precision pass decided and measured: `PrecisionResult`, plus the shared helpers that
name nodes by module path and measure call-level error on the calibration set."""

from __future__ import annotations

import ast
import collections
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NAME_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass
class KeptNode:
    """A node left in higher precision, and the measurement that decided it."""

    name: str
    op_type: str
    module: str  # torch module path from the exporter's metadata ("model.mid_block.attentions.0")
    reason: str  # "range", "nonfinite", "underflow", "sensitivity", "no-int8-kernel", ...
    figure: float | None = None  # the number behind the reason (|max|, rel. L2 error, ...)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrecisionResult:
    path: Path
    precision: str  # "fp16" | "int8"
    kept_float: list[KeptNode] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"fp16": 410, "fp32": 12}
    calibration: dict[str, Any] = field(default_factory=dict)
    call_rel_l2: float = float("nan")  # on the calibration set, vs the FP32 graph
    call_max_abs: float = float("nan")
    passed: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # each verify/widen round
    placement: dict[str, Any] = field(default_factory=dict)  # int8: the Q/DQ placements measured
    config: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def module_path(node: Any) -> str:
    """The torch module a node came from, from the dynamo exporter's name_scopes metadata."""
    for p in node.metadata_props:
        if p.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return p.value
            mods = [s for s in scopes[:-1] if s]  # the last entry is the op itself
            return mods[-1] if mods else (scopes[-1] if scopes else "")
    return ""


def copy_metadata(src: Any, dst: Any) -> None:
    """Carry node metadata (module paths) over to a rewritten graph, matched by node name."""
    meta = {n.name: n.metadata_props for n in src.graph.node if n.name}
    for n in dst.graph.node:
        if n.name in meta and not n.metadata_props:
            n.metadata_props.extend(meta[n.name])


def op_counts(model: Any) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12))


def call_error(outs: list[np.ndarray], refs: list[np.ndarray]) -> tuple[float, float]:
    """Call-level (rel. L2 over the whole set, max abs) of `outs` against `refs`."""
    a = np.concatenate([o.ravel() for o in outs])
    r = np.concatenate([o.ravel() for o in refs])
    max_abs = float(np.max(np.abs(a.astype(np.float64) - r))) if np.isfinite(a).all() else float("inf")
    return rel_l2(a, r), max_abs


def run_model(
    model: Any, feeds: list[dict[str, np.ndarray]], output: str, level: str = "all"
) -> list[np.ndarray]:
    """Run an onnx.ModelProto (or a path) with ORT's CPU provider on each feed; one output."""
    import onnx
    import onnxruntime as ort

    from engines.onnxruntime_runner import session_options

    so = session_options()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    if isinstance(model, str | Path):
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    else:
        with tempfile.TemporaryDirectory(prefix="ddq.") as d:
            p = Path(d) / "m.onnx"
            onnx.save(model, str(p), save_as_external_data=model.ByteSize() > (1 << 30))
            sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    return [sess.run([output], f)[0] for f in feeds]


def toposort(model: Any) -> None:
    """Sort graph nodes topologically in place (the fp16 converter appends Casts at the end,
    which ORT accepts but onnx.checker rejects)."""
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    nodes, out = list(g.node), []
    while nodes:
        rest = []
        for n in nodes:
            (out if all(i in ready for i in n.input) else rest).append(n)
            if out and out[-1] is n:
                ready.update(n.output)
        if len(rest) == len(nodes):
            raise ValueError(f"graph has a cycle or dangling inputs at {rest[0].name}")
        nodes = rest
    del g.node[:]
    g.node.extend(out)
