"""Stable Diffusion 2.x pipelines end to end, on tiny SD2-shaped folders (tests/t2i_tiny.py, sd2=True):
an OpenCLIP-shaped CLIPTextModel (gelu, odd depth, wider than the UNet's blocks), a UNet with linear
projections, a per-block head count list and upcast attention, the tokenizer's "!" padding, and the
scheduler configs as shipped (v_prediction for the 768-v models, epsilon for the 512 base models).

The runtime on the exported graphs gives diffusers' StableDiffusionPipeline images from the same
prompts and latents; dd-compile compiles the folder with every check passing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.t2i_tiny import make_tiny_pipeline

PROMPTS = ["a red seven", "Green  SEVEN, green!"]
STEPS = 8  # Euler/DPM linspace timesteps 999 * k / 7: fractional, as most step counts give


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from optimizer.metrics import psnr_db

    return psnr_db(a.astype(np.float64), b.astype(np.float64), data_range=255.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sd2")


def _pipeline(root: Path, scheduler: str, prediction: str = "v_prediction") -> Path:
    path = root / f"{scheduler}-{prediction}"
    if not path.exists():  # the same seed: the same weights for every scheduler
        make_tiny_pipeline(path, sd2=True, scheduler=scheduler, prediction_type=prediction)
    return path


def _diffusers_images(pipe, prompts, latents, **kw) -> np.ndarray:
    import torch

    pipe.set_progress_bar_config(disable=True)
    img = pipe(prompts, latents=torch.from_numpy(latents), output_type="np", **kw).images
    return (img * 255).round().astype(np.uint8)


def test_sd2_folder_loads_with_its_shapes(root):
    """The loader takes SD 2.x's configs as they are, and the IO specs follow them (1024 -> 48 here)."""
    from optimizer.t2i.load import load_pipeline

    src = _pipeline(root, "DDIMScheduler")
    unet_cfg = json.loads((src / "unet" / "config.json").read_text())
    assert unet_cfg["use_linear_projection"] and unet_cfg["upcast_attention"]
    assert unet_cfg["attention_head_dim"] == [2, 4] and unet_cfg["cross_attention_dim"] == 48
    te_cfg = json.loads((src / "text_encoder" / "config.json").read_text())
    assert te_cfg["hidden_act"] == "gelu" and te_cfg["hidden_size"] == 48
    assert json.loads((src / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    sched = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and "timestep_spacing" not in sched

    loaded = load_pipeline(src)
    spec = loaded.spec
    assert spec.default_size == (24, 24) and spec.guidance == "cfg" and spec.tokenizer.pad_token == "!"
    te = spec.component("text_encoder").io
    unet = spec.component("unet").io
    assert te.outputs[0].shape == ("batch", "tokens", 48)
    assert {t.name: t.shape for t in unet.inputs}["encoder_hidden_states"] == ("batch", "tokens", 48)
    assert loaded.unet.config.upcast_attention and loaded.unet.config.use_linear_projection


@pytest.mark.parametrize(
    "scheduler,prediction",
    [
        ("DDIMScheduler", "v_prediction"),  # stable-diffusion-2-1 as shipped
        ("EulerDiscreteScheduler", "v_prediction"),  # stable-diffusion-2 as shipped
        ("DPMSolverMultistepScheduler", "v_prediction"),
        ("PNDMScheduler", "epsilon"),  # the 512 base models
    ],
    ids=["ddim-v", "euler-v", "dpm-v", "pndm-eps"],
)
def test_sd2_runtime_matches_diffusers(root, tmp_path, scheduler, prediction):
    """engines.t2i on export_pipeline(load_pipeline(src)) vs diffusers' StableDiffusionPipeline from
    the same prompts and latents (CFG 7.5, 8 steps): >= 40 dB; and the prediction type is what gives
    the image (the same run read as the other prediction type is far from it)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline

    src = _pipeline(root, scheduler, prediction)
    out = export_pipeline(load_pipeline(src), tmp_path / "out")
    ref = StableDiffusionPipeline.from_pretrained(src).to("cpu")
    assert type(ref.scheduler).__name__ == scheduler and ref.scheduler.config.prediction_type == prediction
    lat = np.random.default_rng(0).standard_normal((2, 4, 12, 12), dtype=np.float32)
    kw = dict(latents=lat, guidance_scale=7.5, num_inference_steps=STEPS)
    with TextToImagePipeline(out) as pipe:
        # SD 2.x pads with "!" (id 0), not <|endoftext|>: the ids the text encoder sees are diffusers'
        want_ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(pipe.tokenize(PROMPTS), np.array(want_ids))
        ours = pipe(PROMPTS, **kw)
    want = _diffusers_images(ref, PROMPTS, **kw)
    assert ours.dtype == np.uint8 and ours.shape == want.shape == (2, 24, 24, 3)
    assert ours.std() > 10 and np.mean((ours == 0) | (ours == 255)) < 0.5  # a non-degenerate image
    parity = psnr(ours, want)
    other = "epsilon" if prediction == "v_prediction" else "v_prediction"
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config, prediction_type=other)
    wrong = psnr(ours, _diffusers_images(ref, PROMPTS, **kw))
    print(f"\n{scheduler} {prediction}: PSNR vs diffusers {parity:.1f} dB (read as {other}: {wrong:.1f} dB)")
    assert parity >= 40.0, parity
    assert wrong < 30.0, wrong


@pytest.mark.slow
def test_sd2_fp16_attention_overflow_kept_fp32(root, tmp_path):
    """What upcast_attention is for: SD 2.1's attention scores overflow fp16. diffusers' SDPA processor
    (what export traces) ignores the flag, so the exported fp16 UNet must find it by measurement:
    with one self-attention's q and k scaled by 1e3 (scores ~1e6 > 65504), naive fp16 gives NaN, and
    dd-compile's fp16 keeps that attention's QK^T MatMul and Softmax in fp32, finite, near fp32."""
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from optimizer.bars import ParityBars
    from optimizer.metrics import rel_l2
    from optimizer.quantize.onnx_graph import run_model, toposort
    from optimizer.t2i.components import dummy_inputs
    from optimizer.t2i.export import export_component
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.precision import quantize_component

    loaded = load_pipeline(_pipeline(root, "DDIMScheduler"))
    attn = loaded.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():
        attn.to_q.weight.mul_(1e3)
        attn.to_k.weight.mul_(1e3)
    comp = loaded.spec.component("unet")
    src = export_component("unet", loaded.unet, comp.io, comp.config, tmp_path / "unet.fp32.onnx")
    calib = [dummy_inputs(comp.io, np.random.default_rng(i), "min") for i in range(2)]
    ref = run_model(src, calib, "out_sample")
    assert all(np.isfinite(r).all() for r in ref)

    def fp16_run(model, feeds=calib):  # every fp16 op computed in fp16, as a GPU does (ORT CPU upcasts)
        ev = ReferenceEvaluator(model)
        return [ev.run(["out_sample"], f)[0] for f in feeds]

    naive = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    toposort(naive)
    with np.errstate(all="ignore"):
        assert not np.isfinite(fp16_run(naive, calib[:1])[0]).all(), "naive fp16 should overflow"
    g = quantize_component("unet", "fp16", src, tmp_path / "unet.fp16.onnx", calib, ParityBars())
    print(f"\nplanted SD2 attention: {g.why}")
    assert g.info["passed"], g.why
    islands = {(k["op_type"], k["module"]) for k in g.info["kept_float"] if k["reason"] == "range"}
    where = "model.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert islands == {("MatMul", where), ("Softmax", where)}, islands
    got = fp16_run(str(g.path))
    assert all(np.isfinite(o).all() for o in got)
    err = rel_l2(np.concatenate(got), np.concatenate(ref))
    print(f"fp16 UNet (fp16 compute) rel. L2 vs fp32: {err:.2e}")
    assert err <= 1e-2, err


def _cli(args):
    from optimizer.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_compile_sd2_end_to_end(root, tmp_path):
    """dd-compile on an SD 2.1-shaped folder (DDIM, v_prediction, as shipped) at 4 steps vs itself at
    its 50 reference steps: every check passes; upcast attention and linear projections survive
    export (fp32 call parity <= 1e-5, the graph's projections are MatMuls); engines.load samples."""
    import onnx
    import torch

    import engines
    from engines.errors import InputError
    from optimizer.t2i.load import load_component

    src = _pipeline(root, "DDIMScheduler")
    out = tmp_path / "out"
    args = ["--steps", "4", "-o", out, "--precision", "fp32,fp16", "--threads", "1"]
    args += ["--bench-seconds", "0.5", "--samples", "4", "--fid-samples", "8", "--threads-grid", "0"]
    res = _cli([src, *args])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] is True, rep
    cp = rep["call_parity"]
    assert {f"{k}.{p}" for k in ("text_encoder", "unet", "vae_decoder") for p in ("fp32", "fp16")} <= set(cp)
    assert all(c["passed"] for c in cp.values()), cp
    print("\nSD2 call parity (rel. L2):", ", ".join(f"{k} {c['rel_l2']:.1e}" for k, c in cp.items()))
    for k in ("text_encoder", "unet", "vae_decoder"):
        assert cp[f"{k}.fp32"]["rel_l2"] <= 1e-5, (k, cp[f"{k}.fp32"])
    psnr_mix = {v["mix"]: float(v["sample_parity"]["psnr_db"]) for v in rep["variants"]}
    print(f"SD2 sample parity vs the torch pipeline (dB): {psnr_mix}")
    assert psnr_mix["fp32"] >= 40 and psnr_mix["fp16"] >= 30, psnr_mix
    # use_linear_projection: proj_in/proj_out are Linear, so the graph has exactly the UNet's Conv2d
    unet = load_component("unet", src / "unet")
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    blocks = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
    assert len(blocks) == 4  # down 1, mid 1, up 2 (layers_per_block + 1)
    assert all(isinstance(b.proj_in, torch.nn.Linear) for b in blocks)
    (run,) = (out / "runs").iterdir()
    graph = onnx.load(str(run / "onnx" / "unet.fp32.onnx"), load_external_data=False)
    assert sum(n.op_type == "Conv" for n in graph.graph.node) == n_conv
    t2i = json.loads((run / "t2i.json").read_text())
    assert t2i["scheduler"]["kind"] == "ddim" and t2i["tokenizer"]["pad_token"] == "!"
    sched = json.loads((run / t2i["scheduler"]["config"]).read_text())
    assert sched["prediction_type"] == "v_prediction"
    with engines.load(out) as pipe:
        assert type(pipe).__name__ == "TextToImagePipeline"
        img = pipe(["a red seven"], seeds=[0])
        assert img.dtype == np.uint8 and img.shape == (1, 24, 24, 3) and img.std() > 10
        np.testing.assert_array_equal(img, pipe(["a red seven"], seeds=[0]))
    with engines.load(out, precision="fp16") as p16:
        assert psnr(p16(["a red seven"], seeds=[0]), img) >= 30
    with pytest.raises(InputError, match="no text-to-image pipeline 'int8'"):
        engines.load(out, precision="int8")
