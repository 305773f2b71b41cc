"""Per-component precision: each component's graphs and the mixes a deployment is made of.

text encoder fp32 | fp16, UNet fp32 | fp16 | int8, VAE decoder and encoder (image-to-image) fp32 |
fp16 after their range check: optimizer/quantize/fp16.py keeps FP32 islands where the measured
activations would overflow fp16; if a converted VAE graph still misses its target (or the islands
grow past the budget) it stays fp32. bf16 (--backend openvino) is no graph: every component's
fp32 graph run under OpenVINO's bf16 inference hint (`runtime_graph`). Every choice is recorded
with its reason for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.bars import ParityBars
from optimizer.families import FAMILIES
from optimizer.families.table import RUNTIME_PRECISIONS

log = logging.getLogger(__name__)

# the mix named by the UNet's precision (it is where the time goes); the others follow
MIXES = FAMILIES["sd"].mixes  # precision name -> component -> graph precision (SD's; each family has its own)


@dataclass
class Graph:
    kind: str
    precision: str  # what the graph is
    path: Path
    info: dict[str, Any] = field(default_factory=dict)  # the quantizer's record
    why: str = ""


def runtime_graph(fp32: Graph, precision: str) -> Graph:
    """A precision the runtime applies to the fp32 graph (bf16: OpenVINO's hint): the same file,
    its own precision, so it is validated (call parity at that precision's bar) and published on
    its own record; t2i.json names it as the component's precision (engines/t2i.py)."""
    why = f"the fp32 graph under OpenVINO's {precision} inference hint (nothing quantized)"
    return Graph(fp32.kind, precision, fp32.path, {"passed": True, "graph": "fp32"}, why)


def quantize_component(
    kind: str,
    precision: str,
    fp32: Path,
    out: Path,
    calib: list[dict[str, np.ndarray]],
    bars: ParityBars,
) -> Graph:
    """One component graph at `precision`; a graph that misses its target is returned with the
    reason, and the mix falls back to the fp32 graph (`resolve_mix`). A runtime precision (bf16)
    writes nothing: the fp32 graph under that precision (`runtime_graph`)."""
    from optimizer import quantize as q

    if precision in RUNTIME_PRECISIONS:
        return runtime_graph(Graph(kind, "fp32", fp32), precision)
    if precision == "fp16":
        res = q.quantize_fp16(fp32, out, calib, q.Fp16Config.from_bars(bars))
        islands = [k for k in res.kept_float if k.reason == "range"]
        why = (
            f"fp16, {res.counts.get('fp32', 0)} node(s) kept fp32"
            + (f" ({len(islands)} for measured fp16 overflow)" if islands else "")
            + f"; call rel. L2 {res.call_rel_l2:.2e} on calibration"
        )
    else:
        cfg = q.Int8Config(sensitivity="none", placement="fixed").resolve(bars)
        res = q.quantize_int8(fp32, out, calib, cfg)
        why = f"int8 Q/DQ ({res.counts}); call rel. L2 {res.call_rel_l2:.2e} on calibration"
    g = Graph(kind, precision, out, res.to_dict(), why)
    g.info["passed"] = bool(res.passed)
    if not res.passed:
        g.why = f"{precision} missed its calibration target ({why}): fp32 used"
    return g


def resolve_mix(mix: str | Mapping[str, str], graphs: dict[tuple[str, str], Graph]) -> dict[str, Graph]:
    """The component graphs of a mix (a name of SD's, or the family's component -> precision map):
    the asked precision where it was built and passed, else fp32."""
    out = {}
    for kind, p in (MIXES[mix] if isinstance(mix, str) else mix).items():
        g = graphs.get((kind, p))
        if g is None or not g.info.get("passed", True):
            fb = graphs[(kind, "fp32")]
            why = g.why if g is not None else f"{p} not built for {kind}"
            out[kind] = Graph(kind, "fp32", fb.path, fb.info, why)
        else:
            out[kind] = g
    return out
