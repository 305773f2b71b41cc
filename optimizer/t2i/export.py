"""Export a text-to-image pipeline: onnx/<component>.fp32.onnx per component, plus tokenizer.json,
the scheduler config and t2i.json, so the torch-free runtime (engines/t2i.py) needs nothing else.

Same conventions as optimizer/compile/export.py: torch.onnx's dynamo exporter, opset 20, onnx.checker's
full check, atomic writes. Batch is dynamic everywhere; latent height/width are dynamic for the
UNet and the VAE (multiples of the UNet's down-sampling factor, as its skip connections need).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.errors import InputError
from engines.fileio import atomic_path, write_json_atomic
from engines.iospec import IOSpec
from optimizer.compile.export import ExportConfig, write_onnx
from optimizer.families import FAMILIES
from optimizer.t2i.components import PipelineSpec, dummy_inputs, latent_patch, wrap
from optimizer.t2i.load import LoadedPipeline

log = logging.getLogger(__name__)
T2I_FORMAT = "dd-compile-t2i"
T2I_VERSION = 1
DEFAULT_EXPORT = ExportConfig()
MAX_BATCH, MAX_LATENT = 4096, 512  # export-time bounds; the profile says what is validated


def _spatial_multiple(kind: str, config: dict[str, Any]) -> int:
    """What latent (or, for the VAE encoder, pixel) sizes must be a multiple of: the UNet's and the
    VAE encoder's down-sampling, the transformer's patch."""
    if kind == "transformer":
        return latent_patch(config)
    if kind not in ("unet", "vae_encoder"):
        return 1
    return 2 ** (len(config["block_out_channels"]) - 1)


def _torch_dims(kind: str, spec: IOSpec, config: dict[str, Any]) -> dict[str, Any]:
    """One torch.export.Dim per named axis with a range (min < max, or batch/latent: always)."""
    Dim = torch.export.Dim
    mult = _spatial_multiple(kind, config)
    dims: dict[str, Any] = {}
    for name, r in spec.dims.items():
        if name == "batch":
            dims[name] = Dim("batch", min=1, max=max(MAX_BATCH, r.max))
        elif name in ("latent_height", "latent_width", "height", "width") and any(
            name in t.shape for t in spec.inputs
        ):
            hi = max(MAX_LATENT, r.max) if name.startswith("latent") else max(8 * MAX_LATENT, r.max)
            if mult > 1:
                dims[name] = mult * Dim(f"{name}_div{mult}", min=1, max=hi // mult)
            else:
                dims[name] = Dim(name, min=1, max=hi)
        elif r.min < r.max:
            dims[name] = Dim(name, min=r.min, max=r.max)
    return dims


def _example(kind: str, spec: IOSpec, config: dict[str, Any], vocab_size: int) -> dict[str, torch.Tensor]:
    """Inputs at the profile's opt shapes, with batch 2 (a dynamic axis must not be traced at 1)."""
    rng = np.random.default_rng(0)
    feeds = dummy_inputs(
        IOSpec(spec.family, spec.inputs, spec.outputs, _example_dims(spec)), rng, "opt", vocab_size
    )
    return {k: torch.from_numpy(v) for k, v in feeds.items()}


def _example_dims(spec: IOSpec) -> dict[str, Any]:
    from engines.iospec import DimRange

    dims = dict(spec.dims)
    dims["batch"] = DimRange(2, 2, 2)
    for name in ("latent_height", "latent_width", "height", "width"):
        if name in dims and dims[name].opt < 2:
            dims[name] = DimRange(2, 2, 2)
    return dims


def export_component(
    kind: str,
    module: torch.nn.Module,
    spec: IOSpec,
    config: dict[str, Any],
    out_path: str | Path,
    *,
    vocab_size: int = 2,
    export_config: ExportConfig = DEFAULT_EXPORT,
) -> Path:
    """Export one component (wrapped per the table) to `out_path`, written atomically."""
    out_path = Path(out_path)
    model = wrap(kind, module.eval().float(), spec)
    kwargs = _example(kind, spec, config, vocab_size)
    tdims = _torch_dims(kind, spec, config)
    dynamic_shapes = {
        t.name: {i: tdims[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in tdims} or None
        for t in spec.inputs
    }
    return write_onnx(model, (), kwargs, spec, dynamic_shapes, out_path, export_config)


def write_tokenizer_json(tok_dir: Path, dest: Path) -> None:
    """Copy tokenizer.json; a folder with only vocab.json/merges.txt gets one written by transformers."""
    src = tok_dir / "tokenizer.json"
    if src.exists():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tok_dir)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        made = Path(d) / "tokenizer.json"
        if not made.exists():
            raise InputError(f"{tok_dir}: transformers wrote no tokenizer.json from vocab.json/merges.txt")
        with atomic_path(dest) as tmp:
            shutil.copyfile(made, tmp)


def scheduler_kind(
    config: dict[str, Any], where: str = "scheduler/scheduler_config.json", family: str = "sd"
) -> str:
    """The runtime's scheduler for the config's class; one it does not implement is refused, never
    sampled with another (the family table lists what the runtime implements)."""
    return FAMILIES[family].scheduler_kind(str(config.get("_class_name", "DDIMScheduler")), where)


def _vocab_size(spec: PipelineSpec, encoder: str) -> int:
    return int(spec.component(encoder).config["vocab_size"])


def default_strengths(family: str) -> tuple[float, float]:
    """The family's Img2Img and Inpaint pipelines' default strengths (SD's inpainting starts from
    pure noise; SDXL's from 0.9999)."""
    return {"sdxl": (0.3, 0.9999), "sd3": (0.6, 0.6), "flux": (0.6, 0.6)}.get(family, (0.8, 1.0))


def t2i_json(spec: PipelineSpec, paths: dict[str, str], vocab_size: int) -> dict[str, Any]:
    unet_cfg = spec.component(spec.denoiser).config
    kind = scheduler_kind(spec.scheduler_config, family=spec.family)
    lcm = kind == "lcm"
    text: dict[str, Any] = {}
    if spec.tokenizer_2 is not None:  # SDXL, SD3: engines/conditioning.py reads these
        text = {
            "tokenizer_2": {**spec.tokenizer_2.to_dict(), "vocab_size": _vocab_size(spec, "text_encoder_2")},
            "force_zeros_for_empty_prompt": spec.force_zeros_for_empty_prompt,
        }
    if spec.tokenizer_3 is not None:
        text["tokenizer_3"] = {
            **spec.tokenizer_3.to_dict(),
            "vocab_size": _vocab_size(spec, "text_encoder_3"),
        }
    # diffusers' defaults: SD 50 steps at 7.5; LCM 4 steps at 8.5; SD3 28 steps at 7.0
    steps, scale = (4, 8.5) if lcm else (28, 7.0) if spec.family == "sd3" else (50, 7.5)
    if spec.family == "flux":  # FluxPipeline: 28 steps at 3.5 (dev); schnell is run at 4, 0.0
        steps, scale = (28, 3.5) if spec.guidance == "embedded" else (4, 0.0)
    strength, inpaint_strength = default_strengths(spec.family)
    return {
        "format": T2I_FORMAT,
        "version": T2I_VERSION,
        "family": spec.family,
        "pipeline_class": spec.pipeline_class,
        "guidance": spec.guidance,
        # a component without a graph is left out (no vae_encoder: a text-to-image-only description)
        "components": {
            # config: the model's config.json, for layouts other runtimes load (engines/layouts.py)
            c.kind: {"path": paths[c.kind], "precision": "fp32", "io": c.io.to_dict(), "config": c.config}
            for c in spec.components
            if c.kind in paths
        },
        "tokenizer": {**spec.tokenizer.to_dict(), "vocab_size": vocab_size},
        **text,
        "scheduler": {
            "kind": kind,
            "config": "scheduler/scheduler_config.json",
        },
        "vae": {
            "scaling_factor": spec.vae_scaling_factor,
            "scale_factor": spec.vae_scale_factor,
            "shift_factor": spec.vae_shift_factor,
        },
        "denoiser": spec.denoiser,
        "patch_size": latent_patch(unet_cfg),
        "latent_channels": int(spec.component("vae_decoder").config["latent_channels"]),
        "flow_sigmas": "flux" if spec.family == "flux" else None,
        # the UNet's tokens axis in chunks (engines/t2i.py: long_prompts="chunk" needs 2 or more)
        "prompt_chunks": spec.profile.prompt_chunks,
        "time_cond_proj_dim": unet_cfg.get("time_cond_proj_dim"),
        "defaults": {
            "height": spec.default_size[0],
            "width": spec.default_size[1],
            "num_inference_steps": steps,
            "strength": strength,
            "inpaint_strength": inpaint_strength,
            # LCM embeds w - 1 at 8.5; FLUX.1-dev's guidance input takes its 3.5
            "guidance_scale": (scale if spec.family == "flux" else 8.5)
            if spec.guidance == "embedded"
            else (scale if spec.guidance == "cfg" else 0.0),
        },
    }


def export_pipeline(
    loaded: LoadedPipeline, out_dir: str | Path, *, export_config: ExportConfig = DEFAULT_EXPORT
) -> Path:
    """Write out_dir/{onnx/*.fp32.onnx, tokenizer/tokenizer.json, scheduler/, t2i.json}."""
    out = Path(out_dir)
    spec = loaded.spec
    vocab_size = _vocab_size(spec, "text_encoder")
    paths = {}
    for comp in spec.components:
        rel = f"onnx/{comp.kind}.fp32.onnx"
        export_component(
            comp.kind,
            loaded.module(comp.kind),
            comp.io,
            comp.config,
            out / rel,
            vocab_size=int(comp.config.get("vocab_size", vocab_size)),
            export_config=export_config,
        )
        paths[comp.kind] = rel
    for name, tok in (
        ("tokenizer", spec.tokenizer),
        ("tokenizer_2", spec.tokenizer_2),
        ("tokenizer_3", spec.tokenizer_3),
    ):
        if tok is not None:
            write_tokenizer_json(loaded.tokenizer_dirs[name], out / tok.path)
    write_json_atomic(out / "scheduler" / "scheduler_config.json", spec.scheduler_config)
    write_json_atomic(out / "t2i.json", t2i_json(spec, paths, vocab_size))
    return out


def use_component_graph(out_dir: str | Path, kind: str, rel_path: str, precision: str) -> None:
    """Point t2i.json's `kind` at another graph of the same IO (e.g. onnx/unet.fp16.onnx)."""
    import json

    path = Path(out_dir) / "t2i.json"
    d = json.loads(path.read_text())
    if kind not in d["components"]:
        raise InputError(f"{path}: no component {kind!r}")
    if not (Path(out_dir) / rel_path).exists():
        raise InputError(f"{Path(out_dir) / rel_path}: graph not found")
    d["components"][kind].update(path=rel_path, precision=precision)
    write_json_atomic(path, d)
