"""The component table of a latent text-to-image pipeline: one declarative entry per component kind.

Each entry holds what every stage needs to know about a component: the diffusers/transformers
classes it accepts, its IO spec (names, dtypes, dynamic axes: batch, tokens, latent height/width;
after optimum-onnx's CLIPTextOnnxConfig / UNetOnnxConfig / VaeDecoderOnnxConfig and
demo/Diffusion's per-model input names and profiles), the export wrapper giving the graph its
signature, dummy inputs, and the default precision policy. Adding a component is one entry here.

torch is imported only inside the wrappers, so the table itself can be read without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.iospec import DimRange, IOSpec, TensorSpec

GUIDANCE_MODES = ("cfg", "embedded", "none")


@dataclass(frozen=True)
class Profile:
    """The shape range the engines are built for (per image; the UNet's CFG batch is derived)."""

    batch: DimRange = DimRange(1, 1, 4)
    latent_height: DimRange = DimRange(8, 8, 8)
    latent_width: DimRange = DimRange(8, 8, 8)
    tokens: int = 77  # the tokenizer's model_max_length: prompts are padded to it
    t5_tokens: int | None = None  # T5's max_sequence_length (None: the family's own): not dynamic
    # the UNet's tokens axis takes 1..prompt_chunks chunks of `tokens` (long_prompts="chunk");
    # the text encoder stays at `tokens`, called once per chunk
    prompt_chunks: int = 1


@dataclass(frozen=True)
class PrecisionPolicy:
    default: str  # what a build picks unless measurements say otherwise
    candidates: tuple[str, ...]  # precisions worth measuring for this component
    why: str


def _first(v: Any) -> int:
    return int(v[0] if isinstance(v, list | tuple) else v)


def _scaled(r: DimRange, k: int) -> DimRange:
    return DimRange(r.min * k, r.opt * k, r.max * k)


# -- IO specs -------------------------------------------------------------------------------
# what a CLIP text encoder's graph may output: SD 1.x/2.x read the last (final-layer-normed) hidden
# state; SDXL the penultimate one of each encoder, plus encoder 2's projected pooled embedding
TEXT_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state", "text_embeds", "pooler_output")


def text_encoder_spec(
    config: dict[str, Any],
    profile: Profile,
    batch: DimRange,
    outputs: tuple[str, ...] = ("last_hidden_state",),
) -> IOSpec:
    if "d_model" in config:  # a T5 encoder under this component name (Flux's text_encoder_2)
        return t5_encoder_spec(config, profile, batch)
    hidden = int(config["hidden_size"])
    shapes = {
        "last_hidden_state": ("batch", "tokens", hidden),
        "penultimate_hidden_state": ("batch", "tokens", hidden),
        "text_embeds": ("batch", int(config.get("projection_dim") or hidden)),
        "pooler_output": ("batch", hidden),  # Flux: CLIP's pooled (EOS) state, unprojected
    }
    return IOSpec(
        "clip_text",
        (TensorSpec("input_ids", "int64", ("batch", "tokens")),),
        tuple(TensorSpec(o, "float32", shapes[o]) for o in outputs),
        {"batch": batch, "tokens": DimRange(profile.tokens, profile.tokens, profile.tokens)},
    )


def t5_encoder_spec(
    config: dict[str, Any],
    profile: Profile,
    batch: DimRange,
    outputs: tuple[str, ...] = ("last_hidden_state",),
) -> IOSpec:
    """T5EncoderModel: ids padded to max_sequence_length -> its last hidden state (d_model wide)."""
    n = profile.t5_tokens
    return IOSpec(
        "t5_encoder",
        (TensorSpec("input_ids", "int64", ("batch", "t5_tokens")),),
        (TensorSpec("last_hidden_state", "float32", ("batch", "t5_tokens", int(config["d_model"]))),),
        {"batch": batch, "t5_tokens": DimRange(n, n, n)},
    )


def is_flux(config: dict[str, Any]) -> bool:
    """A FluxTransformer2DModel config (its rotary axes): packed 2x2 latent tokens."""
    return "axes_dims_rope" in config


def latent_patch(config: dict[str, Any]) -> int:
    """What latent sizes must be a multiple of for a DiT: Flux packs 2x2 latents into a token, SD3
    patches by its patch_size."""
    return 2 if is_flux(config) else int(config.get("patch_size") or 1)


def flux_transformer_spec(config: dict[str, Any], profile: Profile, batch: DimRange) -> IOSpec:
    """FluxTransformer2DModel behind the runtime's loop names: `sample` unpacked [B, C, h, w] (the
    graph packs it into 2x2 tokens, makes img_ids/txt_ids and unpacks its output), `timestep` as the
    scheduler gives it (sigma x 1000; the graph divides by 1000 as the pipeline does), T5's states,
    CLIP's pooled output, and `guidance` [B] when guidance_embeds (FLUX.1-dev)."""
    c = int(config["in_channels"]) // 4
    n = profile.t5_tokens
    inputs = [
        TensorSpec("sample", "float32", ("batch", c, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec(
            "encoder_hidden_states", "float32", ("batch", "t5_tokens", int(config["joint_attention_dim"]))
        ),
        TensorSpec("pooled_projections", "float32", ("batch", int(config["pooled_projection_dim"]))),
    ]
    if config.get("guidance_embeds"):
        inputs.append(TensorSpec("guidance", "float32", ("batch",)))
    out = TensorSpec("out_sample", "float32", ("batch", c, "latent_height", "latent_width"))
    dims = {
        "batch": batch,
        "t5_tokens": DimRange(n, n, n),
        "latent_height": profile.latent_height,
        "latent_width": profile.latent_width,
    }
    return IOSpec("flux_transformer", tuple(inputs), (out,), dims)


def transformer_spec(config: dict[str, Any], profile: Profile, batch: DimRange) -> IOSpec:
    """SD3Transformer2DModel (MMDiT) with the runtime's loop names: `sample` (its hidden_states),
    `timestep` (sigma x 1000), the joint sequence (CLIP states padded to T5's width, then T5's)
    and the pooled CLIP projections."""
    if is_flux(config):
        return flux_transformer_spec(config, profile, batch)
    c_in, c_out = int(config["in_channels"]), int(config.get("out_channels") or config["in_channels"])
    seq = profile.tokens + profile.t5_tokens
    inputs = (
        TensorSpec("sample", "float32", ("batch", c_in, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec(
            "encoder_hidden_states", "float32", ("batch", "sequence", int(config["joint_attention_dim"]))
        ),
        TensorSpec("pooled_projections", "float32", ("batch", int(config["pooled_projection_dim"]))),
    )
    out = TensorSpec("out_sample", "float32", ("batch", c_out, "latent_height", "latent_width"))
    dims = {
        "batch": batch,
        "sequence": DimRange(seq, seq, seq),
        "latent_height": profile.latent_height,
        "latent_width": profile.latent_width,
    }
    return IOSpec("sd3_transformer", inputs, (out,), dims)


def text_time_dims(config: dict[str, Any]) -> tuple[int, int] | None:
    """SDXL's added conditioning (addition_embed_type "text_time"): (pooled text width, number of
    time ids); the add embedding takes time_ids * addition_time_embed_dim + the pooled width."""
    if config.get("addition_embed_type") != "text_time":
        return None
    n_ids = 6  # original size, crop top-left, target size (the refiner's aesthetic score: 5)
    pooled = int(config["projection_class_embeddings_input_dim"]) - n_ids * int(
        config["addition_time_embed_dim"]
    )
    return pooled, n_ids


def unet_spec(config: dict[str, Any], profile: Profile, batch: DimRange) -> IOSpec:
    c_in, c_out = int(config.get("in_channels", 4)), int(config.get("out_channels", 4))
    lat = ("batch", c_in, "latent_height", "latent_width")
    inputs = [
        TensorSpec("sample", "float32", lat),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec(
            "encoder_hidden_states", "float32", ("batch", "tokens", _first(config["cross_attention_dim"]))
        ),
    ]
    if config.get("time_cond_proj_dim"):  # embedded guidance (LCM): w-embedding at batch B
        inputs.append(TensorSpec("timestep_cond", "float32", ("batch", int(config["time_cond_proj_dim"]))))
    added = text_time_dims(config)
    if added is not None:  # SDXL: pooled text embedding and size/crop ids, both halves under CFG
        inputs.append(TensorSpec("text_embeds", "float32", ("batch", added[0])))
        inputs.append(TensorSpec("time_ids", "float32", ("batch", added[1])))
    out = TensorSpec("out_sample", "float32", ("batch", c_out, "latent_height", "latent_width"))
    dims = {
        "batch": batch,
        # opt at one chunk: most prompts fit (TensorRT tunes its kernels there)
        "tokens": DimRange(profile.tokens, profile.tokens, profile.tokens * profile.prompt_chunks),
        "latent_height": profile.latent_height,
        "latent_width": profile.latent_width,
    }
    return IOSpec("unet2d_condition", tuple(inputs), (out,), dims)


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    """diffusers' pipelines: 2 ** (len(block_out_channels) - 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_decoder_spec(config: dict[str, Any], profile: Profile, batch: DimRange) -> IOSpec:
    k = vae_scale_factor(config)
    dims = {
        "batch": batch,
        "latent_height": profile.latent_height,
        "latent_width": profile.latent_width,
        "height": _scaled(profile.latent_height, k),
        "width": _scaled(profile.latent_width, k),
    }
    return IOSpec(
        "vae_decoder",
        (
            TensorSpec(
                "latent_sample",
                "float32",
                ("batch", int(config["latent_channels"]), "latent_height", "latent_width"),
            ),
        ),
        (TensorSpec("sample", "float32", ("batch", int(config.get("out_channels", 3)), "height", "width")),),
        dims,
    )


def vae_encoder_spec(config: dict[str, Any], profile: Profile, batch: DimRange) -> IOSpec:
    k = vae_scale_factor(config)
    dims = {
        "batch": batch,
        "height": _scaled(profile.latent_height, k),
        "width": _scaled(profile.latent_width, k),
        "latent_height": profile.latent_height,
        "latent_width": profile.latent_width,
    }
    c = 2 * int(config["latent_channels"])  # mean and log-variance, as optimum's latent_parameters
    return IOSpec(
        "vae_encoder",
        (TensorSpec("sample", "float32", ("batch", int(config.get("in_channels", 3)), "height", "width")),),
        (TensorSpec("latent_parameters", "float32", ("batch", c, "latent_height", "latent_width")),),
        dims,
    )


# -- export wrappers (plain tensors in, the IO spec's outputs out; parameter names = input names) --
def text_encoder_wrapper(model: Any, outputs: tuple[str, ...] = ("last_hidden_state",)) -> Any:
    import torch

    hidden = "penultimate_hidden_state" in outputs

    class TextEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> Any:
            # diffusers' encode_prompt: text_encoder(ids), no attention mask for CLIP; SDXL reads
            # hidden_states[-2] (clip_skip None) of each encoder and encoder 2's text_embeds
            out = self.model(input_ids, output_hidden_states=hidden, return_dict=True)
            got = {
                "last_hidden_state": lambda: out.last_hidden_state,
                "penultimate_hidden_state": lambda: out.hidden_states[-2],
                "text_embeds": lambda: out.text_embeds,
                "pooler_output": lambda: out.pooler_output,
            }
            res = tuple(got[o]() for o in outputs)
            return res[0] if len(res) == 1 else res

    return TextEncoder()


def unet_wrapper(model: Any, outputs: tuple[str, ...] = ()) -> Any:
    import torch

    class UNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            sample: torch.Tensor,
            timestep: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            timestep_cond: torch.Tensor | None = None,
            text_embeds: torch.Tensor | None = None,
            time_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.model(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                timestep_cond=timestep_cond,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]

    return UNet()


def transformer_wrapper(model: Any, outputs: tuple[str, ...] = ()) -> Any:
    """SD3's MMDiT as diffusers calls it; Flux's with FluxPipeline's own steps inside the graph
    (_pack_latents, _prepare_latent_image_ids, text ids, timestep / 1000, _unpack_latents), so its
    graph takes and returns unpacked latents like every other denoiser."""
    import torch

    flux = is_flux(dict(model.config))

    class Transformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            sample: torch.Tensor,
            timestep: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            pooled_projections: torch.Tensor,
            guidance: torch.Tensor | None = None,
        ) -> torch.Tensor:
            if not flux:
                return self.model(
                    hidden_states=sample,
                    timestep=timestep,
                    encoder_hidden_states=encoder_hidden_states,
                    pooled_projections=pooled_projections,
                    return_dict=False,
                )[0]
            b, c, h, w = sample.shape
            x = sample.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
            x = x.reshape(b, (h // 2) * (w // 2), c * 4)
            # integer ranges cast once: a float Range's inputs would split between fp16 and int64
            rows = torch.arange(h // 2)[:, None].expand(h // 2, w // 2).to(sample.dtype)
            cols = torch.arange(w // 2)[None, :].expand(h // 2, w // 2).to(sample.dtype)
            img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, dtype=sample.dtype)
            out = self.model(
                hidden_states=x,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled_projections,
                encoder_hidden_states=encoder_hidden_states,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(b, c, h, w)

    return Transformer()


def vae_decoder_wrapper(model: Any, outputs: tuple[str, ...] = ()) -> Any:
    import torch

    class VaeDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            # the 1/scaling_factor stays outside the graph, as in diffusers and optimum
            return self.model.decode(latent_sample, return_dict=False)[0]

    return VaeDecoder()


def vae_encoder_wrapper(model: Any, outputs: tuple[str, ...] = ()) -> Any:
    import torch

    class VaeEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return self.model.encode(sample, return_dict=False)[0].parameters

    return VaeEncoder()


# -- dummy inputs ------------------------------------------------------------------------------
def dummy_inputs(
    spec: IOSpec, rng: np.random.Generator, which: str = "opt", vocab_size: int = 2
) -> dict[str, np.ndarray]:
    """Inputs at one end of the profile: token ids < vocab_size, timesteps in [0, 999], N(0, 1) else."""
    sizes = {k: getattr(r, which) for k, r in spec.dims.items()}
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = t.concrete(sizes)
        if t.name == "input_ids":
            feeds[t.name] = rng.integers(0, vocab_size, size=shape).astype(t.dtype)
        elif t.name == "timestep":
            feeds[t.name] = rng.integers(0, 1000, size=shape).astype(t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


# -- the table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentKind:
    name: str  # the component's name in out/ (onnx/<name>.<precision>.onnx) and t2i.json
    subfolder: str  # its folder in a diffusers pipeline (save_pretrained layout)
    library: str  # "transformers" or "diffusers"
    classes: tuple[str, ...]  # accepted model classes
    io_spec: Callable[..., IOSpec]  # (config, profile, batch[, outputs]) -> IOSpec
    wrapper: Callable[..., Any]  # (module, output names) -> torch module with the spec's signature
    precision: PrecisionPolicy
    exported_by_default: bool = True

    @property
    def weights_stem(self) -> str:
        return "model" if self.library == "transformers" else "diffusion_pytorch_model"


COMPONENTS: dict[str, ComponentKind] = {
    c.name: c
    for c in (
        ComponentKind(
            "text_encoder",
            "text_encoder",
            "transformers",
            ("CLIPTextModel", "CLIPTextModelWithProjection"),  # SD3's has the projection
            text_encoder_spec,
            text_encoder_wrapper,
            PrecisionPolicy("fp16", ("fp32", "fp16", "int8"), "runs once per prompt; fp16 is safe for CLIP"),
        ),
        ComponentKind(  # SDXL's / SD3's second CLIP (penultimate states + pooled projection); Flux's T5
            "text_encoder_2",
            "text_encoder_2",
            "transformers",
            ("CLIPTextModelWithProjection", "T5EncoderModel"),
            text_encoder_spec,
            text_encoder_wrapper,
            PrecisionPolicy("fp16", ("fp32", "fp16", "int8"), "runs once per prompt; fp16 is safe for CLIP"),
        ),
        ComponentKind(  # SD3's T5 v1.1 XXL encoder
            "text_encoder_3",
            "text_encoder_3",
            "transformers",
            ("T5EncoderModel",),
            t5_encoder_spec,
            text_encoder_wrapper,
            PrecisionPolicy("fp32", ("fp32",), "T5's activations overflow fp16 (kept fp32 in every mix)"),
        ),
        ComponentKind(  # SD3's MMDiT: the denoiser of the sd3 family
            "transformer",
            "transformer",
            "diffusers",
            ("SD3Transformer2DModel", "FluxTransformer2DModel"),
            transformer_spec,
            transformer_wrapper,
            PrecisionPolicy("fp16", ("fp32", "fp16", "int8"), "runs once per step: most of the time"),
        ),
        ComponentKind(
            "unet",
            "unet",
            "diffusers",
            ("UNet2DConditionModel",),
            unet_spec,
            unet_wrapper,
            PrecisionPolicy("fp16", ("fp32", "fp16", "int8"), "runs once per step: most of the time"),
        ),
        ComponentKind(
            "vae_decoder",
            "vae",
            "diffusers",
            ("AutoencoderKL",),
            vae_decoder_spec,
            vae_decoder_wrapper,
            PrecisionPolicy(
                "fp32",
                ("fp32", "fp16"),
                "fp16 overflow gives black/NaN images: fp16 only after a range check",
            ),
        ),
        ComponentKind(
            "vae_encoder",
            "vae",
            "diffusers",
            ("AutoencoderKL",),
            vae_encoder_spec,
            vae_encoder_wrapper,
            PrecisionPolicy(
                "fp32", ("fp32", "fp16"), "image-to-image only; same overflow risk as the decoder"
            ),
        ),
    )
}


@dataclass(frozen=True)
class TokenizerSpec:
    path: str  # tokenizer.json, relative to the folder that holds it
    model_max_length: int
    pad_token: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "model_max_length": self.model_max_length, "pad_token": self.pad_token}


@dataclass(frozen=True)
class ComponentSpec:
    kind: str  # a key of COMPONENTS
    config: dict[str, Any]  # the model's config.json
    io: IOSpec


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline: its components, tokenizer, scheduler config and guidance mode."""

    pipeline_class: str
    components: tuple[ComponentSpec, ...]
    tokenizer: TokenizerSpec
    scheduler_config: dict[str, Any]
    guidance: str  # "cfg": UNet at batch 2B; "embedded": timestep_cond at B; "none": guidance <= 1
    vae_scaling_factor: float
    vae_scale_factor: int
    default_size: tuple[int, int]  # (height, width) in pixels: the UNet's sample_size x vae factor
    profile: Profile = field(default_factory=Profile)
    family: str = "sd"  # optimizer/families/table.py: its components and conditioning recipe
    tokenizer_2: TokenizerSpec | None = None  # SDXL's second tokenizer (its text_encoder_2's)
    # SDXL: no negative prompt given -> zero negative embeddings (the pipeline's config flag)
    force_zeros_for_empty_prompt: bool = False
    denoiser: str = "unet"  # the per-step component (SD3: "transformer")
    tokenizer_3: TokenizerSpec | None = None  # SD3's T5 tokenizer (padded to max_sequence_length)
    vae_shift_factor: float = 0.0  # SD3: the decoder sees latents / scaling_factor + shift_factor
    # an inpainting UNet (StableDiffusionInpaintPipeline's): latents + mask + masked-image latents in;
    # it only inpaints, so every stage that generates gives it an image and a mask
    inpaint: bool = False

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode {self.guidance!r} not in {GUIDANCE_MODES}")

    def component(self, kind: str) -> ComponentSpec:
        for c in self.components:
            if c.kind == kind:
                return c
        raise KeyError(kind)


# the outputs each text encoder's graph gives, per family's conditioning (the family table names it)
TEXT_ENCODER_OUTPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "sd": {"text_encoder": ("last_hidden_state",)},
    "sdxl": {
        "text_encoder": ("penultimate_hidden_state",),
        "text_encoder_2": ("penultimate_hidden_state", "text_embeds"),
    },
    "sd3": {
        "text_encoder": ("penultimate_hidden_state", "text_embeds"),
        "text_encoder_2": ("penultimate_hidden_state", "text_embeds"),
        "text_encoder_3": ("last_hidden_state",),
    },
    "flux": {"text_encoder": ("pooler_output",), "text_encoder_2": ("last_hidden_state",)},
}
DENOISERS = ("unet", "transformer")  # the per-step components: their batch doubles under CFG


def build_specs(
    configs: dict[str, dict[str, Any]], profile: Profile, guidance: str, conditioning: str = "sd"
) -> dict[str, IOSpec]:
    """IO spec per component; the UNet's batch range doubles under CFG (both halves in one call)."""
    out = {}
    text_outputs = TEXT_ENCODER_OUTPUTS[conditioning]
    for name, cfg in configs.items():
        batch = profile.batch
        if name in DENOISERS and guidance == "cfg":  # min stays B: guidance <= 1 runs it at B
            batch = DimRange(profile.batch.min, 2 * profile.batch.opt, 2 * profile.batch.max)
        if name in text_outputs:
            out[name] = COMPONENTS[name].io_spec(cfg, profile, batch, text_outputs[name])
        else:
            out[name] = COMPONENTS[name].io_spec(cfg, profile, batch)
    return out


def wrap(kind: str, module: Any, io: IOSpec) -> Any:
    """The component's torch module with its graph's signature (inputs and outputs as `io` names)."""
    return COMPONENTS[kind].wrapper(module, tuple(io.output_names)).eval()
