"""TensorRT build and runner.

Unmarked tests run everywhere: profiles from the IO spec, option mapping into Polygraphy's
CreateConfig, compatibility checks on manifest records, the memory preflight, timing-cache keying,
ORT TensorRT EP options, and the one-line errors when TensorRT or a GPU is missing.
Tests marked `tensorrt` + `gpu` build and run real engines; they skip here with the reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.errors import BackendUnavailable, InputError, IntegrityError
from engines.iospec import DimRange, IOSpec, TensorSpec
from engines.manifest import Artifact, Manifest
from engines.onnxruntime_runner import OnnxRuntimeRunner, default_provider_options
from engines.tensorrt_runner import TensorRTRunner
from engines.trt_target import TrtTarget, check_engine_compatible, compatibility_problem
from optimizer.compile.build import (
    EngineResult,
    TrtBuildConfig,
    check_tensorrt_available,
    engine_path_for,
    precision_of,
)
from optimizer.compile.trt_profiles import (
    BUILD_WEIGHT_COPIES,
    MemoryEstimate,
    build_flags,
    check_memory,
    check_timing_cache,
    create_config_kwargs,
    estimate_build_memory,
    onnx_weight_bytes,
    profiles_from_spec,
    record_timing_cache,
    timing_cache_path,
    to_polygraphy_profiles,
)
from optimizer.metrics import rel_l2
from optimizer.model_io import io_spec_for

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
H100 = TrtTarget("11.4.0.106", "NVIDIA H100 80GB HBM3", "9.0", "12.8")
C, HW, MID = 4, 8, 16  # tiny conv net: [B,4,8,8] -> [B,16,8,8] -> [B,4,8,8]


# -- a tiny ONNX graph, fp32 / fp16 / int8 (Q/DQ on the weights) -----------------------------------
def tiny_onnx(path: Path, precision: str = "fp32", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ft = np.float16 if precision == "fp16" else np.float32
    w1 = (rng.standard_normal((MID, C, 3, 3)) * 0.2).astype(ft)
    b1 = np.zeros(MID, ft)
    w2 = (rng.standard_normal((C, MID, 3, 3)) * 0.2).astype(ft)
    b2 = np.zeros(C, ft)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes, x_in, w1_in, w2_in = [], "sample", "w1", "w2"
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["sample"], ["x16"], to=TensorProto.FLOAT16))
        x_in = "x16"
    if precision == "int8":  # explicit quantization of both weights (symmetric, per tensor)
        for w, arr in (("w1", w1), ("w2", w2)):
            inits += [
                numpy_helper.from_array(np.array(np.abs(arr).max() / 127, np.float32), f"{w}_s"),
                numpy_helper.from_array(np.array(0, np.int8), f"{w}_z"),
            ]
            nodes += [
                helper.make_node("QuantizeLinear", [w, f"{w}_s", f"{w}_z"], [f"{w}_q"]),
                helper.make_node("DequantizeLinear", [f"{w}_q", f"{w}_s", f"{w}_z"], [f"{w}_dq"]),
            ]
        w1_in, w2_in = "w1_dq", "w2_dq"
    nodes += [
        helper.make_node("Conv", [x_in, w1_in, "b1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Conv", ["hr", w2_in, "b2"], ["o"], pads=[1, 1, 1, 1]),
    ]
    out = "o"
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["o"], ["o32"], to=TensorProto.FLOAT))
        out = "o32"
    nodes.append(helper.make_node("Identity", [out], ["out_sample"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", C, HW, HW])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", C, HW, HW])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_spec(bmin: int = 1, bmax: int = 8) -> IOSpec:
    return IOSpec(
        "unet2d",
        (TensorSpec("sample", "float32", ("batch", C, HW, HW)),),
        (TensorSpec("out_sample", "float32", ("batch", C, HW, HW)),),
        {"batch": DimRange(bmin, bmax, bmax)},
    )


def unet_spec() -> IOSpec:
    return io_spec_for("UNet2DModel", {"sample_size": 16, "in_channels": 3, "out_channels": 3})


# -- profiles --------------------------------------------------------------------------------------
def test_range_profile_spans_batch_sizes_with_opt_at_largest():
    (prof,) = profiles_from_spec(unet_spec(), [4, 1, 8], "range")
    assert prof["sample"] == ((1, 3, 16, 16), (8, 3, 16, 16), (8, 3, 16, 16))
    assert prof["timestep"] == ((1,), (8,), (8,))


def test_per_batch_profiles_are_exact_shapes():
    profs = profiles_from_spec(unet_spec(), [2, 8, 2, 4], "per-batch")
    assert [p["sample"][0][0] for p in profs] == [2, 4, 8]
    for p in profs:
        for lo, opt, hi in p.values():
            assert lo == opt == hi


def test_profiles_default_to_the_spec_range():
    spec = unet_spec()
    (prof,) = profiles_from_spec(spec, None, "range")
    r = spec.dims["batch"]
    assert prof["sample"][0][0] == r.min and prof["sample"][2][0] == r.max
    per = profiles_from_spec(spec, None, "per-batch")
    assert [p["sample"][0][0] for p in per] == sorted({r.min, r.opt, r.max})


def test_other_dynamic_axes_keep_their_range():
    spec = IOSpec(
        "unet2d",
        (TensorSpec("sample", "float32", ("batch", 4, "height", "width")),),
        (TensorSpec("out_sample", "float32", ("batch", 4, "height", "width")),),
        {"batch": DimRange(1, 2, 2), "height": DimRange(32, 64, 96), "width": DimRange(32, 64, 96)},
    )
    for prof in profiles_from_spec(spec, [1, 4], "per-batch"):
        lo, opt, hi = prof["sample"]
        assert (lo[2], opt[2], hi[2]) == (32, 64, 96) and lo[0] == hi[0]


@pytest.mark.parametrize("sizes,mode", [([0, 4], "range"), ([], "range"), ([1, 2], "sometimes")])
def test_bad_profile_requests_are_input_errors(sizes, mode):
    with pytest.raises(InputError):
        profiles_from_spec(unet_spec(), sizes, mode)


def test_polygraphy_profiles_carry_the_shapes():
    profs = profiles_from_spec(unet_spec(), [1, 2, 4], "per-batch")
    pg = to_polygraphy_profiles(profs)
    assert len(pg) == 3
    for ours, theirs in zip(profs, pg, strict=True):
        assert list(theirs.keys()) == list(ours.keys())
        for name, (lo, opt, hi) in ours.items():
            t = theirs[name]
            assert (tuple(t.min), tuple(t.opt), tuple(t.max)) == (lo, opt, hi)


# -- option mapping --------------------------------------------------------------------------------
def test_option_mapping_into_create_config(tmp_path):
    from polygraphy.backend.trt import CreateConfig

    cfg = TrtBuildConfig(
        builder_optimization_level=5,
        workspace_bytes=256 << 20,
        hardware_compatibility_level="ampere_plus",
        version_compatible=True,
        refittable=True,
    )
    profs = profiles_from_spec(unet_spec(), [1, 4], "per-batch")
    kw = create_config_kwargs(cfg, profs, tmp_path / "t.cache")
    assert kw["hardware_compatibility_level"] == "AMPERE_PLUS"
    assert kw["memory_pool_limits"] == {"WORKSPACE": 256 << 20}
    assert not {"fp16", "int8", "bf16", "fp8", "calibrator", "precision_constraints"} & set(kw)
    # Everything that is not a TensorRT enum goes straight into polygraphy's real CreateConfig.
    plain = {k: v for k, v in kw.items() if k not in ("hardware_compatibility_level", "memory_pool_limits")}
    cc = CreateConfig(**plain)
    assert len(cc.profiles) == 2 and cc.builder_optimization_level == 5
    assert cc.version_compatible and cc.refittable and cc.timing_cache_path == str(tmp_path / "t.cache")
    assert not (cc.fp16 or cc.int8 or cc.tf32)  # TF32 off: fp32 layers stay fp32 for parity


def test_default_mapping_leaves_tensorrt_defaults():
    kw = create_config_kwargs(TrtBuildConfig(), profiles_from_spec(unet_spec()), None)
    assert "hardware_compatibility_level" not in kw and "memory_pool_limits" not in kw
    assert "load_timing_cache" not in kw and kw["builder_optimization_level"] == 3
    assert build_flags(TrtBuildConfig()) == ["STRONGLY_TYPED"]
    assert build_flags(
        TrtBuildConfig(version_compatible=True, hardware_compatibility_level="ampere_plus")
    ) == ["STRONGLY_TYPED", "VERSION_COMPATIBLE", "HARDWARE_COMPATIBILITY_LEVEL=AMPERE_PLUS"]


@pytest.mark.parametrize(
    "bad",
    [
        dict(builder_optimization_level=6),
        dict(hardware_compatibility_level="turing"),
        dict(workspace_bytes=0),
        dict(profile_mode="all"),
    ],
)
def test_bad_build_config_is_one_input_error(bad):
    with pytest.raises(InputError, match="invalid TensorRT build config"):
        create_config_kwargs(TrtBuildConfig(**bad), profiles_from_spec(unet_spec()), None)


def test_config_hash_ignores_cache_locations():
    a = TrtBuildConfig(timing_cache="/x/t.cache", cache_dir="/x").to_dict()
    b = TrtBuildConfig().to_dict()
    assert a == b and TrtBuildConfig(refittable=True).to_dict() != b


def test_precision_and_engine_names():
    assert precision_of(Path("onnx/student.int8.onnx")) == "int8"
    with pytest.raises(InputError):
        precision_of(Path("model.onnx"))
    assert engine_path_for(Path("out/engines"), "fp16", H100) == Path(
        "out/engines/student.fp16.sm90-trt11.4.plan"
    )
    assert engine_path_for(Path("x/e.plan"), "fp16", H100) == Path("x/e.plan")
    amp = TrtTarget("11.4.0", "NVIDIA A100", "8.0", "12.8", "ampere_plus", True)
    assert amp.key == "ampere_plus-trt11.4-vc"


# -- compatibility ---------------------------------------------------------------------------------
def _t(trt="11.4.0.106", gpu="NVIDIA H100 80GB HBM3", cc="9.0", hw="none", vc=False):
    return TrtTarget(trt, gpu, cc, "12.8", hw, vc)


@pytest.mark.parametrize(
    "built,running,ok",
    [
        (_t(), _t(), True),
        (_t(), _t(trt="11.4.1.2"), False),  # plain engines: exact TensorRT version
        (_t(vc=True), _t(trt="11.5.0"), True),  # version-compatible: newer, same major
        (_t(vc=True), _t(trt="11.3.0"), False),  # ... never older
        (_t(trt="10.13.0", vc=True), _t(trt="11.4.0"), True),  # 10 -> 11 is supported
        (_t(trt="8.6.1", vc=True), _t(trt="11.4.0"), False),  # 8 -> 11 is not
        (_t(), _t(gpu="NVIDIA A100", cc="8.0"), False),  # other architecture
        (_t(), _t(gpu="NVIDIA H200", cc="9.0"), True),  # same sm, other model: runs (warns)
        (_t(hw="ampere_plus"), _t(gpu="NVIDIA A10", cc="8.6"), True),
        (_t(hw="ampere_plus"), _t(gpu="Tesla T4", cc="7.5"), False),
        (_t(hw="same_compute_capability"), _t(gpu="NVIDIA GH200", cc="9.0"), True),
        (_t(hw="same_compute_capability"), _t(gpu="NVIDIA L4", cc="8.9"), False),
    ],
)
def test_compatibility_rules(built, running, ok):
    problem = compatibility_problem(built, running)
    assert (problem is None) == ok, problem


def _engine_record(tmp_path, target: TrtTarget, config: TrtBuildConfig) -> Manifest:
    m = Manifest(tmp_path, tiny_spec())
    plan = tmp_path / "engines" / f"student.fp16.{target.key}.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"bytes standing in for a plan: only the manifest record is under test")
    res = EngineResult(
        path=plan,
        precision="fp16",
        onnx_sha256="ab" * 32,
        target=target,
        profiles=profiles_from_spec(tiny_spec(), [1, 4]),
        flags=build_flags(config),
        build_seconds=12.5,
        engine_bytes=plan.stat().st_size,
        config=config,
    )
    m.add(**res.to_manifest())
    m.save()
    return Manifest.load(tmp_path)


def test_manifest_record_and_check_on_reload(tmp_path):
    built = _t(hw="none")
    m = _engine_record(tmp_path, built, TrtBuildConfig())
    (art,) = m.find("engine", backend="tensorrt", precision="fp16")
    assert art.name == "engine/tensorrt/fp16/sm90-trt11.4" and art.input_sha256 == "ab" * 32
    ex = art.extra
    assert (ex["tensorrt_version"], ex["gpu"], ex["compute_capability"], ex["cuda"]) == (
        "11.4.0.106",
        "NVIDIA H100 80GB HBM3",
        "9.0",
        "12.8",
    )
    assert ex["profiles"][0]["sample"]["max"] == [4, C, HW, HW] and ex["flags"] == ["STRONGLY_TYPED"]
    assert ex["build_seconds"] == 12.5 and ex["engine_bytes"] > 0
    check_engine_compatible(art, running=built)  # same target: accepted
    with pytest.raises(IntegrityError, match=r"11\.4\.0\.106 but 11\.5\.0 is running"):
        check_engine_compatible(art, running=_t(trt="11.5.0"))
    with pytest.raises(IntegrityError, match="sm80"):
        check_engine_compatible(art, running=_t(gpu="NVIDIA A100", cc="8.0"))


def test_portable_record_is_accepted_elsewhere(tmp_path):
    built = _t(hw="ampere_plus", vc=True)
    m = _engine_record(
        tmp_path,
        built,
        TrtBuildConfig(hardware_compatibility_level="ampere_plus", version_compatible=True),
    )
    (art,) = m.find("engine")
    check_engine_compatible(art, running=_t(trt="11.6.0", gpu="NVIDIA A10", cc="8.6"))
    with pytest.raises(IntegrityError, match="compute capability >= 8.0"):
        check_engine_compatible(art, running=_t(gpu="Tesla T4", cc="7.5"))


def test_non_engine_or_incomplete_records_are_refused():
    with pytest.raises(IntegrityError):
        check_engine_compatible(Artifact("onnx/fp16", "onnx/student.fp16.onnx", "0", "onnx"), running=H100)
    art = Artifact("engine/x", "e.plan", "0", "engine", target={"tensorrt": "11.4.0"})
    with pytest.raises(IntegrityError, match="lacks"):
        check_engine_compatible(art, running=H100)


# -- timing caches ---------------------------------------------------------------------------------
def test_timing_cache_is_per_target_and_refused_elsewhere(tmp_path):
    path = timing_cache_path(tmp_path, H100)
    assert path.name == "timing.nvidia-h100-80gb-hbm3.sm90.trt11.4.cache"
    assert timing_cache_path(tmp_path, _t(gpu="NVIDIA A100", cc="8.0")) != path
    check_timing_cache(path, H100)  # nothing there yet: fine
    path.write_bytes(b"\x00cache")
    with pytest.raises(InputError, match="unknown origin"):
        check_timing_cache(path, H100)
    record_timing_cache(path, H100)
    check_timing_cache(path, H100)
    check_timing_cache(path, _t(trt="11.4.2"))  # same major.minor: timings still valid
    with pytest.raises(InputError, match="NVIDIA A100.*do not transfer across GPU models"):
        check_timing_cache(path, _t(gpu="NVIDIA A100", cc="8.0"))
    with pytest.raises(InputError, match="TensorRT 11.4.0.106, running 11.5.0"):
        check_timing_cache(path, _t(trt="11.5.0"))


# -- memory preflight ------------------------------------------------------------------------------
def test_weight_bytes_follow_the_graph_precision(tmp_path):
    n = MID * C * 9 + MID + C * MID * 9 + C
    fp32 = onnx.load(str(tiny_onnx(tmp_path / "s.fp32.onnx", "fp32")))
    fp16 = onnx.load(str(tiny_onnx(tmp_path / "s.fp16.onnx", "fp16")))
    int8 = onnx.load(str(tiny_onnx(tmp_path / "s.int8.onnx", "int8")))
    assert onnx_weight_bytes(fp32) == 4 * n
    assert onnx_weight_bytes(fp16) == 2 * n
    # Quantized weights: 1 byte; biases fp32; per weight a scale (4 B) and a zero point (1 B).
    assert onnx_weight_bytes(int8) == (MID * C * 9 + C * MID * 9) + 4 * (MID + C) + 2 * (4 + 1)


def test_activation_estimate_uses_shape_inference_at_max_batch(tmp_path):
    path = tiny_onnx(tmp_path / "s.fp32.onnx")
    est = estimate_build_memory(path, profiles_from_spec(tiny_spec(), [1, 8]), workspace_bytes=1 << 20)
    largest = 8 * MID * HW * HW * 4  # the [8,16,8,8] fp32 hidden tensor
    io = 8 * C * HW * HW * 4
    assert est.activation_bytes == 3 * largest + io and est.max_batch == 8
    assert est.total_bytes == BUILD_WEIGHT_COPIES * est.weights_bytes + est.activation_bytes + (1 << 20)
    est16 = estimate_build_memory(
        tiny_onnx(tmp_path / "s.fp16.onnx", "fp16"),
        profiles_from_spec(tiny_spec(), [1, 8]),
        workspace_bytes=1 << 20,
    )
    assert est16.activation_bytes < est.activation_bytes  # fp16 hidden tensors are half the bytes


def test_memory_check_says_which_batch_fits():
    est = MemoryEstimate(
        weights_bytes=1 << 30, activation_bytes=16 << 30, workspace_bytes=1 << 28, max_batch=16
    )
    check_memory(est, free_bytes=64 << 30)  # fits
    free = 12 << 30
    with pytest.raises(InputError) as e:
        check_memory(est, free_bytes=free)
    msg = str(e.value)
    assert "only 12.00 GiB of GPU memory is free" in msg and "\n" not in msg
    fit = int(msg.split("--batch-sizes to ")[1].split(";")[0])
    assert 1 <= fit < 16
    smaller = MemoryEstimate(est.weights_bytes, est.activation_bytes * fit // 16, est.workspace_bytes, fit)
    check_memory(smaller, free_bytes=free)  # the advice is right: that batch fits
    bigger = MemoryEstimate(
        smaller.weights_bytes, est.activation_bytes * (fit + 1) // 16, est.workspace_bytes, fit + 1
    )
    with pytest.raises(InputError):
        check_memory(bigger, free_bytes=free)


def test_memory_check_when_weights_alone_do_not_fit():
    est = MemoryEstimate(
        weights_bytes=40 << 30, activation_bytes=1 << 30, workspace_bytes=1 << 30, max_batch=1
    )
    with pytest.raises(InputError, match="smaller precision"):
        check_memory(est, free_bytes=48 << 30)


# -- missing TensorRT / GPU ------------------------------------------------------------------------
def test_cuda_python_without_a_device_is_one_line():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from engines.cuda_utils import call, check_cuda_device, device_count, import_cudart

    n, why = device_count()
    if n:
        pytest.skip("a CUDA device is visible")
    with pytest.raises(BackendUnavailable, match="no CUDA device is visible"):
        check_cuda_device()
    with pytest.raises(RuntimeError, match=f"CUDA error in probe: {why}"):
        call(import_cudart().cudaGetDeviceCount(), "probe")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_one_line_naming_the_extra(tmp_path):
    with pytest.raises(BackendUnavailable) as e:
        check_tensorrt_available()
    msg = str(e.value)
    assert "dd-compile[tensorrt]" in msg and "pypi.nvidia.com" in msg and "\n" not in msg
    runner = TensorRTRunner(tmp_path / "missing.plan", tiny_spec())  # construction needs nothing
    with pytest.raises(BackendUnavailable, match=r"dd-compile\[tensorrt\]"):
        runner.activate()


def test_ort_tensorrt_ep_options(tmp_path):
    spec = tiny_spec(1, 8)
    opts = default_provider_options("onnxruntime-trt", spec, tmp_path / "cache")
    trt = opts["TensorrtExecutionProvider"]
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"]
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path / "cache")
    assert trt["trt_fp16_enable"] is False and trt["trt_int8_enable"] is False
    assert trt["trt_profile_min_shapes"] == f"sample:1x{C}x{HW}x{HW}"
    assert trt["trt_profile_max_shapes"] == f"sample:8x{C}x{HW}x{HW}"
    assert "CUDAExecutionProvider" in opts
    assert default_provider_options("onnxruntime", spec, tmp_path) == {}
    cuda = default_provider_options("onnxruntime-cuda", spec)
    assert set(cuda) == {"CUDAExecutionProvider"}


def test_ort_trt_backend_unavailable_without_the_provider(tmp_path):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT EP")
    path = tiny_onnx(tmp_path / "s.fp32.onnx")
    runner = OnnxRuntimeRunner(path, tiny_spec(), backend="onnxruntime-trt")
    assert runner.provider_options["TensorrtExecutionProvider"]["trt_engine_cache_path"] == str(
        tmp_path / "trt_ep_cache"
    )
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
        runner.activate()
    assert not (tmp_path / "trt_ep_cache").exists()  # nothing created for a backend that is absent


# -- on a GPU with TensorRT ------------------------------------------------------------------------
def _ort_reference(tmp_path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime CPU on the fp32 graph with the same weights (seed)."""
    with OnnxRuntimeRunner(tiny_onnx(tmp_path / "ref.fp32.onnx"), tiny_spec()) as r:
        return r.infer({"sample": x})["out_sample"]


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision,bar", [("fp32", 1e-5), ("fp16", 1e-2), ("int8", 5e-2)])
def test_build_and_run_matches_onnxruntime(tmp_path, precision, bar):
    from optimizer.compile.build import build_engine

    onnx_path = tiny_onnx(tmp_path / f"student.{precision}.onnx", precision)
    res = build_engine(onnx_path, tiny_spec(), tmp_path / "engines", TrtBuildConfig(batch_sizes=(1, 8)))
    assert res.path.exists() and res.engine_bytes == res.path.stat().st_size
    assert res.path.name == f"student.{precision}.{res.target.key}.plan"
    assert res.timing_cache and res.timing_cache.exists()
    x = np.random.default_rng(1).standard_normal((3, C, HW, HW)).astype(np.float32)
    with TensorRTRunner(res.path, tiny_spec()) as r:
        y = r.infer({"sample": x})["out_sample"]
        assert r.last_gpu_ms is not None and r.last_gpu_ms > 0
    assert rel_l2(y, _ort_reference(tmp_path, x)) < bar


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_cuda_graph_recaptures_on_shape_change_and_views(tmp_path):
    from optimizer.compile.build import build_engine

    onnx_path = tiny_onnx(tmp_path / "student.fp32.onnx")
    res = build_engine(onnx_path, tiny_spec(), tmp_path / "engines", TrtBuildConfig(batch_sizes=(1, 8)))
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((n, C, HW, HW)).astype(np.float32) for n in (2, 5))
    with (
        TensorRTRunner(res.path, tiny_spec()) as plain,
        TensorRTRunner(res.path, tiny_spec(), cuda_graph=True, copy_outputs=False) as g,
    ):
        for x in (a, a, b, a):
            ref = plain.infer({"sample": x})["out_sample"].copy()
            out = g.infer({"sample": x})["out_sample"]
            np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
        assert g.graph_captures == 3  # a, b, a again: once per shape change, not per call
        with pytest.raises(InputError, match="outside optimization profile"):
            g.infer({"sample": np.zeros((9, C, HW, HW), np.float32)}, check=False)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_timing_cache_reused_and_engine_loads_from_manifest(tmp_path):
    from optimizer.compile.build import build_engine

    (tmp_path / "onnx").mkdir()
    onnx_path = tiny_onnx(tmp_path / "onnx" / "student.fp16.onnx", "fp16")
    cfg = TrtBuildConfig(batch_sizes=(1, 4), profile_mode="per-batch", cache_dir=str(tmp_path / "cache"))
    first = build_engine(onnx_path, tiny_spec(1, 4), tmp_path / "engines", cfg)
    size = first.timing_cache.stat().st_size
    second = build_engine(onnx_path, tiny_spec(1, 4), tmp_path / "engines2", cfg)
    assert second.timing_cache == first.timing_cache and second.timing_cache.stat().st_size >= size
    assert len(first.profiles) == 2
    x1, x4 = (np.random.default_rng(3).standard_normal((n, C, HW, HW)).astype(np.float32) for n in (1, 4))
    with TensorRTRunner(first.path, tiny_spec(1, 4), profile_index=None) as r:  # picks per shape
        for x in (x1, x4, x1):
            assert rel_l2(r.infer({"sample": x})["out_sample"], _ort_reference(tmp_path, x)) < 1e-2
        assert r.profile_index == 0
    with (
        TensorRTRunner(first.path, tiny_spec(1, 4), profile_index=0) as r,
        pytest.raises(InputError, match="outside optimization profile 0"),
    ):
        r.infer({"sample": x4})
    m = Manifest(tmp_path, tiny_spec(1, 4))
    m.add(**first.to_manifest())
    m.save()
    (art,) = Manifest.load(tmp_path).find("engine")
    check_engine_compatible(art)  # built here, runs here
