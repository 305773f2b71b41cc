"""Text-to-image foundation: component table, pipeline-folder loading, export, torch-free runtime.

The end-to-end tests build a tiny random-weight StableDiffusionPipeline (and an LCM one) with an
offline CLIP BPE tokenizer, export it, and check our runtime against diffusers' own pipeline from
the same prompt, latents, steps and guidance.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.errors import InputError
from tests.t2i_tiny import clip_tokenizer, make_tiny_pipeline

PROMPTS = ["a red seven", "Green  SEVEN, green!", "", "the digit 7 in red " * 30]  # the last is > 77 tokens


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """The project's PSNR (mean over images) on uint8 images."""
    from optimizer.metrics import psnr_db

    return psnr_db(a.astype(np.float64), b.astype(np.float64), data_range=255.0)


# -- tokenizer --------------------------------------------------------------------------------
def test_tokenizer_ids_equal_clip_tokenizer(tmp_path, caplog):
    from engines.tokenizer import ClipTokenizer

    tok = clip_tokenizer(tmp_path / "vocab")
    tok.save_pretrained(tmp_path / "saved")
    ours = ClipTokenizer(tmp_path / "saved" / "tokenizer.json", 77, tok.pad_token)
    # diffusers' encode_prompt call
    want = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    with caplog.at_level(logging.WARNING, logger="engines.tokenizer"):
        got = ours(PROMPTS)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(got, np.array(want))
    assert len(tok(PROMPTS[-1]).input_ids) > 77 and got[-1, -1] == tok.eos_token_id  # truncated, EOS kept
    assert "truncated" in caplog.text


def test_tokenizer_json_written_from_vocab_and_merges(tmp_path):
    from engines.tokenizer import ClipTokenizer
    from optimizer.t2i.export import write_tokenizer_json

    tok = clip_tokenizer(tmp_path / "vocab")  # the folder holds vocab.json + merges.txt only
    write_tokenizer_json(tmp_path / "vocab", tmp_path / "out" / "tokenizer.json")
    got = ClipTokenizer(tmp_path / "out" / "tokenizer.json", 77)(PROMPTS[:2])
    want = tok(PROMPTS[:2], padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(got, np.array(want))


# -- schedulers -------------------------------------------------------------------------------
DDIM_CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
         steps_offset=1, timestep_spacing="leading", clip_sample=False),
    dict(beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="trailing",
         clip_sample=True),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", prediction_type="sample",
         clip_sample=False, rescale_betas_zero_snr=True),
]  # fmt: skip


@pytest.mark.parametrize("kw", DDIM_CONFIGS, ids=["sd15-leading", "v-trailing-clip", "x0-linspace-zsnr"])
def test_ddim_matches_diffusers(kw):
    import torch
    from diffusers import DDIMScheduler as TorchDDIM

    from engines.schedulers import make_scheduler

    ref = TorchDDIM(**kw)
    ours = make_scheduler("ddim", dict(ref.config))
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    xt = torch.from_numpy(x.copy())
    for steps in (1, 4, 7):
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ours.set_timesteps(steps), ref.timesteps.numpy())
        for i, t in enumerate(ref.timesteps):
            out = rng.standard_normal(x.shape, dtype=np.float32)
            xt = ref.step(torch.from_numpy(out), t, xt).prev_sample
            x, _ = ours.step(out, i, x)
            np.testing.assert_allclose(x, xt.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_step_matches_diffusers(steps):
    import torch
    from diffusers import LCMScheduler as TorchLCM

    from engines.schedulers import make_scheduler

    ref = TorchLCM(prediction_type="epsilon", original_inference_steps=50)
    ours = make_scheduler("lcm", dict(ref.config))
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.set_timesteps(steps), ref.timesteps.numpy())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    xt = torch.from_numpy(x.copy())
    gen, gen_copy = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal(x.shape, dtype=np.float32)
        xt, dt = ref.step(torch.from_numpy(out), t, xt, generator=gen, return_dict=False)
        last = i == steps - 1
        noise = None if last else torch.randn(x.shape, generator=gen_copy).numpy()  # the draw step() made
        x, d = ours.step(out, i, x, noise)
        np.testing.assert_allclose(d, dt.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x, xt.numpy(), rtol=1e-5, atol=1e-5)


def test_guidance_scale_embedding_matches_diffusers():
    import torch
    from diffusers import LatentConsistencyModelPipeline

    from engines.t2i import guidance_scale_embedding

    w = np.array([0.0, 1.5, 7.5], dtype=np.float32)
    for dim in (16, 17, 256):
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), dim)
        # sin(1000 w f): a 1-ulp difference between numpy's and torch's float32 exp(f) moves the
        # argument by up to ~2e-4 at w = 7.5; the pipeline-level PSNR test bounds the effect
        np.testing.assert_allclose(guidance_scale_embedding(w, dim), want.numpy(), rtol=0, atol=5e-4)


# -- the component table and bad pipeline folders ------------------------------------------------
def test_component_table_io_specs():
    from engines.iospec import DimRange
    from optimizer.t2i.components import COMPONENTS, Profile, build_specs

    assert set(COMPONENTS) == {
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "transformer",
        "unet",
        "vae_decoder",
        "vae_encoder",
    }
    assert COMPONENTS["vae_decoder"].precision.default == "fp32"
    configs = {
        "text_encoder": {"hidden_size": 32},
        "unet": {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 32},
        "vae_decoder": {"block_out_channels": [16, 32, 64, 64], "latent_channels": 4},
    }
    prof = Profile(
        batch=DimRange(1, 2, 4), latent_height=DimRange(32, 64, 64), latent_width=DimRange(32, 64, 96)
    )
    cfg = build_specs(configs, prof, "cfg")
    assert cfg["unet"].dims["batch"] == DimRange(1, 4, 8)  # CFG: both halves in one call
    assert cfg["text_encoder"].dims["batch"] == prof.batch
    assert cfg["unet"].input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert cfg["vae_decoder"].dims["height"] == DimRange(256, 512, 512)  # x8
    assert cfg["unet"].profile("max")["sample"] == (8, 4, 64, 96)
    lcm = build_specs({**configs, "unet": {**configs["unet"], "time_cond_proj_dim": 256}}, prof, "embedded")
    assert lcm["unet"].input("timestep_cond").shape == ("batch", 256)
    assert lcm["unet"].dims["batch"] == prof.batch


def _fake_layout(root, **changes):
    """A pipeline folder's files (configs, empty weight files): enough for the layout check."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
    }
    index.update(changes)
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if v is not ...}))
    for sub in ("text_encoder", "unet", "vae"):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text("{}")
        (root / sub / "model.safetensors").write_bytes(b"")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    return root


def test_bad_pipeline_folders(tmp_path):
    from optimizer.t2i.load import check_layout

    check_layout(_fake_layout(tmp_path / "ok"))  # the well-formed layout passes
    cases = {
        "missing_vae": (dict(vae=...), "component 'vae' is missing"),
        "bad_unet": (dict(unet=["diffusers", "UNet2DModel"]), "'UNet2DModel': not supported"),
        "bad_pipe": (dict(_class_name="PixArtAlphaPipeline"), "pipeline class"),
        # an SDXL index is read as SDXL: what that family needs and the folder lacks is named
        "sdxl_without_its_second_encoder": (
            dict(_class_name="StableDiffusionXLPipeline"),
            "component 'text_encoder_2' is missing",
        ),
    }
    for name, (change, msg) in cases.items():
        with pytest.raises(InputError, match=msg) as e:
            check_layout(_fake_layout(tmp_path / name, **change))
        assert "\n" not in str(e.value)
    root = _fake_layout(tmp_path / "no_tok")
    (root / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="no tokenizer.json and no vocab.json"):
        check_layout(root)
    root = _fake_layout(tmp_path / "no_vae_dir")
    shutil.rmtree(root / "vae")
    with pytest.raises(InputError, match="no vae/ folder"):
        check_layout(root)
    root = _fake_layout(tmp_path / "pickled")
    (root / "unet" / "model.safetensors").rename(root / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match="no .safetensors"):
        check_layout(root)
    with pytest.raises(InputError, match="no model_index.json"):
        check_layout(tmp_path / "ok" / "unet")


# -- export + runtime vs diffusers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    from engines.iospec import DimRange
    from optimizer.t2i.components import Profile
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline

    root = tmp_path_factory.mktemp("t2i_sd")
    src = make_tiny_pipeline(root / "pipe")
    lat = DimRange(8, 8, 16)  # the tiny UNet's sample_size is 8; the engines also take up to 16
    export_pipeline(load_pipeline(src, profile=Profile(latent_height=lat, latent_width=lat)), root / "out")
    return src, root / "out"


def _diffusers_images(pipe, prompts, latents, **kw) -> np.ndarray:
    import torch

    pipe.set_progress_bar_config(disable=True)
    img = pipe(prompts, latents=torch.from_numpy(latents), output_type="np", **kw).images
    return (img * 255).round().astype(np.uint8)


@pytest.mark.slow
def test_sd_runtime_matches_diffusers(sd_export):
    from diffusers import StableDiffusionPipeline

    from engines.t2i import TextToImagePipeline

    src, out = sd_export
    assert sorted(p.name for p in (out / "onnx").iterdir()) == [
        "text_encoder.fp32.onnx",
        "unet.fp32.onnx",
        "vae_decoder.fp32.onnx",
        "vae_encoder.fp32.onnx",
    ]
    assert (out / "tokenizer" / "tokenizer.json").exists() and (
        out / "scheduler" / "scheduler_config.json"
    ).exists()
    ref = StableDiffusionPipeline.from_pretrained(src).to("cpu")
    prompts = PROMPTS[:3]
    lat = np.random.default_rng(0).standard_normal((3, 4, 8, 8), dtype=np.float32)
    with TextToImagePipeline(out) as pipe:
        results = {}
        for g, neg in ((7.5, None), (3.0, ["blue", "", "red"]), (1.0, None)):  # CFG, CFG + negatives, no CFG
            ours = pipe(prompts, negative_prompt=neg, latents=lat, guidance_scale=g, num_inference_steps=6)
            want = _diffusers_images(
                ref, prompts, lat, negative_prompt=neg, guidance_scale=g, num_inference_steps=6
            )
            assert ours.dtype == np.uint8 and ours.shape == want.shape == (3, 16, 16, 3)
            assert ours.std() > 10 and np.mean((ours == 0) | (ours == 255)) < 0.5  # a non-degenerate image
            results[g] = psnr(ours, want)
        print(f"\nfp32 PSNR vs diffusers StableDiffusionPipeline (dB): {results}")
        assert min(results.values()) >= 40.0, results
        # guidance matters, so the CFG path is not a no-op (not for the empty prompt: cond == uncond)
        kw = dict(latents=lat[:2], num_inference_steps=6)
        assert (
            psnr(pipe(prompts[:2], guidance_scale=7.5, **kw), pipe(prompts[:2], guidance_scale=1.0, **kw))
            < 35
        )
        # seeds: per-seed latents, so an image does not depend on its batch
        a = pipe(prompts[:2], seeds=[5, 6], num_inference_steps=3)
        b = pipe(prompts[1:2], seeds=[6], num_inference_steps=3)
        assert np.abs(a[1].astype(int) - b[0]).max() <= 1  # batch-size-dependent kernels: <= 1 level
        # any number of prompts: chunked at the compiled batch (4), each image as if alone
        many = pipe(
            [prompts[i % len(prompts)] for i in range(9)], seeds=list(range(9)), num_inference_steps=3
        )
        assert many.shape[0] == 9
        for i in (0, 4, 8):  # first of each chunk
            one = pipe([prompts[i % len(prompts)]], seeds=[i], num_inference_steps=3)
            assert np.abs(many[i].astype(int) - one[0]).max() <= 1
        # dynamic latent size: 24x32 pixels = 12x16 latents, vs diffusers at that size
        lat2 = np.random.default_rng(1).standard_normal((1, 4, 12, 16), dtype=np.float32)
        ours = pipe(prompts[:1], latents=lat2, guidance_scale=7.5, num_inference_steps=3)
        want = _diffusers_images(
            ref, prompts[:1], lat2, guidance_scale=7.5, num_inference_steps=3, height=24, width=32
        )
        assert ours.shape == (1, 24, 32, 3) and psnr(ours, want) >= 40.0


@pytest.mark.slow
def test_runtime_bad_inputs(sd_export, tmp_path):
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.export import t2i_json
    from optimizer.t2i.load import load_pipeline

    src, out = sd_export
    lat = np.zeros((2, 4, 8, 8), np.float32)
    with TextToImagePipeline(out) as pipe:
        bad = [
            (dict(prompt=["a", "b"], seeds=[1]), "seeds: 1 seeds for 2 prompts"),
            (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt: 1 prompts for 2"),
            (
                dict(prompt=["a", "b"], latents=lat[:1]),
                r"latents: got float32 \(1, 4, 8, 8\), expected float32 \(2,",
            ),
            (dict(prompt=["a", "b"], latents=lat.astype(np.float64)), "latents: got float64"),
            (dict(prompt=["a"], height=13), "height=13: must be a multiple of 2 in"),
            (dict(prompt=["a"], width=34), r"width=34: must be a multiple of 2 in \[16, 32\]"),
            (dict(prompt=[]), "prompt: expected"),
            (dict(prompt=123), "prompt: expected a string or a non-empty list of strings, got int"),
            (dict(prompt="a", guidance_scale="abc"), "guidance_scale='abc': expected a number"),
            (dict(prompt="a", height=0), r"height=0: must be a multiple of 2"),
            (dict(prompt="a", width=16.5), "width=16.5: expected an integer"),
            (dict(prompt=["a", "b"], latents=lat + np.nan), "latents: contain NaN or Inf"),
        ]
        for kw, msg in bad:
            with pytest.raises(InputError, match=msg) as e:
                pipe(num_inference_steps=1, **kw)
            assert "\n" not in str(e.value)
    # the same graphs described as built without guidance: a CFG request is refused, <= 1 runs
    none = tmp_path / "none"
    shutil.copytree(out, none)
    spec = load_pipeline(src, guidance="none").spec
    paths = {c: f"onnx/{c}.fp32.onnx" for c in ("text_encoder", "unet", "vae_decoder")}
    (none / "t2i.json").write_text(json.dumps(t2i_json(spec, paths, 0)))
    with TextToImagePipeline(none) as pipe:
        with pytest.raises(InputError, match="built without guidance"):
            pipe("a", guidance_scale=7.5, num_inference_steps=1)
        assert pipe("a", num_inference_steps=1).shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_lcm_runtime_matches_diffusers(tmp_path):
    """Embedded guidance: timestep_cond at batch B; 1 step (LCM's re-noising draws differ by RNG)."""
    from diffusers import LatentConsistencyModelPipeline

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline

    src = make_tiny_pipeline(tmp_path / "pipe", lcm=True)
    loaded = load_pipeline(src)
    assert loaded.spec.guidance == "embedded"
    out = export_pipeline(loaded, tmp_path / "out")
    ref = LatentConsistencyModelPipeline.from_pretrained(src).to("cpu")
    lat = np.random.default_rng(2).standard_normal((2, 4, 8, 8), dtype=np.float32)
    with TextToImagePipeline(out) as pipe:
        ours, parity = {}, {}
        for g in (8.5, 2.0):
            ours[g] = pipe(PROMPTS[:2], latents=lat, guidance_scale=g, num_inference_steps=1)
            want = _diffusers_images(ref, PROMPTS[:2], lat, guidance_scale=g, num_inference_steps=1)
            parity[g] = psnr(ours[g], want)
        print(f"\nfp32 PSNR vs diffusers LatentConsistencyModelPipeline, 1 step (dB): {parity}")
        assert min(parity.values()) >= 40.0, parity
        # w enters the graph: its effect on the image is larger than our error vs diffusers
        assert psnr(ours[8.5], ours[2.0]) < min(parity.values())
        a = pipe(PROMPTS[:1], seeds=[4], num_inference_steps=4)  # multistep: re-noising from the seed
        np.testing.assert_array_equal(a, pipe(PROMPTS[:1], seeds=[4], num_inference_steps=4))
        assert psnr(a, pipe(PROMPTS[:1], seeds=[5], num_inference_steps=4)) < 35


@pytest.mark.slow
def test_fp16_unet_call_and_pipeline_parity(sd_export, tmp_path):
    """The UNet through optimizer/quantize/fp16.py: call parity vs fp32, then the images."""
    from engines.iospec import IOSpec
    from engines.t2i import TextToImagePipeline
    from optimizer.quantize.fp16 import quantize_fp16
    from optimizer.t2i.components import dummy_inputs
    from optimizer.t2i.export import use_component_graph

    _, out = sd_export
    mixed = tmp_path / "fp16"
    shutil.copytree(out, mixed)
    spec = IOSpec.from_dict(json.loads((out / "t2i.json").read_text())["components"]["unet"]["io"])
    calib = [dummy_inputs(spec, np.random.default_rng(i)) for i in range(4)]
    res = quantize_fp16(mixed / "onnx/unet.fp32.onnx", mixed / "onnx/unet.fp16.onnx", calib)
    print(f"\nfp16 UNet call rel. L2 vs fp32: {res.call_rel_l2:.2e} ({res.counts})")
    assert res.passed and res.call_rel_l2 <= 1e-2
    use_component_graph(mixed, "unet", "onnx/unet.fp16.onnx", "fp16")
    lat = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    kw = dict(latents=lat, guidance_scale=7.5, num_inference_steps=6)
    with TextToImagePipeline(out) as p32, TextToImagePipeline(mixed) as p16:
        p = psnr(p16(PROMPTS[:2], **kw), p32(PROMPTS[:2], **kw))
    print(f"fp16-UNet pipeline PSNR vs fp32 pipeline (dB): {p:.1f}")
    assert p >= 30.0


TORCH_FREE = """
import sys
for m in ("torch", "transformers", "diffusers", "optimizer"):
    sys.modules[m] = None  # any import of them fails
import numpy as np
from engines.t2i import TextToImagePipeline
with TextToImagePipeline(sys.argv[1]) as pipe:
    img = pipe(["a red seven"], seeds=[0], num_inference_steps=2)
np.save(sys.argv[2], img)
"""


@pytest.mark.slow
def test_runtime_imports_no_torch(sd_export, tmp_path):
    import subprocess
    import sys

    from engines.t2i import TextToImagePipeline

    _, out = sd_export
    repo = Path(__file__).resolve().parents[1]  # `-c` puts the cwd on sys.path: the worktree's engines
    subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(out), str(tmp_path / "img.npy")], check=True, cwd=repo
    )
    with TextToImagePipeline(out) as pipe:
        want = pipe(["a red seven"], seeds=[0], num_inference_steps=2)
    np.testing.assert_array_equal(np.load(tmp_path / "img.npy"), want)
