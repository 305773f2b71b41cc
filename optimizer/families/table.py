"""The family table: one entry per kind of model dd-compile takes, read by every stage that needs it.

A family says which components a source is made of (in call order), which tokenizers and
schedulers it needs, which guidance modes, precisions (or per-component precision mixes) and
backends it can be built and validated for, which family-specific options the CLI honours, and
its default sizes and sample-level bars. The CLI refuses an option, backend or precision a family
does not list (one line, exit 2) instead of dropping it; the stages read the components and mixes
from here; nothing restates them. No torch, no heavy imports: the table is read before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from engines.errors import InputError
from engines.schedulers import FLOW_SCHEDULER_CLASSES, SCHEDULER_CLASSES

GUIDANCE_MODES = ("cfg", "embedded", "none")
# options every family's flow honours (click parameter names, as the CLI declares them)
COMMON_OPTIONS = frozenset(
    {
        "source",
        "demo",
        "out",
        "precisions",
        "backend",
        "batch_sizes",
        "teacher",
        "require_teacher",
        "steps",
        "seed",
        "n_samples",
        "n_fid_samples",
        "threads",
        "bars",
        "bench_seconds",
        "triton_repo",
        "export_cache_dir",
        "as_json",
        "verbose",
    }
)
TRT_OPTIONS = frozenset({"trt_opt_level", "trt_hardware_compat", "trt_version_compatible"})
# precisions the runtime applies to the fp32 graph, not graphs of their own (bf16: OpenVINO's
# INFERENCE_PRECISION_HINT on AVX512-BF16 / AMX CPUs); nothing is quantized for them
RUNTIME_PRECISIONS = ("bf16",)


def _frozen(d: dict[str, Any]) -> MappingProxyType:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Family:
    name: str
    title: str  # what a person calls it, in messages
    flow: str  # the stage runner: "pixel" (optimizer/compile/stages.py) or "pipeline" (optimizer/t2i/)
    components: tuple[str, ...]  # every output has them, in call order (text-to-image)
    tokenizers: tuple[str, ...]
    # scheduler class (a diffusers _class_name, or the pixel student's sampler kinds) -> runtime kind
    schedulers: MappingProxyType
    guidance: tuple[str, ...]
    precisions: tuple[str, ...]  # what --precision may name
    # precision name -> component -> graph precision (one entry per component: a deployment mix)
    mixes: MappingProxyType
    backends: tuple[str, ...]  # --backend values this family's runtime validates and times
    options: frozenset[str]  # family-specific CLI options honoured beyond COMMON_OPTIONS
    batch_sizes: tuple[int, ...]  # default --batch-sizes
    n_samples: int  # default --samples
    n_fid_samples: int  # default --fid-samples
    sample_psnr_db: MappingProxyType  # default sample-level bars (--bar sample.<p>= overrides)
    tasks: MappingProxyType = field(default_factory=lambda: _frozen({}))  # task -> extra components
    default_tasks: tuple[str, ...] = ()  # tasks every output is built for: their components join it
    pipeline_classes: tuple[str, ...] = ()  # model_index.json _class_name values it takes
    # the same family's inpainting-UNet pipelines (StableDiffusionInpaintPipeline): a UNet reading the
    # latents, the mask and the masked image's latents (2C + 1 channels) that only inpaints
    inpaint_classes: tuple[str, ...] = ()
    # how prompts become the denoiser's conditioning (engines/conditioning.py: one recipe per name)
    conditioning: str = ""
    denoiser: str = "unet"  # the component called at every step (a pipeline family's UNet or DiT)
    max_sequence_length: int = 256  # T5's padded prompt length, where the family has T5 (a build knob)

    @property
    def exported(self) -> tuple[str, ...]:
        """What dd-compile exports, quantizes, validates and publishes: the components, then the
        default tasks' extra components (the mixes give each one a precision)."""
        extra = [c for t in self.default_tasks for c in self.tasks[t] if c not in self.components]
        return (*self.components, *dict.fromkeys(extra))

    def honours(self, option: str) -> bool:
        return option in COMMON_OPTIONS or option in self.options

    def check_backend(self, backend: str) -> None:
        if backend not in self.backends:
            raise InputError(
                f"--backend {backend}: {self.title} run on {', '.join(self.backends)} (not {backend})"
            )

    def check_precisions(self, precisions: tuple[str, ...], backend: str) -> None:
        for p in precisions:
            if p not in self.precisions:
                raise InputError(
                    f"--precision {p}: {self.title} build {', '.join(self.precisions)} (not {p})"
                )
        if "bf16" in precisions and backend != "openvino":
            raise InputError(
                f"--precision bf16: needs --backend openvino (OpenVINO's bf16 hint), not {backend}"
            )
        if "bf16" in precisions:  # BackendUnavailable, one line, on CPUs without AVX512-BF16/AMX
            from engines.openvino_runner import check_precision_hint

            check_precision_hint("bf16")

    def scheduler_kind(self, class_name: str, where: str) -> str:
        """The runtime scheduler for a scheduler class; one that is not implemented is refused."""
        kind = self.schedulers.get(class_name)
        if kind is None:
            raise InputError(
                f"{where}: scheduler {class_name!r} is not implemented by the runtime "
                f"(supported: {', '.join(self.schedulers)})"
            )
        return kind


def _pipeline_mixes(
    text_encoders: tuple[str, ...],
    vae: tuple[str, ...] = ("vae_decoder", "vae_encoder"),
    denoiser: str = "unet",
    fp32_only: tuple[str, ...] = (),
) -> MappingProxyType:
    """fp32, fp16, int8 and bf16 deployment mixes of a latent text-to-image pipeline: the denoiser
    runs once per step (most of the time) so int8 goes there; the VAE overflows int8 ranges and stays
    fp16 (optimizer/quantize/fp16.py keeps fp32 islands where its activations pass fp16's range);
    `fp32_only` stay fp32 in every graph mix (T5: its activations overflow fp16). bf16 runs every
    fp32 graph under OpenVINO's bf16 hint: fp32's exponent range, so T5 and the VAE take it too."""
    keep = {c: "fp32" for c in fp32_only}
    every = (*text_encoders, *fp32_only, denoiser, *vae)
    return _frozen(
        {
            "fp32": {c: "fp32" for c in every},
            "fp16": {
                **{c: "fp16" for c in text_encoders},
                **keep,
                denoiser: "fp16",
                **{c: "fp16" for c in vae},
            },
            "int8": {
                **{c: "fp16" for c in text_encoders},
                **keep,
                denoiser: "int8",
                **{c: "fp16" for c in vae},
            },
            "bf16": {c: "bf16" for c in every},
        }
    )


PIPELINE_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "openvino")
PIPELINE_OPTIONS = frozenset(
    {"size", "resolutions", "guidance_scale", "clip_model", "threads_grid", "lora_rank", *TRT_OPTIONS}
)

T5_OPTIONS = PIPELINE_OPTIONS | {"max_sequence_length"}  # families with a T5 encoder
# families whose text is CLIP's alone: their UNet can take long prompts in chunks (--prompt-chunks)
CLIP_OPTIONS = PIPELINE_OPTIONS | {"prompt_chunks"}
# what every latent text-to-image family shares: the flow, precisions, backends (engines/t2i.py's
# runners; tensorrt: one engine per component, optimizer/t2i/trt_build.py), options, defaults
PIPELINE_COMMON: dict[str, Any] = dict(
    flow="pipeline",
    precisions=("fp32", "fp16", "int8", "bf16"),  # bf16: --backend openvino, on BF16 CPUs
    backends=PIPELINE_BACKENDS,
    options=PIPELINE_OPTIONS,
    batch_sizes=(1, 4),
    n_samples=16,
    n_fid_samples=100,
    # uint8 images: rounding alone costs a few tenths of a level, so fp32 sits near 45-60 dB; bf16
    # between fp16 and int8 as its call bar is (the demo on OpenVINO: 48.8 dB over 64 images, the
    # worst one 38.9 dB; fp16 64.4 and int8 40.9 dB there, each bar about half its figure in dB)
    sample_psnr_db=_frozen({"fp32": 40.0, "fp16": 30.0, "bf16": 26.0, "int8": 22.0}),
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # UNet2DModel, UNet2DConditionModel with class labels or cross-attention, DiT: one network
        # sampled by the student's own few-step schedule (optimizer/model_io.py: its IO spec)
        Family(
            name="denoiser",
            title="pixel-space denoisers",
            flow="pixel",
            components=("denoiser",),
            tokenizers=(),
            schedulers=_frozen({"ddim": "ddim", "consistency": "consistency"}),
            guidance=("none",),
            precisions=("fp32", "fp16", "int8", "bf16"),
            mixes=_frozen({p: {"denoiser": p} for p in ("fp32", "fp16", "int8", "bf16")}),
            backends=("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "openvino"),
            options=frozenset({"threads_grid", "int8_calibration", "int8_selection", "cond", *TRT_OPTIONS}),
            batch_sizes=(1, 16),
            n_samples=64,
            n_fid_samples=256,
            # float samples in [0, 1]
            sample_psnr_db=_frozen({"fp32": 60.0, "fp16": 35.0, "bf16": 30.0, "int8": 25.0}),
        ),
        # StableDiffusionPipeline / LatentConsistencyModelPipeline (SD 1.x and its LCM students)
        Family(
            name="sd",
            title="text-to-image pipelines (SD 1.x / LCM)",
            components=("text_encoder", "unet", "vae_decoder"),
            tokenizers=("tokenizer",),
            schedulers=_frozen(SCHEDULER_CLASSES),  # what engines/schedulers.py implements
            guidance=GUIDANCE_MODES,
            mixes=_pipeline_mixes(("text_encoder",)),
            # image-to-image (engines/pipeline.py: image=, strength=): every output has a VAE encoder
            tasks=_frozen({"img2img": ("vae_encoder",)}),
            default_tasks=("img2img",),
            pipeline_classes=("StableDiffusionPipeline", "LatentConsistencyModelPipeline"),
            inpaint_classes=("StableDiffusionInpaintPipeline",),
            conditioning="sd",
            **{**PIPELINE_COMMON, "options": CLIP_OPTIONS},
        ),
        # StableDiffusionXLPipeline (SDXL base and its LCM / Turbo / Lightning students): two CLIP
        # encoders (penultimate states concatenated, encoder 2's pooled embedding) and the UNet's
        # text_time conditioning (pooled embedding + size/crop ids)
        Family(
            name="sdxl",
            title="SDXL pipelines",
            components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
            tokenizers=("tokenizer", "tokenizer_2"),
            schedulers=_frozen(SCHEDULER_CLASSES),
            guidance=GUIDANCE_MODES,
            mixes=_pipeline_mixes(("text_encoder", "text_encoder_2")),
            # image-to-image as StableDiffusionXLImg2ImgPipeline with the base model's time ids
            tasks=_frozen({"img2img": ("vae_encoder",)}),
            default_tasks=("img2img",),
            pipeline_classes=("StableDiffusionXLPipeline",),
            inpaint_classes=("StableDiffusionXLInpaintPipeline",),
            conditioning="sdxl",
            **{**PIPELINE_COMMON, "options": CLIP_OPTIONS},
        ),
        # StableDiffusion3Pipeline (SD3 medium, SD3.5 medium / large / large turbo): two CLIP
        # encoders with projection + T5, an MMDiT transformer on 16-channel latents, FlowMatch Euler
        Family(
            name="sd3",
            title="SD3 pipelines",
            components=("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"),
            tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
            schedulers=_frozen(FLOW_SCHEDULER_CLASSES),
            guidance=("cfg", "none"),
            # T5 overflows fp16 (its feed-forward activations pass 65504): fp32 in every mix
            mixes=_pipeline_mixes(
                ("text_encoder", "text_encoder_2"),
                ("vae_decoder", "vae_encoder"),
                "transformer",
                ("text_encoder_3",),
            ),
            # image-to-image as StableDiffusion3Img2ImgPipeline (FlowMatch's scale_noise)
            tasks=_frozen({"img2img": ("vae_encoder",)}),
            default_tasks=("img2img",),
            pipeline_classes=("StableDiffusion3Pipeline",),
            conditioning="sd3",
            denoiser="transformer",
            **{**PIPELINE_COMMON, "options": T5_OPTIONS},
        ),
        # FluxPipeline (FLUX.1 dev: guidance-distilled, its `guidance` input; schnell: none): CLIP's
        # pooled output + T5's states, a DiT over 2x2-packed latents, FlowMatch Euler with mu
        Family(
            name="flux",
            title="Flux pipelines",
            components=("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
            tokenizers=("tokenizer", "tokenizer_2"),
            schedulers=_frozen(FLOW_SCHEDULER_CLASSES),
            guidance=("embedded", "none"),
            mixes=_pipeline_mixes(
                ("text_encoder",), ("vae_decoder", "vae_encoder"), "transformer", ("text_encoder_2",)
            ),
            # image-to-image as FluxImg2ImgPipeline (FlowMatch's scale_noise on unpacked latents)
            tasks=_frozen({"img2img": ("vae_encoder",)}),
            default_tasks=("img2img",),
            pipeline_classes=("FluxPipeline",),
            conditioning="flux",
            denoiser="transformer",
            max_sequence_length=512,  # FluxPipeline's default (schnell is trained at 256)
            **{**PIPELINE_COMMON, "options": T5_OPTIONS},
        ),
    )
}


def family_of_pipeline(class_name: Any) -> Family | None:
    """The family whose pipelines have this model_index.json _class_name (None: no family)."""
    for f in FAMILIES.values():
        if class_name in f.pipeline_classes or class_name in f.inpaint_classes:
            return f
    return None


def pipeline_classes() -> tuple[str, ...]:
    return tuple(c for f in FAMILIES.values() for c in (*f.pipeline_classes, *f.inpaint_classes))


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None
