"""The PyTorch reference: diffusers' own pipeline objects holding a LoadedPipeline's modules.

`diffusers_pipeline` builds a StableDiffusionPipeline / LatentConsistencyModelPipeline from the
loaded modules (the student UNet included); `Recorder` captures every component's inputs along a
run (text encoder ids, each UNet call with both CFG halves, the VAE's final latents, and the images
the VAE decodes from them, on the uint8 grid, as the VAE encoder's inputs), the real inputs call
parity and calibration use; `images` runs it from given latents with the runtime's per-step draws
for a stochastic scheduler (LCM's re-noising, Euler ancestral's noise), and `img2img_images` runs
diffusers' StableDiffusionImg2ImgPipeline (LCM: LatentConsistencyModelImg2ImgPipeline) with the
runtime's per-seed draws (the VAE posterior's eps, the added noise, the scheduler's), so engine and
torch images are comparable pixel for pixel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engines.torch_rng import TorchGenerator
from optimizer.t2i.load import LoadedPipeline


def diffusers_pipeline(loaded: LoadedPipeline) -> Any:
    import diffusers
    from transformers import CLIPTokenizerFast, T5TokenizerFast

    spec = loaded.spec
    sched_cls = getattr(diffusers, spec.scheduler_config.get("_class_name", "DDIMScheduler"))
    scheduler = sched_cls.from_config(spec.scheduler_config)
    tokenizers = {
        n: (
            T5TokenizerFast
            if n == "tokenizer_3" or (n, spec.family) == ("tokenizer_2", "flux")
            else CLIPTokenizerFast
        ).from_pretrained(d)
        for n, d in loaded.tokenizer_dirs.items()
    }
    cls = getattr(diffusers, spec.pipeline_class)
    kw: dict[str, Any] = dict(loaded.modules, scheduler=scheduler, **tokenizers)
    if spec.family == "sdxl":  # no invisible watermark: the runtime compares pixels, not marks
        kw.update(force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt, add_watermarker=False)
    elif spec.family in ("sd3", "flux"):
        pass  # no safety checker in their pipelines
    else:
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**kw)
    pipe.set_progress_bar_config(disable=True)
    if spec.tokenizer_3 is not None or spec.family == "flux":  # T5's length, as the graphs are built
        pipe.dd_max_sequence_length = spec.profile.t5_tokens
    return pipe


def denoiser_of(pipe: Any) -> Any:
    """A diffusers pipeline's per-step module: its transformer (SD3) or its UNet."""
    return getattr(pipe, "transformer", None) or pipe.unet


def teacher_mode(pipe: Any) -> str:
    """A diffusers pipeline's guidance mode, as optimizer/t2i/load.default_guidance reads a config."""
    from optimizer.t2i.load import default_guidance

    return default_guidance(dict(denoiser_of(pipe).config))


def latent_channels(pipe: Any) -> int:
    """The unpacked latent channels a diffusers pipeline draws (Flux's transformer takes 4x packed)."""
    c = int(denoiser_of(pipe).config.in_channels)
    return c // 4 if type(pipe).__name__ == "FluxPipeline" else c


def native_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's default pixel size (Flux's transformer has no sample_size: 128 latents)."""
    s = (denoiser_of(pipe).config.get("sample_size") or 128) * pipe.vae_scale_factor
    return s, s


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


@dataclass
class Recorder:
    """Component inputs seen while a diffusers pipeline runs (feeds named as in the IO specs)."""

    text_encoder: list[dict[str, np.ndarray]] = field(default_factory=list)
    text_encoder_2: list[dict[str, np.ndarray]] = field(default_factory=list)  # SDXL, SD3
    text_encoder_3: list[dict[str, np.ndarray]] = field(default_factory=list)  # SD3's T5
    transformer: list[dict[str, np.ndarray]] = field(default_factory=list)  # SD3's denoiser
    unet: list[dict[str, np.ndarray]] = field(default_factory=list)
    vae_decoder: list[dict[str, np.ndarray]] = field(default_factory=list)
    vae_encoder: list[dict[str, np.ndarray]] = field(default_factory=list)  # the decoded images

    def feeds(self, kind: str) -> list[dict[str, np.ndarray]]:
        return getattr(self, kind)


def t5_length(pipe: Any) -> dict[str, int]:
    """max_sequence_length= for a pipeline with T5 compiled at another length than its default."""
    n = getattr(pipe, "dd_max_sequence_length", None)
    return {} if n is None else {"max_sequence_length": int(n)}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents: [B, C, H, W] -> [B, (H/2)(W/2), 4C]."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h2: int, w2: int) -> torch.Tensor:
    """FluxPipeline._unpack_latents on an (h2 x w2)-token grid: -> [B, C, 2 h2, 2 w2]."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h2, w2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 2 * h2, 2 * w2)


@contextlib.contextmanager
def recording(pipe: Any) -> Iterator[Recorder]:
    rec = Recorder()

    def te_hook(into: list[dict[str, np.ndarray]]) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            ids = args[0] if args else kwargs["input_ids"]
            into.append({"input_ids": _np(ids).astype(np.int64)})

        return hook

    def unet_hook(_m: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        b = sample.shape[0]
        feeds = {
            "sample": _np(sample).astype(np.float32),
            "timestep": np.broadcast_to(_np(torch.as_tensor(t)).astype(np.float32), (b,)).copy(),
            "encoder_hidden_states": _np(kwargs["encoder_hidden_states"]).astype(np.float32),
        }
        if kwargs.get("timestep_cond") is not None:
            feeds["timestep_cond"] = _np(kwargs["timestep_cond"]).astype(np.float32)
        for k, v in (kwargs.get("added_cond_kwargs") or {}).items():  # SDXL: text_embeds, time_ids
            feeds[k] = _np(v).astype(np.float32)
        rec.unet.append(feeds)

    def transformer_hook(_m: Any, args: tuple, kwargs: dict) -> None:
        x, t = kwargs["hidden_states"], torch.as_tensor(kwargs["timestep"])
        b = x.shape[0]
        if kwargs.get("img_ids") is not None:  # Flux: the graph takes unpacked latents and t x 1000
            ids = kwargs["img_ids"]
            x = unpack(x, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            t = t * 1000
        feeds = {
            "sample": _np(x).astype(np.float32),
            "timestep": np.broadcast_to(_np(t).astype(np.float32), (b,)).copy(),
            "encoder_hidden_states": _np(kwargs["encoder_hidden_states"]).astype(np.float32),
            "pooled_projections": _np(kwargs["pooled_projections"]).astype(np.float32),
        }
        if kwargs.get("guidance") is not None:
            feeds["guidance"] = _np(kwargs["guidance"]).astype(np.float32)
        rec.transformer.append(feeds)

    vae = pipe.vae
    decode = vae.decode

    def recorded_decode(z: torch.Tensor, *a: Any, **kw: Any) -> Any:
        rec.vae_decoder.append({"latent_sample": _np(z).astype(np.float32)})
        out = decode(z, *a, **kw)
        x = out[0] if isinstance(out, tuple) else out.sample
        # real images for the encoder: the decoded ones, rounded to uint8 as a saved image is
        u8 = ((x.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round()
        rec.vae_encoder.append({"sample": _np(u8 / 127.5 - 1).astype(np.float32)})
        return out

    hooks = [
        getattr(pipe, name).register_forward_pre_hook(te_hook(rec.feeds(name)), with_kwargs=True)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
        if getattr(pipe, name, None) is not None
    ]
    if getattr(pipe, "transformer", None) is not None:
        hooks.append(pipe.transformer.register_forward_pre_hook(transformer_hook, with_kwargs=True))
    else:
        hooks.append(pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True))
    vae.decode = recorded_decode
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()
        vae.decode = decode


# stochastic schedulers -> the diffusers module whose randn_tensor draws their per-step noise
NOISE_MODULES = {
    "LCMScheduler": "diffusers.schedulers.scheduling_lcm",
    "EulerAncestralDiscreteScheduler": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
}


@contextlib.contextmanager
def scheduler_noise(
    seeds: list[int], module: str | tuple[str, ...] = NOISE_MODULES["LCMScheduler"]
) -> Iterator[list[np.ndarray]]:
    """The scheduler module's randn_tensor draws as engines/t2i.py does with `latents=` given: from
    fresh per-seed generators, one draw per call (the count follows the scheduler's own steps; Euler
    ancestral's last draw, which engines/t2i.py skips, is multiplied by sigma_up = 0). Several
    modules share the generators, in call order (image-to-image: the VAE's, the pipeline's, the
    scheduler's). Yields the draws made."""
    import importlib

    mods = [importlib.import_module(m) for m in ((module,) if isinstance(module, str) else module)]
    rngs = [TorchGenerator(s) for s in seeds]  # what the runtime draws from each seed
    made: list[np.ndarray] = []

    def ours(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> Any:
        if tuple(shape)[0] != len(rngs):
            raise RuntimeError(f"scheduler noise for {tuple(shape)}: {len(rngs)} seeds")
        made.append(np.stack([r.standard_normal(tuple(shape)[1:], dtype=np.float32) for r in rngs]))
        return torch.from_numpy(made[-1]).to(dtype=dtype or torch.float32)

    origs = [m.randn_tensor for m in mods]
    for m in mods:
        m.randn_tensor = ours
    try:
        yield made
    finally:
        for m, o in zip(mods, origs, strict=True):
            m.randn_tensor = o


@torch.no_grad()
def images(
    pipe: Any,
    prompts: list[str],
    latents: np.ndarray,
    steps: int,
    guidance_scale: float,
    seeds: list[int] | None = None,
) -> np.ndarray:
    """uint8 [B, H, W, 3] from diffusers, from `latents`, with the runtime's per-step draws."""
    k = pipe.vae_scale_factor
    h, w = latents.shape[2] * k, latents.shape[3] * k
    seeds = list(range(len(prompts))) if seeds is None else seeds
    ctx: Any = contextlib.nullcontext()
    module = NOISE_MODULES.get(type(pipe.scheduler).__name__)
    if module is not None:
        ctx = scheduler_noise(seeds, module)
    with ctx:
        lat = torch.from_numpy(latents)
        out = pipe(
            prompts,
            latents=pack(lat) if type(pipe).__name__ == "FluxPipeline" else lat,  # Flux takes tokens
            **t5_length(pipe),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=h,
            width=w,
            output_type="np",
        ).images
    return (out * 255).round().astype(np.uint8)


# image-to-image's draws besides the scheduler's, in order: the VAE posterior's sample (the first
# module), then the noise added at the first kept timestep (the img2img pipeline's module)
VAE_MODULE = "diffusers.models.autoencoders.vae"
IMG2IMG_PIPELINES = {  # text-to-image pipeline class -> (img2img class, the module drawing its noise)
    "StableDiffusionPipeline": (
        "StableDiffusionImg2ImgPipeline",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    ),
    "LatentConsistencyModelPipeline": (
        "LatentConsistencyModelImg2ImgPipeline",
        "diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img",
    ),
    "StableDiffusionXLPipeline": (
        "StableDiffusionXLImg2ImgPipeline",
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
    ),
    "StableDiffusion3Pipeline": (
        "StableDiffusion3Img2ImgPipeline",
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img",
    ),
    "FluxPipeline": ("FluxImg2ImgPipeline", "diffusers.pipelines.flux.pipeline_flux_img2img"),
}
INPAINT_PIPELINES = {  # text-to-image pipeline class -> (inpainting class, the module drawing its noise)
    "StableDiffusionPipeline": (
        "StableDiffusionInpaintPipeline",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    ),
    # an LCM has no inpainting pipeline of its own: diffusers' docs run StableDiffusionInpaintPipeline
    "LatentConsistencyModelPipeline": (
        "StableDiffusionInpaintPipeline",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    ),
    "StableDiffusionXLPipeline": (
        "StableDiffusionXLInpaintPipeline",
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
    ),
    "StableDiffusion3Pipeline": (
        "StableDiffusion3InpaintPipeline",
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint",
    ),
    "FluxPipeline": ("FluxInpaintPipeline", "diffusers.pipelines.flux.pipeline_flux_inpaint"),
}
# img2img pipelines that resize the image to height/width (their default: the native size)
SIZED_IMG2IMG = ("StableDiffusion3Img2ImgPipeline", "FluxImg2ImgPipeline")
NOISE_MODULE = {cls: module for cls, module in (*IMG2IMG_PIPELINES.values(), *INPAINT_PIPELINES.values())}


def img2img_pipeline(pipe: Any, task: str = "img2img") -> Any:
    """diffusers' img2img (task "img2img") or inpainting ("inpaint") pipeline over a text-to-image
    pipeline's modules: StableDiffusionImg2ImgPipeline, LatentConsistencyModelImg2ImgPipeline for an
    LCM, StableDiffusionXLImg2ImgPipeline, ...; StableDiffusionInpaintPipeline, ...XLInpaint..."""
    import diffusers

    table = INPAINT_PIPELINES if task == "inpaint" else IMG2IMG_PIPELINES
    cls = getattr(diffusers, table[type(pipe).__name__][0])
    comps = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    if cls.__name__ in (*SIZED_IMG2IMG, "StableDiffusion3InpaintPipeline", "FluxInpaintPipeline"):
        flags = {}
    elif "text_encoder_2" in comps:  # SDXL: the base model's ids (no aesthetic score), no watermark
        flags = dict(
            requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    else:
        flags = dict(requires_safety_checker=False)
    i2i = cls(**comps, **flags)
    i2i.set_progress_bar_config(disable=True)
    if getattr(pipe, "dd_max_sequence_length", None) is not None:  # T5 compiled at another length
        i2i.dd_max_sequence_length = pipe.dd_max_sequence_length
    return i2i


@torch.no_grad()
def img2img_images(
    pipe: Any,
    prompts: list[str],
    image: np.ndarray,
    strength: float,
    steps: int,
    guidance_scale: float,
    seeds: list[int],
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 [B, H, W, 3] from diffusers' img2img or inpainting pipeline (`pipe`: img2img_pipeline)
    for uint8 NHWC `image` (as PIL images; `mask`: uint8 NHW as PIL "L" images, inpainting), with
    the runtime's per-seed draws in its order: the VAE posterior's eps, the noise added at the first
    kept timestep, (inpainting: the masked image's eps,) the scheduler's per-step draws."""
    from PIL import Image

    mods = (VAE_MODULE, NOISE_MODULE[type(pipe).__name__])
    extra = NOISE_MODULES.get(type(pipe.scheduler).__name__)
    sized = type(pipe).__name__ in SIZED_IMG2IMG or mask is not None  # inpainting: the UNet's size else
    size = dict(height=image.shape[1], width=image.shape[2]) if sized else {}
    more = {} if mask is None else dict(mask_image=[Image.fromarray(m) for m in mask])
    # diffusers' SD3 inpainting decodes latents / scaling_factor without + shift_factor, unlike its
    # own encoder and every other SD3 pipeline (diffusers#13611, issue 1; fixed by PR #14671): the
    # runtime decodes as the others do, so the reference decodes its latents the fixed way
    unshifted = type(pipe).__name__ == "StableDiffusion3InpaintPipeline"
    with scheduler_noise(seeds, (*mods, *([extra] if extra else []))):
        out = pipe(
            prompts,
            image=[Image.fromarray(x) for x in image],
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type="latent" if unshifted else "np",
            **size,
            **more,
            **t5_length(pipe),
        ).images
    if unshifted:
        cfg = pipe.vae.config
        decoded = pipe.vae.decode(out / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
        out = pipe.image_processor.postprocess(decoded, output_type="np")
    return (out * 255).round().astype(np.uint8)
