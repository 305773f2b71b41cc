"""--bar reaches the quantizers: FP16/INT8 search targets are derived from the parity bars."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from optimizer.bars import ParityBars
from optimizer.cli import parse_bars
from optimizer.compile.stages import CompileConfig
from optimizer.metrics import psnr_db
from optimizer.quantize import Fp16Config, Int8Config, quantize_int8
from optimizer.quantize.onnx_graph import run_model
from tests.test_quantize import OUT, _calib, tiny_unet  # noqa: F401 (module-scoped fixture)


def test_defaults_are_the_targets_of_the_default_bars():
    # targets left unset come from the bars; the default bars give the long-standing 4e-2 / 25 dB
    assert Int8Config().target_call_rel_l2 is None
    assert Int8Config().resolve() == Int8Config.from_bars(ParityBars())
    assert Int8Config().resolve().target_call_rel_l2 == 4e-2 and Int8Config().resolve().min_psnr_db == 25.0
    assert Fp16Config() == Fp16Config.from_bars(ParityBars())
    assert Fp16Config().target_rel_l2 == 5e-3


def test_bar_flags_tighten_the_search_targets(tmp_path):
    bars = parse_bars(("sample.int8=30", "call.int8=2e-2", "call.fp16=4e-3"))
    q8 = Int8Config.from_bars(bars, calibration="percentile")
    assert q8.min_psnr_db == 30.0  # was 25 dB whatever --bar said
    assert q8.target_call_rel_l2 == pytest.approx(1.6e-2)  # bar / 1.25
    assert q8.calibration == "percentile"  # other fields pass through
    assert Fp16Config.from_bars(bars).target_rel_l2 == pytest.approx(2e-3)  # bar / 2
    # explicit margins, and explicit targets are the caller's
    assert Int8Config().resolve(bars, call_headroom=1.0, psnr_margin_db=1.5).min_psnr_db == 31.5
    assert Int8Config(min_psnr_db=20.0).resolve(bars).min_psnr_db == 20.0
    # what dd-compile does: the CLI's Int8Config (no targets) resolved against the parsed --bar
    cfg = CompileConfig(out=tmp_path, bars=bars, int8=Int8Config(calibration="entropy", placement="fixed"))
    resolved = cfg.int8_config().resolve(cfg.bars)
    assert resolved.min_psnr_db == 30.0 and resolved.calibration == "entropy"
    assert CompileConfig(out=tmp_path, bars=bars).int8_config().resolve(bars).min_psnr_db == 30.0


@pytest.mark.slow
def test_tighter_sample_bar_selects_fewer_int8_nodes(tiny_unet, tmp_path):  # noqa: F811
    """The search keeps the bar it is given: a bar the loose selection misses is met by a smaller one."""
    path, spec = tiny_unet
    calib = _calib(path, spec, (1, 8, 8), seeds=[0, 1], batch=2)
    ref = np.concatenate(run_model(path, calib, OUT))

    def check(p):  # a real measurement: PSNR of the candidate's outputs vs FP32 on the calibration set
        return psnr_db(np.concatenate(run_model(p, calib, OUT)), ref)

    fast = {"sensitivity": "none", "placement": "fixed"}
    loose = quantize_int8(
        path, tmp_path / "loose.onnx", calib, Int8Config.from_bars(ParityBars(), **fast), parity_check=check
    )
    got = loose.calibration["sample_psnr_db"]
    assert loose.passed and loose.counts["int8"] > 0 and got >= 25.0
    bar = got + 0.5  # the loose selection fails this bar by construction
    bars = parse_bars((f"sample.int8={bar}",))
    tight = quantize_int8(
        path, tmp_path / "tight.onnx", calib, Int8Config.from_bars(bars, **fast), parity_check=check
    )
    assert tight.config["min_psnr_db"] == bar
    assert tight.counts["int8"] < loose.counts["int8"]
    assert all(h["psnr_db"] >= bar for h in tight.history if h["passed"] and h["quantized"] > 0)
    if tight.counts["int8"] > 0:
        assert tight.passed and check(tight.path) >= bar
