"""Inpainting UNets (StableDiffusionInpaintPipeline's and SDXL's 9-channel UNet: latents + mask +
masked-image latents): the folder loads and exports like any SD / SDXL pipeline, the torch-free
runtime (engines/pipeline.py, `inpaint_unet`) reproduces diffusers' inpainting pipeline from the same
image, mask, prompts, seeds and strength, and a call without image= and mask_image= is refused in
one line; dd-compile on such a folder runs every stage as inpainting (optimizer/t2i/workload.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines.errors import InputError
from tests.test_img2img import PROMPTS, SEEDS, psnr, test_images
from tests.test_inpaint import test_masks

STEPS = 6


def _export(root, make):
    import torch

    from engines.iospec import DimRange
    from optimizer.t2i.components import Profile
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    torch.set_num_threads(1)
    src = make(root / "pipe", inpaint=True)
    lat = DimRange(8, 8, 16)
    loaded = load_pipeline(src, profile=Profile(latent_height=lat, latent_width=lat))
    assert loaded.spec.inpaint and loaded.spec.component("unet").io.inputs[0].shape[1] == 9
    return export_pipeline(loaded, root / "out"), diffusers_pipeline(loaded)


@pytest.fixture(scope="module")
def sd_inpaint(tmp_path_factory):
    """dd-compile on a tiny StableDiffusionInpaintPipeline folder (its own teacher, latents 8..16),
    and diffusers' pipeline over the same modules: (output folder, diffusers pipeline)."""
    import torch
    from click.testing import CliRunner

    from optimizer.cli import main
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline
    from tests.t2i_tiny import make_tiny_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sd_inpaint")
    src = make_tiny_pipeline(root / "pipe", inpaint=True, seed=2)
    out = root / "out"
    args = [src, "--steps", "2", "-o", out, "--precision", "fp32,fp16", "--threads", "1", "--samples", "4"]
    args += ["--resolutions", "16,32", "--bench-seconds", "0.3", "--fid-samples", "8", "--threads-grid", "1"]
    args += ["--batch-sizes", "1"]
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, diffusers_pipeline(load_pipeline(src))


def _parity(pipe, ref, strengths, size=(24, 32)) -> dict[float, float]:
    from optimizer.t2i.reference import img2img_images

    images, masks = test_images(2, *size, seed=3), test_masks(2, *size)
    got = {}
    with pipe:
        assert pipe.inpaint_only
        for s in strengths:
            ours = pipe(
                PROMPTS, image=images, mask_image=masks, strength=s, seeds=SEEDS, num_inference_steps=STEPS
            )
            want = img2img_images(ref, PROMPTS, images, s, STEPS, 7.5, SEEDS, mask=masks)
            assert ours.dtype == np.uint8 and ours.shape == want.shape == (2, *size, 3)
            got[s] = psnr(ours, want)
    return got


def test_sd_inpainting_unet_matches_diffusers(sd_inpaint):
    """StableDiffusionInpaintPipeline with its 9-channel UNet, DDIM, CFG 7.5, 24x32: strength 1.0
    (pure noise: the image is encoded only as the masked image) and 0.6 (the image noised to the
    first kept step), the runtime's uint8 images within 40 dB of diffusers'."""
    import engines

    out, ref = sd_inpaint
    assert type(ref).__name__ == "StableDiffusionInpaintPipeline"
    parity = _parity(engines.load(out, precision="fp32"), ref, (1.0, 0.6))
    print("\nSD inpainting UNet, fp32 PSNR vs diffusers (dB) by strength:", json.dumps(parity))
    assert all(v >= 40.0 for v in parity.values()), parity


def test_sdxl_inpainting_unet_matches_diffusers(tmp_path):
    """StableDiffusionXLInpaintPipeline with a 9-channel UNet (Euler, the base model's time ids):
    its default strength 0.9999 and 1.0."""
    from engines.t2i import TextToImagePipeline
    from tests.t2i_tiny import make_tiny_sdxl

    out, ref = _export(tmp_path, make_tiny_sdxl)
    assert type(ref).__name__ == "StableDiffusionXLInpaintPipeline"
    parity = _parity(TextToImagePipeline(out), ref, (0.9999, 1.0), size=(16, 16))
    print("\nSDXL inpainting UNet, fp32 PSNR vs diffusers (dB) by strength:", json.dumps(parity))
    assert all(v >= 40.0 for v in parity.values()), parity


def test_inpainting_unet_refuses_other_tasks(sd_inpaint):
    """Text-to-image and image-to-image are refused in one line, before any component runs; the
    default strength is the family's (SD: 1.0)."""
    import engines

    out, _ = sd_inpaint
    img, mask = test_images(1, 16, 16, seed=4), test_masks(1, 16, 16)
    with engines.load(out, precision="fp32") as pipe:
        for kw, msg in (
            ({}, "image: this output's UNet is an inpainting UNet"),
            (dict(image=img), "mask_image: this output's UNet is an inpainting UNet"),
            (dict(strength=0.5), "image: this output's UNet is an inpainting UNet"),
        ):
            for call in (pipe, pipe.check):
                with pytest.raises(InputError) as e:
                    call("a red seven", seeds=[0], num_inference_steps=4, **kw)
                assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
        a = pipe("a red seven", image=img, mask_image=mask, seeds=[0], num_inference_steps=4)
        b = pipe("a red seven", image=img, mask_image=mask, strength=1.0, seeds=[0], num_inference_steps=4)
        req = pipe.check("a red seven", image=img, mask_image=mask, seeds=[0], num_inference_steps=4)
        assert np.array_equal(a, b) and np.array_equal(pipe.run(req), a)


def test_compile_inpainting_unet(sd_inpaint):
    """dd-compile on the inpainting folder: calibration, call and sample parity, distribution and
    timing all inpaint (synthetic images under a box, strength 1.0), every mix passes; the
    published pipeline (engines.load) inpaints and refuses text-to-image in one line."""
    import engines

    out, _ = sd_inpaint
    rep = json.loads((out / "report.json").read_text())
    assert rep["student"]["task"] == "inpaint" and rep["passed"]
    assert any("an inpainting UNet" in n for n in rep["notes"]), rep["notes"]
    assert rep["call_parity"]["unet.fp32"]["rel_l2"] <= 1e-5
    assert rep["call_parity"]["vae_encoder.fp32"]["passed"]
    psnr = {v["mix"]: float(v["sample_parity"]["psnr_db"]) for v in rep["variants"]}
    assert psnr["fp32"] >= 40 and psnr["fp16"] >= 30, psnr  # fp16: range-checked on inpainting calls
    assert all(v["task_parity"] == {} for v in rep["variants"])  # its sample parity is inpainting
    assert rep["distribution"]["n"] == 8
    assert rep["timings"]["end_to_end"]["teacher"] and rep["timings"]["teacher_baseline"]
    for b, sp in rep["variants"][0]["speedup_end_to_end"].items():  # 2 steps vs its 50 CFG steps
        why = rep["timings"]["speedup_null_reason"]["fp32"][b]
        assert (sp is None and why) or sp > 1, (b, sp, why)
    pipe = engines.load(out, precision="fp32")
    img = pipe("a red seven", image=test_images(1, 16, 16, 0), mask_image=test_masks(1, 16, 16), seeds=[0])
    assert img.dtype == np.uint8 and img.shape == (1, 16, 16, 3)
    with pytest.raises(InputError, match="an inpainting UNet"):
        pipe("a red seven", seeds=[0])


def test_inpainting_unet_and_pipeline_class_must_agree(tmp_path):
    """A 9-channel UNet in a StableDiffusionPipeline folder, or a 4-channel one in an inpainting
    folder, is one line naming the UNet, its channels and the class expected."""
    from optimizer.t2i.load import load_pipeline
    from tests.t2i_tiny import make_tiny_pipeline

    for inpaint, cls, want in (
        (True, "StableDiffusionPipeline", "StableDiffusionInpaintPipeline"),
        (False, "StableDiffusionInpaintPipeline", "StableDiffusionPipeline"),
    ):
        src = make_tiny_pipeline(tmp_path / f"p{int(inpaint)}", inpaint=inpaint)
        index = json.loads((src / "model_index.json").read_text())
        (src / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
        with pytest.raises(InputError) as e:
            load_pipeline(src)
        msg = str(e.value)
        assert f"in_channels {9 if inpaint else 4}" in msg and want in msg and "\n" not in msg, msg
    # any other count (checked once the weights loaded, so a VAE config that does not match its
    # weights is named as the VAE's first)
    from optimizer.t2i.load import check_unet_channels

    configs = {"unet": {"in_channels": 5}, "vae_decoder": {"latent_channels": 4}}
    with pytest.raises(InputError, match="in_channels 5: expected the VAE's latent_channels 4 .* or 9"):
        check_unet_channels(configs, tmp_path)
    check_unet_channels({**configs, "unet": {"in_channels": 9}}, tmp_path)
