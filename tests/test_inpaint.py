"""Inpainting on the sd family: `pipe(prompt, image=..., mask_image=...)` from the same compiled
output as text-to-image and image-to-image (engines/pipeline.py, step 4's image branch and the
blend after each step), against diffusers' StableDiffusionInpaintPipeline with the same 4-channel
UNet, prompts, image, mask, seeds and strength (the runtime's per-seed draws handed to diffusers:
optimizer/t2i/reference.py img2img_images with mask=); the mask's forms and the input checks.
SDXL, SD3 and Flux have theirs in test_sdxl.py, test_sd3.py and test_flux.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines.errors import InputError
from tests.test_img2img import PROMPTS, SEEDS, _with_scheduler, psnr, test_images

STEPS = 8


def test_masks(n: int, h: int, w: int) -> np.ndarray:
    """uint8 NHW: a different white (repaint) rectangle per image, grey edges either side of 128."""
    out = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        out[i, 2 + i : h // 2 + 3 + i, w // 4 : w - 2 - i] = 255
        out[i, 0, :] = 127 + i  # 127 keeps, 128 repaints: the binarising threshold 0.5 of / 255
    return out


test_masks.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def inp(t2i_folder):
    """The session's exported tiny SD pipeline (DDIM, 4-channel UNet) and diffusers'
    StableDiffusionInpaintPipeline over the same torch modules."""
    import torch

    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, img2img_pipeline

    torch.set_num_threads(1)
    ref = img2img_pipeline(diffusers_pipeline(load_pipeline(t2i_folder.parent / "pipe")), "inpaint")
    assert type(ref).__name__ == "StableDiffusionInpaintPipeline"
    return t2i_folder, ref


def test_inpaint_matches_diffusers(inp, tmp_path):
    """DDIM and Euler ancestral (its per-step draws come after the masked image's posterior draw),
    strengths 0.6 and 1.0 (pure noise, not the image noised to the first timestep), CFG 7.5, 24x32:
    the runtime's uint8 images within 40 dB of StableDiffusionInpaintPipeline's."""
    import diffusers

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.reference import img2img_images

    out, ref = inp
    images, masks = test_images(2, 24, 32, seed=0), test_masks(2, 24, 32)
    ddim_config = dict(ref.scheduler.config)
    parity: dict[str, dict[float, float]] = {}
    try:
        for cls, kind in (("DDIMScheduler", "ddim"), ("EulerAncestralDiscreteScheduler", "euler_ancestral")):
            folder = _with_scheduler(out, tmp_path, cls, kind, {})
            ref.scheduler = getattr(diffusers, cls).from_config(ddim_config)
            with TextToImagePipeline(folder) as pipe:
                for s in (0.6, 1.0):
                    ours = pipe(
                        PROMPTS,
                        image=images,
                        mask_image=masks,
                        strength=s,
                        seeds=SEEDS,
                        num_inference_steps=STEPS,
                    )
                    want = img2img_images(ref, PROMPTS, images, s, STEPS, 7.5, SEEDS, mask=masks)
                    assert ours.dtype == np.uint8 and ours.shape == want.shape == (2, 24, 32, 3)
                    parity.setdefault(kind, {})[s] = psnr(ours, want)
                    # the mask is used: img2img from the same seeds differs inside it
                    if s == 0.6:
                        i2i = pipe(PROMPTS, image=images, strength=s, seeds=SEEDS, num_inference_steps=STEPS)
                        assert psnr(i2i, ours) < 35
    finally:
        ref.scheduler = diffusers.DDIMScheduler.from_config(ddim_config)
    print("\ninpaint fp32 PSNR vs diffusers (dB) by strength:", json.dumps(parity))
    assert all(v >= 40.0 for d in parity.values() for v in d.values()), parity


def test_mask_forms_and_files_agree(inp, tmp_path):
    """HW uint8, HWx1, HWx3 RGB (made grayscale as PIL's convert("L")), bool, a list and PNG files
    give the same images; the default strength is diffusers' 1.0; chunks of the compiled batch."""
    from PIL import Image

    from engines.images import grayscale
    from engines.t2i import TextToImagePipeline

    out, _ = inp
    images, masks = test_images(5, 16, 16, seed=1), test_masks(5, 16, 16)
    rgb = np.stack([masks] * 3, -1)
    rgb[..., 0] = np.where(masks > 0, 250, 0)  # not grey: the luma decides
    assert np.array_equal(
        grayscale(rgb) >= 128, np.asarray([Image.fromarray(m).convert("L") for m in rgb]) >= 128
    )
    Image.fromarray(images[0]).save(tmp_path / "image.png")
    Image.fromarray(masks[0]).save(tmp_path / "mask.png")
    prompts = [f"a red seven {i}" for i in range(5)]
    kw = dict(seeds=list(range(5)), num_inference_steps=4)
    with TextToImagePipeline(out) as pipe:
        many = pipe(prompts, image=images, mask_image=masks, **kw)
        assert many.shape == (5, 16, 16, 3)
        for form in (masks[..., None], list(masks), masks >= 128):
            assert np.array_equal(pipe(prompts, image=images, mask_image=form, **kw), many)
        coloured = pipe(prompts, image=images, mask_image=rgb, **kw)
        assert np.array_equal(pipe(prompts, image=images, mask_image=grayscale(rgb), **kw), coloured)
        full = pipe(prompts[:1], image=images[:1], mask_image=masks[:1], strength=1.0, **{**kw, "seeds": [0]})
        files = pipe(
            prompts[0],
            image=tmp_path / "image.png",
            mask_image=str(tmp_path / "mask.png"),
            seeds=[0],
            num_inference_steps=4,
        )
    assert np.abs(full.astype(int) - many[:1]).max() <= 1  # independent of the batch
    assert np.array_equal(files, full)


def test_inpaint_bad_inputs_are_one_line(inp, tmp_path):
    from engines.t2i import TextToImagePipeline

    out, _ = inp
    img, mask = test_images(1, 16, 16, seed=2), test_masks(1, 16, 16)
    (tmp_path / "bad.png").write_text("not a png")
    cases = [
        (dict(mask_image=mask), "mask_image: only with image="),
        (
            dict(image=img, mask_image=mask.astype(np.float32)),
            "mask_image: expected uint8 or bool masks, got float32",
        ),
        (dict(image=img, mask_image=test_masks(1, 16, 24)), "mask_image: 16x24, the image is 16x16"),
        (dict(image=img, mask_image=np.concatenate([mask, mask])), "mask_image: 2 mask(s) for 1 prompt(s)"),
        (
            dict(image=img, mask_image=np.zeros((1, 16, 16, 2), np.uint8)),
            "mask_image: 2 channels, expected 1 or 3",
        ),
        (dict(image=img, mask_image=3), "mask_image: expected a uint8 numpy array, a file path"),
        (dict(image=img, mask_image=tmp_path / "missing.png"), "missing.png: no such file"),
        (dict(image=tmp_path / "bad.png", mask_image=mask), "bad.png: not an image Pillow reads"),
        (dict(image=img, mask_image=mask, strength=0), "strength=0.0: must be in (0, 1]"),
        (dict(image=img, mask_image=mask, strength=0.05), "no step left"),
    ]
    with TextToImagePipeline(out) as pipe:
        for kw, msg in cases:
            with pytest.raises(InputError) as e:
                pipe("a red seven", num_inference_steps=10, **kw)
            assert msg in str(e.value) and "\n" not in str(e.value), (kw.keys(), str(e.value))


def test_mask_preprocessing_matches_diffusers():
    """engines/images.py against diffusers' mask_processor (grayscale, / 255, binarised at 0.5) and
    F.interpolate's nearest resize to the latent size, on random masks and odd ratios."""
    import torch
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from engines.images import preprocess_mask, resize_nearest

    proc = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    want = proc.preprocess([Image.fromarray(x) for x in rgb], height=32, width=48).numpy()
    got = preprocess_mask(rgb, 2, (32, 48))
    assert got.shape == want.shape == (2, 1, 32, 48) and np.array_equal(got, want)
    for size in ((4, 6), (5, 7), (32, 48), (3, 40)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(got), size=size).numpy()
        assert np.array_equal(resize_nearest(got, size), ref), size
