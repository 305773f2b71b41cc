"""Stage `quantize`: onnx/student.fp32.onnx -> student.fp16.onnx (measured FP32 islands) and
student.int8.onnx (explicit symmetric Q/DQ on the nodes that measurably pay off)."""

from optimizer.quantize.calibration import calibration_feeds
from optimizer.quantize.fp16 import Fp16Config, quantize_fp16
from optimizer.quantize.int8 import Int8Config, quantize_int8
from optimizer.quantize.precision_result import KeptNode, PrecisionResult

__all__ = [
    "calibration_feeds",
    "Fp16Config",
    "quantize_fp16",
    "Int8Config",
    "quantize_int8",
    "KeptNode",
    "PrecisionResult",
]
