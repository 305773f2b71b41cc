"""The PyTorch reference: diffusers' own pipeline objects holding a LoadedPipeline's modules.

`diffusers_pipeline` builds a StableDiffusionPipeline / LatentConsistencyModelPipeline from the
loaded modules (the student UNet included); `Recorder` captures every component's inputs along a
run (text encoder ids, each UNet call with both CFG halves, the VAE's final latents), the real
inputs call parity and calibration use; `images` runs it from given latents with the runtime's
per-step draws for a stochastic scheduler (LCM's re-noising, Euler ancestral's noise), so engine
and torch images are comparable pixel for pixel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from optimizer.t2i.load import LoadedPipeline


def diffusers_pipeline(loaded: LoadedPipeline) -> Any:
    import diffusers
    from transformers import CLIPTokenizerFast

    spec = loaded.spec
    sched_cls = getattr(diffusers, spec.scheduler_config.get("_class_name", "DDIMScheduler"))
    scheduler = sched_cls.from_config(spec.scheduler_config)
    tokenizer = CLIPTokenizerFast.from_pretrained(loaded.tokenizer_dir)
    cls = getattr(diffusers, spec.pipeline_class)
    kw = dict(
        vae=loaded.vae,
        text_encoder=loaded.text_encoder,
        tokenizer=tokenizer,
        unet=loaded.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = cls(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


@dataclass
class Recorder:
    """Component inputs seen while a diffusers pipeline runs (feeds named as in the IO specs)."""

    text_encoder: list[dict[str, np.ndarray]] = field(default_factory=list)
    unet: list[dict[str, np.ndarray]] = field(default_factory=list)
    vae_decoder: list[dict[str, np.ndarray]] = field(default_factory=list)

    def feeds(self, kind: str) -> list[dict[str, np.ndarray]]:
        return getattr(self, kind)


@contextlib.contextmanager
def recording(pipe: Any) -> Iterator[Recorder]:
    rec = Recorder()

    def te_hook(_m: Any, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        rec.text_encoder.append({"input_ids": _np(ids).astype(np.int64)})

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
        rec.unet.append(feeds)

    vae = pipe.vae
    decode = vae.decode

    def recorded_decode(z: torch.Tensor, *a: Any, **kw: Any) -> Any:
        rec.vae_decoder.append({"latent_sample": _np(z).astype(np.float32)})
        return decode(z, *a, **kw)

    hooks = [
        pipe.text_encoder.register_forward_pre_hook(te_hook, with_kwargs=True),
        pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True),
    ]
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
    seeds: list[int], module: str = NOISE_MODULES["LCMScheduler"]
) -> Iterator[list[np.ndarray]]:
    """The scheduler module's randn_tensor draws as engines/t2i.py does with `latents=` given: from
    fresh per-seed generators, one draw per call (the count follows the scheduler's own steps; Euler
    ancestral's last draw, which engines/t2i.py skips, is multiplied by sigma_up = 0). Yields the
    draws made."""
    import importlib

    mod = importlib.import_module(module)
    rngs = [np.random.default_rng(s) for s in seeds]
    made: list[np.ndarray] = []
    orig = mod.randn_tensor

    def ours(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> Any:
        if tuple(shape)[0] != len(rngs):
            raise RuntimeError(f"scheduler noise for {tuple(shape)}: {len(rngs)} seeds")
        made.append(np.stack([r.standard_normal(tuple(shape)[1:], dtype=np.float32) for r in rngs]))
        return torch.from_numpy(made[-1]).to(dtype=dtype or torch.float32)

    mod.randn_tensor = ours
    try:
        yield made
    finally:
        mod.randn_tensor = orig


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
        out = pipe(
            prompts,
            latents=torch.from_numpy(latents),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=h,
            width=w,
            output_type="np",
        ).images
    return (out * 255).round().astype(np.uint8)
