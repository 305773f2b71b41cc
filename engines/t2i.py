"""Text-to-image pipeline on exported graphs, without torch: prompt in, uint8 [B, H, W, 3] out
(and image-to-image, `image=` and `strength=`, when the output has a VAE encoder).

Follows diffusers' StableDiffusionPipeline / LatentConsistencyModelPipeline step by step
(encode_prompt, prepare_latents, the denoising loop with CFG or the guidance-scale embedding,
vae.decode(latents / scaling_factor), postprocess), so given the same `latents` it gives the
diffusers image. Reads a folder written by optimizer/t2i/export.py (t2i.json + onnx/ + tokenizer/
+ scheduler/).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engines.base import Runner
from engines.errors import InputError
from engines.iospec import IOSpec
from engines.lora import AdapterSet, Slots
from engines.pipeline import (  # noqa: F401  (T2IRequest, to_uint8, guidance_scale_embedding: this module's API)
    LONG_PROMPT_POLICIES,
    CompiledPipeline,
    Parts,
    T2IRequest,
    TextParts,
    VaeParts,
    guidance_scale_embedding,
    to_uint8,
)
from engines.schedulers import make_scheduler
from engines.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)
T2I_FORMAT = "dd-compile-t2i"
COMPONENT_NAMES = ("text_encoder", "unet", "vae_decoder")  # every family's output has them
# image-to-image's VAE encoder (outputs compiled before it have none and run text-to-image only);
# SDXL's second text encoder (its description's family says whether it is required)
OPTIONAL_COMPONENTS = ("vae_encoder",)
FAMILY_COMPONENTS = {
    "sd": COMPONENT_NAMES,
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"),
    "flux": ("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
}
BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "openvino", "tensorrt")
RunnerFactory = Callable[[str, Path, IOSpec], Runner]
# precisions a runtime applies to the fp32 graph (no graph of their own) -> OpenVINO's
# INFERENCE_PRECISION_HINT; t2i.json names them as a component's "precision"
OPENVINO_HINTS = {"bf16": "bf16"}
# backends whose runners feed a graph's LoRA inputs (zeros when no adapter is set: engines/lora.py);
# tensorrt: engines built with the inputs' rank range in their profiles, written against TensorRT's
# API and unit-tested around it (no TensorRT here); onnxruntime-trt's profiles do not cover them
LORA_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "openvino", "tensorrt")


class ComponentRunnerFactory(Protocol):
    def __call__(self, name: str, path: Path, spec: IOSpec, precision: str = "fp32") -> Runner: ...


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
    family: str = "sd"  # outputs written before families were recorded are SD's
    tokenizer_2: dict[str, Any] | None = None
    force_zeros_for_empty_prompt: bool = False
    tokenizer_3: dict[str, Any] | None = None  # SD3's T5
    denoiser: str = "unet"
    patch_size: int = 1
    vae_shift_factor: float = 0.0
    flow_sigmas: str | None = None  # "flux": FluxPipeline's sigmas, linspace(1, 1/n, n)
    # the prompt chunks the UNet's tokens axis takes (dd-compile --prompt-chunks; older outputs: 1)
    prompt_chunks: int = 1

    @property
    def required(self) -> tuple[str, ...]:
        return FAMILY_COMPONENTS[self.family]

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
        family = d.get("family", "sd")
        if family not in FAMILY_COMPONENTS:
            raise InputError(
                f"{path}: family {family!r} is not one this runtime runs ({', '.join(FAMILY_COMPONENTS)})"
            )
        for fam, key in (
            ("sdxl", "tokenizer_2"),
            ("sd3", "tokenizer_2"),
            ("sd3", "tokenizer_3"),
            ("flux", "tokenizer_2"),
        ):
            if family == fam and not isinstance(d.get(key), dict):
                raise InputError(f"{path}: a {fam} description needs {key}")
        missing = [c for c in FAMILY_COMPONENTS[family] if c not in d.get("components", {})]
        if missing:
            raise InputError(f"{path}: component(s) {missing} missing")
        sched_path = root / d["scheduler"]["config"]
        if not sched_path.exists():
            raise InputError(f"{sched_path}: scheduler config not found")
        # the UNet's tokens axis must take that many tokenizer-length chunks (SD3/Flux: no such axis)
        chunks = d.get("prompt_chunks", 1)
        tokens = d["components"][d.get("denoiser", "unet")].get("io", {}).get("dims", {}).get("tokens")
        most = 1 if tokens is None else tokens[-1] // int(d["tokenizer"]["model_max_length"])
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks != most:
            raise InputError(f"{path}: prompt_chunks {chunks!r}, but the UNet's tokens axis takes {most}")
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
            family=family,
            tokenizer_2=d.get("tokenizer_2"),
            force_zeros_for_empty_prompt=bool(d.get("force_zeros_for_empty_prompt", False)),
            tokenizer_3=d.get("tokenizer_3"),
            denoiser=str(d.get("denoiser", "unet")),
            patch_size=int(d.get("patch_size", 1)),
            vae_shift_factor=float(d["vae"].get("shift_factor", 0.0)),
            flow_sigmas=d.get("flow_sigmas"),
            prompt_chunks=chunks,
        )


def component_runner(backend: str, threads: int | None = None) -> ComponentRunnerFactory:
    """Runners on `backend` for the components' graphs (heavy imports only for the one asked);
    `precision` is the component's in the description: "bf16" runs its fp32 graph under OpenVINO's
    bf16 hint, so it is refused on any other backend rather than run in fp32 unsaid."""
    if backend not in BACKENDS:
        raise InputError(f"unknown text-to-image backend {backend!r}; choose from {list(BACKENDS)}")

    def make(name: str, path: Path, spec: IOSpec, precision: str = "fp32") -> Runner:
        if not path.exists():
            raise InputError(f"{path}: {name} graph not found")
        if precision in OPENVINO_HINTS and backend != "openvino":
            raise InputError(
                f"{name}: precision {precision} is the fp32 graph under OpenVINO's {precision} "
                f"inference hint: it runs with backend 'openvino', not {backend!r}"
            )
        if backend == "tensorrt":  # the description names each component's engine (.plan)
            from engines.tensorrt_runner import TensorRTRunner

            return TensorRTRunner(path, spec, name=name)
        if backend == "openvino":
            from engines.openvino_runner import OpenVINORunner

            # static compiles per input-shape signature, on first use (the UNet at B and 2B under
            # CFG, each latent size of the profile): dynamic shapes ran the demo UNet at 0.6-0.7x
            # (benchmarks/openvino_pipeline.py); bf16 on AMX is the larger gain at SD 1.5 size
            hint = OPENVINO_HINTS.get(precision, "f32")
            return OpenVINORunner(path, spec, threads=threads, name=name, precision_hint=hint)
        from engines.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, spec, backend=backend, threads=threads, name=name)

    return make


def _tokenizer(root: Path, tok: dict[str, Any]) -> ClipTokenizer:
    return ClipTokenizer(root / tok["path"], int(tok["model_max_length"]), tok["pad_token"])


class TextToImagePipeline(CompiledPipeline):
    """A pipeline family's runtime from its description (t2i.json): `pipe(prompt, ...)` -> uint8
    [B, H, W, 3]; runners are ONNX Runtime sessions (CPU by default), OpenVINO or TensorRT engines
    with `backend=`, or whatever `runner_factory` makes (dd-serve: Triton BLS)."""

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
        self.config = cfg = T2IConfig.load(folder, config)
        names = cfg.required + tuple(n for n in OPTIONAL_COMPONENTS if n in cfg.components)
        specs = {n: IOSpec.from_dict(cfg.components[n]["io"]) for n in names}
        self.backend = backend if runner_factory is None else "custom"
        paths = {n: cfg.root / cfg.components[n]["path"] for n in names}
        if runner_factory is None:  # each component at the precision its description names
            make = component_runner(backend, threads)
            precision = {n: str(cfg.components[n].get("precision", "fp32")) for n in names}
            runners = {n: make(n, paths[n], specs[n], precision=precision[n]) for n in names}
        else:  # runners bound elsewhere (dd-serve's, Triton BLS) already run each precision
            runners = {n: runner_factory(n, paths[n], specs[n]) for n in names}
        self.tokenizer = _tokenizer(cfg.root, cfg.tokenizer)
        more = tuple(
            (f"text_encoder_{i}", _tokenizer(cfg.root, t))
            for i, t in ((2, cfg.tokenizer_2), (3, cfg.tokenizer_3))
            if t is not None
        )
        scheduler = make_scheduler(
            cfg.scheduler_kind, cfg.scheduler_config, where=str(cfg.root / "scheduler")
        )
        super().__init__(
            Parts(
                runners=runners,
                specs=specs,
                denoiser=cfg.denoiser,
                scheduler=scheduler,
                guidance=cfg.guidance,
                sample_channels=cfg.latent_channels,
                defaults=cfg.defaults,
                text=TextParts(
                    self.tokenizer,
                    output=specs["text_encoder"].output_names[0],  # the family's (its IO spec)
                    long_prompts=long_prompts,
                    recipe=cfg.family,
                    more=more,
                    zero_negative=cfg.force_zeros_for_empty_prompt,
                    max_chunks=cfg.prompt_chunks,
                ),
                vae=VaeParts(
                    cfg.vae_scaling_factor,
                    cfg.vae_scale_factor,
                    shift_factor=cfg.vae_shift_factor,
                    encoder="vae_encoder" if "vae_encoder" in runners else None,
                ),
                time_cond_proj_dim=cfg.time_cond_proj_dim,
                noise="torch",  # seeds reproduce diffusers' torch.Generator draws
                patch_size=cfg.patch_size,
                flow_sigmas=cfg.flow_sigmas,
                packed_latents=cfg.family == "flux",
                inpaint_unet=int(specs[cfg.denoiser].inputs[0].shape[1]) == 2 * cfg.latent_channels + 1,
            )
        )
        # LoRA inputs (dd-compile --lora-rank): adapters at run time, fed to this process's runners
        slots = {
            n: Slots.from_dict(cfg.components[n]["lora"]) for n in names if cfg.components[n].get("lora")
        }
        if slots and runner_factory is None and self.backend not in LORA_BACKENDS:
            raise InputError(
                f"{cfg.root / config}: graphs with LoRA inputs run on {', '.join(LORA_BACKENDS)}, not "
                f"{self.backend!r}"
            )
        # runners bound elsewhere (dd-serve's, Triton BLS) feed the base model; adapters are not
        # sent through them yet, so they are refused rather than silently dropped
        self.adapters = AdapterSet(
            slots,
            runners,
            cfg.denoiser,
            refuse=None
            if runner_factory is None
            else "adapters through Triton or dd-serve are not applied yet",
        )

    # -- LoRA at run time (diffusers' names; engines/lora.py) --
    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> str:
        """Load a LoRA file (diffusers / peft or kohya names); it becomes the one active adapter."""
        return self.adapters.load(path, adapter_name)

    def set_adapters(
        self,
        adapter_names: str | Sequence[str] | Mapping[str, float],
        adapter_weights: float | Sequence[float] | None = None,
    ) -> None:
        """The adapters to run and their weights: `set_adapters({"style": 0.8, "detail": 0.4})`, or
        diffusers' `set_adapters(["style", "detail"], adapter_weights=[0.8, 0.4])`; `{}`: none,
        which gives the base model's images bit for bit."""
        if isinstance(adapter_names, Mapping):
            weights = dict(adapter_names)
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            ws = adapter_weights if isinstance(adapter_weights, Sequence) else [adapter_weights] * len(names)
            if len(ws) != len(names):
                raise InputError(f"set_adapters: {len(names)} adapter names but {len(ws)} weights")
            weights = {n: 1.0 if w is None else w for n, w in zip(names, ws, strict=True)}
        self.adapters.set(weights)

    def disable_lora(self) -> None:
        self.adapters.set({})

    def unload_lora_weights(self) -> None:
        self.adapters.unload()

    def get_active_adapters(self) -> list[str]:
        return list(self.adapters.active)
