"""Text-to-image pipeline on exported graphs, without torch: prompt in, uint8 [B, H, W, 3] out.

Follows diffusers' StableDiffusionPipeline / LatentConsistencyModelPipeline step by step
(encode_prompt, prepare_latents, the denoising loop with CFG or the guidance-scale embedding,
vae.decode(latents / scaling_factor), postprocess), so given the same `latents` it gives the
diffusers image. Reads a folder written by optimizer/t2i/export.py (t2i.json + onnx/ + tokenizer/
+ scheduler/).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.errors import InputError
from engines.iospec import IOSpec
from engines.schedulers import make_scheduler
from engines.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)
T2I_FORMAT = "dd-compile-t2i"
COMPONENT_NAMES = ("text_encoder", "unet", "vae_decoder")
BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "openvino", "tensorrt")
# A prompt over the tokenizer's limit: "truncate" (diffusers: cut, keep EOS, log a warning) or
# "refuse" (one-line InputError naming the token count; what dd-serve does)
LONG_PROMPT_POLICIES = ("truncate", "refuse")
MAX_SEED = 2**63 - 1
RunnerFactory = Callable[[str, Path, IOSpec], Runner]


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


def to_uint8(images: np.ndarray) -> np.ndarray:
    """VAE output NCHW in [-1, 1] -> uint8 NHWC, as diffusers' postprocess + numpy_to_pil."""
    x = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (x * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class T2IConfig:
    root: Path
    pipeline_class: str
    guidance: str
    components: dict[str, dict[str, Any]]  # name -> {"path", "precision", "io"}
    tokenizer: dict[str, Any]
    scheduler_kind: str
    scheduler_config: dict[str, Any]
    vae_scaling_factor: float
    vae_scale_factor: int
    latent_channels: int
    time_cond_proj_dim: int | None
    defaults: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path, name: str = "t2i.json") -> T2IConfig:
        root = Path(folder)
        path = root / name
        if not path.exists():
            raise InputError(f"{root}: no {name} (export the pipeline with optimizer.t2i.export first)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if d.get("format") != T2I_FORMAT:
            raise InputError(f"{path}: format {d.get('format')!r}, expected {T2I_FORMAT!r}")
        missing = [c for c in COMPONENT_NAMES if c not in d.get("components", {})]
        if missing:
            raise InputError(f"{path}: component(s) {missing} missing")
        sched_path = root / d["scheduler"]["config"]
        if not sched_path.exists():
            raise InputError(f"{sched_path}: scheduler config not found")
        return cls(
            root=root,
            pipeline_class=d["pipeline_class"],
            guidance=d["guidance"],
            components=d["components"],
            tokenizer=d["tokenizer"],
            scheduler_kind=d["scheduler"]["kind"],
            scheduler_config=json.loads(sched_path.read_text()),
            vae_scaling_factor=float(d["vae"]["scaling_factor"]),
            vae_scale_factor=int(d["vae"]["scale_factor"]),
            latent_channels=int(d["latent_channels"]),
            time_cond_proj_dim=d.get("time_cond_proj_dim"),
            defaults=d["defaults"],
        )


def component_runner(backend: str, threads: int | None = None) -> RunnerFactory:
    """Runners on `backend` for the components' graphs (heavy imports only for the one asked)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown text-to-image backend {backend!r}; choose from {list(BACKENDS)}")

    def make(name: str, path: Path, spec: IOSpec) -> Runner:
        if not path.exists():
            raise InputError(f"{path}: {name} graph not found")
        if backend == "tensorrt":  # the description names each component's engine (.plan)
            from engines.tensorrt_runner import TensorRTRunner

            return TensorRTRunner(path, spec, name=name)
        if backend == "openvino":
            from engines.openvino_runner import OpenVINORunner

            # dynamic shapes: the UNet runs at B and 2B (CFG) and at any latent size of the profile,
            # where a static compile at the opt shapes would not take the call
            return OpenVINORunner(path, spec, threads=threads, name=name)
        from engines.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, spec, backend=backend, threads=threads, name=name)

    return make


@dataclass(frozen=True)
class T2IRequest:
    """One checked call: what `__call__` runs, and what a server merges across requests."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    guidance_scale: float
    num_inference_steps: int


class TextToImagePipeline:
    """`pipe(prompt, ...)` -> uint8 [B, H, W, 3]; runners are ONNX Runtime sessions (CPU by default),
    OpenVINO with backend="openvino", or whatever `runner_factory` makes (dd-serve: Triton BLS)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        backend: str = "onnxruntime",
        threads: int | None = None,
        runner_factory: RunnerFactory | None = None,
        long_prompts: str = "truncate",
        config: str = "t2i.json",
    ):
        """`config`: which description in `folder` (dd-compile writes t2i.<mix>.json per mix)."""
        if long_prompts not in LONG_PROMPT_POLICIES:
            raise InputError(f"long_prompts={long_prompts!r}: choose from {list(LONG_PROMPT_POLICIES)}")
        self.long_prompts = long_prompts
        self.config = cfg = T2IConfig.load(folder, config)
        self.specs = {n: IOSpec.from_dict(cfg.components[n]["io"]) for n in COMPONENT_NAMES}
        make = runner_factory or component_runner(backend, threads)
        self.backend = backend if runner_factory is None else "custom"
        self.runners = {
            n: make(n, cfg.root / cfg.components[n]["path"], self.specs[n]) for n in COMPONENT_NAMES
        }
        tok = cfg.tokenizer
        self.tokenizer = ClipTokenizer(cfg.root / tok["path"], int(tok["model_max_length"]), tok["pad_token"])
        self.scheduler = make_scheduler(
            cfg.scheduler_kind, cfg.scheduler_config, where=str(cfg.root / "scheduler")
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> TextToImagePipeline:
        for r in self.runners.values():
            r.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) at the default size."""
        return int(self.config.defaults["height"]), int(self.config.defaults["width"]), 3

    # -- input checks ------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        """Images per chunk of a call: the UNet's batch range, halved when it was sized for CFG."""
        m = self.specs["unet"].dims["batch"].max
        return m // 2 if self.config.guidance == "cfg" else m

    def _prompts(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None
    ) -> tuple[list[str], list[str]]:
        prompts = _strings(prompt, "prompt")
        if negative_prompt is None:
            neg = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            neg = [negative_prompt] * len(prompts)
        else:
            neg = _strings(negative_prompt, "negative_prompt")
            if len(neg) != len(prompts):
                raise InputError(f"negative_prompt: {len(neg)} prompts for {len(prompts)} prompts")
        return prompts, neg

    def _size(self, height: int | None, width: int | None, latents: np.ndarray | None) -> tuple[int, int]:
        k = self.config.vae_scale_factor
        if isinstance(latents, np.ndarray) and latents.ndim == 4 and height is None and width is None:
            h, w = latents.shape[2] * k, latents.shape[3] * k  # diffusers would need height/width too
        else:
            h = _int_or(height, self.config.defaults["height"], "height")
            w = _int_or(width, self.config.defaults["width"], "width")
        dims = self.specs["unet"].dims
        for name, v, axis in (("height", h, "latent_height"), ("width", w, "latent_width")):
            r = dims[axis]
            if v % k or not (r.min <= v // k <= r.max):
                raise InputError(
                    f"{name}={v}: must be a multiple of {k} in [{r.min * k}, {r.max * k}] (the profile)"
                )
        return h, w

    def _guidance(self, guidance_scale: float | None) -> tuple[float, bool]:
        """(scale, run the CFG batch?) checked against the mode the engines were built for."""
        mode = self.config.guidance
        g = self.config.defaults["guidance_scale"] if guidance_scale is None else guidance_scale
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

    # -- stages ------------------------------------------------------------------------------
    def _steps(self, num_inference_steps: int | None) -> int:
        n = (
            self.config.defaults["num_inference_steps"]
            if num_inference_steps is None
            else num_inference_steps
        )
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise InputError(f"num_inference_steps={n!r}: expected an integer")
        copy.deepcopy(self.scheduler).set_timesteps(int(n))  # the scheduler's own range check
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

    def tokenize(self, prompts: list[str], what: str = "prompt") -> np.ndarray:
        """int64 ids [B, tokens]; a prompt over the limit is cut (truncate) or refused (refuse)."""
        return self.tokenizer(prompts, truncate=self.long_prompts == "truncate", what=what)

    def _check_tokens(self, prompts: list[str], neg: list[str]) -> None:
        self.tokenize(prompts)
        self.tokenize(neg, "negative_prompt")

    def check(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        seeds: list[int] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
    ) -> T2IRequest:
        """Every check of a call at the default size, before any component runs."""
        prompts, neg = self._prompts(prompt, negative_prompt)
        seeds = self._seeds(seeds, len(prompts))
        g, _ = self._guidance(guidance_scale)
        steps = self._steps(num_inference_steps)
        self._check_tokens(prompts, neg)
        return T2IRequest(prompts, neg, seeds, g, steps)

    def run(self, request: T2IRequest) -> np.ndarray:
        """uint8 [B, H, W, 3] of a checked request at the default size (seeded latents)."""
        return self(
            request.prompts,
            request.negative_prompts,
            request.seeds,
            guidance_scale=request.guidance_scale,
            num_inference_steps=request.num_inference_steps,
        )

    def encode(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenize(prompts)
        return self.runners["text_encoder"].infer({"input_ids": ids})["last_hidden_state"].astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = (latents / np.float32(self.config.vae_scaling_factor)).astype(np.float32)
        return self.runners["vae_decoder"].infer({"latent_sample": z})["sample"]

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        seeds: list[int] | None = None,
        latents: np.ndarray | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> np.ndarray:
        cfg = self.config
        prompts, neg = self._prompts(prompt, negative_prompt)
        b = len(prompts)
        seeds = self._seeds(seeds, b)
        g, do_cfg = self._guidance(guidance_scale)
        h, w = self._size(height, width, latents)
        shape = (b, cfg.latent_channels, h // cfg.vae_scale_factor, w // cfg.vae_scale_factor)
        steps = self._steps(num_inference_steps)
        if self.long_prompts == "refuse":
            self._check_tokens(prompts, neg)  # refuse before any component runs
        rngs = [np.random.default_rng(s) for s in seeds]
        if latents is None:  # per-seed draws, so an image does not depend on its batch
            latents = np.stack([r.standard_normal(shape[1:], dtype=np.float32) for r in rngs])
        elif not isinstance(latents, np.ndarray) or latents.dtype != np.float32 or latents.shape != shape:
            got = (
                f"{latents.dtype} {latents.shape}"
                if isinstance(latents, np.ndarray)
                else type(latents).__name__
            )
            raise InputError(f"latents: got {got}, expected float32 {shape}")
        elif not np.isfinite(latents).all():
            raise InputError("latents: contain NaN or Inf")
        # any number of prompts: chunks of the compiled batch; per-seed draws keep each image
        # independent of how the prompts are chunked
        mb = self.max_batch
        return np.concatenate(
            [
                self._run(
                    prompts[i : i + mb],
                    neg[i : i + mb],
                    rngs[i : i + mb],
                    latents[i : i + mb],
                    g,
                    do_cfg,
                    steps,
                )
                for i in range(0, b, mb)
            ]
        )

    def _run(
        self,
        prompts: list[str],
        neg: list[str],
        rngs: list[np.random.Generator],
        latents: np.ndarray,
        g: float,
        do_cfg: bool,
        steps: int,
    ) -> np.ndarray:
        cfg, sched = self.config, self.scheduler
        b = len(prompts)
        # diffusers: cat([negative, positive]), one text-encoder call each (its profile is sized for B)
        emb = self.encode(prompts)
        if do_cfg:
            emb = np.concatenate([self.encode(neg), emb])
        timesteps = sched.set_timesteps(steps)
        x = (latents * np.float32(sched.init_noise_sigma)).astype(np.float32)
        feeds_extra: dict[str, np.ndarray] = {}
        if cfg.guidance == "embedded":  # Imagen's w; the LCM pipelines embed w - 1
            w = np.full((b,), g - 1, dtype=np.float32)
            feeds_extra["timestep_cond"] = guidance_scale_embedding(w, int(cfg.time_cond_proj_dim))
        denoised = x
        last = len(timesteps) - 1
        for i, t in enumerate(timesteps):
            xi = sched.scale_model_input(x, i)
            xin = np.concatenate([xi, xi]) if do_cfg else xi
            feeds = {
                "sample": xin,
                "timestep": np.full((xin.shape[0],), t, np.float32),
                "encoder_hidden_states": emb,
                **feeds_extra,
            }
            out = self.runners["unet"].infer(feeds)["out_sample"].astype(np.float32)
            if do_cfg:
                u, c = out[:b], out[b:]
                out = u + np.float32(g) * (c - u)
            # per-image draws from each seed's generator, so an image does not depend on its batch
            noise = None
            if sched.stochastic and i < last:
                noise = np.stack([r.standard_normal(x.shape[1:], dtype=np.float32) for r in rngs])
            x, denoised = sched.step(out, i, x, noise)
        return to_uint8(self.decode(denoised))
