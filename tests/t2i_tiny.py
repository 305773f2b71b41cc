"""A tiny random-weight StableDiffusionPipeline (LCM and SD 2.x variants) with an offline CLIP BPE
tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

MERGES = ["r e", "re d</w>", "s e", "v e", "ve n</w>", "se ven</w>", "g r", "e e", "gr ee"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table (CLIP's BPE alphabet)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_vocab(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    syms = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in [*syms, *(s + "</w>" for s in syms), *(m.replace(" ", "") for m in MERGES)]:
        vocab.setdefault(s, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return d


def clip_tokenizer(d: Path, pad_token: str | None = None):
    """CLIP's BPE on the tiny vocabulary; `pad_token` "!" as SD 2.x's OpenCLIP tokenizer (id 0 here
    too), else CLIPTokenizer's default <|endoftext|> (SD 1.x)."""
    from transformers import CLIPTokenizer

    write_clip_vocab(d)
    kw = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77, **kw)


# SD 2.x's scheduler_config.json as shipped (stable-diffusion-2 / 2-1: the 768-v models), whatever the
# class: keys another class does not take (skip_prk_steps, clip_sample, ...) are kept, as on the hub
SD2_SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)


def tiny_vae(sample_size: int):
    """The tiny AutoencoderKL every test pipeline uses (scale factor 2, 4 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )


def _sd2_modules(tok, seed: int):
    """SD 2.x's shapes, tiny: the OpenCLIP ViT-H text tower as CLIPTextModel (gelu, an odd layer count
    as ViT-H's 23, its config's bos/eos/pad ids 0/2/1 as shipped, wider than any UNet block, as 1024 is
    there), a UNet with linear projections, a per-block head count list and upcast attention."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=12,  # not the SD 1.x tiny's 8, as 96 (768 px) is not 64
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=48,
        attention_head_dim=[2, 4],  # diffusers reads it as heads per block (SD 2.x: [5, 10, 20, 20])
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = tiny_vae(24)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    return unet, vae, text


def make_tiny_pipeline(
    path: Path,
    *,
    lcm: bool = False,
    seed: int = 0,
    sd2: bool = False,
    scheduler: str = "DDIMScheduler",
    prediction_type: str = "v_prediction",
    inpaint: bool = False,
) -> Path:
    """save_pretrained layout: text_encoder, tokenizer, unet, vae, scheduler, model_index.json.

    `sd2`: SD 2.x's shapes (see _sd2_modules), its tokenizer's "!" padding, and its scheduler config
    as shipped (SD2_SCHEDULER) under the diffusers class `scheduler`, with `prediction_type`
    (v_prediction: the 768-v models; epsilon: the 512 base models). `inpaint`: a 9-channel inpainting
    UNet (latents + mask + masked-image latents) in a StableDiffusionInpaintPipeline folder."""
    if sd2:
        return _make_sd2(path, seed, scheduler, prediction_type)
    import torch
    from diffusers import (
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer(path.parent / f"{path.name}_vocab")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        time_cond_proj_dim=16 if lcm else None,
    )
    vae = tiny_vae(16)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    if lcm:
        sched = LCMScheduler(
            **sched_kw, set_alpha_to_one=True, timestep_spacing="leading", original_inference_steps=50
        )
        pipe = LatentConsistencyModelPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=tok,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        sched = DDIMScheduler(**sched_kw, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
        pipe = (StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline)(
            vae=vae,
            text_encoder=text,
            tokenizer=tok,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _make_sd2(path: Path, seed: int, scheduler: str, prediction_type: str) -> Path:
    import diffusers
    from diffusers import StableDiffusionPipeline

    tok = clip_tokenizer(path.parent / f"{path.name}_vocab", pad_token="!")
    unet, vae, text = _sd2_modules(tok, seed)
    shipped = {**SD2_SCHEDULER, "prediction_type": prediction_type}
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=getattr(diffusers, scheduler).from_config(shipped),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # the file as shipped, not as diffusers rewrites it (every default filled in, foreign keys dropped)
    cfg = {"_class_name": scheduler, "_diffusers_version": "0.8.0", **shipped}
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def tiny_clip_pair(tok, tok2, *, width: int, with_projection: bool):
    """SDXL's / SD3's two CLIP text encoders (gelu, 3 layers; the second, OpenCLIP bigG-like, with
    its projection; SD3's first has one too), on the CLIP tokenizer and the "!"-padded one."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4 if width >= 32 else 2,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=width,
    )
    first = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(
        CLIPTextConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **cfg,
        )
    )
    second = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=len(tok2), bos_token_id=0, eos_token_id=2, pad_token_id=1, **cfg)
    )
    return first, second


# SDXL base's scheduler_config.json as shipped (EulerDiscreteScheduler, leading spacing)
SDXL_SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)


def make_tiny_sdxl(
    path: Path,
    *,
    seed: int = 0,
    lcm: bool = False,
    force_zeros: bool = True,
    hot_vae: bool = False,
    inpaint: bool = False,
) -> Path:
    """A tiny random StableDiffusionXLPipeline, shaped as diffusers' own SDXL pipeline tests build it
    (get_dummy_components): CLIPTextModel + CLIPTextModelWithProjection (hidden 32 each, projection
    32), a UNet with text_time added conditioning (addition_time_embed_dim 8: 6 x 8 + 32 = 80) and
    cross-attention width 64 (both encoders), the tokenizer_2 padding with "!" as SDXL's OpenCLIP
    one, Euler as shipped; `lcm`: a time_cond_proj_dim UNet with LCMScheduler (LCM-SDXL); `hot_vae`:
    SDXL's VAE fp16 trap planted (force_upcast, the decoder's first conv x 1e5: activations past
    65504 that fp32 shrugs off); `inpaint`: a 9-channel inpainting UNet in a
    StableDiffusionXLInpaintPipeline folder."""
    import diffusers
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = clip_tokenizer(path.parent / f"{path.name}_vocab")
    tok2 = clip_tokenizer(path.parent / f"{path.name}_vocab2", pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
        time_cond_proj_dim=16 if lcm else None,
    )
    vae = tiny_vae(16)
    if hot_vae:
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(1e5)
            vae.decoder.conv_in.bias.mul_(1e5)
    text, text_2 = tiny_clip_pair(tok, tok2, width=32, with_projection=False)
    sched = (
        diffusers.LCMScheduler.from_config({**SDXL_SCHEDULER, "original_inference_steps": 50})
        if lcm
        else diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    )
    pipe = (StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline)(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=sched,
        force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


T5_CORPUS = [
    "a red seven",
    "green seven on a blue field",
    "a photo of a cat",
    "an oil painting of a bowl of fruit",
    "a mountain lake at dawn",
]


def t5_tokenizer(d: Path, vocab_size: int = 64):
    """An offline T5 tokenizer: `tokenizers` Unigram + Metaspace trained on a few strings, `</s>`
    appended by a template, loaded by T5TokenizerFast(tokenizer_file=..., extra_ids=0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = __import__("tokenizers").decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(T5_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    tok.save(str(d / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(d / "tokenizer.json"), extra_ids=0, model_max_length=32)


def tiny_t5_encoder(tok):
    """A T5EncoderModel on the offline T5 tokenizer: d_model 48 (wider than the CLIP encoders, as
    T5-XXL's 4096 is), gated-gelu as T5 v1.1."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=48,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=0,
        )
    )


def tiny_dit_vae(latent_channels: int, *, scaling_factor: float, shift_factor: float):
    """The DiT families' VAE: no quant convs, a scaling and a shift factor (scale factor 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def make_tiny_sd3(path: Path, *, seed: int = 0, t5: bool = True) -> Path:
    """A tiny random StableDiffusion3Pipeline as diffusers' SD3 tests build it, with SD3's proportions
    kept where they matter: two CLIPTextModelWithProjection (hidden 16 each, projection 16: pooled
    32), whose penultimate states (16 + 16) are zero-padded to the T5 encoder's width 48 and
    concatenated with its states on the sequence axis (77 + 32 tokens); an SD3Transformer2DModel with
    patch size 2 on 16 latent channels; a VAE with SD3's scaling and shift factors; FlowMatch Euler
    with shift 3. `t5=False`: no third encoder (SD3 runs with zeros for it)."""
    import diffusers
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = clip_tokenizer(path.parent / f"{path.name}_vocab")
    tok2 = clip_tokenizer(path.parent / f"{path.name}_vocab2", pad_token="!")
    tok3 = t5_tokenizer(path.parent / f"{path.name}_t5")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    vae = tiny_dit_vae(16, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's factors
    text, text_2 = tiny_clip_pair(tok, tok2, width=16, with_projection=True)
    text_3 = tiny_t5_encoder(tok3)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text_2,
        tokenizer_2=tok2,
        text_encoder_3=text_3 if t5 else None,
        tokenizer_3=tok3 if t5 else None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_flux(path: Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny random FluxPipeline as diffusers' Flux tests build it: a CLIPTextModel whose pooled
    output is the pooled projection (32), a T5 encoder (d_model 48) for the token states, a
    FluxTransformer2DModel over 2x2-packed latents (4 latent channels -> 16 packed, rope axes
    4 + 4 + 8), a VAE with Flux's scaling and shift factors, FlowMatch Euler (dev: dynamic
    shifting; schnell: static shift 1, as their configs). `guidance_embeds`: FLUX.1-dev's
    guidance-distilled input; False: schnell's (no guidance)."""
    import diffusers
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer(path.parent / f"{path.name}_vocab")
    tok2 = t5_tokenizer(path.parent / f"{path.name}_t5")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    vae = tiny_dit_vae(4, scaling_factor=0.3611, shift_factor=0.1159)  # Flux's factors
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    text_2 = tiny_t5_encoder(tok2)
    # dev: dynamic shifting (mu from the image's tokens); schnell: its static shift 1, where
    # FluxPipeline's own sigmas linspace(1, 1/n, n) still replace the scheduler's default ones
    dynamic = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        **(dict(shift=3.0, **dynamic) if guidance_embeds else dict(shift=1.0, use_dynamic_shifting=False)),
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=sched,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        text_encoder_2=text_2,
        tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
