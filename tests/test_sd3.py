"""SD3 pipelines end to end, on tiny SD3-shaped folders (tests/t2i_tiny.py make_tiny_sd3, as diffusers'
own SD3 tests build them, with an offline T5 tokenizer): two CLIP encoders with projection (their
penultimate states concatenated, zero-padded to T5's width, T5's states after them on the sequence
axis; pooled = both projections), an MMDiT transformer with patch size 2 on 16 latent channels, a
VAE with scaling and shift factors, FlowMatch Euler with shift 3.

The torch-free runtime on the exported graphs gives diffusers' StableDiffusion3Pipeline images from
the same prompts and latents (and from the same seeds); dd-compile compiles the folder, T5 fp32 in
every mix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.t2i_tiny import make_tiny_sd3

PROMPTS = ["a red seven", "Green  SEVEN, green!"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from optimizer.metrics import psnr_db

    return psnr_db(a.astype(np.float64), b.astype(np.float64), data_range=255.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(pipeline folder, its fp32 runtime folder)."""
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline

    root = tmp_path_factory.mktemp("sd3")
    src = make_tiny_sd3(root / "base")
    export_pipeline(load_pipeline(src), root / "fp32")
    return src, root / "fp32"


def _reference(src: Path):
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    return diffusers_pipeline(load_pipeline(src))


def test_sd3_folder_loads_as_its_family(exported):
    from optimizer.families import FAMILIES
    from optimizer.families.detect import family_of
    from optimizer.t2i.load import load_pipeline

    src, _ = exported
    assert family_of(src) is FAMILIES["sd3"]
    spec = load_pipeline(src).spec
    assert (
        spec.family == "sd3"
        and spec.denoiser == "transformer"
        and spec.vae_shift_factor == pytest.approx(0.0609)
    )
    assert spec.tokenizer_3.model_max_length == 256 and spec.tokenizer_3.pad_token == "<pad>"
    tr = {t.name: t.shape for t in spec.component("transformer").io.inputs}
    assert tr["encoder_hidden_states"] == ("batch", "sequence", 48)  # CLIP 16 + 16 padded to T5's 48
    assert spec.component("transformer").io.dims["sequence"].opt == 77 + 256
    assert tr["pooled_projections"] == ("batch", 32) and tr["sample"][1] == 16
    assert dict(FAMILIES["sd3"].mixes["fp16"])["text_encoder_3"] == "fp32"  # T5 overflows fp16


@pytest.mark.parametrize("negative,guidance", [(None, 5.0), ("blue", 5.0), (None, 1.0)])
def test_runtime_reproduces_diffusers_sd3(exported, negative, guidance):
    """fp32 graphs, same prompts and latents: StableDiffusion3Pipeline's images (>= 40 dB)."""
    import torch

    from engines.t2i import TextToImagePipeline

    src, out = exported
    lat = np.random.default_rng(0).standard_normal((2, 16, 8, 8), dtype=np.float32)
    kw = dict(negative_prompt=negative, num_inference_steps=5, guidance_scale=guidance)
    want = _reference(src)(PROMPTS, latents=torch.from_numpy(lat), output_type="np", **kw).images
    want = (want * 255).round().astype(np.uint8)
    with TextToImagePipeline(out) as pipe:
        got = pipe(PROMPTS, latents=lat, **kw)
    assert got.shape == (2, 16, 16, 3)
    assert psnr(got, want) >= 40.0, psnr(got, want)


def test_sd3_seeds_reproduce_diffusers_generators(exported):
    """`seeds=[s]`: diffusers' image from torch.Generator().manual_seed(s), nothing patched."""
    import torch

    from engines.t2i import TextToImagePipeline

    src, out = exported
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    want = _reference(src)(PROMPTS, generator=gens, num_inference_steps=4, output_type="np").images
    with TextToImagePipeline(out) as pipe:
        assert pipe.parts.defaults["guidance_scale"] == 7.0  # SD3's default
        got = pipe(PROMPTS, seeds=[7, 8], num_inference_steps=4)
    assert psnr(got, (want * 255).round().astype(np.uint8)) >= 40.0


def test_sd3_sizes_are_whole_patches(exported):
    """The transformer takes whole 2x2 latent patches: 16 px = 8 latents ok; 18 px refused in one line."""
    from engines.errors import InputError
    from engines.t2i import TextToImagePipeline

    _, out = exported
    with (
        TextToImagePipeline(out) as pipe,
        pytest.raises(InputError, match=r"height=18: must be a multiple of 4"),
    ):
        pipe("a red seven", seeds=[0], height=18, width=16)


def test_t5_length_is_a_build_knob(exported, tmp_path):
    """--max-sequence-length 64: T5 and the joint sequence are built for 64 tokens (77 + 64), and
    the runtime gives diffusers' images at max_sequence_length=64 (the reference runs there too)."""
    import dataclasses

    import torch

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, t5_length

    src, _ = exported
    base = load_pipeline(src).spec.profile
    loaded = load_pipeline(src, profile=dataclasses.replace(base, t5_tokens=64))
    assert loaded.spec.component("transformer").io.dims["sequence"].opt == 77 + 64
    export_pipeline(loaded, tmp_path / "t5-64")
    pipe = diffusers_pipeline(loaded)
    assert t5_length(pipe) == {"max_sequence_length": 64}
    lat = np.random.default_rng(3).standard_normal((2, 16, 8, 8), dtype=np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=5.0)
    want = pipe(PROMPTS, latents=torch.from_numpy(lat), output_type="np", max_sequence_length=64, **kw).images
    with TextToImagePipeline(tmp_path / "t5-64") as ep:
        assert ep.specs["text_encoder_3"].dims["t5_tokens"].opt == 64
        got = ep(PROMPTS, latents=lat, **kw)
    assert psnr(got, (want * 255).round().astype(np.uint8)) >= 40.0


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_sd3_img2img_reproduces_diffusers(exported, strength):
    """image= on an SD3 output: StableDiffusion3Img2ImgPipeline's images (the VAE posterior's
    sample, shift and scaling, FlowMatch's scale_noise at the first kept sigma, its unrounded
    strength rule: 5 steps at 0.5 keep 3)."""
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.reference import img2img_images, img2img_pipeline
    from tests.test_img2img import test_images

    src, out = exported
    image = test_images(2, 16, 16, seed=4)
    i2i = img2img_pipeline(_reference(src))
    want = img2img_images(i2i, PROMPTS, image, strength, 5, 5.0, seeds=[1, 2])
    with TextToImagePipeline(out) as pipe:
        assert "vae_encoder" in pipe.runners
        got = pipe(PROMPTS, image=image, seeds=[1, 2], strength=strength, num_inference_steps=5)
    assert psnr(got, want) >= 40.0, psnr(got, want)


def test_sd3_inpaint_reproduces_diffusers(exported):
    """image= and mask_image= on an SD3 output (16-channel transformer):
    StableDiffusion3InpaintPipeline's images, its default strength 0.6 (the unrounded rule) and
    1.0 (pure noise); the kept region re-noised with FlowMatch's scale_noise after every step."""
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.reference import img2img_images, img2img_pipeline
    from tests.test_img2img import test_images
    from tests.test_inpaint import test_masks

    src, out = exported
    image, mask = test_images(2, 16, 16, seed=4), test_masks(2, 16, 16)
    ref = img2img_pipeline(_reference(src), "inpaint")
    with TextToImagePipeline(out) as pipe:
        for s in (None, 1.0):
            got = pipe(PROMPTS, image=image, mask_image=mask, strength=s, seeds=[1, 2], num_inference_steps=5)
            want = img2img_images(ref, PROMPTS, image, 0.6 if s is None else s, 5, 5.0, [1, 2], mask=mask)
            assert psnr(got, want) >= 40.0, (s, psnr(got, want))


def test_sd3_triton_repository_serves_the_runtimes_images(exported, tmp_path, monkeypatch):
    """dd-triton on SD3: two CLIP encoders, T5 and the transformer as models; dd_t2i's images (with
    and without a negative prompt) are the runtime's."""
    from tests.test_triton_t2i import check_served_family

    models = ["dd_text_encoder", "dd_text_encoder_2", "dd_text_encoder_3", "dd_transformer", "dd_vae_decoder"]
    check_served_family(exported[1], tmp_path, monkeypatch, models, negative=True)


@pytest.mark.slow
def test_dd_serve_sd3_gives_the_runtimes_images(exported, tmp_path):
    """dd-serve on SD3 for real (PyTriton): five component models plus dd_t2i; two concurrent
    requests over HTTP and gRPC (one with a negative prompt) give the runtime's images."""
    from concurrent.futures import ThreadPoolExecutor

    from engines.t2i import TextToImagePipeline
    from tests.test_serve import grpc, http, require_serve_env, run_server
    from tests.test_serve_t2i import _input, prompt_inputs

    out = exported[1]
    py = require_serve_env("tokenizers")
    jobs = [(http, ["a red seven", ""], [1, 2], None), (grpc, ["green"], [3], "blue")]
    with run_server(tmp_path, out, "dd_t2i", "--allow-unvalidated", py=py) as server:

        def infer(job):
            mod, prompts, seeds, negative = job
            inputs = prompt_inputs(mod, prompts, seeds, steps=2)
            if negative is not None:
                arr = np.array([[negative.encode()]] * len(prompts), dtype=object)
                inputs.append(_input(mod, "negative_prompt", arr, "BYTES"))
            url = server["grpc" if mod is grpc else "http"]
            return mod.InferenceServerClient(url).infer("dd_t2i", inputs).as_numpy("image")

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(infer, jobs))
    with TextToImagePipeline(out, threads=1) as pipe:
        for (_, prompts, seeds, negative), image in zip(jobs, got, strict=True):
            want = pipe(prompts, negative, seeds=seeds, num_inference_steps=2)
            assert image.shape == want.shape and np.abs(image.astype(int) - want).max() <= 1


@pytest.mark.slow
def test_dd_compile_sd3_end_to_end(tmp_path):
    """dd-compile on an SD3 folder: every mix passes (T5 fp32 in each, the transformer fp16 / int8),
    the output loads, generates and benches its family."""
    import engines
    from optimizer.cli import main

    src = make_tiny_sd3(tmp_path / "sd3")
    out = tmp_path / "out"
    args = [str(src), "--steps", "4", "-o", str(out), "--samples", "2", "--fid-samples", "4"]
    args += ["--bench-seconds", "1", "--batch-sizes", "1", "--threads-grid", "0"]
    args += ["--max-sequence-length", "32"]  # T5's length as a build knob, end to end
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "sd3"
    variants = {v["mix"]: v for v in report["variants"]}
    assert set(variants) == {"fp32", "fp16", "int8"} and all(v["passed"] for v in variants.values())
    assert variants["int8"]["components"]["transformer"]["precision"] == "int8"
    assert {v["components"]["text_encoder_3"]["precision"] for v in variants.values()} == {"fp32"}
    assert float(variants["fp32"]["sample_parity"]["psnr_db"]) >= 40.0  # "inf" when identical
    with engines.load(out) as pipe:
        assert pipe.config.family == "sd3" and pipe.specs["text_encoder_3"].dims["t5_tokens"].opt == 32
        img = pipe("a red seven", seeds=[5])
    assert img.shape == (1, 16, 16, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("clip_width,t5_width", [(16, 48), (64, 48), (48, 48)])
def test_clip_states_padded_or_cut_to_t5s_width_as_torch_pads(clip_width, t5_width):
    """diffusers pads the concatenated CLIP states to T5's width with F.pad, which crops when CLIP
    is wider (diffusers' own SD3 test config: 2 x 32 CLIP over a 32-wide T5): the runtime's recipe
    gives the same joint sequence either way."""
    import torch

    from engines.conditioning import _sd3_embeddings
    from engines.pipeline import TextParts

    rng = np.random.default_rng(0)
    half = clip_width // 2
    outs = {
        "te1": {
            "penultimate_hidden_state": rng.standard_normal((2, 5, half)),
            "text_embeds": np.ones((2, 3)),
        },
        "te2": {
            "penultimate_hidden_state": rng.standard_normal((2, 5, half)),
            "text_embeds": np.ones((2, 4)),
        },
        "te3": {"last_hidden_state": rng.standard_normal((2, 7, t5_width))},
    }
    text = TextParts(None, encoder="te1", more=(("te2", None), ("te3", None)))
    states, pooled = _sd3_embeddings(
        text, lambda runner, tok, prompts, what: outs[runner], ["a", "b"], "prompt"
    )
    clip = torch.cat([torch.from_numpy(outs[k]["penultimate_hidden_state"]) for k in ("te1", "te2")], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5_width - clip.shape[-1]))
    want = torch.cat([clip, torch.from_numpy(outs["te3"]["last_hidden_state"])], dim=-2).float().numpy()
    assert states.shape == (2, 12, t5_width) and np.array_equal(states, want)
    assert pooled.shape == (2, 7)
