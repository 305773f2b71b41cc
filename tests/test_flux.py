"""Flux pipelines end to end, on tiny Flux-shaped folders (tests/t2i_tiny.py make_tiny_flux, as
diffusers' own Flux tests build them, with an offline T5 tokenizer): CLIP's pooled output, T5's
states, a transformer over 2x2-packed latents with rotary image/text ids, FlowMatch Euler with mu
from the token count and FluxPipeline's own sigmas, FLUX.1-dev's embedded guidance (and schnell's
none), a VAE with scaling and shift factors.

The exported transformer graph takes unpacked latents and packs, builds the ids and unpacks inside,
so the runtime's loop is every family's; the runtime gives diffusers' FluxPipeline images from the
same prompts and latents, and from the same seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines.errors import InputError
from tests.t2i_tiny import make_tiny_flux

PROMPTS = ["a red seven", "Green  SEVEN, green!"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from optimizer.metrics import psnr_db

    return psnr_db(a.astype(np.float64), b.astype(np.float64), data_range=255.0)


def _profile():
    from engines.iospec import DimRange
    from optimizer.t2i.components import Profile

    return Profile(DimRange(1, 1, 2), DimRange(8, 8, 8), DimRange(8, 8, 8))  # 16 px


@pytest.fixture(scope="module", params=["dev", "schnell"])
def exported(request, tmp_path_factory) -> tuple[Path, Path, str]:
    """(pipeline folder, its fp32 runtime folder at 16 px, variant)."""
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline

    root = tmp_path_factory.mktemp(f"flux-{request.param}")
    src = make_tiny_flux(root / "base", guidance_embeds=request.param == "dev")
    export_pipeline(load_pipeline(src, profile=_profile()), root / "fp32")
    return src, root / "fp32", request.param


def _reference(src: Path):
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    return diffusers_pipeline(load_pipeline(src, profile=_profile()))


def test_flux_folder_loads_as_its_family(exported):
    from optimizer.families import FAMILIES
    from optimizer.families.detect import family_of
    from optimizer.t2i.load import load_pipeline

    src, _, variant = exported
    assert family_of(src) is FAMILIES["flux"]
    spec = load_pipeline(src, profile=_profile()).spec
    assert spec.guidance == ("embedded" if variant == "dev" else "none")
    assert spec.tokenizer_2.model_max_length == 512 and spec.tokenizer_2.pad_token == "<pad>"
    tr = {t.name: t.shape for t in spec.component("transformer").io.inputs}
    assert tr["sample"] == ("batch", 4, "latent_height", "latent_width")  # unpacked: 16 / 4
    assert tr["encoder_hidden_states"] == ("batch", "t5_tokens", 48) and tr["pooled_projections"] == (
        "batch",
        32,
    )
    assert ("guidance" in tr) == (variant == "dev")
    assert spec.component("text_encoder").io.output_names == ["pooler_output"]
    # the default size is one the built profile takes (16 px), not the transformer's native one
    assert spec.default_size == (16, 16)


def test_runtime_reproduces_diffusers_flux(exported):
    """Same prompts and latents (packed for diffusers, as FluxPipeline takes them): its images."""
    import torch

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.reference import pack

    src, out, variant = exported
    g = 3.5 if variant == "dev" else 0.0
    lat = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    want = _reference(src)(
        PROMPTS,
        latents=pack(torch.from_numpy(lat)),
        num_inference_steps=5,
        guidance_scale=g,
        height=16,
        width=16,
        output_type="np",
    ).images
    want = (want * 255).round().astype(np.uint8)
    packed = pack(torch.from_numpy(lat)).numpy()
    with TextToImagePipeline(out) as pipe:
        got = pipe(PROMPTS, latents=lat, num_inference_steps=5, guidance_scale=g)
        # the packed tensor FluxPipeline takes is taken as is: the same images
        same = pipe(PROMPTS, latents=packed, num_inference_steps=5, guidance_scale=g, height=16, width=16)
        with pytest.raises(InputError, match=r"expected float32 \(2, 4, 8, 8\) or packed \(2, 16, 16\)"):
            pipe(PROMPTS, latents=packed[:, :3], num_inference_steps=5, guidance_scale=g)
    assert got.shape == (2, 16, 16, 3)
    assert psnr(got, want) >= 40.0, psnr(got, want)
    assert np.array_equal(same, got)


def test_flux_seeds_reproduce_diffusers_generators(exported):
    import torch

    from engines.t2i import TextToImagePipeline

    src, out, variant = exported
    g = 3.5 if variant == "dev" else 0.0
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    want = _reference(src)(
        PROMPTS,
        generator=gens,
        num_inference_steps=4,
        guidance_scale=g,
        height=16,
        width=16,
        output_type="np",
    ).images
    with TextToImagePipeline(out) as pipe:
        got = pipe(PROMPTS, seeds=[3, 4], num_inference_steps=4, guidance_scale=g, height=16, width=16)
    assert psnr(got, (want * 255).round().astype(np.uint8)) >= 40.0


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_flux_img2img_reproduces_diffusers(exported, strength):
    """image= on a Flux output: FluxImg2ImgPipeline's images (mu from the image's tokens, the
    pipeline's sigmas cut by its strength rule, scale_noise on the unpacked latents)."""
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.reference import img2img_images, img2img_pipeline
    from tests.test_img2img import test_images

    src, out, variant = exported
    g = 3.5 if variant == "dev" else 0.0
    image = test_images(2, 16, 16, seed=4)
    want = img2img_images(img2img_pipeline(_reference(src)), PROMPTS, image, strength, 5, g, seeds=[1, 2])
    with TextToImagePipeline(out) as pipe:
        got = pipe(
            PROMPTS, image=image, seeds=[1, 2], strength=strength, num_inference_steps=5, guidance_scale=g
        )
    assert psnr(got, want) >= 40.0, psnr(got, want)


def test_flux_inpaint_reproduces_diffusers(exported):
    """image= and mask_image= on a Flux output: FluxInpaintPipeline's images (the blend in packed
    token space is the same elementwise blend unpacked), its default strength 0.6 and 1.0."""
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.reference import img2img_images, img2img_pipeline
    from tests.test_img2img import test_images
    from tests.test_inpaint import test_masks

    src, out, variant = exported
    g = 3.5 if variant == "dev" else 0.0
    image, mask = test_images(2, 16, 16, seed=4), test_masks(2, 16, 16)
    ref = img2img_pipeline(_reference(src), "inpaint")
    with TextToImagePipeline(out) as pipe:
        for s in (None, 1.0):
            kw = dict(strength=s, seeds=[1, 2], num_inference_steps=4, guidance_scale=g)
            got = pipe(PROMPTS, image=image, mask_image=mask, **kw)
            want = img2img_images(ref, PROMPTS, image, 0.6 if s is None else s, 4, g, [1, 2], mask=mask)
            assert psnr(got, want) >= 40.0, (s, psnr(got, want))


def test_flux_triton_repository_serves_the_runtimes_images(exported, tmp_path, monkeypatch):
    """dd-triton on Flux (dev: the guidance input; schnell: none): CLIP, T5 and the transformer as
    models; dd_t2i's images are the runtime's."""
    from tests.test_triton_t2i import check_served_family

    models = ["dd_text_encoder", "dd_text_encoder_2", "dd_transformer", "dd_vae_decoder"]
    check_served_family(exported[1], tmp_path, monkeypatch, models, negative=False)


@pytest.mark.slow
def test_dd_compile_flux_dev_end_to_end(tmp_path):
    """dd-compile on a FLUX.1-dev-shaped folder at --size 16x16: every mix passes (T5 fp32 in each),
    the output loads and generates."""
    import engines
    from optimizer.cli import main

    src = make_tiny_flux(tmp_path / "flux")
    out = tmp_path / "out"
    args = [
        str(src),
        "--steps",
        "4",
        "--size",
        "16x16",
        "-o",
        str(out),
        "--samples",
        "2",
        "--fid-samples",
        "4",
    ]
    args += ["--bench-seconds", "1", "--batch-sizes", "1", "--threads-grid", "0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "flux"
    variants = {v["mix"]: v for v in report["variants"]}
    assert all(v["passed"] for v in variants.values()), variants
    assert {v["components"]["text_encoder_2"]["precision"] for v in variants.values()} == {"fp32"}
    with engines.load(out) as pipe:
        assert pipe.config.family == "flux" and "guidance" in pipe.specs["transformer"].input_names
        img = pipe("a red seven", seeds=[5])
    assert img.shape == (1, 16, 16, 3) and img.dtype == np.uint8
