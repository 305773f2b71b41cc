"""benchmarks/real_components.py at --scale tiny: the real-size component benchmark's own functions, with
real exports, fp16 conversions and ORT sessions, judged by call parity against torch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "real_components.py"
    spec = importlib.util.spec_from_file_location("real_components", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _check(r: dict, fp16_bar: float) -> None:
    assert r["status"] == "ok"
    p = r["parity_vs_torch"]
    assert p["ort_fp32"]["rel_l2"] < 1e-5, p  # the fp32 call bar (ParityBars)
    assert p["ort_fp16"]["rel_l2"] < fp16_bar, p
    assert p["ort_fp16"]["finite"]
    for k in ("torch_fp32", "ort_fp32", "ort_fp16"):
        assert r["timing_ms"][k]["n"] == 1 and r["timing_ms"][k]["median_ms"] > 0
    assert r["speedup_vs_torch"]["ort_fp32"] > 0


def test_tiny_te_external_data(bench, tmp_path, monkeypatch):
    """The TE exported as if it were over 2 GB (external data, fp16 from the file): it loads in ORT
    and matches torch; the t2i flow's own fp16 pass runs on the same external-data graph."""
    import optimizer.compile.export as ce
    from optimizer.quantize.onnx_graph import run_model

    cfg = bench.BenchConfig(components=("te",), scale="tiny", repeats=1, warmup=0, threads=1)
    with monkeypatch.context() as m:
        m.setattr(ce, "TWO_GB", (64 << 20) + 1)  # every graph counts as > 2 GB
        te = bench.run_component("te", cfg, tmp_path)
    fp32 = tmp_path / "te.fp32.onnx"
    # the graph names its weights file by its final name (not the temp name it was saved under)
    g = onnx.load(str(fp32), load_external_data=False)
    locs = {e.value for t in g.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"te.fp32.onnx.data"}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert te["onnx_fp32"]["external_data"] and te["onnx_fp16"]["external_data"]
    assert te["fp16"]["method"].startswith("file") and "2 GB" in te["fp16"]["why"]
    _check(te, 5e-3)

    feeds = [bench.inputs("te", bench.TE["tiny"], "tiny", s) for s in (1, 2)]
    proj = bench.fp16_project("te", fp32, tmp_path / "te.p16.onnx", feeds)
    assert proj["passed_calibration_target"] and proj["calib_rel_l2"] < 5e-3
    ref = run_model(str(fp32), feeds[:1], "last_hidden_state")[0]
    got = run_model(str(tmp_path / "te.p16.onnx"), feeds[:1], "last_hidden_state")[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 5e-3

    table = bench.markdown({"scale": "tiny", "machine": bench.machine(1), "components": {"te": te}})
    assert table.count("| te (tiny config) |") == 1


@pytest.mark.slow
def test_tiny_lcm_unet_and_vae(bench, tmp_path):
    """The LCM UNet takes timestep_cond (w-embedding at batch 1); its fp16 graph from the file path
    keeps the timestep embedding's Sin/Cos in fp32. The VAE decoder goes through the t2i flow's
    own fp16 pass (auto: its graph fits one protobuf)."""
    cfg = bench.BenchConfig(
        components=("lcm_unet",), scale="tiny", repeats=1, warmup=0, threads=1, fp16="file"
    )
    r = bench.run_component("lcm_unet", cfg, tmp_path / "lcm")
    assert r["inputs"]["timestep_cond"] == [1, bench.LCM_COND["tiny"]]
    assert r["fp16"]["fp32_nodes"] >= 2  # at least the Sin and the Cos
    _check(r, 5e-3)

    cfg = bench.BenchConfig(components=("vae",), scale="tiny", repeats=1, warmup=0, threads=1)
    vae = bench.run_component("vae", cfg, tmp_path / "vae")
    assert not vae["onnx_fp32"]["external_data"]
    assert vae["fp16"]["method"].startswith("project") and vae["fp16"]["passed_calibration_target"]
    assert vae["inputs"]["latent_sample"] == [1, 4, 16, 16]
    _check(vae, 5e-3)


def test_inputs_are_the_pipelines(bench):
    te = bench.inputs("te", bench.TE["tiny"], "tiny", 0)["input_ids"]
    v = bench.TE["tiny"]["vocab_size"]
    assert te.shape == (2, 77) and (te[:, 0] == v - 2).all() and (te[1, 1:] == v - 1).all()
    u = bench.inputs("unet", bench.UNET["tiny"], "tiny", 0)
    assert np.array_equal(u["sample"][0], u["sample"][1])  # the CFG pair of one latent


def test_bad_options_exit_2(bench, capsys):
    with pytest.raises(InputError, match="--components: clip not in"):
        bench.BenchConfig(components=("clip",))
    assert bench.main(["--scale", "huge"]) == 2
    assert capsys.readouterr().err.strip() == "real_components: error: --scale: 'huge' not in full,tiny"


@pytest.mark.parametrize(
    "name,outputs",
    [
        ("sdxl_te2", ["penultimate_hidden_state", "text_embeds"]),
        ("t5xxl", ["last_hidden_state"]),
        ("flux_transformer", ["out_sample"]),
    ],
)
def test_tiny_family_rows(bench, tmp_path, name, outputs):
    """The SDXL, T5 and Flux rows at tiny scale: each exported with its family's IO (SDXL's
    encoder 2 with both outputs, each judged), converted to fp16, and matching torch (the SD3.5
    row's transformer export is test_sd3.py's; 14 s more here bought nothing new)."""
    cfg = bench.BenchConfig(components=(name,), scale="tiny", repeats=1, warmup=0, threads=1)
    r = bench.run_component(name, cfg, tmp_path)
    _check(r, 5e-3)
    assert r["parity_vs_torch"]["ort_fp32"]["outputs"] == outputs
    if name == "flux_transformer":  # FLUX.1-dev: one pass with the guidance input
        assert r["inputs"]["guidance"] == [1] and r["inputs"]["sample"][0] == 1


def test_weights_torch_moved_out_end_beside_the_final_name(bench, tmp_path, monkeypatch):
    """torch's ONNXProgram.save may write the weights as external data below our 2 GB line (a
    2.07 GB T5 did): the export still moves them to `<name>.data` and points the graph there, so
    the pair loads from another folder and no temp-named file is left behind."""
    import shutil

    import onnxruntime as ort
    from torch.onnx import ONNXProgram

    save = ONNXProgram.save
    monkeypatch.setattr(
        ONNXProgram, "save", lambda self, dest, **kw: save(self, dest, **{**kw, "external_data": True})
    )
    module = bench.build("te", "tiny")
    config = bench.model_config("te", module)
    spec = bench.io_spec("te", config, "tiny")
    from optimizer.t2i.export import export_component

    path = tmp_path / "te.fp32.onnx"
    export_component("text_encoder", module, spec, config, path, vocab_size=int(config["vocab_size"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["te.fp32.onnx", "te.fp32.onnx.data"]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for p in (path, path.with_name(path.name + ".data")):
        shutil.copy(p, moved / p.name)
    feeds = bench.inputs("te", config, "tiny", 0)
    sess = ort.InferenceSession(str(moved / path.name), providers=["CPUExecutionProvider"])
    assert sess.run(None, feeds)[0].shape[:2] == (2, 77)
