"""Load a diffusers text-to-image pipeline folder (save_pretrained layout, model_index.json).

Checks the layout before loading anything, so a bad folder is one line naming what is wrong.
Weights load from .safetensors only (nothing is unpickled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import InputError
from optimizer.t2i.components import (
    ComponentSpec,
    PipelineSpec,
    Profile,
    TokenizerSpec,
    build_specs,
    vae_scale_factor,
)

PIPELINE_CLASSES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")
# model_index.json entries that a text-to-image run needs; others (safety_checker, ...) are ignored
REQUIRED = {
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "scheduler": ("diffusers", None),  # any diffusers scheduler: its config drives the numpy one
}


@dataclass
class LoadedPipeline:
    path: Path
    spec: PipelineSpec
    text_encoder: Any
    unet: Any
    vae: Any
    tokenizer_dir: Path

    def module(self, kind: str) -> Any:
        return {"text_encoder": self.text_encoder, "unet": self.unet}.get(kind, self.vae)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None


def check_layout(path: Path) -> dict[str, Any]:
    """model_index.json, every required component with a supported class, weights, tokenizer files."""
    if not path.is_dir():
        raise InputError(f"{path}: pipeline folder not found")
    index_path = path / "model_index.json"
    if not index_path.exists():
        raise InputError(
            f"{path}: no model_index.json (a diffusers save_pretrained pipeline folder is expected)"
        )
    index = _read_json(index_path)
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise InputError(
            f"{index_path}: pipeline class {cls!r} is not supported ({', '.join(PIPELINE_CLASSES)})"
        )
    for name, (_, classes) in REQUIRED.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise InputError(f"{index_path}: component {name!r} is missing")
        if classes is not None and entry[1] not in classes:
            raise InputError(f"{index_path}: {name} class {entry[1]!r}: not supported ({', '.join(classes)})")
        if not (path / name).is_dir():
            raise InputError(f"{path}: component {name!r} is missing (no {name}/ folder)")
    for name in ("text_encoder", "unet", "vae"):
        if not (path / name / "config.json").exists():
            raise InputError(f"{path / name}: no config.json")
        if not any((path / name).glob("*.safetensors")):
            raise InputError(
                f"{path / name}: no .safetensors weights (dd-compile does not unpickle .bin files)"
            )
    tok = path / "tokenizer"
    if not (tok / "tokenizer.json").exists() and not (
        (tok / "vocab.json").exists() and (tok / "merges.txt").exists()
    ):
        raise InputError(f"{tok}: no tokenizer.json and no vocab.json + merges.txt")
    if not (path / "scheduler" / "scheduler_config.json").exists():
        raise InputError(f"{path / 'scheduler'}: no scheduler_config.json")
    return index


def tokenizer_spec(tok_dir: Path) -> TokenizerSpec:
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.exists() else {}
    pad = cfg.get("pad_token") or "<|endoftext|>"
    if isinstance(pad, dict):  # older save_pretrained writes AddedToken dicts
        pad = pad.get("content", "<|endoftext|>")
    max_len = int(cfg.get("model_max_length") or 77)
    if max_len > 10_000:  # transformers' "no limit" sentinel: CLIP's position table says 77
        max_len = 77
    return TokenizerSpec("tokenizer/tokenizer.json", max_len, str(pad))


def default_guidance(unet_config: dict[str, Any]) -> str:
    return "embedded" if unet_config.get("time_cond_proj_dim") else "cfg"


def pipeline_spec(
    path: Path,
    pipeline_class: str,
    configs: dict[str, dict[str, Any]],
    scheduler_config: dict[str, Any],
    *,
    profile: Profile | None = None,
    guidance: str | None = None,
    unet_where: Path | str | None = None,
) -> PipelineSpec:
    """The PipelineSpec of a pipeline folder's tokenizer with these component configs (IO specs
    sized for `profile` and the guidance mode; `unet_where` names the UNet in errors)."""
    unet_cfg, vae_cfg = configs["unet"], configs["vae_decoder"]
    where = unet_where or path / "unet"
    mode = guidance or default_guidance(unet_cfg)
    if mode == "embedded" and not unet_cfg.get("time_cond_proj_dim"):
        raise InputError(f"{where}: guidance 'embedded' needs a UNet with time_cond_proj_dim")
    if mode != "embedded" and unet_cfg.get("time_cond_proj_dim"):
        raise InputError(f"{where}: the UNet has time_cond_proj_dim (embedded guidance), not {mode!r}")
    tok = tokenizer_spec(path / "tokenizer")
    k = vae_scale_factor(vae_cfg)
    size = unet_cfg.get("sample_size") or 64
    lh, lw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if profile is None:
        from engines.iospec import DimRange

        profile = Profile(latent_height=DimRange(lh, lh, lh), latent_width=DimRange(lw, lw, lw))
    profile = Profile(profile.batch, profile.latent_height, profile.latent_width, tok.model_max_length)
    specs = build_specs(configs, profile, mode)
    return PipelineSpec(
        pipeline_class=pipeline_class,
        components=tuple(ComponentSpec(n, configs[n], specs[n]) for n in configs),
        tokenizer=tok,
        scheduler_config=scheduler_config,
        guidance=mode,
        vae_scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
        vae_scale_factor=k,
        default_size=(lh * k, lw * k),
        profile=profile,
    )


def component_configs(path: Path) -> dict[str, dict[str, Any]]:
    return {
        "text_encoder": _read_json(path / "text_encoder" / "config.json"),
        "unet": _read_json(path / "unet" / "config.json"),
        "vae_decoder": _read_json(path / "vae" / "config.json"),
    }


def load_pipeline(
    path: str | Path, *, profile: Profile | None = None, guidance: str | None = None
) -> LoadedPipeline:
    """The pipeline's torch modules and its PipelineSpec (IO specs sized for `profile` and the mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    index = check_layout(path)
    spec = pipeline_spec(
        path,
        index["_class_name"],
        component_configs(path),
        _read_json(path / "scheduler" / "scheduler_config.json"),
        profile=profile,
        guidance=guidance,
    )
    return LoadedPipeline(
        path=path,
        spec=spec,
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True).eval(),
        unet=UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True).eval(),
        vae=AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True).eval(),
        tokenizer_dir=path / "tokenizer",
    )
