"""INT8 Q/DQ placement that ONNX Runtime can fuse: isolated Q/DQ pairs in front of quantized nodes.

A tensor that feeds a Conv and float ops (a skip Concat, a norm) is the UNet's common case; with one
shared signed Q/DQ, ORT's x86 S8->U8 rewrite skips it and the Conv runs in float.
Real ORT, tiny graphs."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.metrics import rel_l2
from optimizer.quantize import Int8Config, quantize_int8
from optimizer.quantize.int8 import isolate_qdq, unfused_nodes
from optimizer.quantize.onnx_graph import run_model

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")


def _skip_graph(path):
    """x -> conv_a (3x3), conv_b (1x1), Concat(x, a, b) -> Relu -> y: x has three consumers."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b"),
        helper.make_node("Concat", ["x", "a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Relu", ["cat"], ["y"], name="relu"),
    ]
    g = helper.make_graph(
        nodes,
        "skip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24, 8, 8])],
        [init("wa", 8, 8, 3, 3), init("ba", 8), init("wb", 8, 8, 1, 1), init("bb", 8)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def skip_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("skip")
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((2, 8, 8, 8)).astype(np.float32)} for _ in range(3)]
    return _skip_graph(d / "m.onnx"), calib


def _consumers(model):
    out = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


LOOSE = dict(sensitivity="none", target_call_rel_l2=0.5, placement="fixed")


def test_isolated_qdq_feeds_only_quantized_nodes_and_fuses(skip_model, tmp_path):
    src, calib = skip_model
    res = quantize_int8(src, tmp_path / "iso.onnx", calib, Int8Config(**LOOSE))
    assert res.counts["int8"] == 2, res.kept_float  # both convs have an ORT integer kernel
    m = onnx.load(str(res.path))
    cons = _consumers(m)
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    # The float consumer reads the float input, not a quantized copy of it.
    cat = next(n for n in m.graph.node if n.op_type == "Concat")
    assert cat.input[0] == "x"
    # Each conv has its own activation Q->DQ pair, one consumer each (ORT's S8->U8 rewrite).
    for conv in (n for n in m.graph.node if n.op_type == "Conv"):
        dq = prod[conv.input[0]]
        q = prod[dq.input[0]]
        assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
        assert len(cons[dq.output[0]]) == 1 and len(cons[q.output[0]]) == 1
    # TensorRT explicit quantization: int8 (int32 bias), zero point 0 everywhere.
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype in (np.int8, np.int32) and not zp.any(), n.name  # int32: the bias
    assert unfused_nodes(res.path, ["conv_a", "conv_b"]) == []
    got, ref = run_model(res.path, calib, "y"), run_model(src, calib, "y")
    assert rel_l2(np.concatenate(got), np.concatenate(ref)) < 5e-2


@pytest.mark.skipif(not X86, reason="the S8->U8 rewrite that shared Q/DQ defeats is ORT's x86 path")
def test_shared_qdq_leaves_convs_unfused_on_x86(skip_model, tmp_path):
    src, calib = skip_model
    res = quantize_int8(src, tmp_path / "shared.onnx", calib, Int8Config(isolate_qdq=False, **LOOSE))
    assert res.counts["int8"] < 2
    assert {k.reason for k in res.kept_float} == {"no-int8-kernel"}


def test_isolate_qdq_rewires_float_consumers_and_keeps_output_quantization(skip_model, tmp_path):
    """On quantize_static's own graph: after isolate_qdq the Concat's copy of x is exact again (it
    was quantized before); each conv keeps its one-consumer output Q/DQ (QLinearConv needs it)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from optimizer.quantize.calibration import ort_reader

    src, calib = skip_model
    shared = tmp_path / "shared.onnx"
    quantize_static(
        str(src),
        str(shared),
        ort_reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=["conv_a", "conv_b"],
        op_types_to_quantize=["Conv"],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    m = onnx.load(str(shared))
    assert isolate_qdq(m, {"conv_a", "conv_b"}) > 0
    onnx.checker.check_model(m)
    cons = _consumers(m)
    prod = {o: n for n in m.graph.node for o in n.output}
    for conv in ("conv_a", "conv_b"):
        out = next(n for n in m.graph.node if n.name == conv).output[0]
        (q,) = cons[out]
        (dq,) = cons[q.output[0]]
        assert q.op_type == "QuantizeLinear" and len(cons[dq.output[0]]) == 1
    assert prod["cat"].input[0] == "x"
    relu_x = [np.maximum(f["x"], 0) for f in calib]
    before = [y[:, :8] for y in run_model(shared, calib, "y")]
    after = [y[:, :8] for y in run_model(m, calib, "y")]
    assert all(np.array_equal(a, r) for a, r in zip(after, relu_x, strict=True))  # float path untouched
    # it was quantized before
    assert not all(np.array_equal(b, r) for b, r in zip(before, relu_x, strict=True))


def test_node_macs_and_order_config(skip_model):
    from engines.errors import InputError
    from optimizer.quantize.int8 import node_macs

    src, _ = skip_model
    macs = node_macs(onnx.load(str(src)))
    # per sample: C_out*H*W outputs, each C_in*kH*kW MACs
    assert macs == {"conv_a": 8 * 8 * 8 * (8 * 3 * 3), "conv_b": 8 * 8 * 8 * 8}
    with pytest.raises(InputError, match="order"):
        Int8Config(order="fastest")
