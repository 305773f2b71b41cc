"""Load a diffusers text-to-image pipeline folder (save_pretrained layout, model_index.json).

Checks the layout before loading anything, so a bad folder is one line naming what is wrong.
Weights load from .safetensors only (nothing is unpickled); a component saved only as a variant
(`model.fp16.safetensors`, a common hub layout) loads that variant, upcast to float32. Every
problem with a folder's files (JSON, weights, configs that do not match them, tokenizer, scheduler)
is an InputError naming the file or folder, raised here, before anything is exported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.schedulers import SCHEDULER_CLASSES, trial_timesteps
from optimizer.families import Family, family_of_pipeline, pipeline_classes
from optimizer.t2i.components import (
    COMPONENTS,
    ComponentKind,
    ComponentSpec,
    PipelineSpec,
    Profile,
    TokenizerSpec,
    build_specs,
    is_flux,
    text_time_dims,
    vae_scale_factor,
)

PIPELINE_CLASSES = pipeline_classes()  # every pipeline family's classes (optimizer/families)
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast")  # SD3's tokenizer_3 (read as tokenizer.json)
# what from_pretrained raises on files that do not fit (OSError: unreadable; ValueError/RuntimeError:
# config vs weights; KeyError/TypeError: configs with missing or mistyped fields)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)


def module_folders(family: Family) -> tuple[str, ...]:
    """The pipeline's subfolders holding torch modules, in call order (the VAE once)."""
    return tuple(dict.fromkeys(COMPONENTS[c].subfolder for c in family.exported))


def _kind_of_folder(folder: str) -> ComponentKind:
    return next(k for k in COMPONENTS.values() if k.subfolder == folder)


def required_entries(family: Family) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """model_index.json entries a family's run needs: its modules, tokenizers and scheduler (others,
    such as safety_checker or SDXL's image_encoder, are ignored)."""
    out: dict[str, tuple[str, tuple[str, ...] | None]] = {}
    for folder in module_folders(family):
        k = _kind_of_folder(folder)
        out[folder] = (k.library, k.classes)
    for tok in family.tokenizers:
        t5 = tok == "tokenizer_3" or (tok == "tokenizer_2" and family.name == "flux")
        out[tok] = ("transformers", T5_TOKENIZER_CLASSES if t5 else TOKENIZER_CLASSES)
    out["scheduler"] = ("diffusers", None)  # check_scheduler: the runtime samples only some
    return out


@dataclass
class LoadedPipeline:
    path: Path
    spec: PipelineSpec
    modules: dict[str, Any]  # subfolder (text_encoder, text_encoder_2, unet, vae) -> torch module
    tokenizer_dirs: dict[str, Path]  # tokenizer, tokenizer_2 -> folder

    def module(self, kind: str) -> Any:
        """The torch module behind a component (both VAE components: the one AutoencoderKL)."""
        return self.modules[COMPONENTS[kind].subfolder]

    @property
    def text_encoder(self) -> Any:
        return self.modules["text_encoder"]

    @property
    def unet(self) -> Any:
        """The per-step component (a UNet, or SD3's transformer)."""
        return self.modules[self.spec.denoiser]

    @property
    def vae(self) -> Any:
        return self.modules["vae"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenizer_dirs["tokenizer"]


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object (every file read here is one: configs, model_index.json, teacher.json)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({_one_line(e)})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object, got a {type(d).__name__}")
    return d


def index_family(index: dict[str, Any], index_path: Path) -> Family:
    """The family of a model_index.json's pipeline class; another class is refused naming them all."""
    cls = index.get("_class_name")
    family = family_of_pipeline(cls)
    if family is None:
        raise InputError(
            f"{index_path}: pipeline class {cls!r} is not supported ({', '.join(PIPELINE_CLASSES)})"
        )
    return family


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
    family = index_family(index, index_path)
    for name, (_, classes) in required_entries(family).items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise InputError(f"{index_path}: component {name!r} is missing")
        if classes is not None and entry[1] not in classes:
            raise InputError(f"{index_path}: {name} class {entry[1]!r}: not supported ({', '.join(classes)})")
        if not (path / name).is_dir():
            raise InputError(f"{path}: component {name!r} is missing (no {name}/ folder)")
    if index["_class_name"] == "LatentConsistencyModelPipeline":  # its call decodes LCM's x0
        sched = (index["scheduler"][1], path / "scheduler" / "scheduler_config.json")
        if sched[0] != "LCMScheduler":
            raise InputError(
                f"{index_path}: a LatentConsistencyModelPipeline samples with LCMScheduler, not {sched[0]!r}"
            )
    for name in module_folders(family):
        if not (path / name / "config.json").exists():
            raise InputError(f"{path / name}: no config.json")
        if not any((path / name).glob("*.safetensors")):
            raise InputError(
                f"{path / name}: no .safetensors weights (dd-compile does not unpickle .bin files)"
            )
    for name in family.tokenizers:
        tok = path / name
        if not (tok / "tokenizer.json").exists() and not (
            (tok / "vocab.json").exists() and (tok / "merges.txt").exists()
        ):
            raise InputError(f"{tok}: no tokenizer.json and no vocab.json + merges.txt")
    if not (path / "scheduler" / "scheduler_config.json").exists():
        raise InputError(f"{path / 'scheduler'}: no scheduler_config.json")
    return index


def family_of_folder(path: Path) -> Family:
    """The family of a pipeline folder (its layout checked)."""
    return index_family(check_layout(path), path / "model_index.json")


def weights_files(folder: Path, stem: str) -> tuple[list[Path], str | None]:
    """The component's .safetensors file(s) and the diffusers variant they are saved as.

    `<stem>.safetensors` (or its sharded index) first; else a variant (`<stem>.fp16.safetensors`,
    a hub layout that ships half-precision weights only), fp16 preferred when there are several."""

    def shards(index: Path) -> list[Path]:
        wm = _read_json(index).get("weight_map")
        names = sorted(set(wm.values())) if isinstance(wm, dict) and wm else None
        if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise InputError(f"{index}: weight_map must map tensor names to shard files in {folder}")
        return [folder / n for n in names]

    plain, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if plain.exists() or plain.is_symlink():
        return [plain], None
    if index.exists():
        return shards(index), None
    found: dict[str, list[Path]] = {}
    for f in folder.glob(f"{stem}.*.safetensors"):
        v = f.name[len(stem) + 1 : -len(".safetensors")]
        if v and "." not in v:
            found[v] = [f]
    for f in folder.glob(f"{stem}.safetensors.index.*.json"):
        v = f.name[len(f"{stem}.safetensors.index.") : -len(".json")]
        if v and "." not in v:
            found[v] = shards(f)
    if not found:
        raise InputError(
            f"{folder}: no {stem}.safetensors (nor a variant such as {stem}.fp16.safetensors); "
            "dd-compile does not unpickle .bin files"
        )
    if "fp16" in found or len(found) == 1:
        v = "fp16" if "fp16" in found else next(iter(found))
        return found[v], v
    raise InputError(f"{folder}: no {stem}.safetensors and several variants ({', '.join(sorted(found))})")


def check_safetensors(f: Path) -> None:
    """The header parses and its tensors cover the file exactly (truncated, garbage, lying headers
    are refused here, not inside from_pretrained); a symlink is followed and its target named."""
    from safetensors import SafetensorError, safe_open

    where = f"{f} (a symlink to {f.resolve()})" if f.is_symlink() else str(f)
    if f.is_symlink() and not f.exists():
        raise InputError(f"{where}: broken symlink")
    if not f.is_file():
        raise InputError(f"{where}: weights file missing")
    try:
        with safe_open(str(f), framework="np") as h:
            n = len(list(h.keys()))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{where}: not a readable safetensors file ({_one_line(e)})") from None
    if n == 0:
        raise InputError(f"{where}: holds no tensors")


def check_weights(path: Path) -> dict[str, tuple[list[Path], str | None]]:
    """Every weights file of the pipeline's modules (text encoders, UNet, VAE), header-checked."""
    out = {}
    for name in module_folders(family_of_folder(path)):
        files, variant = out[name] = weights_files(path / name, _kind_of_folder(name).weights_stem)
        for f in files:
            check_safetensors(f)
    return out


def check_scheduler(config: dict[str, Any], where: str, classes: Any = None) -> Any:
    """The numpy scheduler the runtime samples with; any other diffusers class is refused (the runtime
    would sample it as something else). `classes`: the family's (default: the UNet families')."""
    from engines.schedulers import make_scheduler

    classes = SCHEDULER_CLASSES if classes is None else classes
    cls = config.get("_class_name")
    kind = classes.get(cls) if isinstance(cls, str) else None
    if kind is None:
        raise InputError(
            f"{where}: _class_name {cls!r} is not supported: the runtime samples "
            f"{', '.join(classes)} (save the pipeline with one of them)"
        )
    try:
        return make_scheduler(kind, config, where=where)
    except (TypeError, ValueError, OverflowError) as e:  # fields of the wrong type or range
        raise InputError(f"{where}: {_one_line(e)}") from None


def check_steps(scheduler: Any, steps: Any, option: str, where: str) -> int:
    """A step count the scheduler can sample (DDIM: 1..num_train_timesteps; LCM: 1..original steps)."""

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"{option} {steps!r}: must be an integer >= 1")
    try:
        trial_timesteps(scheduler, steps)
    except InputError as e:
        raise InputError(f"{option} {steps}: not possible with {where} ({e})") from None
    return steps


def check_tokenizer(tok_dir: Path) -> int:
    """The tokenizer loads and encodes (tokenizer.json as the runtime reads it, else vocab.json +
    merges.txt as export converts them); returns its vocabulary size."""
    try:
        if (tok_dir / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
            tok.encode("a photo")
            return int(tok.get_vocab_size())
        from transformers import CLIPTokenizer

        slow = CLIPTokenizer.from_pretrained(tok_dir)
        slow("a photo")
        return len(slow)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise InputError(f"{tok_dir}: the tokenizer does not load ({_one_line(e)})") from None


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def sample_size(unet_config: dict[str, Any], where: str | Path) -> tuple[int, int] | None:
    """The UNet's latent (height, width) from sample_size; None when the config has none (Flux's
    transformer has none: FluxPipeline's default_sample_size, 128)."""
    s = unet_config.get("sample_size")
    if s is None and is_flux(unet_config):
        return (128, 128)
    if s is None:
        return None
    if _pos_int(s):
        return (s, s)
    if isinstance(s, list | tuple) and len(s) == 2 and all(_pos_int(v) for v in s):
        return (int(s[0]), int(s[1]))
    raise InputError(f"{where}: sample_size {s!r}: expected a positive integer or [height, width]")


def check_configs(configs: dict[str, dict[str, Any]], where: dict[str, str]) -> None:
    """The config fields the IO specs read, with their types (a missing one is a bug report otherwise);
    SDXL's: the UNet's cross-attention width is both encoders' widths, its text_time embedding takes
    text_encoder_2's pooled projection and six size/crop ids."""

    def need(kind: str, key: str, ok: bool, what: str) -> None:
        if not ok:
            raise InputError(f"{where[kind]}: {key} {configs[kind].get(key)!r}: expected {what}")

    if "transformer" in configs and is_flux(configs["transformer"]):
        return _check_flux_configs(configs, need)
    if "transformer" in configs:
        return _check_sd3_configs(configs, need)
    unet, vae = configs["unet"], configs["vae_decoder"]
    encoders = [k for k in ("text_encoder", "text_encoder_2") if k in configs]
    for te in encoders:
        need(te, "hidden_size", _pos_int(configs[te].get("hidden_size")), "a positive integer")
    for kind, cfg in (("unet", unet), ("vae_decoder", vae)):
        boc = cfg.get("block_out_channels")
        ok = isinstance(boc, list | tuple) and len(boc) > 0 and all(_pos_int(c) for c in boc)
        need(kind, "block_out_channels", ok, "a non-empty list of positive integers")
    cad = unet.get("cross_attention_dim")
    ok = _pos_int(cad) or (isinstance(cad, list | tuple) and len(cad) > 0 and all(_pos_int(c) for c in cad))
    need("unet", "cross_attention_dim", ok, "a positive integer (or a list of them)")
    for key in ("in_channels", "out_channels", "time_cond_proj_dim"):
        need("unet", key, unet.get(key) is None or _pos_int(unet.get(key)), "a positive integer")
    need("vae_decoder", "latent_channels", _pos_int(vae.get("latent_channels")), "a positive integer")
    # a 9-channel inpainting UNet (latents, mask, masked-image latents) is told apart from a
    # text-to-image one by pipeline_spec; other counts by check_unet_channels once the weights
    # loaded (a VAE config that does not match its weights is named first, as the VAE's)
    sample_size(unet, where["unet"])
    if "text_encoder_2" not in configs:
        if unet.get("addition_embed_type") is not None:
            need("unet", "addition_embed_type", False, "none (this family has no added conditioning)")
        return
    # SDXL
    te2 = configs["text_encoder_2"]
    need("text_encoder_2", "projection_dim", _pos_int(te2.get("projection_dim")), "a positive integer")
    need("unet", "addition_embed_type", unet.get("addition_embed_type") == "text_time", "'text_time'")
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        need("unet", key, _pos_int(unet.get(key)), "a positive integer")
    pooled, n_ids = text_time_dims(unet)
    need(
        "unet",
        "projection_class_embeddings_input_dim",
        pooled == te2["projection_dim"],
        f"{n_ids} x addition_time_embed_dim + text_encoder_2's projection_dim {te2['projection_dim']} "
        "(SDXL base's six size/crop ids; a refiner's aesthetic score is not supported)",
    )
    width = sum(int(configs[te]["hidden_size"]) for te in encoders)
    first = cad[0] if isinstance(cad, list | tuple) else cad
    need("unet", "cross_attention_dim", first == width, f"{width} (the two encoders' widths together)")
    if vae.get("latents_mean") is not None:
        need("vae_decoder", "latents_mean", False, "none (latent statistics are not supported yet)")


def _check_vae(vae: dict[str, Any], need: Any) -> None:
    need("vae_decoder", "latent_channels", _pos_int(vae.get("latent_channels")), "a positive integer")
    boc = vae.get("block_out_channels")
    ok = isinstance(boc, list | tuple) and len(boc) > 0 and all(_pos_int(c) for c in boc)
    need("vae_decoder", "block_out_channels", ok, "a non-empty list of positive integers")


def _check_sd3_configs(configs: dict[str, dict[str, Any]], need: Any) -> None:
    """SD3: the transformer's joint width is T5's (CLIP states are zero-padded, or cut, to it), its pooled
    width both CLIP projections, its channels the VAE's latent channels."""
    tr, vae, t5 = configs["transformer"], configs["vae_decoder"], configs["text_encoder_3"]
    for key in ("in_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim"):
        need("transformer", key, _pos_int(tr.get(key)), "a positive integer")
    need("text_encoder_3", "d_model", _pos_int(t5.get("d_model")), "a positive integer")
    for te in ("text_encoder", "text_encoder_2"):
        for key in ("hidden_size", "projection_dim"):
            need(te, key, _pos_int(configs[te].get(key)), "a positive integer")
    _check_vae(vae, need)
    need(
        "transformer",
        "joint_attention_dim",
        tr["joint_attention_dim"] == t5["d_model"],
        f"T5's d_model {t5['d_model']}",
    )
    pooled = sum(int(configs[te]["projection_dim"]) for te in ("text_encoder", "text_encoder_2"))
    need(
        "transformer",
        "pooled_projection_dim",
        tr["pooled_projection_dim"] == pooled,
        f"{pooled} (both projections)",
    )
    need(
        "transformer",
        "in_channels",
        tr["in_channels"] == vae["latent_channels"],
        f"the VAE's {vae['latent_channels']}",
    )
    sample_size(tr, "transformer config")


def _check_flux_configs(configs: dict[str, dict[str, Any]], need: Any) -> None:
    """Flux: the transformer's joint width is T5's, its pooled width CLIP's hidden size, its packed
    channels 4 x the VAE's latent channels."""
    tr, vae, t5, clip = (configs[k] for k in ("transformer", "vae_decoder", "text_encoder_2", "text_encoder"))
    for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim"):
        need("transformer", key, _pos_int(tr.get(key)), "a positive integer")
    need("text_encoder_2", "d_model", _pos_int(t5.get("d_model")), "a positive integer (a T5 encoder)")
    need("text_encoder", "hidden_size", _pos_int(clip.get("hidden_size")), "a positive integer")
    _check_vae(vae, need)
    need(
        "transformer",
        "joint_attention_dim",
        tr["joint_attention_dim"] == t5["d_model"],
        f"T5's d_model {t5['d_model']}",
    )
    need(
        "transformer",
        "pooled_projection_dim",
        tr["pooled_projection_dim"] == clip["hidden_size"],
        f"CLIP's hidden_size {clip['hidden_size']}",
    )
    need(
        "transformer",
        "in_channels",
        tr["in_channels"] == 4 * vae["latent_channels"],
        f"4 x the VAE's {vae['latent_channels']} (2x2 packing)",
    )
    if tr.get("patch_size", 1) != 1:
        need("transformer", "patch_size", False, "1 (the pipeline packs 2x2 latents itself)")


def tokenizer_spec(tok_dir: Path) -> TokenizerSpec:
    """Where the runtime reads it (<name>/tokenizer.json), its length and its pad token."""
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.exists() else {}
    pad = cfg.get("pad_token") or "<|endoftext|>"
    if isinstance(pad, dict):  # older save_pretrained writes AddedToken dicts
        pad = pad.get("content", "<|endoftext|>")
    max_len = int(cfg.get("model_max_length") or 77)
    if max_len > 10_000:  # transformers' "no limit" sentinel: CLIP's position table says 77
        max_len = 77
    return TokenizerSpec(f"{tok_dir.name}/tokenizer.json", max_len, str(pad))


def t5_tokenizer_spec(tok_dir: Path, max_sequence_length: int) -> TokenizerSpec:
    """A T5 tokenizer as the pipelines call it: padded to max_sequence_length (not its own limit),
    with T5's <pad> where its config names none."""
    t = tokenizer_spec(tok_dir)
    return TokenizerSpec(
        t.path, max_sequence_length, t.pad_token if t.pad_token != "<|endoftext|>" else "<pad>"
    )


def default_guidance(unet_config: dict[str, Any]) -> str:
    """LCM's w-embedding or Flux-dev's guidance input: embedded; Flux schnell: none; else CFG."""
    if is_flux(unet_config):
        return "embedded" if unet_config.get("guidance_embeds") else "none"
    return "embedded" if unet_config.get("time_cond_proj_dim") else "cfg"


def _embeds_guidance(unet_config: dict[str, Any]) -> bool:
    return bool(unet_config.get("time_cond_proj_dim") or unet_config.get("guidance_embeds"))


def pipeline_spec(
    path: Path,
    pipeline_class: str,
    configs: dict[str, dict[str, Any]],
    scheduler_config: dict[str, Any],
    *,
    profile: Profile | None = None,
    guidance: str | None = None,
    unet_where: Path | str | None = None,
    index: dict[str, Any] | None = None,
) -> PipelineSpec:
    """The PipelineSpec of a pipeline folder's tokenizer(s) with these component configs (IO specs
    sized for `profile` and the guidance mode; `unet_where` names the UNet in errors; `index`: the
    folder's model_index.json, for its pipeline flags)."""
    family = family_of_pipeline(pipeline_class)
    if family is None:
        raise InputError(f"{path}: pipeline class {pipeline_class!r} is not supported")
    unet_cfg, vae_cfg = configs[family.denoiser], configs["vae_decoder"]
    where = unet_where or path / family.denoiser
    inpaint = unet_cfg.get("in_channels") == 2 * int(vae_cfg.get("latent_channels", 4)) + 1
    if inpaint != (pipeline_class in family.inpaint_classes):
        want = family.inpaint_classes if inpaint else family.pipeline_classes
        raise InputError(
            f"{where}: in_channels {unet_cfg.get('in_channels')} is "
            f"{'an inpainting' if inpaint else 'a text-to-image'} UNet, but the pipeline class is "
            f"{pipeline_class} (expected {' or '.join(want)} in model_index.json)"
        )
    mode = guidance or default_guidance(unet_cfg)
    if mode == "embedded" and not _embeds_guidance(unet_cfg):
        raise InputError(f"{where}: guidance 'embedded' needs a UNet with time_cond_proj_dim")
    if mode != "embedded" and _embeds_guidance(unet_cfg):
        raise InputError(f"{where}: the UNet has time_cond_proj_dim (embedded guidance), not {mode!r}")
    tok = tokenizer_spec(path / "tokenizer")
    positions = configs["text_encoder"].get("max_position_embeddings", 77)
    if isinstance(positions, int) and tok.model_max_length > positions:
        raise InputError(
            f"{path / 'tokenizer'}: model_max_length {tok.model_max_length} exceeds the text encoder's "
            f"max_position_embeddings {positions}"
        )
    k = vae_scale_factor(vae_cfg)
    native = sample_size(unet_cfg, where)
    if profile is None:
        from engines.iospec import DimRange

        if native is None:
            raise InputError(f"{where}: config.json has no sample_size (the default image size)")
        lh, lw = native
        profile = Profile(latent_height=DimRange(lh, lh, lh), latent_width=DimRange(lw, lw, lw))
    else:  # the native size where the profile holds it, else the size it is built for (--size)
        inside = native is not None and (
            profile.latent_height.min <= native[0] <= profile.latent_height.max
            and profile.latent_width.min <= native[1] <= profile.latent_width.max
        )
        lh, lw = native if inside else (profile.latent_height.opt, profile.latent_width.opt)
    t5_tokens = profile.t5_tokens or family.max_sequence_length
    tok2 = tokenizer_spec(path / "tokenizer_2") if "tokenizer_2" in family.tokenizers else None
    if tok2 is not None and family.name == "flux":  # T5: padded to max_sequence_length
        tok2 = t5_tokenizer_spec(path / "tokenizer_2", t5_tokens)
    elif tok2 is not None and tok2.model_max_length != tok.model_max_length:
        raise InputError(
            f"{path / 'tokenizer_2'}: model_max_length {tok2.model_max_length}, not tokenizer's "
            f"{tok.model_max_length} (the encoders' states are concatenated token by token)"
        )
    tok3 = None
    if "tokenizer_3" in family.tokenizers:  # T5: padded to max_sequence_length, not its own limit
        tok3 = t5_tokenizer_spec(path / "tokenizer_3", t5_tokens)
    profile = Profile(
        profile.batch,
        profile.latent_height,
        profile.latent_width,
        tok.model_max_length,
        t5_tokens,
        profile.prompt_chunks,
    )
    specs = build_specs(configs, profile, mode, family.conditioning)
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
        family=family.name,
        tokenizer_2=tok2,
        force_zeros_for_empty_prompt=bool((index or {}).get("force_zeros_for_empty_prompt", False))
        and family.name == "sdxl",
        denoiser=family.denoiser,
        tokenizer_3=tok3,
        vae_shift_factor=float(vae_cfg.get("shift_factor") or 0.0),
        inpaint=inpaint,
    )


def component_configs(path: Path) -> dict[str, dict[str, Any]]:
    """config.json of each component the folder's family exports (the VAE's for both VAE parts)."""
    family = family_of_folder(path)
    files = {c: path / COMPONENTS[c].subfolder / "config.json" for c in family.exported}
    configs = {k: _read_json(f) for k, f in files.items() if k != "vae_encoder"}
    check_configs(configs, {k: str(f) for k, f in files.items()})
    if "vae_encoder" in files:
        configs["vae_encoder"] = configs["vae_decoder"]  # image-to-image: the same AutoencoderKL
    return configs


def _module_class(folder: str, class_name: str | None = None) -> Any:
    """The class a component folder loads as: model_index.json's (one the table accepts), else the
    table's first."""
    import diffusers
    import transformers

    k = _kind_of_folder(folder)
    name = class_name if class_name in k.classes else k.classes[0]
    return getattr(diffusers if k.library == "diffusers" else transformers, name)


def load_component(kind: str, folder: Path, class_name: str | None = None) -> Any:
    """A text encoder / unet / vae module (`kind`: its pipeline subfolder name) in float32; any
    mismatch between config.json and the weights (missing, unexpected or misshapen tensors) is
    refused naming the folder."""
    from safetensors import SafetensorError

    cls = _module_class(kind, class_name)
    files, variant = weights_files(folder, _kind_of_folder(kind).weights_stem)
    for f in files:
        check_safetensors(f)
    try:
        model, info = cls.from_pretrained(
            folder, use_safetensors=True, variant=variant, output_loading_info=True
        )
    except (*LOAD_ERRORS, SafetensorError) as e:
        # diffusers appends advice to overwrite the weights with random ones: not ours to give
        why = _one_line(e, 400).split(" If you want to instead")[0][:260]
        raise InputError(f"{folder}: config.json and weights do not load together ({why})") from None
    # transformers reports a non-persistent buffer an older save kept (position_ids) as unexpected
    buffers = {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()}
    problems = {
        "missing": sorted(info.get("missing_keys") or []),
        "unexpected": sorted(
            k for k in info.get("unexpected_keys") or [] if k.rsplit(".", 1)[-1] not in buffers
        ),
        "misshapen": sorted(
            str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []
        ),
    }
    for what, keys in problems.items():
        if keys:
            raise InputError(
                f"{folder}: config.json does not match the weights: {len(keys)} {what} tensor(s) "
                f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            )
    # a half-precision variant is upcast: every stage exports and compares in float32
    return model.float().eval()


TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def check_tokenizer_fits(path: Path, configs: dict[str, dict[str, Any]]) -> None:
    """Token ids must index each text encoder's embedding table (`configs`: component configs)."""
    for te, tok in TOKENIZER_OF.items():
        if te not in configs:
            continue
        n = check_tokenizer(path / tok)
        vocab = configs[te].get("vocab_size")
        if _pos_int(vocab) and n > vocab:
            raise InputError(
                f"{path / tok}: {n} tokens, more than the text encoder's vocab_size {vocab} "
                f"({path / te / 'config.json'})"
            )


def load_pipeline(
    path: str | Path, *, profile: Profile | None = None, guidance: str | None = None
) -> LoadedPipeline:
    """The pipeline's torch modules and its PipelineSpec (IO specs sized for `profile` and the mode)."""
    path = Path(path)
    index = check_layout(path)
    check_weights(path)  # headers of every component first: one line before any module loads
    configs = component_configs(path)
    # the scheduler class is checked where the runtime will sample it (source.resolve): a teacher
    # loaded here for the diffusers baseline may have any diffusers scheduler
    sched_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
    check_tokenizer_fits(path, configs)
    spec = pipeline_spec(
        path, index["_class_name"], configs, sched_cfg, profile=profile, guidance=guidance, index=index
    )
    family = family_of_pipeline(index["_class_name"])
    modules = {f: load_component(f, path / f, index[f][1]) for f in module_folders(family)}
    check_unet_channels(configs, path)
    return LoadedPipeline(
        path=path,
        spec=spec,
        modules=modules,
        tokenizer_dirs={t: path / t for t in family.tokenizers},
    )


def check_unet_channels(configs: dict[str, dict[str, Any]], path: Path) -> None:
    """A UNet reads the VAE's latent channels C (text-to-image) or 2C + 1 (inpainting)."""
    unet = configs.get("unet")
    if unet is None:  # SD3 / Flux: their transformer's channels are checked with their configs
        return
    c, got = int(configs["vae_decoder"]["latent_channels"]), unet.get("in_channels", 4)
    if got not in (c, 2 * c + 1):
        raise InputError(
            f"{path / 'unet' / 'config.json'}: in_channels {got!r}: expected the VAE's latent_channels {c} "
            f"(text-to-image) or {2 * c + 1} (an inpainting UNet: latents + mask + masked image)"
        )
