"""`Int8Config`: what the INT8 pass may quantize, how it calibrates, and the bars its search keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from engines.errors import InputError
from optimizer.bars import ParityBars

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")

# How far inside the int8 bars the search aims (`Int8Config.from_bars`):
# call level: the search measures on the calibration feeds the scales were fitted to, the bar is
# judged on validation trajectories the quantizer never saw, so aim for bar / 1.25 (5e-2 -> 4e-2);
INT8_CALL_HEADROOM = 1.25
# sample level: parity_check already runs the whole sampler on seeds validation does not use, the
# measurement the bar judges, so it aims at the bar itself.
INT8_PSNR_MARGIN_DB = 0.0


@dataclass(frozen=True)
class Int8Config:
    # minmax | percentile | entropy; measured (int8_speed.py --explore): on the demo,
    # percentile (99.999) cost 0.7 dB sample PSNR and entropy chose the min/max range anyway
    calibration: str = "minmax"
    percentile: float = 99.999  # for calibration="percentile"
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
    require_int8_kernel: bool = True  # quantize only nodes ORT CPU runs as integer kernels
    # Search targets: the call-level rel. L2 the selection must stay within, and the sample-level
    # PSNR (dB) parity_check must reach. None: derived from the int8 bars by `resolve` (default bars
    # 5e-2 and 25 dB -> 4e-2 and 25 dB); a number set here is the caller's and is kept.
    target_call_rel_l2: float | None = None
    min_psnr_db: float | None = None
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

    @classmethod
    def from_bars(cls, bars: ParityBars, **fields: Any) -> Int8Config:
        """A config whose search targets come from `bars` (`--bar`); other fields from `fields`."""
        return cls(**fields).resolve(bars)

    def resolve(
        self,
        bars: ParityBars | None = None,
        *,
        call_headroom: float = INT8_CALL_HEADROOM,
        psnr_margin_db: float = INT8_PSNR_MARGIN_DB,
    ) -> Int8Config:
        """This config with the targets left None derived from the int8 bars the result is judged
        by (default: ParityBars()): call rel. L2 bar / `call_headroom`, sample PSNR bar +
        `psnr_margin_db`. Targets already set are kept."""
        if bars is None:
            bars = ParityBars()
        call = self.target_call_rel_l2
        psnr = self.min_psnr_db
        return replace(
            self,
            target_call_rel_l2=bars.call_rel_l2["int8"] / call_headroom if call is None else call,
            min_psnr_db=bars.sample_psnr_db["int8"] + psnr_margin_db if psnr is None else psnr,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["op_types"] = list(self.op_types)
        return d
