"""One runtime pipeline for every family, without torch: `CompiledPipeline`.

Its `__call__` follows diffusers' pipelines step by step over the components a family has:

1. check inputs (one line per problem, before any component runs);
2. encode the conditioning: the text encoder if the family has one, else the caller's `cond`;
3. prepare the timesteps (the family's scheduler, engines/schedulers.py's interface);
4. prepare latents or noise, drawn per seed so an image never depends on its batch (latent
   pipelines draw what torch.Generator().manual_seed(seed) draws on CPU, engines/torch_rng.py, so a
   seed gives diffusers' image for that seed's generator); with `image=`
   (image-to-image, diffusers' StableDiffusionImg2ImgPipeline) the VAE encoder's latent of the
   image, noised to the first timestep that `strength` keeps;
5. the denoising loop, with the family's guidance policy (cfg: both halves in one call; embedded:
   a w-embedding feed; none);
6. decode with the VAE if the family has one, else the samples are the images.

Any number of requests is taken: generations run in chunks of the compiled batch. A subclass only
reads its description into `Parts`: engines/t2i.py's TextToImagePipeline (a pipeline family's
t2i.json) and engines/runtime.py's SamplerPipeline (a denoiser's manifest).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.base import Runner
from engines.conditioning import RECIPES
from engines.errors import InputError
from engines.images import preprocess, preprocess_mask, resize_nearest
from engines.iospec import IOSpec
from engines.schedule import MAX_SEED, check_sampler_inputs, to_images
from engines.schedulers import trial_timesteps

# A prompt over the tokenizer's limit: "truncate" (diffusers: cut, keep EOS, log a warning),
# "refuse" (one-line InputError naming the token count; what dd-serve does) or "chunk" (opt-in,
# A1111 / compel: chunks of limit - 2 tokens with BOS/EOS each, encoded apart, their states
# concatenated on the sequence axis; needs a UNet compiled with dd-compile --prompt-chunks N)
LONG_PROMPT_POLICIES = ("truncate", "refuse", "chunk")
# "chunk" where CLIP alone carries the text; SD3 and Flux read long prompts through T5
CHUNK_RECIPES = ("sd", "sdxl")


@dataclass(frozen=True)
class TextParts:
    tokenizer: Any  # engines/tokenizer.ClipTokenizer: prompts -> int64 ids [B, tokens]
    encoder: str = "text_encoder"  # its runner
    output: str = "last_hidden_state"
    long_prompts: str = "truncate"
    recipe: str = "sd"  # engines/conditioning.py: how the encoders' outputs become the UNet's feeds
    more: tuple[tuple[str, Any], ...] = ()  # further (encoder runner, tokenizer): SDXL's second
    zero_negative: bool = False  # SDXL's force_zeros_for_empty_prompt
    # long_prompts="chunk": the most chunks the UNet's tokens axis takes (dd-compile --prompt-chunks)
    max_chunks: int = 1


@dataclass(frozen=True)
class VaeParts:
    scaling_factor: float  # latents / scaling_factor go into the decoder (diffusers' vae.decode)
    scale_factor: int  # pixels per latent cell
    decoder: str = "vae_decoder"
    encoder: str | None = None  # its runner (image-to-image); None: an output compiled without one
    shift_factor: float = 0.0  # SD3: the decoder sees latents / scaling_factor + shift_factor


@dataclass
class Parts:
    """What a family's runtime is made of; `CompiledPipeline` runs whichever parts are present."""

    runners: dict[str, Runner]
    specs: dict[str, IOSpec]
    denoiser: str  # the runner called at every step ("unet", or "denoiser" for a pixel student)
    scheduler: Any  # engines/schedulers.py interface
    guidance: str  # "cfg" | "embedded" | "none"
    sample_channels: int  # latent channels (VAE families) or image channels
    defaults: dict[str, Any]  # num_inference_steps, guidance_scale, height, width (model space)
    text: TextParts | None = None
    vae: VaeParts | None = None
    time_cond_proj_dim: int | None = None  # embedded guidance: the w-embedding's size
    # what a denoiser takes besides sample and timestep, given by the caller per image (class labels,
    # encoder_hidden_states); empty for text families, whose conditioning comes from the encoder
    cond_names: tuple[str, ...] = field(default_factory=tuple)
    # per-seed draws: "torch" (torch's CPU randn, engines/torch_rng.py: diffusers' images from the
    # same seeds) or "numpy" (np.random.default_rng: the pixel students' validated convention)
    noise: str = "numpy"
    patch_size: int = 1  # a DiT's latent patch: sizes are multiples of it; its token count sets mu
    flow_sigmas: str | None = None  # "flux": the pipeline's own sigmas, linspace(1, 1/n, n)
    # Flux: latents= may also come packed, [B, (h/2)(w/2), 4C], as FluxPipeline takes them
    packed_latents: bool = False
    # StableDiffusion(XL)InpaintPipeline's UNet: latents + mask + masked-image latents (2C + 1
    # channels) in; it inpaints only (a call without image= and mask_image= is refused)
    inpaint_unet: bool = False


def seed_generator(kind: str, seed: int) -> Any:
    """A per-image noise source with numpy's `standard_normal(shape, dtype=np.float32)`."""
    if kind == "torch":
        from engines.torch_rng import TorchGenerator

        return TorchGenerator(seed)
    return np.random.default_rng(seed)


def guidance_scale_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """diffusers' get_guidance_scale_embedding (VDM's sinusoidal embedding of 1000 w), float32."""
    w = w.astype(np.float32) * np.float32(1000.0)
    half = dim // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)  # float32 throughout, as torch computes it
    freq = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)
    emb = w[:, None] * freq[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """VAE output NCHW in [-1, 1] -> uint8 NHWC, as diffusers' postprocess + numpy_to_pil."""
    x = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (x * 255).round().astype(np.uint8)


def check_strength(strength: Any, steps: int | None, truncate_init: bool = True) -> int:
    """The first kept step index, as diffusers' img2img get_timesteps (every runtime scheduler has
    order 1): init = min(int(steps * strength), steps), t_start = steps - init (steps None: the range
    check only). `truncate_init` False: the SD3 / Flux img2img pipelines' rule, init = min(steps *
    strength, steps) unrounded and t_start = int(steps - init) (5 steps at 0.5: 3 kept, not 2)."""
    if isinstance(strength, bool) or not isinstance(strength, int | float | np.integer | np.floating):
        raise InputError(f"strength={strength!r}: expected a number in (0, 1]")
    s = float(strength)
    if not (0.0 < s <= 1.0):
        raise InputError(f"strength={s}: must be in (0, 1]")
    if steps is None:
        return 0
    if not truncate_init:  # never empty: steps - steps * s < steps for any s > 0
        return int(max(steps - min(steps * s, steps), 0))
    init = min(int(steps * s), steps)
    if init == 0:
        raise InputError(
            f"strength={s} with num_inference_steps={steps}: no step left (int(steps * strength) = 0); "
            "raise either"
        )
    return max(steps - init, 0)


INPAINT_ONLY = (
    "this output's UNet is an inpainting UNet (it reads the latents, the mask and the masked image): "
    "pass image= and mask_image="
)


def _no_image_inputs(strength: Any, mask_image: Any, inpaint_unet: bool = False) -> None:
    """A call without image= takes neither strength= nor mask_image= (one line each); an inpainting
    UNet takes no call without them."""
    if inpaint_unet:
        raise InputError(f"image: {INPAINT_ONLY}")
    if strength is not None:
        raise InputError("strength: only with image= (image-to-image, inpainting)")
    if mask_image is not None:
        raise InputError("mask_image: only with image= (the image to inpaint)")


def _strings(v: Any, what: str) -> list[str]:
    items = [v] if isinstance(v, str) else list(v) if isinstance(v, list | tuple) else None
    if not items or not all(isinstance(p, str) for p in items):
        raise InputError(f"{what}: expected a string or a non-empty list of strings, got {type(v).__name__}")
    return items


def _int_or(v: Any, default: Any, what: str) -> int:
    """`v` as a pixel size (None: the default); 0 or a non-integer is refused, not defaulted."""
    if v is None:
        return int(default)
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise InputError(f"{what}={v!r}: expected an integer")
    return int(v)


def unpack_latents(tokens: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """FluxPipeline._unpack_latents: [B, (h/2)(w/2), 4C] 2x2 tokens -> [B, C, h, w] (`shape`)."""
    b, c, h, w = shape
    x = tokens.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(b, c, h, w))


@dataclass(frozen=True)
class ImageTask:
    """A checked image-to-image or inpainting input: what step 4 starts from."""

    pixels: np.ndarray  # float32 NCHW in [-1, 1]
    mask: np.ndarray | None  # inpainting: float32 [B, 1, H, W], 1 = repaint; None: image-to-image
    begin: int  # the first kept step index; -1: a scheduler that shortens its schedule itself (LCM)
    strength: float

    def chunk(self, sl: slice) -> ImageTask:
        mask = None if self.mask is None else self.mask[sl]
        return ImageTask(self.pixels[sl], mask, self.begin, self.strength)


@dataclass(frozen=True)
class T2IRequest:
    """One checked call: what `__call__` runs, and what a server merges across requests."""

    prompts: list[str]
    negative_prompts: list[str | None]  # None: not given
    seeds: list[int]
    guidance_scale: float
    num_inference_steps: int
    image: np.ndarray | None = None  # uint8 [B, H, W, 3], one per prompt; None: text-to-image
    mask_image: np.ndarray | None = None  # uint8 [B, H, W], 255 = repaint (inpainting), else 0
    strength: float | None = None  # with an image: the strength it runs at (defaults filled in)
    adapters: str = ""  # a server's LoRA adapters for the call: canonical JSON {name: weight}, "" none

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """What requests share to run as one call: guidance, steps, adapters, and for image
        requests the size, strength and task (inpainting or not)."""
        size = None if self.image is None else tuple(self.image.shape[1:3])
        inpaint = self.mask_image is not None
        return (self.guidance_scale, self.num_inference_steps, size, self.strength, inpaint, self.adapters)

    @staticmethod
    def merge(requests: list[T2IRequest]) -> T2IRequest:
        """One request of several with the same batch_key; its images are theirs, in order (each
        image's draws come from its own seed: its batch changes it by the components' rounding
        only, <= 1 uint8 level measured)."""
        first = requests[0]
        if any(r.batch_key != first.batch_key for r in requests):
            raise ValueError("T2IRequest.merge: the requests differ in their batch_key")

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(r, name) for r in requests]
            return None if arrays[0] is None else np.concatenate(arrays)

        return T2IRequest(
            [p for r in requests for p in r.prompts],
            [n for r in requests for n in r.negative_prompts],
            [s for r in requests for s in r.seeds],
            first.guidance_scale,
            first.num_inference_steps,
            cat("image"),
            cat("mask_image"),
            first.strength,
            first.adapters,
        )


class CompiledPipeline:
    def __init__(self, parts: Parts):
        t = parts.text
        if t is not None and t.long_prompts not in LONG_PROMPT_POLICIES:
            raise InputError(f"long_prompts={t.long_prompts!r}: choose from {list(LONG_PROMPT_POLICIES)}")
        if t is not None and t.long_prompts == "chunk" and t.recipe not in CHUNK_RECIPES:
            raise InputError(
                f"long_prompts='chunk': not for {t.recipe} pipelines (their T5 encoder reads long "
                "prompts); use 'truncate' or 'refuse'"
            )
        if t is not None and t.long_prompts == "chunk" and t.max_chunks < 2:
            raise InputError(
                f"long_prompts='chunk': this pipeline's UNet takes {t.tokenizer.model_max_length} "
                "tokens only; recompile it with dd-compile --prompt-chunks N (N >= 2)"
            )
        self.parts = parts
        self.runners, self.specs, self.scheduler = parts.runners, parts.specs, parts.scheduler

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> CompiledPipeline:
        for r in self.runners.values():
            r.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    @property
    def long_prompts(self) -> str:
        return self.parts.text.long_prompts if self.parts.text else "truncate"

    @property
    def max_batch(self) -> int:
        """Images per chunk of a call: the denoiser's batch range, halved when it was sized for CFG."""
        spec = self.specs[self.parts.denoiser]
        if "batch" not in spec.dims:
            return 1 << 30
        m = spec.dims["batch"].max
        return m // 2 if self.parts.guidance == "cfg" else m

    @property
    def inpaint_only(self) -> bool:
        """An inpainting UNet's output: every call takes image= and mask_image=."""
        return self.parts.inpaint_unet

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) at the default size."""
        return int(self.parts.defaults["height"]), int(self.parts.defaults["width"]), 3

    # -- 1. check inputs ---------------------------------------------------------------------
    def _prompts(
        self, prompt: str | list[str] | None, negative_prompt: str | list[str | None] | None
    ) -> tuple[list[str], list[str | None]]:
        """Prompts and negatives; a negative of None is "not given" (SD: "", SDXL: zeros when its
        pipeline says force_zeros_for_empty_prompt, as diffusers does)."""
        prompts = _strings(prompt, "prompt")
        neg: list[str | None]
        if negative_prompt is None:
            neg = [None] * len(prompts)
        elif isinstance(negative_prompt, str):
            neg = [negative_prompt] * len(prompts)
        else:
            items = negative_prompt if isinstance(negative_prompt, list | tuple) else None
            if not items or not all(n is None or isinstance(n, str) for n in items):
                raise InputError(
                    "negative_prompt: expected a string or a non-empty list of strings (None: not "
                    f"given), got {type(negative_prompt).__name__}"
                )
            neg = list(items)
            if len(neg) != len(prompts):
                raise InputError(f"negative_prompt: {len(neg)} prompts for {len(prompts)} prompts")
        return prompts, neg

    def _size(self, height: Any, width: Any, latents: Any) -> tuple[int, int]:
        """(height, width) in model-space pixels, inside the denoiser's profile."""
        k = self.parts.vae.scale_factor if self.parts.vae else 1
        m = k * self.parts.patch_size  # a DiT takes whole patches of latents
        d = self.parts.defaults
        if isinstance(latents, np.ndarray) and latents.ndim == 4 and height is None and width is None:
            h, w = latents.shape[2] * k, latents.shape[3] * k  # diffusers would need height/width too
        else:
            h, w = _int_or(height, d["height"], "height"), _int_or(width, d["width"], "width")
        dims = self.specs[self.parts.denoiser].dims
        axes = ("latent_height", "latent_width") if self.parts.vae else ("height", "width")
        for name, v, axis in zip(("height", "width"), (h, w), axes, strict=True):
            r = dims.get(axis)
            lo, hi = (r.min, r.max) if r is not None else (v // k, v // k)
            if r is None and v != d[name]:  # a static axis: only the compiled size
                raise InputError(f"{name}={v}: this pipeline was compiled for {d[name]} only")
            if v % m or not (lo <= v // k <= hi):
                raise InputError(
                    f"{name}={v}: must be a multiple of {m} in [{lo * k}, {hi * k}] (the profile)"
                )
        return h, w

    def _guidance(self, guidance_scale: Any) -> tuple[float, bool]:
        """(scale, run the CFG batch?) checked against the mode the engines were built for."""
        mode = self.parts.guidance
        g = self.parts.defaults.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        if isinstance(g, bool) or not isinstance(g, int | float | np.integer | np.floating):
            raise InputError(f"guidance_scale={g!r}: expected a number")
        g = float(g)
        if not math.isfinite(g):
            raise InputError(f"guidance_scale={g}: must be a finite number")
        if mode == "none" and g > 1:
            raise InputError(
                f"guidance_scale={g}: the pipeline was built without guidance (mode 'none'): use <= 1"
            )
        return g, (mode == "cfg" and g > 1)

    def _steps(self, num_inference_steps: Any) -> int:
        n = self.parts.defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise InputError(f"num_inference_steps={n!r}: expected an integer")
        trial_timesteps(self.scheduler, int(n))  # the scheduler's own range check
        return int(n)

    def _seeds(self, seeds: Any, b: int) -> list[int]:
        if seeds is None:
            return list(range(b))
        seeds = [seeds] if isinstance(seeds, int | np.integer) else list(seeds)
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s <= MAX_SEED:
                raise InputError(f"seeds: {s!r} is not an integer in [0, 2^63 - 1]")
        if len(seeds) != b:
            raise InputError(f"seeds: {len(seeds)} seeds for {b} prompts")
        return [int(s) for s in seeds]

    def tokenize(
        self, prompts: list[str], what: str = "prompt", tokenizer: Any = None, chunks: int | None = None
    ) -> np.ndarray:
        """int64 ids [B, tokens]; a prompt over the limit is cut (truncate, and chunk without
        `chunks`) or refused (refuse); with `chunks` k: [B, k, tokens], each prompt in k chunks."""
        tok = tokenizer or self.parts.text.tokenizer
        if chunks is not None:
            return tok.chunked(prompts, chunks, what=what)
        return tok(prompts, truncate=self.long_prompts != "refuse", what=what)

    def prompt_chunks(self, prompts: list[str], neg: list[str | None]) -> int:
        """long_prompts="chunk": the chunks every prompt and negative of a call is padded to, the
        most any of them needs over every tokenizer (the UNet takes one sequence length per call,
        so a short prompt batched with a long one attends to empty chunks too, as in A1111 and
        compel); more than the UNet was compiled for is a one-line InputError."""
        t = self.parts.text
        toks, n, k = (t.tokenizer, *(tk for _, tk in t.more)), t.tokenizer.model_max_length - 2, 1
        for what, texts in (("prompt", prompts), ("negative_prompt", ["" if x is None else x for x in neg])):
            if not texts:
                continue
            need = np.max([tok.chunks_needed(texts) for tok in toks], axis=0)  # per text, any tokenizer
            i = int(np.argmax(need))
            if need[i] > t.max_chunks:
                raise InputError(
                    f"{what} {i}: {need[i]} chunks of {n} tokens, over the {t.max_chunks} this pipeline "
                    f"was compiled for; shorten it or recompile with dd-compile --prompt-chunks {need[i]}"
                )
            k = max(k, int(need[i]))
        return k

    def _check_tokens(self, prompts: list[str], neg: list[str | None]) -> None:
        t = self.parts.text
        if self.long_prompts == "chunk":
            self.prompt_chunks(prompts, neg)
            return
        for tok in (t.tokenizer, *(tk for _, tk in t.more)):
            self.tokenize(prompts, tokenizer=tok)
            self.tokenize(["" if n is None else n for n in neg], "negative_prompt", tok)

    def check(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        seeds: list[int] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        *,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
    ) -> T2IRequest:
        """Every check of a prompted call, before any component runs: at the default size, or with
        `image` (+ `mask_image`, `strength`, as `__call__` takes them) at the image's size."""
        prompts, neg = self._prompts(prompt, negative_prompt)
        seeds = self._seeds(seeds, len(prompts))
        g, _ = self._guidance(guidance_scale)
        steps = self._steps(num_inference_steps)
        self._check_tokens(prompts, neg)
        if image is None:
            _no_image_inputs(strength, mask_image, self.parts.inpaint_unet)
            return T2IRequest(prompts, neg, seeds, g, steps)
        task = self._image(image, mask_image, len(prompts), None, None, None, strength, steps)
        # kept as uint8 a server can concatenate: 2 u / 255 - 1 in float32 rounds back to u for
        # every uint8 u; the mask as 0 / 255, which __call__ binarises to the same mask
        pixels = ((task.pixels + np.float32(1.0)) * np.float32(127.5)).round().astype(np.uint8)
        image = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
        mask = None if task.mask is None else (task.mask[:, 0] * 255).astype(np.uint8)
        return T2IRequest(prompts, neg, seeds, g, steps, image, mask, task.strength)

    def run(self, request: T2IRequest) -> np.ndarray:
        """The images of a checked request: at the default size from seeded latents, or from its
        image (and mask) at the image's size."""
        return self(
            request.prompts,
            request.negative_prompts,
            request.seeds,
            guidance_scale=request.guidance_scale,
            num_inference_steps=request.num_inference_steps,
            image=request.image,
            strength=request.strength,
            mask_image=request.mask_image,
        )

    # -- components --------------------------------------------------------------------------
    def _encode_with(
        self, runner: str, tokenizer: Any, prompts: list[str], what: str, chunks: int | None = None
    ) -> dict[str, np.ndarray]:
        """The encoder's outputs for the prompts; with `chunks` k (long_prompts="chunk") each chunk
        is encoded alone, states [B, tokens, hidden] concatenated on the sequence axis to
        [B, k tokens, hidden], pooled outputs (SDXL's text_embeds) from the first chunk."""
        enc = self.runners[runner]
        if chunks is None:
            ids = self.tokenize(prompts, what, tokenizer)
            return {k: v.astype(np.float32) for k, v in enc.infer({"input_ids": ids}).items()}
        ids = self.tokenize(prompts, what, tokenizer, chunks)  # [B, k, tokens]
        # one call per chunk at batch B: inside the encoder's batch profile whatever k is. Stacking
        # the chunks as rows of one call was measured (benchmarks/long_prompts_demo.py, demo encoder,
        # B=1, k=2: 0.33 vs 0.50 ms) at ~1% of an 18 ms generation: not worth the regrouping
        outs = [enc.infer({"input_ids": np.ascontiguousarray(ids[:, j])}) for j in range(chunks)]
        return {
            name: (np.concatenate([o[name] for o in outs], axis=1) if v.ndim == 3 else v).astype(np.float32)
            for name, v in outs[0].items()
        }

    def encode(self, prompts: list[str]) -> np.ndarray:
        """The first text encoder's states for the prompts (what SD's UNet attends to)."""
        t = self.parts.text
        k = self.prompt_chunks(prompts, []) if self.long_prompts == "chunk" else None
        return self._encode_with(t.encoder, t.tokenizer, prompts, "prompt", k)[t.output]

    def conditioning(
        self, prompts: list[str], neg: list[str | None], do_cfg: bool, size: tuple[int, int]
    ) -> dict[str, np.ndarray]:
        """The UNet's text conditioning feeds by the family's recipe (engines/conditioning.py);
        under long_prompts="chunk" every encoder call of the batch gets the same chunk count."""
        t = self.parts.text
        encode = self._encode_with
        if self.long_prompts == "chunk":  # the negatives count only where they are encoded
            k = self.prompt_chunks(prompts, neg if do_cfg else [])
            encode = functools.partial(self._encode_with, chunks=k)
        return RECIPES[t.recipe](t, encode, prompts, neg, do_cfg, size)

    def encode_image(self, pixels: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
        """diffusers' retrieve_latents(vae.encode(image), generator) * scaling_factor: the posterior
        (mean, log-variance clamped to [-30, 20]) sampled as mean + std * eps, eps from each rng."""
        v = self.parts.vae
        params = self.runners[v.encoder].infer({"sample": pixels})["latent_parameters"].astype(np.float32)
        c = params.shape[1] // 2
        mean, logvar = params[:, :c], np.clip(params[:, c:], -30.0, 20.0)
        std = np.exp(np.float32(0.5) * logvar).astype(np.float32)
        eps = np.stack([r.standard_normal(mean.shape[1:], dtype=np.float32) for r in rngs])
        return (((mean + std * eps) - np.float32(v.shift_factor)) * np.float32(v.scaling_factor)).astype(
            np.float32
        )

    def _image(
        self,
        image: Any,
        mask_image: Any,
        b: int,
        latents: Any,
        height: Any,
        width: Any,
        strength: Any,
        steps: Any,
    ) -> ImageTask:
        """Image-to-image's and inpainting's checks, before any component runs."""
        v = self.parts.vae
        task = "inpainting" if mask_image is not None else "image-to-image"
        if v is None or v.encoder is None:
            raise InputError(
                "image: this output has no vae_encoder component (compiled for text-to-image only; "
                f"recompile it with this dd-compile for {task})"
            )
        if latents is not None:
            raise InputError(f"image: pass image= or latents=, not both ({task} draws its own)")
        spec = self.specs[v.encoder]
        pixels = preprocess(image, b, int(spec.inputs[0].shape[1]))
        ih, iw = pixels.shape[2], pixels.shape[3]
        for name, given, got in (("height", height, ih), ("width", width, iw)):
            if given is not None and given != got:
                raise InputError(f"{name}={given}: {task} takes the image's size ({got})")
        try:
            self._size(ih, iw, None)
        except InputError as e:
            raise InputError(f"image {ih}x{iw}: {e}") from None
        if mask_image is None and self.parts.inpaint_unet:
            raise InputError(f"mask_image: {INPAINT_ONLY}")
        mask = None if mask_image is None else preprocess_mask(mask_image, b, (ih, iw))
        d = self.parts.defaults
        if strength is None:  # the family's diffusers default (SD: 0.8 / inpainting 1.0)
            strength = d.get("inpaint_strength", 1.0) if mask is not None else d.get("strength", 0.8)
        n = self._steps(steps)
        # LCM image-to-image shortens its schedule itself; its inpainting is StableDiffusion-
        # InpaintPipeline's (the schedule truncated like every other scheduler's)
        if mask is None and getattr(self.scheduler, "strength_in_set_timesteps", False):
            check_strength(strength, None)
            copy.deepcopy(self.scheduler).set_timesteps(n, strength=float(strength))
            return ImageTask(pixels, None, -1, float(strength))
        begin = check_strength(strength, n, getattr(self.scheduler, "truncate_strength", True))
        return ImageTask(pixels, mask, begin, float(strength))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        v = self.parts.vae
        z = (latents / np.float32(v.scaling_factor) + np.float32(v.shift_factor)).astype(np.float32)
        return self.runners[v.decoder].infer({"latent_sample": z})["sample"]

    # -- the call ----------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        seeds: list[int] | None = None,
        latents: np.ndarray | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        *,
        step_noise: np.ndarray | None = None,
        cond: dict[str, np.ndarray] | None = None,
        output_type: str = "images",
        image: Any = None,
        strength: float | None = None,
        mask_image: Any = None,
    ) -> np.ndarray:
        """Images: uint8 [B, H, W, 3] for families with a VAE, floats [B, C, H, W] in [0, 1] for
        pixel students (`output_type="samples"`: their model-space samples).

        `image` (uint8 HWC, NHWC, a file path or a list of them; one per prompt) makes it
        image-to-image, as the family's diffusers Img2Img pipeline: the image size is the output
        size and `strength` in (0, 1] (default: the family's, SD 0.8) keeps the last
        int(steps * strength) steps. Per seed, the image's generator draws the VAE posterior's eps
        first (latent = mean + std * eps, times scaling_factor), then the noise added at the first
        kept timestep, then the scheduler's per-step draws (Euler ancestral, LCM).

        `mask_image` too (uint8 or bool HW / HWC, a batch, a file path or a list; white = repaint)
        makes it inpainting, as the family's diffusers Inpaint pipeline with a text-to-image
        denoiser: after every step the kept region is reset to the image's latent noised to the
        next timestep (the last step: the latent itself). Strength 1 starts from pure noise; the
        default is the family's (SD 1.0). Draws per seed: the image's eps, the initial noise, the
        masked image's eps (diffusers encodes it even where its denoiser does not read it), then
        the scheduler's."""
        p = self.parts
        # 1. Check inputs
        if p.text is not None:
            prompts, neg = self._prompts(prompt, negative_prompt)
            b = len(prompts)
            seeds = self._seeds(seeds, b)
        else:
            if prompt is not None or negative_prompt is not None:
                raise InputError("prompt: this pipeline has no text encoder (pass seeds= or latents=)")
            prompts = neg = []
            check_sampler_inputs(seeds, latents, step_noise, cond, self._shape(), self._schedule())
            b = len(seeds) if seeds is not None else int(latents.shape[0])
        g, do_cfg = self._guidance(guidance_scale)
        task = None
        if image is not None:
            task = self._image(image, mask_image, b, latents, height, width, strength, num_inference_steps)
            height, width = task.pixels.shape[2], task.pixels.shape[3]
        else:
            _no_image_inputs(strength, mask_image, p.inpaint_unet)
        h, w = self._size(height, width, latents)
        k = p.vae.scale_factor if p.vae else 1
        shape = (b, p.sample_channels, h // k, w // k)
        steps = self._steps(num_inference_steps)
        if p.text is not None and self.long_prompts != "truncate":
            self._check_tokens(prompts, neg)  # refuse (or too many chunks) before any component runs
        packed = (b, (shape[2] // 2) * (shape[3] // 2), shape[1] * 4)
        if p.packed_latents and isinstance(latents, np.ndarray) and latents.shape == packed:
            latents = unpack_latents(latents, shape)
        if latents is not None:
            if not isinstance(latents, np.ndarray) or latents.dtype != np.float32 or latents.shape != shape:
                got = (
                    f"{latents.dtype} {latents.shape}"
                    if isinstance(latents, np.ndarray)
                    else type(latents).__name__
                )
                also = f" or packed {packed}" if p.packed_latents else ""
                raise InputError(f"latents: got {got}, expected float32 {shape}{also}")
            if not np.isfinite(latents).all():
                raise InputError("latents: contain NaN or Inf")
        if (
            self.scheduler.stochastic
            and steps > 1
            and latents is not None
            and seeds is None
            and step_noise is None
        ):
            raise InputError("a consistency student needs step_noise with noise= (or pass seeds=)")
        # any number of images: chunks of the compiled batch
        mb = self.max_batch
        chunks = []
        for i in range(0, b, mb):
            sl = slice(i, i + mb)
            chunks.append(
                self._generate(
                    prompts[sl],
                    neg[sl],
                    None if seeds is None else seeds[sl],
                    None if latents is None else latents[sl],
                    None if step_noise is None else step_noise[:, sl],
                    {k_: v[sl] for k_, v in (cond or {}).items()},
                    shape[1:],
                    g,
                    do_cfg,
                    steps,
                    None if task is None else task.chunk(sl),
                )
            )
        out = np.concatenate(chunks)
        if p.vae is not None:
            return to_uint8(out)
        return to_images(out) if output_type == "images" else out

    def _generate(
        self,
        prompts: list[str],
        neg: list[str | None],
        seeds: list[int] | None,
        latents: np.ndarray | None,
        step_noise: np.ndarray | None,
        cond: dict[str, np.ndarray],
        sample_shape: tuple[int, ...],
        g: float,
        do_cfg: bool,
        steps: int,
        task: ImageTask | None = None,
    ) -> np.ndarray:
        p, sched = self.parts, self.scheduler
        # 2. Encode the conditioning: diffusers' cat([negative, positive]) under CFG, one text-encoder
        # call each (its profile is sized for B); else the caller's per-image inputs
        if p.text is not None:
            k = p.vae.scale_factor if p.vae else 1
            feeds_c = self.conditioning(prompts, neg, do_cfg, (sample_shape[1] * k, sample_shape[2] * k))
        else:
            feeds_c = dict(cond)
        b = len(prompts) if p.text is not None else len(seeds if seeds is not None else latents)
        if p.guidance == "embedded" and p.time_cond_proj_dim is None:  # FLUX.1-dev: g itself, at B
            feeds_c["guidance"] = np.full((b,), g, dtype=np.float32)
        elif p.guidance == "embedded":  # Imagen's w; the LCM pipelines embed w - 1
            w = np.full((b,), g - 1, dtype=np.float32)
            feeds_c["timestep_cond"] = guidance_scale_embedding(w, int(p.time_cond_proj_dim))
        # 3. Prepare timesteps
        begin = 0 if task is None else task.begin
        if begin < 0:  # LCM image-to-image: strength shortens the schedule, which starts at 0
            timesteps, begin = sched.set_timesteps(steps, strength=task.strength), 0
        elif getattr(sched, "dynamic_shifting", False):
            # FlowMatch with dynamic shifting: mu from the image's token count, at run time
            seq = (sample_shape[1] // p.patch_size) * (sample_shape[2] // p.patch_size)
            sigmas = np.linspace(1.0, 1 / steps, steps) if p.flow_sigmas == "flux" else None
            timesteps = sched.set_timesteps(steps, mu=sched.mu_for(seq), sigmas=sigmas)
        elif p.flow_sigmas == "flux":  # FluxPipeline passes its sigmas with a static shift too (schnell)
            timesteps = sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
        else:
            timesteps = sched.set_timesteps(steps)
        # 4. Prepare latents (or noise) and the per-step draws, per seed: init first, then one draw
        # per re-noising step, from each image's own generator
        rngs = [seed_generator(p.noise, s) for s in seeds] if seeds is not None else []
        mask = image_latents = noise0 = masked = None
        if task is not None:  # image-to-image: the image's latent noised to the first kept step
            sched.set_begin_index(begin)
            full = task.mask is not None and task.strength == 1.0  # inpainting from pure noise
            # an inpainting UNet's pipeline encodes the image only to noise it (not at strength 1)
            if not (p.inpaint_unet and full):
                image_latents = self.encode_image(task.pixels, rngs)
            noise0 = np.stack([r.standard_normal(sample_shape, dtype=np.float32) for r in rngs])
            if full:
                x = (noise0 * np.float32(sched.init_noise_sigma)).astype(np.float32)
            else:
                x = sched.add_noise(image_latents, noise0, begin)
            if task.mask is not None:
                mask = resize_nearest(task.mask, sample_shape[1:])
                if p.inpaint_unet:  # the masked image's latents: the UNet's extra input channels
                    hidden = task.pixels * (task.mask < 0.5).astype(np.float32)
                    masked = np.concatenate([mask, self.encode_image(hidden, rngs)], axis=1)
                else:  # the masked image's posterior draw, which diffusers makes all the same
                    for r in rngs:
                        r.standard_normal(sample_shape, dtype=np.float32)
        else:
            if latents is None:
                latents = np.stack([r.standard_normal(sample_shape, dtype=np.float32) for r in rngs])
            x = (latents * np.float32(sched.init_noise_sigma)).astype(np.float32)
        # 5. Denoising loop
        out_name = self.specs[p.denoiser].output_names[0]
        denoised, last = x, len(timesteps) - 1
        for i in range(begin, len(timesteps)):
            t = timesteps[i]
            xi = sched.scale_model_input(x, i)
            if masked is not None:  # an inpainting UNet: + mask + masked-image latents, per half
                xi = np.concatenate([xi, masked], axis=1)
            xin = np.concatenate([xi, xi]) if do_cfg else xi
            feeds = {"sample": xin, "timestep": np.full((xin.shape[0],), t, np.float32), **feeds_c}
            # the first step checks the feeds against the IO spec; the others have the same shapes
            out = self.runners[p.denoiser].infer(feeds, check=i == begin)[out_name].astype(np.float32)
            if do_cfg:
                u, c = out[:b], out[b:]
                out = u + np.float32(g) * (c - u)
            noise = None
            if sched.stochastic and i < last:
                noise = (
                    step_noise[i]
                    if step_noise is not None
                    else np.stack([r.standard_normal(x.shape[1:], dtype=np.float32) for r in rngs])
                )
            x, denoised = sched.step(out, i, x, noise)
            if mask is not None and masked is None:  # a text-to-image UNet inpainting: the kept
                # region follows the image's own trajectory
                kept = sched.add_noise(image_latents, noise0, i + 1) if i < last else image_latents
                x = denoised = ((np.float32(1) - mask) * kept + mask * x).astype(np.float32)
        # 6. Decode
        return self.decode(denoised) if p.vae is not None else denoised

    # pixel students: the sample shape and the schedule their inputs are checked against
    def _shape(self) -> tuple[int, ...]:
        d = self.parts.defaults
        return (self.parts.sample_channels, int(d["height"]), int(d["width"]))

    def _schedule(self) -> Any:
        return getattr(self.scheduler, "schedule", None)
