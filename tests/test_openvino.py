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


@pytest.mark.slow
def test_dd_compile_backend_openvino_validates_fp32_and_bf16_and_the_runtime_serves_them(
    tiny_teacher_dir, tmp_path
):
    import json

    from click.testing import CliRunner

    import engines
    from engines.errors import InputError
    from optimizer.cli import main

    precisions = "fp32,bf16" if "BF16" in cpu_capabilities() else "fp32"
    out = tmp_path / "out"
    args = [str(tiny_teacher_dir), "--steps", "2", "-o", str(out), "--backend", "openvino"]
    args += ["--precision", precisions, "--batch-sizes", "1,2", "--samples", "8", "--fid-samples", "16"]
    # the tiny random UNet's bf16 call error (4.4e-2 measured) is over the default 3e-2 bar; the
    # demo's is 1.1e-2: this test is about the mechanism, so the bar is widened here
    args += ["--bench-seconds", "0.5", "--threads", "1", "--bar", "call.bf16=0.1"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    rep = json.loads((out / "report.json").read_text())
    assert res.exit_code == 0, (res.output, rep.get("failures"))
    by = {v["precision"]: v for v in rep["variants"]}
    assert all(v["backend"] == "openvino" for v in by.values())
    assert by["fp32"]["parity"]["call"]["rel_l2"] < 1e-5
    if "bf16" in by:
        # bf16 really ran in bf16 (not fp32 in disguise) and stayed inside its bars
        assert 1e-5 < by["bf16"]["parity"]["call"]["rel_l2"] < 0.1
        assert by["bf16"]["parity"]["sample"]["psnr_db"] >= 30
    with engines.load(out, precision=precisions.split(",")[-1], backend="openvino") as pipe:
        img = pipe(seeds=[0, 1])
    assert img.shape[0] == 2 and np.isfinite(img).all()
    # validated on OpenVINO: ONNX Runtime may not serve it on that record
    with pytest.raises(InputError, match="validated on openvino, not on onnxruntime"):
        engines.load(out, precision="fp32", backend="onnxruntime")


def test_bf16_needs_the_openvino_backend(tiny_teacher_dir, tmp_path):
    from click.testing import CliRunner

    from optimizer.cli import main

    res = CliRunner().invoke(
        main, [str(tiny_teacher_dir), "--steps", "2", "-o", str(tmp_path / "o"), "--precision", "bf16"]
    )
    assert res.exit_code == 2 and "--precision bf16: needs --backend openvino" in res.output
    assert not (tmp_path / "o").exists()
