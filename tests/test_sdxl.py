"""SDXL pipelines end to end, on tiny SDXL-shaped folders (tests/t2i_tiny.py make_tiny_sdxl, as
diffusers' own SDXL tests build them): two CLIP encoders (penultimate states concatenated, encoder
2's pooled projection), the UNet's text_time conditioning, force_zeros_for_empty_prompt, Euler.

The torch-free runtime on the exported graphs gives diffusers' StableDiffusionXLPipeline images
from the same prompts and latents (CFG with and without a negative prompt, no CFG, LCM-SDXL's
embedded guidance); dd-compile compiles the folder and catches SDXL's VAE fp16 trap.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.t2i_tiny import make_tiny_sdxl

PROMPTS = ["a red seven", "Green  SEVEN, green!"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from optimizer.metrics import psnr_db

    return psnr_db(a.astype(np.float64), b.astype(np.float64), data_range=255.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdxl")


def _exported(root: Path, name: str, **kw) -> tuple[Path, Path]:
    """(pipeline folder, its fp32 runtime folder), made once per module."""
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline

    src, out = root / name, root / f"{name}-fp32"
    if not out.exists():
        make_tiny_sdxl(src, **kw)
        export_pipeline(load_pipeline(src), out)
    return src, out


def _diffusers_images(src: Path, prompts, latents, **kw) -> np.ndarray:
    import torch

    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    pipe = diffusers_pipeline(load_pipeline(src))
    img = pipe(prompts, latents=torch.from_numpy(latents), output_type="np", **kw).images
    return (img * 255).round().astype(np.uint8)


def test_sdxl_folder_loads_as_its_family(root):
    """Detected as SDXL; the IO specs carry both encoders' outputs and the UNet's added inputs."""
    from optimizer.families import FAMILIES
    from optimizer.families.detect import family_of
    from optimizer.t2i.load import load_pipeline

    src, _ = _exported(root, "base")
    assert family_of(src) is FAMILIES["sdxl"]
    spec = load_pipeline(src).spec
    assert spec.family == "sdxl" and spec.force_zeros_for_empty_prompt and spec.tokenizer_2.pad_token == "!"
    te1, te2 = spec.component("text_encoder").io, spec.component("text_encoder_2").io
    assert te1.output_names == ["penultimate_hidden_state"]
    assert te2.output_names == ["penultimate_hidden_state", "text_embeds"]
    unet = {t.name: t.shape for t in spec.component("unet").io.inputs}
    assert unet["encoder_hidden_states"] == ("batch", "tokens", 64)  # 32 + 32: both encoders
    assert unet["text_embeds"] == ("batch", 32) and unet["time_ids"] == ("batch", 6)
    kinds = [c.kind for c in spec.components]
    assert kinds == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]  # img2img


@pytest.mark.parametrize(
    "negative,guidance",
    [
        (None, 5.0),  # force_zeros_for_empty_prompt: zero negative embeddings
        ("blue", 5.0),  # a negative prompt through both encoders
        (None, 1.0),  # no CFG: the UNet at batch B
    ],
)
def test_runtime_reproduces_diffusers_sdxl(root, negative, guidance):
    """fp32 graphs, same prompts, latents, steps: the runtime's images are diffusers' (>= 40 dB)."""
    from engines.t2i import TextToImagePipeline

    src, out = _exported(root, "base")
    lat = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    kw = dict(negative_prompt=negative, num_inference_steps=6, guidance_scale=guidance)
    want = _diffusers_images(src, PROMPTS, lat, **kw)
    with TextToImagePipeline(out) as pipe:
        got = pipe(PROMPTS, latents=lat, **kw)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert psnr(got, want) >= 40.0, psnr(got, want)


def test_no_negative_prompt_is_not_the_empty_one(root):
    """SDXL zeroes the negative embeddings when none is given; an explicit "" is encoded: the two
    images differ, and each matches diffusers' own for the same call."""
    from engines.t2i import TextToImagePipeline

    src, out = _exported(root, "base")
    lat = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=7.0)
    with TextToImagePipeline(out) as pipe:
        zero = pipe(PROMPTS[:1], latents=lat, **kw)
        empty = pipe(PROMPTS[:1], negative_prompt="", latents=lat, **kw)
        mixed = pipe(PROMPTS[:1] * 2, negative_prompt=[None, ""], latents=np.concatenate([lat, lat]), **kw)
    assert np.abs(zero.astype(int) - empty.astype(int)).max() > 0
    assert psnr(empty, _diffusers_images(src, PROMPTS[:1], lat, negative_prompt="", **kw)) >= 40.0
    # per image in one call: the first had none, the second an empty one
    assert np.array_equal(mixed[0], zero[0]) and np.array_equal(mixed[1], empty[0])


def test_lcm_sdxl_embedded_guidance(root):
    """LCM-SDXL: a time_cond_proj_dim UNet (the w-embedding at batch B, no CFG) with LCM's re-noising
    draws, as the runtime makes them from the seeds."""
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, images

    src, out = _exported(root, "lcm", lcm=True)
    with TextToImagePipeline(out) as pipe:
        assert pipe.config.guidance == "embedded" and "timestep_cond" in pipe.specs["unet"].input_names
        lat = np.random.default_rng(2).standard_normal((2, 4, 8, 8), dtype=np.float32)
        got = pipe(PROMPTS, seeds=[0, 1], latents=lat, num_inference_steps=4, guidance_scale=8.5)
    want = images(diffusers_pipeline(load_pipeline(src)), PROMPTS, lat, 4, 8.5, seeds=[0, 1])
    assert psnr(got, want) >= 40.0, psnr(got, want)


def test_sdxl_folder_problems_are_one_line(root, tmp_path):
    """A broken SDXL folder is refused naming the file and field, before anything is exported."""
    import shutil

    from engines.errors import InputError
    from optimizer.t2i.load import load_pipeline

    src, _ = _exported(root, "base")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg_path = bad / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "projection_class_embeddings_input_dim": 81}))
    with pytest.raises(InputError, match=r"unet/config.json: projection_class_embeddings_input_dim 81"):
        load_pipeline(bad)
    cfg_path.write_text(json.dumps(cfg))
    shutil.rmtree(bad / "tokenizer_2")
    with pytest.raises(InputError, match=r"component 'tokenizer_2' is missing"):
        load_pipeline(bad)


@pytest.mark.slow
def test_dd_compile_sdxl_end_to_end_catches_the_vae_fp16_trap(tmp_path):
    """dd-compile on an SDXL folder whose VAE overflows fp16 (force_upcast, activations ~1e5):
    every mix passes its bars, the fp16 mix's VAE decoder keeps fp32 where the range check measured
    overflow (or stays fp32, saying why), and the output loads, generates and names its family."""
    import engines
    from optimizer.cli import main

    src = make_tiny_sdxl(tmp_path / "xl", hot_vae=True)
    out = tmp_path / "out"
    args = [str(src), "--steps", "4", "-o", str(out), "--precision", "fp32,fp16"]
    args += ["--samples", "2", "--fid-samples", "4", "--bench-seconds", "1", "--batch-sizes", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "sdxl"
    variants = {v["mix"]: v for v in report["variants"]}
    assert all(v["passed"] for v in variants.values()), variants
    vae = variants["fp16"]["components"]["vae_decoder"]
    assert "overflow" in vae["why"] or vae["precision"] == "fp32", vae
    assert variants["fp16"]["components"]["text_encoder_2"]["precision"] == "fp16"
    with engines.load(out) as pipe:
        assert pipe.config.family == "sdxl"
        img = pipe("a red seven", seeds=[5])
    assert img.shape == (1, 16, 16, 3) and img.dtype == np.uint8


def test_sdxl_triton_repository_serves_the_runtimes_images(root, tmp_path, monkeypatch):
    """dd-triton on SDXL: both CLIP encoders as models; no negative prompt (zeros) and a negative
    prompt in one merged batch give the runtime's images."""
    from tests.test_triton_t2i import check_served_family

    _, out = _exported(root, "base")
    models = ["dd_text_encoder", "dd_text_encoder_2", "dd_unet", "dd_vae_decoder"]
    check_served_family(out, tmp_path, monkeypatch, models, negative=True)


@pytest.mark.parametrize("name,kw", [("base", {}), ("lcm", {"lcm": True})])
def test_seeds_reproduce_diffusers_generators(root, name, kw):
    """`seeds=[s]` draws what torch.Generator().manual_seed(s) draws on CPU (engines/torch_rng.py):
    the latents and, for LCM, every re-noising step, so the runtime's image from a seed is
    diffusers' own image from that seed's generator, nothing patched on the diffusers side."""
    import torch

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    src, out = _exported(root, name, **kw)
    seeds, steps, g = [11, 2**40 + 3], 4, (8.5 if kw else 5.0)
    pipe = diffusers_pipeline(load_pipeline(src))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    want = pipe(PROMPTS, generator=gens, num_inference_steps=steps, guidance_scale=g, output_type="np").images
    want = (want * 255).round().astype(np.uint8)
    with TextToImagePipeline(out) as ep:
        got = ep(PROMPTS, seeds=seeds, num_inference_steps=steps, guidance_scale=g)
    assert psnr(got, want) >= 40.0, psnr(got, want)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_sdxl_img2img_reproduces_diffusers(root, strength):
    """image= on an SDXL output: StableDiffusionXLImg2ImgPipeline's images (base model's time ids at
    the image's size, the VAE posterior's sample and the added noise from each seed)."""
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, img2img_images, img2img_pipeline
    from tests.test_img2img import test_images

    src, out = _exported(root, "base")
    image = test_images(2, 16, 16, seed=4)
    kw = dict(strength=strength, num_inference_steps=5, guidance_scale=5.0)
    i2i = img2img_pipeline(diffusers_pipeline(load_pipeline(src)))
    want = img2img_images(i2i, PROMPTS, image, kw["strength"], 5, 5.0, seeds=[1, 2])
    with TextToImagePipeline(out) as pipe:
        assert "vae_encoder" in pipe.runners
        got = pipe(PROMPTS, image=image, seeds=[1, 2], **kw)
    assert psnr(got, want) >= 40.0, psnr(got, want)


def test_sdxl_inpaint_reproduces_diffusers(root):
    """image= and mask_image= on an SDXL output (4-channel UNet): StableDiffusionXLInpaintPipeline's
    images at its default strength 0.9999 (the first step dropped, the image noised) and at 1.0."""
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, img2img_images, img2img_pipeline
    from tests.test_img2img import test_images
    from tests.test_inpaint import test_masks

    src, out = _exported(root, "base")
    image, mask = test_images(2, 16, 16, seed=4), test_masks(2, 16, 16)
    ref = img2img_pipeline(diffusers_pipeline(load_pipeline(src)), "inpaint")
    with TextToImagePipeline(out) as pipe:
        for s in (None, 1.0):
            got = pipe(
                PROMPTS,
                image=image,
                mask_image=mask,
                strength=s,
                seeds=[1, 2],
                num_inference_steps=5,
                guidance_scale=5.0,
            )
            want = img2img_images(ref, PROMPTS, image, 0.9999 if s is None else s, 5, 5.0, [1, 2], mask=mask)
            assert psnr(got, want) >= 40.0, (s, psnr(got, want))
