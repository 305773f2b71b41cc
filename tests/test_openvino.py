"""OpenVINO runner: the same ONNX graphs as ONNX Runtime, static per-batch compiles, bf16 hint."""

from __future__ import annotations

import numpy as np
import pytest

from engines.errors import BackendUnavailable, InputError
from engines.onnxruntime_runner import OnnxRuntimeRunner
from optimizer.metrics import rel_l2
from tests.test_tensorrt import tiny_onnx, tiny_spec

ov = pytest.importorskip("openvino", reason="openvino not installed: pip install 'dd-compile[openvino]'")
from engines.openvino_runner import OpenVINORunner, cpu_capabilities  # noqa: E402


def _feeds(b: int, seed: int = 0) -> dict[str, np.ndarray]:
    shape = tiny_spec().profile("opt")["sample"][1:]
    return {"sample": np.random.default_rng(seed).standard_normal((b, *shape)).astype(np.float32)}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_same_graph_same_answer_as_onnxruntime(tmp_path, precision):
    path = tiny_onnx(tmp_path / f"s.{precision}.onnx", precision)
    with (
        OnnxRuntimeRunner(path, tiny_spec()) as ort_r,
        OpenVINORunner(path, tiny_spec(), batch_sizes=[2]) as ov_r,
    ):
        for b in (2, 3):  # 2: the static compile; 3: the dynamic fallback
            f = _feeds(b, seed=b)
            ref, got = ort_r.infer(f)["out_sample"], ov_r.infer(f)["out_sample"]
            assert got.shape == ref.shape
            # fp32: same math; fp16/int8: the two runtimes may round intermediate tensors differently
            assert rel_l2(got, ref) < (1e-5 if precision == "fp32" else 2e-2)
        assert set(ov_r._static) == {2} and ov_r._dynamic is not None


def test_cache_dir_and_config(tmp_path):
    path = tiny_onnx(tmp_path / "s.fp32.onnx")
    r = OpenVINORunner(path, tiny_spec(), batch_sizes=[1], threads=1, cache_dir=tmp_path / "ov_cache")
    assert r.config() == {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": "1",
        "CACHE_DIR": str(tmp_path / "ov_cache"),
    }
    with r:
        r.infer(_feeds(1))
    assert any((tmp_path / "ov_cache").iterdir())  # OpenVINO wrote its compiled blob


def test_bad_hints_are_one_line(tmp_path):
    path = tiny_onnx(tmp_path / "s.fp32.onnx")
    with pytest.raises(InputError, match="performance hint 'FAST'"):
        OpenVINORunner(path, tiny_spec(), performance_hint="FAST")
    with pytest.raises(InputError, match="precision hint 'int4'"):
        OpenVINORunner(path, tiny_spec(), precision_hint="int4")


def test_bf16_runs_where_the_cpu_has_it_and_is_refused_elsewhere(tmp_path):
    path = tiny_onnx(tmp_path / "s.fp32.onnx")
    r = OpenVINORunner(path, tiny_spec(), batch_sizes=[4], precision_hint="bf16")
    if "BF16" not in cpu_capabilities():
        with pytest.raises(BackendUnavailable, match="bf16 needs a CPU with AVX512-BF16 or AMX"):
            r.activate()
        return
    with r, OnnxRuntimeRunner(path, tiny_spec()) as ref:
        f = _feeds(4)
        err = rel_l2(r.infer(f)["out_sample"], ref.infer(f)["out_sample"])
    # bf16 keeps 8 mantissa bits: ~4e-3 relative rounding per op, but not fp32's 1e-7
    assert 1e-5 < err < 3e-2
