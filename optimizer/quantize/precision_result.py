"""What a precision pass decided and measured: `PrecisionResult` and the `KeptNode`s it left in
higher precision, each with the measurement behind it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


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
