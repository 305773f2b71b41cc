"""ONNX graph helpers the FP16 and INT8 passes share: which torch module a node came from, node
metadata across rewrites, topological order, and running a graph on ORT CPU to measure its
call-level error against the FP32 outputs."""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.metrics import max_abs, rel_l2

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
EXTERNAL_OVER = 1 << 30  # run_model saves a ModelProto this big with its weights beside it


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


def call_error(outs: list[np.ndarray], refs: list[np.ndarray]) -> tuple[float, float]:
    """Call-level (rel. L2 over the whole set, max abs) of `outs` against `refs`."""
    a = np.concatenate([o.ravel() for o in outs])
    r = np.concatenate([o.ravel() for o in refs])
    return rel_l2(a, r), max_abs(a, r)


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
            external = model.ByteSize() > EXTERNAL_OVER
            onnx.save(model, str(p), save_as_external_data=external, location="m.onnx.data")
            sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            if external:  # onnx.save moved the weights out of `model`: back in before the folder goes
                onnx.load_external_data_for_model(model, d)
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
