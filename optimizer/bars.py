"""The pass/fail bars of the three parity levels (defaults: ARCHITECTURE.md, `--bar` changes them).

A plain dataclass below optimizer/compile/ and optimizer/quantize/: the stages judge results by
it and the quantizers derive their search targets from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ParityBars:
    """Defaults from ARCHITECTURE.md; rel. L2 per call, PSNR (dB) per sample."""

    # bf16 (OpenVINO's inference-precision hint on AVX512-BF16/AMX CPUs): 8 mantissa bits where
    # fp16 has 11, so its bars lie between fp16's and int8's
    call_rel_l2: dict[str, float] = field(
        default_factory=lambda: {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2, "int8": 5e-2}
    )
    sample_psnr_db: dict[str, float] = field(
        default_factory=lambda: {"fp32": 60.0, "fp16": 35.0, "bf16": 30.0, "int8": 25.0}
    )
    # polygraphy SimpleCompareFunc on the median element error; its 1e-5 default fails every
    # correct FP16 graph, so the tolerances follow the precision.
    polygraphy_atol: dict[str, float] = field(
        default_factory=lambda: {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2, "int8": 5e-2}
    )
    polygraphy_rtol: dict[str, float] = field(
        default_factory=lambda: {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1, "int8": 2e-1}
    )
    fid_margin: float = 1.5  # student FID <= margin x teacher reference FID
    min_paired_psnr_db: float = 15.0  # student vs teacher from the same noise
