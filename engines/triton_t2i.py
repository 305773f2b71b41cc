"""Triton model repository for a text-to-image pipeline: the components as ONNX Runtime models and
the pipeline as a Python-backend (BLS) model that calls them.

    dd-triton PIPELINE_OUT --repo triton_repo/
    tritonserver --model-repository=$PWD/triton_repo

Layout (built in a staging folder beside DIR, then swapped in; engines/outdir.py's rule, marker
kind triton-repo). One ONNX Runtime model per component the family has (engines.t2i's
FAMILY_COMPONENTS: SD's text_encoder/unet/vae_decoder; SDXL adds text_encoder_2; SD3 and Flux a
transformer in the UNet's place and T5 as text_encoder_3 / text_encoder_2):

    DIR/dd_text_encoder/{config.pbtxt, 1/model.onnx}   input_ids INT64 [B, tokens] -> last_hidden_state
    DIR/dd_unet/{config.pbtxt, 1/model.onnx}           sample [B, C, -1, -1], timestep, text states
                                                       (+ timestep_cond) -> out_sample; B = 2x images for CFG
    DIR/dd_vae_decoder/{config.pbtxt, 1/model.onnx}    latent_sample [B, C, -1, -1] -> sample [B, 3, -1, -1]
    DIR/dd_text_encoder_2/, dd_text_encoder_3/, dd_transformer/   where the family has them
    DIR/dd_vae_encoder/{config.pbtxt, 1/model.onnx}    sample [B, 3, -1, -1] -> latent_parameters (where
                                                       compiled: image-to-image and inpainting requests)
    DIR/dd_t2i/config.pbtxt                            backend "python": prompt, seed (+ negative_prompt,
                                                       guidance_scale, num_inference_steps; with a VAE
                                                       encoder image [H, W, 3], mask_image [H, W], strength)
                                                       -> image UINT8 [H, W, 3]
    DIR/dd_t2i/1/model.py                              engines/triton_t2i_model.py
    DIR/dd_t2i/1/engines/                              the runtime's text-to-image code (numpy, tokenizers)
    DIR/dd_t2i/1/pipeline/                             t2i.json, tokenizer*/, scheduler/ (runtime inputs)
    DIR/dd_t2i/1/t2i_model.json                        component model names, max batch, long-prompt policy
    DIR/README.md, DIR/.dd-compile.json

Dims: batch is Triton's batch axis (max_batch_size from each component's profile); an axis whose
profile range is one size (tokens = 77) is written as that size, a dynamic one (latent height and
width) as -1. Prompts over the tokenizer's limit are refused (HTTP 400 naming the token count),
not truncated as diffusers does: a served image should not silently ignore part of its prompt.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engines.deploy_common import TRITON_DTYPES, parameters_text, swap_in
from engines.errors import InputError
from engines.fileio import sha256_file
from engines.iospec import IOSpec, TensorSpec
from engines.outdir import check_target, claim
from engines.t2i import FAMILY_COMPONENTS, OPTIONAL_COMPONENTS, T2I_FORMAT, TextToImagePipeline

log = logging.getLogger(__name__)

PIPELINE_MODEL = "dd_t2i"
# every component any family has (the VAE encoder where compiled) -> its Triton model name
COMPONENT_MODELS = {n: f"dd_{n}" for ns in (*FAMILY_COMPONENTS.values(), OPTIONAL_COMPONENTS) for n in ns}
MODEL_TEMPLATE = Path(__file__).with_name("triton_t2i_model.py")
# What the pipeline model imports: numpy + tokenizers, nothing of onnxruntime or the manifest code.
VENDORED = (
    "base.py",
    "errors.py",
    "iospec.py",
    "schedule.py",
    "schedulers.py",
    "tokenizer.py",
    "conditioning.py",
    "torch_rng.py",
    "lora.py",
    "safetensors_io.py",
    "images.py",
    "pipeline.py",
    "t2i.py",
)
LONG_PROMPTS = "refuse"
TOKENIZER_PATH, SCHEDULER_PATH = "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"
# t2i.json key -> where the copied pipeline/ folder keeps that tokenizer
TOKENIZER_PATHS = {
    "tokenizer": TOKENIZER_PATH,
    "tokenizer_2": "tokenizer_2/tokenizer.json",
    "tokenizer_3": "tokenizer_3/tokenizer.json",
}


@dataclass(frozen=True)
class T2ITritonConfig:
    instances: int = 1  # instances of each component model (instance_group count)
    max_queue_delay_us: int = 2000  # how long the batcher may hold a request to fill a batch
    allow_unvalidated: bool = False  # recorded in README.md and config.pbtxt


T2I_KIND = "text-to-image"  # a dd-compile manifest's meta.kind for a published pipeline


def _manifest_kind(folder: Path) -> str | None:
    from engines.manifest import MANIFEST_NAME, Manifest

    if not (folder / MANIFEST_NAME).is_file():
        return None
    return Manifest.load(folder).meta.get("kind")


def is_t2i_folder(folder: str | Path) -> bool:
    """A text-to-image output (a dd-compile manifest of kind text-to-image, or a bare export
    folder: optimizer/t2i/export.py's t2i.json) rather than a pixel student."""
    folder = Path(folder)
    kind = _manifest_kind(folder)
    return kind == T2I_KIND if kind is not None else (folder / "t2i.json").is_file()


@dataclass
class OpenedT2I:
    """A text-to-image pipeline to deploy, and whether a dd-compile run validated it."""

    pipe: TextToImagePipeline
    unvalidated: bool  # deployed under --allow-unvalidated: recorded in what is written


def open_t2i(
    out_dir: str | Path,
    *,
    backend: str = "onnxruntime",
    threads: int | None = None,
    allow_unvalidated: bool = False,
    precision: str | None = None,
) -> OpenedT2I | None:
    """The text-to-image pipeline of `out_dir`, or None when it holds a pixel student. A published
    output goes through engines.load (validation records, sha256); a bare export folder has none."""
    out = Path(out_dir)
    if not is_t2i_folder(out):
        return None
    kw = {"threads": threads} if threads else {}
    if _manifest_kind(out) == T2I_KIND:
        from engines.manifest import Manifest
        from engines.runtime import load

        m = Manifest.load(out)
        art = m.get(f"pipeline/{precision or m.meta.get('recommended') or 'fp32'}")
        unvalidated = art is None or m.servable(art, backend) is not None
        pipe = load(out, precision, backend, allow_unvalidated=allow_unvalidated, **kw)
        return OpenedT2I(pipe, unvalidated)
    require_validated(out, allow_unvalidated)
    return OpenedT2I(TextToImagePipeline(out, backend=backend, **kw), True)


def tokenizers_of(pipe: TextToImagePipeline) -> dict[str, dict]:
    """The description's tokenizer entries (tokenizer, and tokenizer_2/_3 where the family has them)."""
    c = pipe.config
    found = {"tokenizer": c.tokenizer, "tokenizer_2": c.tokenizer_2, "tokenizer_3": c.tokenizer_3}
    return {k: v for k, v in found.items() if v is not None}


def served_models(pipe: TextToImagePipeline) -> dict[str, str]:
    """Component -> Triton model name for the components this pipeline runs: its family's, and the
    VAE encoder (image requests) where the output has one."""
    return {n: COMPONENT_MODELS[n] for n in pipe.specs}


def takes_images(pipe: TextToImagePipeline) -> bool:
    """Whether the pipeline model takes image requests (an output compiled with a VAE encoder)."""
    return "vae_encoder" in pipe.specs


def description(pipe: TextToImagePipeline) -> dict:
    """The t2i.json the runtime reads, rebuilt from the pipeline's own config (whatever file it
    came from), with its tokenizer and scheduler at the usual relative paths."""
    c = pipe.config
    return {
        "format": T2I_FORMAT,
        "version": 1,
        "family": c.family,
        "pipeline_class": c.pipeline_class,
        "guidance": c.guidance,
        "components": c.components,
        **{k: {**t, "path": TOKENIZER_PATHS[k]} for k, t in tokenizers_of(pipe).items()},
        # written beside a second tokenizer (optimizer/t2i/export.py): SD 1.x/2.x have no such switch
        **({"force_zeros_for_empty_prompt": c.force_zeros_for_empty_prompt} if c.tokenizer_2 else {}),
        "scheduler": {"kind": c.scheduler_kind, "config": SCHEDULER_PATH},
        "vae": {
            "scaling_factor": c.vae_scaling_factor,
            "scale_factor": c.vae_scale_factor,
            "shift_factor": c.vae_shift_factor,
        },
        "denoiser": c.denoiser,
        "patch_size": c.patch_size,
        "latent_channels": c.latent_channels,
        "flow_sigmas": c.flow_sigmas,
        "prompt_chunks": c.prompt_chunks,
        "time_cond_proj_dim": c.time_cond_proj_dim,
        "defaults": c.defaults,
    }


def component_dims(t: TensorSpec, spec: IOSpec) -> list[int]:
    """Triton dims without the batch axis: fixed sizes as they are, single-size ranges as that
    size, dynamic ranges as -1; a [batch] tensor is dims [1] (+ reshape [] in the block)."""
    dims = []
    for d in t.shape[1:]:
        if isinstance(d, int):
            dims.append(d)
        else:
            r = spec.dims.get(d)
            dims.append(r.min if r is not None and r.min == r.max else -1)
    return dims


def _block(
    name: str, triton_type: str, dims: list[int], *, reshape: bool = False, optional: bool = False
) -> str:
    extra = ("\n    reshape: { shape: [ ] }" if reshape else "") + (
        "\n    optional: true" if optional else ""
    )
    return (
        f'  {{\n    name: "{name}"\n    data_type: {triton_type}\n'
        f"    dims: [ {', '.join(map(str, dims))} ]{extra}\n  }}"
    )


def _tensor_block(t: TensorSpec, spec: IOSpec) -> str:
    if t.dtype not in TRITON_DTYPES:
        raise InputError(f"{t.name}: dtype {t.dtype} has no Triton type")
    dims = component_dims(t, spec)
    return _block(t.name, TRITON_DTYPES[t.dtype], dims or [1], reshape=not dims)


def component_config(name: str, spec: IOSpec, art_sha256: str, cfg: T2ITritonConfig) -> str:
    max_batch = spec.dims["batch"].max
    text = (
        f"# generated by dd-triton: text-to-image component {name} (model.onnx sha256 {art_sha256})\n"
        f'name: "{COMPONENT_MODELS[name]}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n'
        'default_model_filename: "model.onnx"\n'
        "version_policy: { specific: { versions: [ 1 ] } }\n"
    )
    text += "input [\n" + ",\n".join(_tensor_block(t, spec) for t in spec.inputs) + "\n]\n"
    text += "output [\n" + ",\n".join(_tensor_block(t, spec) for t in spec.outputs) + "\n]\n"
    text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}\n"
    text += f"instance_group [\n  {{ count: {cfg.instances} kind: KIND_AUTO }}\n]\n"
    params = {"dd_artifact_sha256": art_sha256}
    if cfg.allow_unvalidated:
        params["dd_allow_unvalidated"] = "true"
    return text + parameters_text(params)


def pipeline_config(
    max_batch: int,
    image_shape: tuple[int, int, int],
    cfg: T2ITritonConfig,
    images: bool = False,
    adapters: bool = False,
) -> str:
    """dd_t2i's config; `images`: the optional image-to-image / inpainting inputs, and an image
    output of any size (an image request's size is its output's); `adapters`: the optional
    LoRA adapters input (dd-serve --lora-dir)."""
    ins = [
        _block("prompt", "TYPE_STRING", [1]),
        _block("seed", "TYPE_INT64", [1]),
        _block("negative_prompt", "TYPE_STRING", [1], optional=True),
        _block("guidance_scale", "TYPE_FP32", [1], optional=True),
        _block("num_inference_steps", "TYPE_INT32", [1], optional=True),
    ]
    if images:
        ins += [
            _block("image", "TYPE_UINT8", [-1, -1, 3], optional=True),
            _block("mask_image", "TYPE_UINT8", [-1, -1], optional=True),
            _block("strength", "TYPE_FP32", [1], optional=True),
        ]
        image_shape = (-1, -1, 3)
    if adapters:
        ins.append(_block("adapters", "TYPE_STRING", [1], optional=True))
    return (
        "# generated by dd-triton: the text-to-image pipeline (tokenizers, text encoders, denoiser "
        "steps with CFG, embedded guidance or none, VAE decoder) calling the component models (BLS)\n"
        f'name: "{PIPELINE_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        "version_policy: { specific: { versions: [ 1 ] } }\n"
        "input [\n" + ",\n".join(ins) + "\n]\n"
        "output [\n" + _block("image", "TYPE_UINT8", list(image_shape)) + "\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}\n"
        "instance_group [\n  { count: 1 kind: KIND_CPU }\n]\n"
    )


def write_pipeline_model(repo: Path, pipe: TextToImagePipeline, cfg: T2ITritonConfig) -> Path:
    """repo/dd_t2i: config, model.py, the vendored runtime code and the pipeline's settings.
    dd-serve writes this same folder (its components are bound through PyTriton instead)."""
    here = Path(__file__).parent
    model = repo / PIPELINE_MODEL
    version = model / "1"
    (version / "engines").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        pipeline_config(
            pipe.max_batch,
            pipe.image_shape,
            cfg,
            images=takes_images(pipe),
            adapters=bool(pipe.adapters.loaded),
        )
    )
    shutil.copyfile(MODEL_TEMPLATE, version / "model.py")
    (version / "engines" / "__init__.py").write_text(
        '"""The subset of dd-compile\'s runtime the dd_t2i model imports (copied by dd-triton)."""\n'
    )
    for name in VENDORED:
        shutil.copyfile(here / name, version / "engines" / name)
    dest = version / "pipeline"
    (dest / SCHEDULER_PATH).parent.mkdir(parents=True)
    for key, tok in tokenizers_of(pipe).items():
        (dest / TOKENIZER_PATHS[key]).parent.mkdir(parents=True)
        shutil.copyfile(pipe.config.root / tok["path"], dest / TOKENIZER_PATHS[key])
    (dest / SCHEDULER_PATH).write_text(json.dumps(pipe.config.scheduler_config, indent=2))
    (dest / "t2i.json").write_text(json.dumps(description(pipe), indent=2))
    settings: dict[str, object] = {
        "models": served_models(pipe),
        "max_batch": pipe.max_batch,
        "long_prompts": LONG_PROMPTS,
    }
    if pipe.adapters.loaded:  # dd-serve --lora-dir: what requests may name, the components taking them
        settings.update(adapters=sorted(pipe.adapters.loaded), lora_components=sorted(pipe.adapters.slots))
    (version / "t2i_model.json").write_text(json.dumps(settings, indent=2))
    return model


def readme(source: Path, pipe: TextToImagePipeline, repo_dir: Path, cfg: T2ITritonConfig) -> str:
    h, w, _ = pipe.image_shape
    lines = [
        f"# Triton model repository for the text-to-image pipeline {pipe.config.pipeline_class}",
        "",
        f"Generated by `dd-triton` from `{source}` (family {pipe.config.family}, guidance mode "
        f"{pipe.config.guidance}).",
        "",
        *(
            ["**allow_unvalidated: true**: no dd-compile run validated these graphs.", ""]
            if cfg.allow_unvalidated
            else []
        ),
        *(
            f"- `{model}`: {n}, platform `onnxruntime_onnx`, dynamic batching."
            for n, model in served_models(pipe).items()
        ),
        f"- `{PIPELINE_MODEL}`: Python backend (BLS): `prompt` (BYTES, UTF-8) and `seed` (INT64) per "
        "image, optional `negative_prompt`, `guidance_scale` (FP32), `num_inference_steps` (INT32); "
        f"returns `image` (UINT8 [B, {h}, {w}, 3]). Max batch {pipe.max_batch}.",
        *(
            [
                "- Image requests (the output has a VAE encoder): optional `image` (UINT8 [B, H, W, 3], "
                "image-to-image: the output takes its size), `mask_image` (UINT8 [B, H, W], inpainting: "
                ">= 128 repaints), `strength` (FP32, in (0, 1]; default the family's, SD: 0.8, "
                "inpainting 1.0). A bad image, mask or strength fails its request alone (HTTP 400, "
                "one line)."
            ]
            if takes_images(pipe)
            else []
        ),
        f"- Prompts over a tokenizer's limit ({pipe.tokenizer.model_max_length} for CLIP) are refused "
        "(HTTP 400 / gRPC "
        "INVALID_ARGUMENT naming the token count), not truncated.",
        "",
        "## Versions this repository needs",
        "",
        "- Triton with the `onnxruntime` backend (opset 20 graphs) and the Python backend.",
        "- In the Python backend's environment: numpy and `tokenizers` (`pip install tokenizers` in "
        "the image, or a conda-pack execution environment); dd_t2i imports nothing else.",
        "",
        "## Serve and call",
        "",
        "```sh",
        f"tritonserver --model-repository={repo_dir.resolve()}",
        "```",
        "",
        "```python",
        "import numpy as np, tritonclient.http as http",
        "c = http.InferenceServerClient('localhost:8000')",
        "p = http.InferInput('prompt', [1, 1], 'BYTES')",
        "p.set_data_from_numpy(np.array([[b'a red seven']], object))",
        "s = http.InferInput('seed', [1, 1], 'INT64'); s.set_data_from_numpy(np.array([[0]], np.int64))",
        f"image = c.infer('{PIPELINE_MODEL}', [p, s]).as_numpy('image')   # uint8 [1, {h}, {w}, 3]",
        "```",
        "",
        "Same prompt and seed -> the image of `engines.t2i.TextToImagePipeline` (the same code: "
        f"`{PIPELINE_MODEL}/1/engines/` is a copy of it).",
        "",
    ]
    return "\n".join(lines)


def write_t2i_repo(
    out_dir: Path,
    repo_dir: Path,
    *,
    instances: int = 1,
    max_queue_delay_us: int = 2000,
    allow_unvalidated: bool = False,
    option: str = "--repo",
) -> Path:
    """Write the Triton repository for the text-to-image output `out_dir` into `repo_dir`."""
    repo_dir = check_target(repo_dir, "triton-repo", option, protect=[out_dir])
    # checks the description, the graphs and the tokenizer; runs nothing
    opened = open_t2i(out_dir, allow_unvalidated=allow_unvalidated)
    if opened is None:
        raise InputError(f"{out_dir}: not a text-to-image output")
    pipe = opened.pipe
    if pipe.adapters.slots:  # Triton's ORT backend takes the inputs config.pbtxt declares, no more
        raise InputError(
            f"{out_dir}: its graphs take LoRA inputs (dd-compile --lora-rank); a Triton repository "
            "for them is not built yet: serve it with dd-serve, or compile without --lora-rank"
        )
    cfg = T2ITritonConfig(instances, max_queue_delay_us, opened.unvalidated)
    repo_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}.staging-", dir=repo_dir.parent))
    try:
        shas = {}
        for n in served_models(pipe):
            src = pipe.config.root / pipe.config.components[n]["path"]
            model = tmp / COMPONENT_MODELS[n]
            (model / "1").mkdir(parents=True)
            shutil.copyfile(src, model / "1" / "model.onnx")
            ext = src.with_name(src.name + ".data")
            if ext.exists():  # external weights keep their recorded name
                shutil.copyfile(ext, model / "1" / ext.name)
            shas[n] = sha256_file(model / "1" / "model.onnx")
            (model / "config.pbtxt").write_text(component_config(n, pipe.specs[n], shas[n], cfg))
        write_pipeline_model(tmp, pipe, cfg)
        (tmp / "README.md").write_text(readme(Path(out_dir), pipe, repo_dir, cfg))
        claim(
            tmp,
            "triton-repo",
            shas[pipe.config.denoiser],
            pipeline=PIPELINE_MODEL,
            allow_unvalidated=cfg.allow_unvalidated,
        )
        swap_in(tmp, repo_dir, option)
    finally:
        pipe.close()  # engines.load hands back an active pipeline
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote text-to-image Triton model repository %s", repo_dir)
    return repo_dir


def require_validated(folder: Path, allow_unvalidated: bool) -> None:
    """A bare export folder (t2i.json, no dd-compile run) carries no validation record: serve or
    export it only with allow_unvalidated, as for any artifact no published run validated."""
    if allow_unvalidated:
        log.warning(
            "%s: serving text-to-image graphs no dd-compile run validated (--allow-unvalidated)", folder
        )
        return
    raise InputError(
        f"{folder}: an exported text-to-image folder that no dd-compile run validated; "
        "compile it with dd-compile, or pass --allow-unvalidated"
    )
