"""dd-compile on text-to-image pipelines: the flow on a tiny pipeline, bad inputs (one line, exit 2,
nothing written), the VAE's planted fp16 overflow, CLIP score on a tiny random CLIPModel."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines.errors import InputError
from tests.peer_runtimes import layout_check
from tests.t2i_tiny import clip_tokenizer, make_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("t2i_compile")
    return make_tiny_pipeline(d / "sd"), make_tiny_pipeline(d / "lcm", lcm=True, seed=1)


def _cli(args):
    from optimizer.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_exit_2(res, *expect):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    for e in expect:
        assert e in lines[0], lines[0]


def _student_ckpt(tiny, tmp_path, teacher):
    from diffusers import LCMScheduler, UNet2DConditionModel

    from engines.schedule import SamplingSchedule
    from optimizer.t2i.student import save_t2i_student

    _, lcm = tiny
    sched = LCMScheduler.from_pretrained(lcm / "scheduler")
    return save_t2i_student(
        tmp_path / "student.ckpt",
        UNet2DConditionModel.from_pretrained(lcm / "unet", use_safetensors=True),
        teacher,
        scheduler_class="LCMScheduler",
        scheduler_config=dict(sched.config),
        schedule=SamplingSchedule.from_alphas(
            sched.alphas_cumprod.numpy(), [999, 499], "consistency", "epsilon"
        ),
        guidance="embedded",
        guidance_scale=2.0,
        distillation={"method": "lcm"},
    )


def _break(case, src, tmp_path, tiny):
    """A copy of the tiny pipeline (or a student.ckpt) broken one way; returns the SOURCE."""
    if case == "ckpt-hash":
        teacher = tmp_path / "teacher"
        shutil.copytree(src, teacher)
        ckpt = _student_ckpt(tiny, tmp_path, teacher)
        (teacher / "text_encoder" / "config.json").write_text(
            (teacher / "text_encoder" / "config.json").read_text() + "\n"
        )
        return ckpt
    p = tmp_path / "pipe"
    shutil.copytree(src, p)
    if case == "missing-vae":
        shutil.rmtree(p / "vae")
    elif case == "unsupported-class":
        idx = json.loads((p / "model_index.json").read_text())
        idx["unet"] = ["diffusers", "UNet2DModel"]
        (p / "model_index.json").write_text(json.dumps(idx))
    elif case == "inpainting-unet":  # 9 channels (latents + mask + masked) in a text-to-image folder
        cfg = json.loads((p / "unet" / "config.json").read_text())
        (p / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 9}))
    elif case == "no-tokenizer-json":
        for f in ("tokenizer.json", "vocab.json", "merges.txt"):
            (p / "tokenizer" / f).unlink(missing_ok=True)
    return p


@pytest.mark.parametrize(
    "case,extra,expect",
    [
        ("missing-vae", ["--steps", "2"], ["component 'vae' is missing"]),
        ("unsupported-class", ["--steps", "2"], ["unet class 'UNet2DModel'", "not supported"]),
        ("no-tokenizer-json", ["--steps", "2"], ["no tokenizer.json"]),
        (
            "inpainting-unet",
            ["--steps", "2"],
            ["in_channels 9 is an inpainting UNet", "expected StableDiffusionInpaintPipeline"],
        ),
        ("ckpt-hash", [], ["student.ckpt", "'text_encoder'", "changed"]),
        ("ok", ["--steps", "2", "--size", "15x16"], ["--size 15x16", "not a multiple of 4"]),
        ("ok", ["--steps", "2", "--size", "16x"], ["--size '16x'", "HxW"]),
        (
            "ok",
            ["--steps", "2", "--resolutions", "16,32", "--size", "48x48"],
            ["outside the profile [16, 32]"],
        ),
        ("ok", ["--steps", "2", "--resolutions", "18"], ["--resolutions 18", "not a multiple of 4"]),
        ("ok", ["--steps", "2", "--precision", "bf16"], ["--precision bf16"]),
        ("ok", [], ["needs --steps N"]),
    ],
)
def test_bad_inputs_one_line_exit_2_nothing_written(tiny, tmp_path, case, extra, expect):
    src = _break(case, tiny[0], tmp_path, tiny) if case != "ok" else tiny[0]
    if case == "ok":  # a folder with no distill.json and no teacher.json: needs --steps
        src = tmp_path / "pipe"
        shutil.copytree(tiny[0], src)
    out = tmp_path / "out"
    res = _cli([src, "-o", out, *extra])
    _one_line_exit_2(res, *expect)
    assert not out.exists()


def test_size_inside_the_profile_is_accepted(tiny):
    from optimizer.t2i.source import make_profile

    src, _ = tiny
    cfg = json.loads((src / "unet" / "config.json").read_text())
    prof, size = make_profile(src, cfg, (24, 32), (16, 32), (1, 4))
    assert size == (24, 32)
    assert (prof.latent_height.min, prof.latent_height.opt, prof.latent_height.max) == (8, 12, 16)
    assert (prof.latent_width.opt, prof.batch.max) == (16, 4)


class _Hot:
    """Plant an fp16 overflow in a VAE decoder: its first conv scaled by 1e5, so the residual
    stream carries |x| ~ 1e5 > 65504 until a GroupNorm scales it back (fp32 shrugs it off)."""

    @staticmethod
    def vae():
        import torch
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
        ).eval()
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(1e5)
            vae.decoder.conv_in.bias.mul_(1e5)
        return vae


@pytest.mark.slow
def test_vae_fp16_planted_overflow_keeps_fp32_islands(tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from engines.iospec import DimRange
    from optimizer.bars import ParityBars
    from optimizer.metrics import rel_l2
    from optimizer.quantize.onnx_graph import run_model, toposort
    from optimizer.t2i.components import Profile, dummy_inputs, vae_decoder_spec
    from optimizer.t2i.export import export_component
    from optimizer.t2i.precision import Graph, quantize_component, resolve_mix

    vae = _Hot.vae()
    cfg = dict(vae.config)
    spec = vae_decoder_spec(
        cfg, Profile(latent_height=DimRange(4, 4, 4), latent_width=DimRange(4, 4, 4)), DimRange(1, 1, 2)
    )
    src = export_component("vae_decoder", vae, spec, cfg, tmp_path / "vae_decoder.fp32.onnx")
    calib = [dummy_inputs(spec, np.random.default_rng(i), "min") for i in range(2)]
    ref = run_model(src, calib, "sample")

    def fp16_run(path_or_model):  # every fp16 op computed in fp16, as a GPU does (ORT CPU upcasts)
        ev = ReferenceEvaluator(path_or_model)
        return [ev.run(["sample"], f)[0] for f in calib]

    naive = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    toposort(naive)
    assert not all(np.isfinite(o).all() for o in fp16_run(naive)), "naive fp16 should overflow"
    g = quantize_component(
        "vae_decoder", "fp16", src, tmp_path / "vae_decoder.fp16.onnx", calib, ParityBars()
    )
    print(f"\nplanted VAE: {g.why}")
    kept = g.info["kept_float"]
    assert any(k["reason"] == "range" for k in kept), kept  # the range check saw the overflow
    fp32 = Graph("vae_decoder", "fp32", src, {"passed": True})
    graphs = {(k, "fp32"): fp32 for k in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}
    deployed = resolve_mix("fp16", {**graphs, ("vae_decoder", "fp16"): g})["vae_decoder"]
    if g.info["passed"]:  # fp16 with fp32 islands: finite where naive fp16 is not
        assert deployed.precision == "fp16" and "overflow" in g.why
    else:  # the islands were not enough: the mix keeps the fp32 decoder, and says why
        assert deployed.precision == "fp32" and deployed.path == src and "fp32 used" in deployed.why
    got = fp16_run(str(deployed.path))
    assert all(np.isfinite(o).all() for o in got)
    assert rel_l2(np.concatenate(got), np.concatenate(ref)) <= 1e-2


def test_clip_score_on_a_tiny_random_clip_model(tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPModel

    from optimizer.bars import ParityBars
    from optimizer.t2i.validate import judge

    tok = clip_tokenizer(tmp_path / "vocab")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(tmp_path / "clip", safe_serialization=True)
    tok.save_pretrained(tmp_path / "clip")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
    info = {"teacher": {}, "student": {}}
    d = judge(a, b, ["a red seven"] * 6, None, ParityBars(), info, tmp_path / "clip")
    assert d.clip_score_student is not None and 0 <= d.clip_score_student <= 100
    assert np.isfinite(d.fid_student) and d.fid_student >= 0 and "CLIP" in d.feature_space
    same = judge(a, a, ["a red seven"] * 6, None, ParityBars(), info, tmp_path / "clip")
    assert same.clip_score_student == same.clip_score_teacher and same.fid_student < 1e-6
    with pytest.raises(InputError, match="--clip-model"):
        judge(a, b, ["x"] * 6, None, ParityBars(), info, tmp_path / "nope")


@pytest.fixture(scope="module")
def compiled_sd(tiny, tmp_path_factory):
    """dd-compile on the tiny SD pipeline (its own teacher), fp32 + fp16: the output folder."""
    src, _ = tiny
    out = tmp_path_factory.mktemp("compiled_sd") / "out"
    res = _cli(
        [
            src,
            "--steps",
            "2",
            "-o",
            out,
            "--precision",
            "fp32,fp16",
            "--threads",
            "1",
            "--bench-seconds",
            "0.5",
        ]
    )
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_compile_tiny_pipeline_end_to_end(compiled_sd, tmp_path):
    """dd-compile on a tiny SD pipeline (its own teacher at 6 steps): every check passes, the
    report holds every component's parity, engines.load gives the TextToImagePipeline."""
    import engines

    out = compiled_sd
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["call_parity"]) == {
        f"{k}.{p}" for k in ("text_encoder", "unet", "vae_decoder", "vae_encoder") for p in ("fp32", "fp16")
    }
    assert all(c["passed"] for c in rep["call_parity"].values())
    assert rep["call_parity"]["unet.fp32"]["rel_l2"] <= 1e-5
    psnr = {v["mix"]: float(v["sample_parity"]["psnr_db"]) for v in rep["variants"]}  # "inf" when equal
    assert psnr["fp32"] >= 40 and psnr["fp16"] >= 30, psnr
    # image-to-image and inpainting validated per mix against diffusers' pipelines, same bars
    tasks = {(v["mix"], t): p for v in rep["variants"] for t, p in v["task_parity"].items()}
    assert set(tasks) == {(m, t) for m in ("fp32", "fp16") for t in ("img2img", "inpaint")}, tasks
    assert all(p["passed"] and p["n"] == 2 and p["strength"] == 0.75 for p in tasks.values()), tasks
    assert (
        float(tasks["fp32", "inpaint"]["psnr_db"]) >= 40 and float(tasks["fp32", "img2img"]["psnr_db"]) >= 40
    )
    assert "img2img / inpaint PSNR" in (out / "report.md").read_text()
    assert rep["timings"]["end_to_end"]["teacher"] and rep["variants"][0]["speedup_end_to_end"]
    assert rep["distribution"]["paired_psnr_db"] > 0
    pipe = engines.load(out, precision="fp16")
    assert type(pipe).__name__ == "TextToImagePipeline"
    img = pipe(["a red seven"], seeds=[0])
    assert img.dtype == np.uint8 and img.shape == (1, 16, 16, 3)
    for kw, msg in (
        (dict(prompt=["a", "b"], seeds=[1]), "seeds: 1 seeds for 2 prompts"),
        (dict(prompt=["a"], latents=np.zeros((1, 3, 8, 8), np.float32)), "latents: got float32"),
        (dict(prompt=["a"], latents=np.zeros((1, 4, 8, 8), np.float64)), "latents: got float64"),
    ):
        with pytest.raises(InputError, match=msg):
            pipe(**kw)
    with pytest.raises(InputError, match="no text-to-image pipeline 'int8'"):
        engines.load(out, precision="int8")
    # a tampered graph is refused before anything runs (on a copy: the output is shared)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    unet = next((copy / "runs").glob("*/onnx/unet.fp16.onnx"))
    unet.write_bytes(unet.read_bytes() + b"\0")
    with pytest.raises(Exception, match="sha256"):
        engines.load(copy, precision="fp16")


@pytest.mark.slow
def test_layout_optimum_onnx(compiled_sd, tmp_path):
    """dd-layout writes a mix as optimum-onnx's folder layout (model_index.json, <component>/
    model.onnx byte for byte + config.json, tokenizer, scheduler, the validation record); it
    replaces only a layout it wrote, refuses other families and bf16 in one line; with the peers'
    venv (benchmarks/layout_check.py) optimum's ORTDiffusionPipeline reproduces our images."""
    from engines.fileio import sha256_file
    from engines.layouts import check_reader, command

    def layout(*args):
        return CliRunner().invoke(command(), [str(a) for a in args], catch_exceptions=False)

    dest = tmp_path / "optimum"
    for _ in range(2):  # the second run replaces the first (it is ours)
        res = layout(compiled_sd, "-o", dest, "--precision", "fp16")
        assert res.exit_code == 0, res.output
    index = json.loads((dest / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"][1] == "UNet2DConditionModel"
    rec = json.loads((dest / "dd-compile.json").read_text())
    assert rec["mix"] == "fp16" and rec["precisions"]["unet"] == "fp16"
    run = next((compiled_sd / "runs").glob("*"))
    for kind in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        got = sha256_file(dest / kind / "model.onnx")
        precision = rec["precisions"][kind]
        assert got == rec["graphs_sha256"][kind] == sha256_file(run / f"onnx/{kind}.{precision}.onnx")
        assert json.loads((dest / kind / "config.json").read_text())  # the model's config.json
    tok = json.loads((dest / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 77 and (dest / "tokenizer" / "tokenizer.json").exists()
    assert (dest / "report.json").exists() and (dest / "scheduler" / "scheduler_config.json").exists()
    assert check_reader(dest, rec["checked_with"]) is None
    assert "optimum-onnx 9.9 (checked: " in check_reader(dest, {**rec["checked_with"], "optimum-onnx": "9.9"})
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("user data")
    res = layout(compiled_sd, "-o", theirs)
    assert res.exit_code == 2 and (theirs / "keep.txt").read_text() == "user data", res.output
    res = layout(compiled_sd, "-o", tmp_path / "x", "--precision", "int8")
    assert res.exit_code == 2 and "no text-to-image pipeline 'int8'" in res.output
    assert not (tmp_path / "x").exists()
    # an OpenVINO layout needs a mix validated on OpenVINO (tests/test_openvino_t2i.py writes one)
    res = layout(compiled_sd, "-o", tmp_path / "ov", "--layout", "openvino")
    assert res.exit_code == 2 and "validated on onnxruntime, not on openvino" in res.output
    assert not (tmp_path / "ov").exists()
    got = layout_check(tmp_path, compiled_sd, dest, "optimum", "fp16", "onnxruntime")
    print("\noptimum-onnx on the fp16 layout vs dd-compile's runtime:", got["psnr_db"], "dB")
    assert got["pipeline_class"] == "ORTStableDiffusionPipeline" and got["reader_warning"] is None
    assert float(got["psnr_db"]) >= 40, got


@pytest.mark.slow
def test_demo_t2i_passes_and_is_far_past_10x(tmp_path):
    """`dd-compile --demo` (text-to-image, the bundled LCM student): every check passes and the
    compiled pipeline beats the diffusers teacher (DDIM 50 + CFG) by >= 10x end to end.
    CI compiles the demo as its own step first and points DD_DEMO_T2I_OUT at that out/, so the same
    assertions run on that real run instead of compiling it twice."""

    if os.environ.get("DD_DEMO_T2I_OUT"):
        out = Path(os.environ["DD_DEMO_T2I_OUT"])
        assert json.loads((out / "report.json").read_text())["kind"] == "text-to-image"
    else:
        out = tmp_path / "out"
        res = _cli(["--demo", "-o", out, "--bench-seconds", "3"])
        assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    d = rep["distribution"]
    assert d["adherence_student"]["digit"] >= 0.9 and d["adherence_student"]["colour"] >= 0.95
    assert d["fid_student"] <= 1.5 * d["fid_teacher"]
    best = next(v for v in rep["variants"] if v["mix"] == rep["recommended"])
    print(f"\ndemo speedups end to end: {best['speedup_end_to_end']}, {rep['seconds']:.0f} s")
    # a speedup is stated only between stable medians, over the teacher timed alone in a fresh process
    stated = [x for x in best["speedup_end_to_end"].values() if x is not None]
    assert stated and min(stated) >= 10.0, best["speedup_end_to_end"]
    assert all(t["source"] == "fresh process" for t in rep["timings"]["teacher_baseline"].values())
    # the references CI's torch-free runtime check compares against are this demo's images: a
    # change to noise, scheduler or tokenizer must come with new references (.ci/runtime_venv_check)
    import engines

    refs = np.load(Path(__file__).parent / "data" / "demo_t2i_refs.npz")
    with engines.load(out, precision=str(refs["precision"])) as pipe:
        images = pipe([str(p) for p in refs["prompts"]], seeds=[int(s) for s in refs["seeds"]])
    levels = int(np.abs(images.astype(int) - refs["images"]).max())
    assert levels <= 8, f"tests/data/demo_t2i_refs.npz is stale: {levels} levels off"


@pytest.mark.slow
def test_compile_t2i_student_ckpt(tiny, tmp_path):
    """A t2i student.ckpt (LCM UNet, multistep: the re-noising draws are the runtime's) on its
    teacher's components, one run with a failing int8 mix: exit 1, the report and manifest say
    so, the runtime refuses to serve that mix, while the fp32 mix passed (embedded guidance in
    the published manifest) and stays servable, recommended among the passing ones."""
    import engines

    sd, _ = tiny
    ckpt = _student_ckpt(tiny, tmp_path, sd)
    bad = tmp_path / "bad"
    args = "--threads 1 --bench-seconds 0.3 --samples 4 --fid-samples 8 --batch-sizes 1,2 --threads-grid 0"
    res = _cli([ckpt, "-o", bad, "--precision", "fp32,int8", "--bar", "sample.int8=99", *args.split()])
    assert res.exit_code == 1 and "FAILED sample int8" in res.output, res.output
    rep = json.loads((bad / "report.json").read_text())
    assert rep["passed"] is False and rep["recommended"] == "fp32"
    assert rep["student"]["guidance"] == "embedded" and rep["student"]["steps"] == 2
    fp32 = next(v for v in rep["variants"] if v["mix"] == "fp32")
    assert fp32["passed"] and float(fp32["sample_parity"]["psnr_db"]) >= 40
    assert json.loads((bad / "manifest.json").read_text())["meta"]["guidance"] == "embedded"
    with pytest.raises(InputError, match="not servable"):
        engines.load(bad, precision="int8")
    with engines.load(bad) as pipe:  # the recommended fp32 mix
        assert pipe(["a red seven"], seeds=[0]).shape == (1, 16, 16, 3)


def test_sample_bars_default_per_mix_and_follow_bar():
    from optimizer.cli import parse_bars
    from optimizer.families import FAMILIES
    from optimizer.t2i.validate import sample_bar

    sd = FAMILIES["sd"]
    assert [sample_bar(m, parse_bars((), sd)) for m in ("fp32", "fp16", "int8")] == [40.0, 30.0, 22.0]
    assert sample_bar("fp16", parse_bars(("sample.fp16=33",), sd)) == 33.0
    # a bar equal to the pixel default is the user's bar too (it was silently replaced by 30 dB)
    assert sample_bar("fp16", parse_bars(("sample.fp16=35",), sd)) == 35.0
