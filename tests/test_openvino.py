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
        for b in (2, 3):  # 2: precompiled at activation; 3: compiled static on first use
            f = _feeds(b, seed=b)
            ref, got = ort_r.infer(f)["out_sample"], ov_r.infer(f)["out_sample"]
            assert got.shape == ref.shape
            # fp32: same math; fp16/int8: the two runtimes may round intermediate tensors differently
            assert rel_l2(got, ref) < (1e-5 if precision == "fp32" else 2e-2)
        sigs = ov_r.compiled_signatures
        assert [dict(s)["sample"][0] for s in sigs] == [2, 3] and ov_r._dynamic is None


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


# -- static compiles keyed by the feeds' shapes ------------------------------------------------------
def _spatial(tmp_path):
    """A conv graph with dynamic batch and spatial axes (a UNet's latent size) and its spec."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from engines.iospec import DimRange, IOSpec, TensorSpec

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32), "w")
    dims = ["batch", 4, "h", "w"]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["sample", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Tanh", ["c"], ["out"]),
        ],
        "spatial",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    path = tmp_path / "spatial.fp32.onnx"
    onnx.save(model, str(path))
    spec = IOSpec(
        "spatial",
        (TensorSpec("sample", "float32", tuple(dims)),),
        (TensorSpec("out", "float32", tuple(dims)),),
        {"batch": DimRange(1, 1, 8), "h": DimRange(4, 8, 16), "w": DimRange(4, 8, 16)},
    )
    return path, spec


def _x(b: int, h: int, w: int) -> dict[str, np.ndarray]:
    return {"sample": np.random.default_rng(b * h * w).standard_normal((b, 4, h, w)).astype(np.float32)}


def test_static_compiles_are_keyed_by_the_full_shape_and_match_onnxruntime(tmp_path):
    path, spec = _spatial(tmp_path)
    with OnnxRuntimeRunner(path, spec) as ref, OpenVINORunner(path, spec, batch_sizes=[1]) as r:
        assert r.compiles == 1  # the construction's batch size, at the spec's opt dims, before any call
        # another batch (CFG's 2B) and another latent size at the precompiled batch: each its own compile
        for shape in ((1, 8, 8), (2, 8, 8), (1, 12, 16), (2, 8, 8)):
            f = _x(*shape)
            assert rel_l2(r.infer(f)["out"], ref.infer(f)["out"]) < 1e-5, shape
        held = [dict(s)["sample"] for s in r.compiled_signatures]
        assert held == [(1, 4, 8, 8), (1, 4, 12, 16), (2, 4, 8, 8)] and r.compiles == 3  # by last use
        assert r._dynamic is None


def test_the_compiles_kept_are_bounded_least_recently_used_first(tmp_path):
    path, spec = _spatial(tmp_path)
    with (
        OnnxRuntimeRunner(path, spec) as ref,
        OpenVINORunner(path, spec, batch_sizes=[1], max_compiled=2) as r,
    ):
        for b in (2, 3, 2, 4):  # 3 is the least recently used when 4 comes
            r.infer(_x(b, 8, 8))
        assert [dict(s)["sample"][0] for s in r.compiled_signatures] == [1, 2, 4]  # 1: precompiled, kept
        n = r.compiles
        f = _x(3, 8, 8)  # evicted: compiled again, and still right
        assert rel_l2(r.infer(f)["out"], ref.infer(f)["out"]) < 1e-5
        assert r.compiles == n + 1 and len(r.compiled_signatures) == 3
    with pytest.raises(InputError, match="max_compiled 0"):
        OpenVINORunner(path, spec, max_compiled=0)


def test_static_false_is_one_dynamic_compile_for_every_shape(tmp_path):
    path, spec = _spatial(tmp_path)
    with OnnxRuntimeRunner(path, spec) as ref, OpenVINORunner(path, spec, batch_sizes=[1], static=False) as r:
        assert r.compiles == 1  # compiled at activation: timing excludes it
        for shape in ((1, 8, 8), (3, 8, 8), (2, 16, 4)):
            f = _x(*shape)
            assert rel_l2(r.infer(f)["out"], ref.infer(f)["out"]) < 1e-5
        assert r.compiles == 1 and r.compiled_signatures == []


def test_the_bf16_hint_reaches_every_static_compile(tmp_path):
    if "BF16" not in cpu_capabilities():
        pytest.skip("this CPU's OpenVINO reports no BF16 (needs AVX512-BF16 or AMX)")
    path, spec = _spatial(tmp_path)
    with OpenVINORunner(path, spec, batch_sizes=[1], precision_hint="bf16", cache_dir=tmp_path / "c") as r:
        for shape in ((2, 8, 8), (1, 16, 16)):
            r.infer(_x(*shape))
        compiled = [*r._pinned.values(), *r._lru.values()]
        assert len(compiled) == 3
        assert {c.model.get_property("INFERENCE_PRECISION_HINT").to_string() for c in compiled} == {"bf16"}
    assert len(list((tmp_path / "c").iterdir())) >= 3  # CACHE_DIR: one blob per compiled shape
