"""Text-to-image pipelines on OpenVINO: static compiles per input shape for every component, and the
bf16 mix (every component's fp32 graph under OpenVINO's bf16 hint): validated by dd-compile with
--backend openvino, refused in one line wherever it would run in fp32 unsaid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines.errors import InputError

pytest.importorskip("openvino", reason="openvino not installed: pip install 'dd-compile[openvino]'")
from engines.openvino_runner import cpu_capabilities  # noqa: E402

HAS_BF16 = "BF16" in cpu_capabilities()
needs_bf16 = pytest.mark.skipif(
    not HAS_BF16, reason="this CPU's OpenVINO reports no BF16 (bf16 needs AVX512-BF16 or AMX)"
)


def _as_bf16(folder: Path, dest: Path) -> Path:
    """A copy of an exported pipeline whose description runs every component at bf16."""
    shutil.copytree(folder, dest)
    d = json.loads((dest / "t2i.json").read_text())
    for c in d["components"].values():
        c["precision"] = "bf16"
    (dest / "t2i.json").write_text(json.dumps(d))
    return dest


def test_bf16_components_run_on_openvino_only(t2i_folder, tmp_path):
    from engines.t2i import TextToImagePipeline, component_runner

    folder = _as_bf16(t2i_folder, tmp_path / "bf16")
    for backend in ("onnxruntime", "onnxruntime-cuda"):
        with pytest.raises(InputError) as e:
            TextToImagePipeline(folder, backend=backend)
        assert str(e.value) == (
            "text_encoder: precision bf16 is the fp32 graph under OpenVINO's bf16 inference hint: "
            f"it runs with backend 'openvino', not {backend!r}"
        )
    unet = folder / "onnx" / "unet.fp32.onnx"
    spec = TextToImagePipeline(folder, backend="openvino").specs["unet"]
    with pytest.raises(InputError, match="not 'tensorrt'"):
        component_runner("tensorrt")("unet", unet, spec, precision="bf16")
    # the precision comes from the description, not from the name (nothing is activated here)
    ov = TextToImagePipeline(folder, backend="openvino")
    assert {r.precision_hint for r in ov.runners.values()} == {"bf16"}
    assert all(r.static for r in ov.runners.values())
    plain = TextToImagePipeline(t2i_folder, backend="openvino")
    assert {r.precision_hint for r in plain.runners.values()} == {"f32"}


def test_static_compiles_follow_the_cfg_batch_and_the_size(t2i_folder):
    """The UNet under CFG runs at 2B and at each latent size of the profile: each is a static compile
    of its own, and the images are ONNX Runtime's."""
    from engines.t2i import TextToImagePipeline

    with (
        TextToImagePipeline(t2i_folder, threads=1) as ort,
        TextToImagePipeline(t2i_folder, backend="openvino", threads=1) as ov,
    ):
        for size in (16, 32):  # latents 8x8 and 16x16 (the profile: 8..16)
            kw = dict(seeds=[0], height=size, width=size, num_inference_steps=2, guidance_scale=2.0)
            want, got = ort(["a red seven"], **kw), ov(["a red seven"], **kw)
            assert got.shape == want.shape == (1, size, size, 3)
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, size
        unet = [dict(s)["sample"] for s in ov.runners["unet"].compiled_signatures]
    assert unet == [(2, 4, 8, 8), (2, 4, 16, 16)]  # CFG: the UNet's batch is 2B


def test_bf16_refused_on_cpus_without_it_before_any_work(tmp_path, monkeypatch):
    import engines.openvino_runner as ovr
    from optimizer.cli import main
    from tests.t2i_tiny import make_tiny_pipeline

    monkeypatch.setattr(ovr, "cpu_capabilities", lambda: {"FP32", "INT8"})
    src = make_tiny_pipeline(tmp_path / "sd")
    out = tmp_path / "out"
    args = [str(src), "--steps", "2", "-o", str(out), "--backend", "openvino", "--precision", "fp32,bf16"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "bf16 needs a CPU with AVX512-BF16 or AMX" in lines[0], res.output
    assert not out.exists()


def test_bf16_sample_bar_is_the_pipelines_own():
    from optimizer.families import FAMILIES
    from optimizer.t2i.validate import default_bars

    for name in ("sd", "sdxl", "sd3", "flux"):
        fam = FAMILIES[name]
        assert "bf16" in fam.precisions and set(fam.mixes["bf16"].values()) == {"bf16"}
        assert set(fam.mixes["bf16"]) == set(fam.mixes["fp32"])  # every component, T5 included
    assert default_bars().sample_psnr_db["bf16"] == FAMILIES["sd"].sample_psnr_db["bf16"]


@pytest.mark.slow
@needs_bf16
def test_compile_tiny_pipeline_fp32_and_bf16_on_openvino(tmp_path):
    """dd-compile --backend openvino --precision fp32,bf16 on a tiny SD pipeline: both mixes pass,
    the bf16 one is the fp32 graphs under the hint (really bf16: not fp32's call error), the
    runtime serves it on OpenVINO and refuses it elsewhere."""
    import engines
    from optimizer.cli import main
    from tests.t2i_tiny import make_tiny_pipeline

    src = make_tiny_pipeline(tmp_path / "sd")
    out = tmp_path / "out"
    args = [str(src), "--steps", "2", "-o", str(out), "--backend", "openvino", "--precision", "fp32,bf16"]
    args += ["--threads", "1", "--bench-seconds", "0.5", "--samples", "4", "--fid-samples", "8"]
    args += ["--batch-sizes", "1,2", "--threads-grid", "1"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    rep = json.loads((out / "report.json").read_text())
    assert res.exit_code == 0, (res.output, rep.get("failures"))
    by = {v["mix"]: v for v in rep["variants"]}
    assert set(by) == {"fp32", "bf16"} and all(
        v["passed"] and v["backend"] == "openvino" for v in by.values()
    )
    comps = by["bf16"]["components"]
    assert {c["precision"] for c in comps.values()} == {"bf16"}
    assert all(c["path"].endswith(".fp32.onnx") for c in comps.values())  # nothing quantized
    calls = rep["call_parity"]
    for k in comps:
        assert calls[f"{k}.fp32"]["rel_l2"] <= 1e-5
        assert 1e-5 < calls[f"{k}.bf16"]["rel_l2"] <= calls[f"{k}.bf16"]["bar"], k
    assert not list(out.glob("runs/*/onnx/*.bf16.onnx"))
    desc = json.loads(next(out.glob("runs/*/t2i.bf16.json")).read_text())
    assert {c["precision"] for c in desc["components"].values()} == {"bf16"}
    with engines.load(out, precision="bf16", backend="openvino", threads=1) as pipe:
        assert {r.precision_hint for r in pipe.runners.values()} == {"bf16"}
        img = pipe(["a red seven"], seeds=[0])
    assert img.dtype == np.uint8 and img.shape == (1, 16, 16, 3)
    with engines.load(out, precision="fp32", backend="openvino", threads=1) as pipe:
        assert {r.precision_hint for r in pipe.runners.values()} == {"f32"}
    with pytest.raises(InputError, match="validated on openvino, not on onnxruntime"):
        engines.load(out, precision="bf16", backend="onnxruntime")
    _openvino_layout(out, tmp_path)
    # dd-bench, even told to run unvalidated rows: the bf16 mix is a skipped row off OpenVINO
    from optimizer.bench.measure import BenchConfig
    from optimizer.bench.pipeline import setup

    cfg = BenchConfig(
        batch_sizes=(1,), threads=1, backends=("onnxruntime", "openvino"), teacher=False, peak_seconds=0.1
    )
    s = setup(out, cfg, allow_unvalidated=True)
    try:
        skipped = {v.name: why for v, why in s.skipped}
        assert "openvino only" in skipped["onnxruntime/bf16"], skipped
        assert {"openvino/bf16", "openvino/fp32", "onnxruntime/fp32"} <= {v.name for v in s.variants}
    finally:
        for r in s.runners.values():
            r.deactivate()


def _openvino_layout(out: Path, tmp_path: Path) -> None:
    """dd-layout --layout openvino of the validated bf16 mix: IR per component (the UNet's timestep
    int64, as genai feeds it), the tokenizer converted for genai, the hint the validation held
    under recorded; with the peers' venv, openvino.genai's Text2ImagePipeline reproduces the
    runtime's bf16 images on OpenVINO (its own scheduler code: within 30 dB here)."""
    import openvino as ov

    from engines.layouts import command

    dest = tmp_path / "ov_layout"
    res = CliRunner().invoke(
        command(), [str(out), "-o", str(dest), "--layout", "openvino", "--precision", "bf16"]
    )
    assert res.exit_code == 0, res.output
    rec = json.loads((dest / "dd-compile.json").read_text())
    assert rec["properties"] == {"INFERENCE_PRECISION_HINT": "bf16"} and rec["mix"] == "bf16"
    unet = ov.Core().read_model(str(dest / "unet" / "openvino_model.xml"))
    assert {i.get_any_name(): i.get_element_type() for i in unet.inputs}["timestep"] == ov.Type.i64
    assert (dest / "tokenizer" / "openvino_tokenizer.xml").exists()
    index = json.loads((dest / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and all(
        None not in v for v in index.values() if isinstance(v, list)
    )
    from tests.peer_runtimes import layout_check

    got = layout_check(tmp_path, out, dest, "genai", "bf16", "openvino")
    print("\nopenvino.genai on the bf16 layout vs dd-compile's runtime on OpenVINO:", got["psnr_db"], "dB")
    assert got["reader_warning"] is None and float(got["psnr_db"]) >= 30, got
