"""What ONNX Runtime's CPU provider does with a QDQ graph: which nodes it fuses into integer kernels,
and a session to time it with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


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


def session_fn(path: Path, feed: dict[str, np.ndarray]) -> Callable[[], Any]:
    """A no-argument call that runs `path` once on `feed` (ORT CPU), for interleaved timing."""
    import onnxruntime as ort

    from engines.onnxruntime_runner import session_options

    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    f = {k: v for k, v in feed.items() if k in names}
    return lambda: sess.run(None, f)
