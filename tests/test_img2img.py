"""Image-to-image on the sd family: one compiled output serves text-to-image and image-to-image.

The runtime's `pipe(prompt, image=..., strength=...)` (engines/pipeline.py, step 4's image branch)
against diffusers' StableDiffusionImg2ImgPipeline on the same modules, prompts, images, seeds and
strength, with the runtime's per-seed draws handed to diffusers (optimizer/t2i/reference.py:
img2img_images); the input checks; dd-compile exporting, quantizing and validating the VAE encoder.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from engines.errors import InputError

PROMPTS = ["a red seven", "Green  SEVEN, green!"]
SEEDS = [5, 6]
STRENGTHS = (0.3, 0.75, 1.0)
STEPS = 10
# (diffusers class, runtime kind, options over the tiny pipeline's DDIM config)
SCHEDULERS = [
    ("DDIMScheduler", "ddim", {}),
    ("EulerDiscreteScheduler", "euler", {}),
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", {}),
    ("DPMSolverMultistepScheduler", "dpm_multistep", {}),
    ("PNDMScheduler", "pndm", {"skip_prk_steps": True}),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from optimizer.metrics import psnr_db

    return psnr_db(a.astype(np.float64), b.astype(np.float64), data_range=255.0)


def test_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 NHWC: smooth colour waves plus a little noise (something a VAE encodes like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) / max(h, w)
    out = []
    for _ in range(n):
        f, ph = rng.uniform(0.5, 2.0, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
        chans = [127.5 + 100 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + ph[c]) for c in range(3)]
        img = np.stack(chans, axis=-1) + rng.normal(0, 8, (h, w, 3))
        out.append(np.clip(img, 0, 255).round().astype(np.uint8))
    return np.stack(out)


test_images.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def i2i(t2i_folder, tmp_path_factory):
    """The session's exported tiny pipeline (DDIM, latents 8..16, VAE factor 2) and diffusers'
    img2img pipeline over the same torch modules."""
    import torch

    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, img2img_pipeline

    torch.set_num_threads(1)
    loaded = load_pipeline(t2i_folder.parent / "pipe")
    return t2i_folder, img2img_pipeline(diffusers_pipeline(loaded))


def _with_scheduler(out, root, cls: str, kind: str, kw: dict) -> object:
    """A copy of the exported folder sampling with another scheduler (the graphs do not change)."""
    import diffusers

    if kind == "ddim":
        return out
    dest = root / kind
    shutil.copytree(out, dest)
    base = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    getattr(diffusers, cls).from_config({**base, **kw}).save_config(dest / "scheduler")
    t2i = json.loads((dest / "t2i.json").read_text())
    t2i["scheduler"]["kind"] = kind
    (dest / "t2i.json").write_text(json.dumps(t2i))
    return dest


def test_img2img_matches_diffusers(i2i, tmp_path):
    """Every runtime scheduler but LCM, strengths 0.3 / 0.75 / 1.0, 10 steps, CFG 7.5, 24x32 images:
    the runtime's uint8 images within 40 dB of diffusers' StableDiffusionImg2ImgPipeline."""
    import diffusers

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.reference import img2img_images

    out, ref = i2i
    images = test_images(2, 24, 32, seed=0)
    ddim_config = dict(ref.scheduler.config)
    parity: dict[str, dict[float, float]] = {}
    try:
        for cls, kind, kw in SCHEDULERS:
            folder = _with_scheduler(out, tmp_path, cls, kind, kw)
            ref.scheduler = getattr(diffusers, cls).from_config({**ddim_config, **kw})
            with TextToImagePipeline(folder) as pipe:
                assert pipe.config.scheduler_kind == kind
                for s in STRENGTHS:
                    ours = pipe(PROMPTS, image=images, strength=s, seeds=SEEDS, num_inference_steps=STEPS)
                    want = img2img_images(ref, PROMPTS, images, s, STEPS, 7.5, SEEDS)
                    assert ours.dtype == np.uint8 and ours.shape == want.shape == (2, 24, 32, 3)
                    assert ours.std() > 5
                    parity.setdefault(cls, {})[s] = psnr(ours, want)
                if kind in ("ddim", "euler_ancestral"):  # the draws matter: other seeds, other images
                    other = img2img_images(ref, PROMPTS, images, 0.75, STEPS, 7.5, [7, 8])
                    assert psnr(other, img2img_images(ref, PROMPTS, images, 0.75, STEPS, 7.5, SEEDS)) < 35
    finally:
        ref.scheduler = diffusers.DDIMScheduler.from_config(ddim_config)
    print("\nimg2img fp32 PSNR vs diffusers (dB) by strength:", json.dumps(parity, indent=1))
    assert all(v >= 40.0 for d in parity.values() for v in d.values()), parity


def test_img2img_batch_forms_and_chunks(i2i):
    """HWC, NHWC and a list give the same images; an image never depends on its batch (5 images run
    in chunks of the compiled batch, 4); text-to-image from the same output still works."""
    from engines.t2i import TextToImagePipeline

    out, _ = i2i
    images = test_images(5, 16, 16, seed=1)
    prompts = [f"a red seven {i}" for i in range(5)]
    with TextToImagePipeline(out) as pipe:
        assert pipe.max_batch == 4
        many = pipe(prompts, image=images, strength=0.6, seeds=list(range(5)), num_inference_steps=5)
        listed = pipe(prompts[:2], image=list(images[:2]), strength=0.6, seeds=[0, 1], num_inference_steps=5)
        one = pipe(prompts[4], image=images[4], strength=0.6, seeds=[4], num_inference_steps=5)
        t2i = pipe(prompts[:1], seeds=[0], num_inference_steps=5)
    assert many.shape == (5, 16, 16, 3) and t2i.shape == (1, 16, 16, 3)
    assert np.abs(listed.astype(int) - many[:2]).max() <= 1
    assert np.abs(one.astype(int) - many[4:]).max() <= 1
    assert psnr(t2i, many[:1]) < 35  # the image is used


def test_img2img_bad_inputs_are_one_line(i2i, tmp_path):
    from engines.t2i import TextToImagePipeline

    out, _ = i2i
    img = test_images(1, 16, 16, seed=2)
    cases = [
        (dict(image=img.astype(np.float32)), "image: expected uint8 (HWC or NHWC), got float32"),
        (dict(image=[img[0], img[0].astype(np.int16)]), "image: expected uint8 images"),
        (dict(image=test_images(1, 17, 16, 3)), "image 17x16: height=17: must be a multiple of 2"),
        (dict(image=test_images(1, 16, 64, 3)), "image 16x64: width=64: must be a multiple of 2 in [16, 32]"),
        (dict(image=img[..., :2]), "image: 2 channels, expected 3"),
        (dict(image=img[0, 0]), "image: expected HWC or NHWC"),
        (dict(image=3), "image: expected a uint8 numpy array, a file path or a list of them, got int"),
        (dict(image="cat.png"), "image: cat.png: no such file"),
        (dict(image=img, strength=0), "strength=0.0: must be in (0, 1]"),
        (dict(image=img, strength=1.5), "strength=1.5: must be in (0, 1]"),
        (dict(image=img, strength="0.5"), "strength='0.5': expected a number"),
        (dict(image=img, strength=0.05), "no step left"),
        (dict(strength=0.5), "strength: only with image="),
        (dict(image=np.concatenate([img, img])), "image: 2 image(s) for 1 prompt(s)"),
        (dict(image=img, height=32), "height=32: image-to-image takes the image's size (16)"),
        (dict(image=img, latents=np.zeros((1, 4, 8, 8), np.float32)), "pass image= or latents=, not both"),
    ]
    with TextToImagePipeline(out) as pipe:
        for kw, msg in cases:
            with pytest.raises(InputError) as e:
                pipe("a red seven", num_inference_steps=10, **kw)
            assert msg in str(e.value) and "\n" not in str(e.value), (kw.keys(), str(e.value))
    # an output compiled before image-to-image (no vae_encoder in t2i.json): text-to-image only
    old = tmp_path / "old"
    shutil.copytree(out, old)
    t2i = json.loads((old / "t2i.json").read_text())
    del t2i["components"]["vae_encoder"]
    (old / "t2i.json").write_text(json.dumps(t2i))
    with TextToImagePipeline(old) as pipe:
        assert pipe("a red seven", seeds=[0], num_inference_steps=2).shape == (1, 16, 16, 3)
        with pytest.raises(InputError, match=r"^image: this output has no vae_encoder component") as e:
            pipe("a red seven", image=img, num_inference_steps=2)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_lcm_img2img_matches_diffusers(tmp_path):
    """An LCM pipeline (embedded guidance): strength shortens LCMScheduler's schedule itself, as
    diffusers' LatentConsistencyModelImg2ImgPipeline; same images within 40 dB, 4 steps."""
    import torch

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, img2img_images, img2img_pipeline
    from tests.t2i_tiny import make_tiny_pipeline

    torch.set_num_threads(1)
    loaded = load_pipeline(make_tiny_pipeline(tmp_path / "pipe", lcm=True, seed=1))
    out = export_pipeline(loaded, tmp_path / "out")
    ref = img2img_pipeline(diffusers_pipeline(loaded))
    assert type(ref).__name__ == "LatentConsistencyModelImg2ImgPipeline"
    images = test_images(2, 16, 16, seed=4)
    parity = {}
    with TextToImagePipeline(out) as pipe:
        for s in (0.3, 0.75, 1.0):
            ours = pipe(
                PROMPTS, image=images, strength=s, seeds=SEEDS, num_inference_steps=4, guidance_scale=8.5
            )
            parity[s] = psnr(ours, img2img_images(ref, PROMPTS, images, s, 4, 8.5, SEEDS))
        with pytest.raises(InputError, match=r"^strength=0.05 with num_inference_steps=4: an LCM keeps"):
            pipe(PROMPTS, image=images, strength=0.05, num_inference_steps=4)
    print(f"\nLCM img2img fp32 PSNR vs diffusers (dB) by strength: {parity}")
    assert min(parity.values()) >= 40.0, parity


def test_add_noise_matches_diffusers():
    """Each scheduler's add_noise at a begin index, against diffusers' with set_begin_index (or the
    timestep, for the alpha-bar ones)."""
    import diffusers
    import torch

    from engines.schedulers import SCHEDULER_CLASSES, make_scheduler

    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    rng = np.random.default_rng(0)
    x, n = (
        rng.standard_normal((2, 4, 3, 3), dtype=np.float32),
        rng.standard_normal((2, 4, 3, 3), dtype=np.float32),
    )
    for cls, kind in SCHEDULER_CLASSES.items():
        ref = getattr(diffusers, cls).from_config({**base, "skip_prk_steps": True})
        ours = make_scheduler(kind, {**base, "_class_name": cls, "skip_prk_steps": True})
        ref.set_timesteps(10)
        ours.set_timesteps(10)
        begin = 4
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(begin)
        t = ref.timesteps[begin : begin + 1].repeat(2)
        want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(n), t).numpy()
        ours.set_begin_index(begin)
        got = ours.add_noise(x, n, begin)
        assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-5 * max(1, np.abs(want).max()), cls


@pytest.mark.slow
def test_compile_exports_validates_and_serves_the_vae_encoder(tmp_path):
    """dd-compile on the tiny SD pipeline: the VAE encoder is exported, quantized (fp16 like the
    decoder), call-parity validated on real (decoded) images and published; engines.load(out) runs
    image-to-image, the fp32 mix within 40 dB of diffusers."""
    import engines
    from optimizer.cli import main
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, img2img_images, img2img_pipeline
    from tests.t2i_tiny import make_tiny_pipeline

    src = make_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "out"
    args = [src, "--steps", "4", "-o", out, "--precision", "fp32,fp16", "--threads", "1"]
    args += ["--bench-seconds", "0.5", "--samples", "4", "--fid-samples", "8", "--threads-grid", "0"]
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    cp = rep["call_parity"]
    assert {"vae_encoder.fp32", "vae_encoder.fp16"} <= set(cp), sorted(cp)
    assert cp["vae_encoder.fp32"]["passed"] and cp["vae_encoder.fp32"]["rel_l2"] <= 1e-5, cp[
        "vae_encoder.fp32"
    ]
    assert cp["vae_encoder.fp16"]["passed"] and cp["vae_encoder.fp16"]["calls"] >= 1, cp["vae_encoder.fp16"]
    print(
        f"\nvae_encoder call parity: fp32 {cp['vae_encoder.fp32']['rel_l2']:.1e}, "
        f"fp16 {cp['vae_encoder.fp16']['rel_l2']:.1e}"
    )
    mixes = {v["mix"]: v["components"]["vae_encoder"]["precision"] for v in rep["variants"]}
    assert mixes["fp32"] == "fp32" and mixes["fp16"] in ("fp16", "fp32"), mixes
    m = json.loads((out / "manifest.json").read_text())
    published = {
        a["name"] for a in m["artifacts"] if (a.get("extra") or {}).get("component") == "vae_encoder"
    }
    assert published == {"onnx/vae_encoder/fp32", "onnx/vae_encoder/fp16"}, published
    image = test_images(1, 16, 16, seed=5)
    ref = img2img_pipeline(diffusers_pipeline(load_pipeline(src)))
    want = img2img_images(ref, ["a red seven"], image, 0.5, 4, 7.5, [3])
    with engines.load(out) as pipe:  # the recommended mix
        got = pipe("a red seven", image=image[0], strength=0.5, seeds=[3])
        assert got.dtype == np.uint8 and got.shape == (1, 16, 16, 3)
        assert pipe("a red seven", seeds=[3]).shape == (1, 16, 16, 3)  # text-to-image, same output
    with engines.load(out, precision="fp32") as pipe:
        fp32 = psnr(
            pipe(
                "a red seven", image=image, strength=0.5, seeds=[3], guidance_scale=7.5, num_inference_steps=4
            ),
            want,
        )
    print(f"compiled fp32 img2img PSNR vs diffusers: {fp32:.1f} dB")
    assert fp32 >= 40.0


def test_family_table_exports_the_vae_encoder():
    """The sd family's default task img2img adds the VAE encoder to what dd-compile builds; every mix
    gives it a precision (fp32 in fp32, fp16 beside an fp16 decoder)."""
    from optimizer.families import FAMILIES

    sd = FAMILIES["sd"]
    assert sd.exported == ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    assert {m: sd.mixes[m]["vae_encoder"] for m in sd.mixes} == {
        "fp32": "fp32",
        "fp16": "fp16",
        "int8": "fp16",
        "bf16": "bf16",  # the fp32 graph under OpenVINO's bf16 hint
    }
    assert FAMILIES["denoiser"].exported == ("denoiser",)
