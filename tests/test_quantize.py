"""Precision stage: FP16 islands from measured ranges, INT8 symmetric Q/DQ chosen by sensitivity.

Real diffusers classes, real ONNX Runtime, tiny models (seconds each)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from engines.errors import InputError
from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.schedule import SamplingSchedule, trailing_timesteps
from optimizer.compile.export import export_onnx
from optimizer.metrics import rel_l2
from optimizer.model_io import io_spec_for
from optimizer.models import Denoiser
from optimizer.quantize import (
    Fp16Config,
    Int8Config,
    calibration_feeds,
    quantize_fp16,
    quantize_int8,
)
from optimizer.quantize.int8 import unfused_nodes
from optimizer.quantize.onnx_graph import run_model, toposort

torch.set_num_threads(1)
OUT = "out_sample"


def _schedule(steps: int = 2) -> SamplingSchedule:
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    return SamplingSchedule.from_alphas(
        sch.alphas_cumprod.numpy(),
        trailing_timesteps(1000, steps),
        kind="ddim",
        prediction_type="v_prediction",
    )


def _calib(path: Path, spec, shape, seeds=(0, 1, 2, 3), batch=2, steps=2):
    with OnnxRuntimeRunner(path, spec) as r:
        return calibration_feeds(r, spec, _schedule(steps), shape, list(seeds), batch)


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    m = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()
    spec = io_spec_for("UNet2DModel", dict(m.config))
    path = tmp_path_factory.mktemp("unet") / "student.fp32.onnx"
    export_onnx(Denoiser(m), spec, path)
    return path, spec


class PlantedOverflow(torch.nn.Module):
    """One block whose activations reach ~1e6 (> fp16's 65504), scaled back down afterwards."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.hot = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, sample, timestep):
        h = torch.nn.functional.silu(self.conv_in(sample)) + timestep[:, None, None, None] / 1000
        big = self.hot(h * 1e6)  # the overflowing block
        h = h + big * 1e-6  # back in range, but only if `big` was representable
        return self.conv_out(h)


def test_calibration_feeds_follow_the_trajectory(tiny_unet):
    path, spec = tiny_unet
    feeds = _calib(path, spec, (1, 8, 8), seeds=[0, 1, 2], batch=2, steps=2)
    assert len(feeds) == 2 * 2  # ceil(3 seeds / 2) batches x 2 timesteps
    assert sorted({float(f["timestep"][0]) for f in feeds}) == [499.0, 999.0]
    # The second step's input is the sampler's own intermediate, not fresh noise.
    assert not np.allclose(feeds[0]["sample"], feeds[1]["sample"])
    assert feeds[2]["sample"].shape[0] == 1


def test_fp16_pass_on_a_graph_saved_with_external_weights(tmp_path, monkeypatch):
    """The fp16 pass runs its ModelProto many times; past EXTERNAL_OVER (1 GB: a 2-layer T5-XXL of
    2.07 GB) each run saves it with the weights beside it, which moves them out of the proto. They
    are read back before the temp folder goes, so every later run (and the conversion) still has
    them: here every graph counts as big."""
    import optimizer.quantize.onnx_graph as og

    torch.manual_seed(0)
    spec = io_spec_for("UNet2DModel", {"sample_size": 8, "in_channels": 1, "out_channels": 1})
    src = export_onnx(PlantedOverflow(), spec, tmp_path / "m.fp32.onnx")
    calib = _calib(src, spec, (1, 8, 8))
    ref = run_model(src, calib, OUT)
    monkeypatch.setattr(og, "EXTERNAL_OVER", 0)
    model = onnx.load(str(src))
    first, second = run_model(model, calib, OUT), run_model(model, calib, OUT)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(first, ref, strict=True))
    res = quantize_fp16(src, tmp_path / "m.fp16.onnx", calib, Fp16Config())
    assert res.passed and res.call_rel_l2 <= 1e-2


def test_fp16_planted_overflow_naive_fails_islands_pass(tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    torch.manual_seed(0)
    spec = io_spec_for("UNet2DModel", {"sample_size": 8, "in_channels": 1, "out_channels": 1})
    src = export_onnx(PlantedOverflow(), spec, tmp_path / "m.fp32.onnx")
    calib = _calib(src, spec, (1, 8, 8))
    ref = run_model(src, calib, OUT)

    # ORT's CPU provider runs fp16 math in fp32 between Casts, hiding overflow that a GPU (TensorRT,
    # CUDA) shows; onnx's reference evaluator computes every fp16 op in fp16, as a GPU does.
    def fp16_run(model):
        ev = ReferenceEvaluator(model)
        return [ev.run([OUT], f)[0] for f in calib]

    naive = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    toposort(naive)
    assert not all(np.isfinite(o).all() for o in fp16_run(naive)), "naive fp16 should overflow"

    res = quantize_fp16(src, tmp_path / "m.fp16.onnx", calib, Fp16Config())
    for got in (fp16_run(onnx.load(str(res.path))), run_model(res.path, calib, OUT)):
        assert all(np.isfinite(o).all() for o in got)
        assert rel_l2(np.concatenate(got), np.concatenate(ref)) <= 1e-2
    assert res.passed and res.call_rel_l2 <= 1e-2
    reasons = {k.reason for k in res.kept_float}
    assert "range" in reasons
    assert any(k.module.startswith("hot") or "hot" in k.module for k in res.kept_float), res.kept_float
    # Most of the graph is still fp16.
    assert res.counts["fp16"] > 0
    m = onnx.load(str(res.path))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [onnx.TensorProto.FLOAT] * 2


def test_fp16_unet_within_bar(tiny_unet, tmp_path):
    path, spec = tiny_unet
    calib = _calib(path, spec, (1, 8, 8))
    res = quantize_fp16(path, tmp_path / "s.fp16.onnx", calib, Fp16Config())
    assert res.passed, res.history
    assert res.call_rel_l2 <= 1e-2
    d = res.to_dict()
    assert d["calibration"]["timesteps"] == [499.0, 999.0]
    onnx.checker.check_model(str(res.path))


def test_int8_symmetric_qdq_within_bar(tiny_unet, tmp_path, monkeypatch):
    path, spec = tiny_unet
    calib = _calib(path, spec, (1, 8, 8))
    # Relative paths, as `dd-compile -o out/` passes them (pre-processing runs in a temp dir).
    monkeypatch.chdir(path.parent)
    rel_out = Path(os.path.relpath(tmp_path / "s.int8.onnx"))
    res = quantize_int8(Path(path.name), rel_out, calib, Int8Config(sensitivity_feeds=2))
    m = onnx.load(str(res.path))
    inits = {i.name: i for i in m.graph.initializer}
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert res.counts["int8"] > 0 and qdq
    for n in qdq:  # zero point 0 and int8 everywhere (TensorRT explicit quantization)
        zp = numpy_helper.to_array(inits[n.input[2]])
        assert zp.dtype in (np.int8, np.int32) and not zp.any()
    # Weights per output channel: some DQ has a 1-D scale.
    assert any(
        numpy_helper.to_array(inits[n.input[1]]).ndim == 1
        for n in qdq
        if n.op_type == "DequantizeLinear" and n.input[1] in inits
    )
    got = run_model(res.path, calib, OUT)
    ref = run_model(path, calib, OUT)
    assert rel_l2(np.concatenate(got), np.concatenate(ref)) <= 5e-2
    assert res.passed
    # Every node left in float says why, with its module path.
    assert all(k.reason and k.module for k in res.kept_float)
    assert {k.reason for k in res.kept_float} <= {"activation-input", "no-int8-kernel", "sensitivity"}


def test_int8_parity_check_vetoes(tiny_unet, tmp_path):
    path, spec = tiny_unet
    calib = _calib(path, spec, (1, 8, 8), seeds=[0, 1], batch=2)
    seen = []

    def never(p):  # a sample-level check that nothing passes: the stage must fall back to float
        seen.append(p)
        return 0.0

    res = quantize_int8(
        path, tmp_path / "s.int8.onnx", calib, Int8Config(sensitivity="none"), parity_check=never
    )
    assert seen and not res.passed and res.counts["int8"] == 0
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(res.path)).graph.node)


@pytest.mark.slow
def test_condition_unet_fp16_and_int8(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    spec = io_spec_for("UNet2DConditionModel", dict(m.config), seq_len=4)
    path = export_onnx(Denoiser(m), spec, tmp_path / "c.fp32.onnx")
    calib = _calib(path, spec, (4, 8, 8), seeds=[0, 1], batch=2)
    assert all("encoder_hidden_states" in f for f in calib)
    r16 = quantize_fp16(path, tmp_path / "c.fp16.onnx", calib, Fp16Config())
    assert r16.passed and r16.call_rel_l2 <= 1e-2
    r8 = quantize_int8(path, tmp_path / "c.int8.onnx", calib, Int8Config(sensitivity_feeds=1))
    assert r8.passed and r8.call_rel_l2 <= 5e-2 and r8.counts["int8"] > 0


def test_bad_input(tmp_path):
    with pytest.raises(InputError, match="not found"):
        quantize_fp16(tmp_path / "missing.onnx", tmp_path / "o.onnx", [{}], Fp16Config())
    with pytest.raises(InputError, match="calibration"):
        Int8Config(calibration="kl")
    assert not (tmp_path / "o.onnx").exists()


def test_fp16_keeps_large_phase_sin_cos_in_fp32(tmp_path):
    """sin(t * f) for t up to 999: fp16 rounds t*f to 0.5, a phase error no range check sees."""
    import onnx
    from onnx import TensorProto, helper

    freq = np.linspace(0.05, 1.0, 16, dtype=np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["timestep", "axes"], ["t1"], name="unsq"),
            helper.make_node("Mul", ["t1", "freq"], ["arg"], name="mul"),
            helper.make_node("Sin", ["arg"], ["s"], name="sin"),
            helper.make_node("Cos", ["arg"], ["c"], name="cos"),
            helper.make_node("Concat", ["s", "c"], ["out_sample"], name="cat", axis=1),
        ],
        "phase",
        [helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 32])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("freq", TensorProto.FLOAT, [1, 16], freq),
        ],
    )
    src = tmp_path / "phase.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), src)
    calib = [{"timestep": np.array([999.0, 749.0, 499.0, 249.0], np.float32)}]
    ours = quantize_fp16(src, tmp_path / "ours.onnx", calib, Fp16Config())
    naive = quantize_fp16(
        src, tmp_path / "naive.onnx", calib, Fp16Config(max_phase_error=float("inf"), max_rounds=0)
    )
    assert {k.name for k in ours.kept_float if k.reason == "phase"} >= {"sin", "cos", "mul"}
    assert naive.call_rel_l2 > 1e-2 and ours.call_rel_l2 < 1e-3


@pytest.mark.slow
def test_int8_placement_is_measured_and_reported(tiny_unet, tmp_path):
    """Both Q/DQ placements are built for the selected nodes; the kept one passes the bars, and
    nodes a shared placement leaves unfused are reported in float, never counted as int8."""
    path, spec = tiny_unet
    calib = _calib(path, spec, (1, 8, 8))
    res = quantize_int8(
        path, tmp_path / "p.int8.onnx", calib, Int8Config(sensitivity_feeds=2, placement_repeats=5)
    )
    pl = res.placement
    assert set(pl["placements"]) == {"isolated", "shared"} and pl["chosen"] in pl["placements"]
    if pl["placements"]["shared"]["passed"]:
        assert all(v > 0 for v in pl["median_ms"].values()) and pl["batch"] == 2
    assert res.passed and res.call_rel_l2 <= 4e-2
    unfused = set(pl.get("unfused", []))
    assert unfused <= {k.name for k in res.kept_float if k.reason == "no-int8-kernel"}
    # What ORT runs in float in the kept graph is exactly what the report says.
    assert set(unfused_nodes(res.path, _int8_nodes(res.path))) == unfused
    assert res.counts["int8"] == len(_int8_nodes(res.path)) - len(unfused)


def _int8_nodes(path):
    """Names of the Conv/MatMul/Gemm nodes fed by a DequantizeLinear of a weight."""
    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    return [
        n.name
        for n in m.graph.node
        if n.op_type in ("Conv", "MatMul", "Gemm")
        and len(n.input) > 1
        and n.input[1] in prod
        and prod[n.input[1]].op_type == "DequantizeLinear"
    ]


def test_int8_subset_cut_equals_quantize_static(tiny_unet, tmp_path):
    """The sensitivity pass cuts single-node graphs out of one quantized graph: same graph
    function as running quantize_static on that subset (isolated placement), for any subset."""
    from optimizer.quantize.int8 import QdqQuantizer

    path, spec = tiny_unet
    calib = _calib(path, spec, (1, 8, 8), seeds=[0, 1], batch=2)
    qz = QdqQuantizer(path, tmp_path, calib, Int8Config())
    universe = [n.name for n in qz.candidates()[0]]
    assert len(universe) > 6
    rng = np.random.default_rng(0)
    subsets = [
        [universe[0]],
        [universe[-1]],
        [universe[i] for i in sorted(rng.choice(len(universe), 5, replace=False))],
    ]
    for nodes in subsets:
        cut, ref = qz.subset(nodes, universe), qz.quantize(nodes, isolate=True)
        a, b = run_model(cut, calib, OUT), run_model(ref, calib, OUT)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), nodes
        m = onnx.load(str(cut))
        onnx.checker.check_model(m)
        # Only the subset keeps int8 weights: every other node reads its float weight again.
        dq_w = {
            n.output[0]
            for n in m.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in {i.name for i in m.graph.initializer}
        }
        with_int8_w = {n.name for n in m.graph.node if any(i in dq_w for i in n.input)}
        assert with_int8_w == set(nodes)
    # The float graph is reachable too (a cut with no node).
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(qz.subset([], universe))).graph.node)
