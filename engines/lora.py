"""LoRA adapters at run time, without torch: files -> per-layer low-rank factors -> graph feeds.

A graph compiled with LoRA inputs (dd-compile --lora-rank R, optimizer/t2i/lora_slots.py) adds to
each slotted linear layer `y = x W + b` the branch `+ (x A) B`, where `A` [in, r] and `B` [r, out]
are graph inputs named `lora_A:<module>` and `lora_B:<module>` and r is dynamic (0 = no adapter: the
branch adds exact zeros). Several adapters with weights are one branch: their factors concatenated
on the rank axis, each `B` scaled by weight x the adapter's own scale, which is peft's sum of
`w_i s_i B_i(A_i(x))` (diffusers' set_adapters). No weight is ever rewritten, so removing every
adapter returns the base graph's outputs bit for bit (TensorRT refits leave residue: TensorRT#3628).

Files read: diffusers / peft (`lora_A` / `lora_B`, `lora.down` / `lora.up`, attention-processor
`to_q_lora.down`), with the `lora_adapter_metadata` peft config diffusers writes (lora_alpha, r,
alpha_pattern, rank_pattern, use_rslora), and kohya (`lora_unet_...` / `lora_te_...` with `.alpha`)
for layers named as the compiled modules are. A key this runtime cannot apply is refused by name,
never dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InputError
from engines.safetensors_io import read_safetensors

log = logging.getLogger(__name__)
INPUT_A, INPUT_B = "lora_A:", "lora_B:"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file name
# (down suffix, up suffix): peft, diffusers' LoRACompatibleLinear / convert_state_dict_to_diffusers, kohya
PAIRS = (
    ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),  # diffusers' text-encoder LoRA
    ("lora_A.weight", "lora_B.weight"),
    ("lora.down.weight", "lora.up.weight"),
    ("lora_down.weight", "lora_up.weight"),
)
_PROCESSOR = re.compile(
    r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"
)  # pre-peft diffusers
_KOHYA = {
    "lora_unet_": None,
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


@dataclass(frozen=True)
class Slot:
    """One linear layer's LoRA inputs in a component graph (t2i.json: components.<c>.lora.slots)."""

    a: str  # graph input [in, rank]: the adapters' down factors, transposed
    b: str  # graph input [rank, out]: their up factors, scaled and transposed
    features_in: int
    features_out: int
    dtype: str = "float32"  # the layer's activation type in this graph (float16 in fp16 graphs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "in": self.features_in,
            "out": self.features_out,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Slot:
        return cls(str(d["a"]), str(d["b"]), int(d["in"]), int(d["out"]), str(d.get("dtype", "float32")))


@dataclass(frozen=True)
class Slots:
    """A component graph's LoRA inputs: module path -> Slot, and the most total rank one layer takes."""

    layers: dict[str, Slot]
    max_rank: int
    # layers adapters may name that the graph does not compute (pruned: nothing it returns reads
    # them, e.g. a CLIP encoder's last layer under penultimate states) -> (in, out); keys for them
    # are shape-checked and ignored, which is what they change in diffusers' outputs
    inert: dict[str, tuple[int, int]] = field(default_factory=dict)
    # targeted layers that take no adapter: the exporter split them into several matmuls (Flux's
    # single-block proj_out over a concat); a key for one is refused by name
    unslotted: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_rank": self.max_rank,
            "slots": {m: s.to_dict() for m, s in self.layers.items()},
            "inert": {m: list(io) for m, io in self.inert.items()},
            "unslotted": list(self.unslotted),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Slots:
        return cls(
            {str(m): Slot.from_dict(s) for m, s in d["slots"].items()},
            int(d["max_rank"]),
            {str(m): (int(io[0]), int(io[1])) for m, io in d.get("inert", {}).items()},
            tuple(str(m) for m in d.get("unslotted", ())),
        )


@dataclass(frozen=True)
class LoraLayer:
    down: np.ndarray  # [r, in] (peft's lora_A.weight)
    up: np.ndarray  # [out, r] (lora_B.weight)
    scale: float  # lora_alpha / r (or / sqrt(r) under rsLoRA; 1 where the file says nothing)


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    layers: dict[str, dict[str, LoraLayer]] = field(default_factory=dict)  # component -> module -> layer

    @property
    def rank(self) -> int:
        return max((x.down.shape[0] for c in self.layers.values() for x in c.values()), default=0)


def lora_file(path: str | Path) -> Path:
    """A .safetensors file, or a folder holding diffusers' pytorch_lora_weights.safetensors."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHT_NAME
    if not p.is_file():
        raise InputError(f"{path}: no LoRA file (a .safetensors file, or a folder with {WEIGHT_NAME})")
    return p


def _split_component(key: str, denoiser: str, slots: Mapping[str, Slots]) -> tuple[str, str]:
    """(component, the rest of the key) from a key's prefix; kohya's flattened names resolved
    against the slotted modules' names with dots as underscores."""
    for prefix, comp in _KOHYA.items():
        if key.startswith(prefix):
            comp = comp or denoiser
            flat, _, suffix = key[len(prefix) :].partition(".")
            modules = list(slots.get(comp, Slots({}, 0)).layers)
            names = {v.replace(".", "_"): m for m in modules for v in _spellings(m)}
            names.update({v.replace(".", "_"): m for m, v in _sgm_names(modules).items()})
            return comp, f"{names.get(flat, flat)}.{suffix}"
    head, _, rest = key.partition(".")
    if head in ("unet", "transformer"):
        return denoiser, rest
    if head.startswith("text_encoder"):
        return head, rest
    return denoiser, key  # unet.save_attn_procs / a bare peft state dict: the denoiser's modules


_UNET_ATTENTION = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")


def _sgm_names(modules: list[str]) -> dict[str, str]:
    """A UNet's attention layers as the original (SGM / LDM) checkpoints name them, which kohya's
    SDXL LoRAs use (input_blocks.4.1..., middle_block.1..., output_blocks.3.1...): the inverse of
    diffusers' _maybe_map_sgm_blocks_to_diffusers. layers_per_block from the names: a down block
    has one attention per layer, an up block one more."""
    found = [(m, _UNET_ATTENTION.match(m)) for m in modules]
    downs = [int(x.group(3)) for _, x in found if x and x.group(1) == "down_blocks"]
    ups = [int(x.group(3)) for _, x in found if x and x.group(1) == "up_blocks"]
    if not downs and not ups:
        return {}
    per = max(downs) + 1 if downs else max(ups)  # layers_per_block
    out = {}
    for m, x in found:
        if x is not None:
            kind, block, layer, rest = x.group(1), int(x.group(2)), int(x.group(3)), x.group(4)
            index = 1 + block * (per + 1) + layer if kind == "down_blocks" else block * (per + 1) + layer
            out[m] = f"{'input_blocks' if kind == 'down_blocks' else 'output_blocks'}.{index}.1.{rest}"
        elif m.startswith("mid_block.attentions.0."):
            out[m] = "middle_block.1." + m[len("mid_block.attentions.0.") :]
    return out


def _spellings(module: str) -> tuple[str, ...]:
    """A CLIP text encoder's module path with and without "text_model." (transformers 5 dropped the
    wrapper: its files and graphs say encoder.layers..., older files text_model.encoder.layers...)."""
    if module.startswith("text_model."):
        return module, module.removeprefix("text_model.")
    return module, f"text_model.{module}"


def _module_and_part(rest: str) -> tuple[str, str] | None:
    """(module path, "down" | "up" | "alpha") for a LoRA key without its component prefix."""
    m = _PROCESSOR.search(rest)
    if m:
        mod = m.group(1).replace("to_out", "to_out.0")
        return f"{rest[: m.start()]}.{mod}", m.group(2)
    for down, up in PAIRS:
        for suffix, part in ((down, "down"), (up, "up")):
            if rest.endswith("." + suffix):
                return rest[: -len(suffix) - 1], part
    if rest.endswith(".alpha"):
        return rest[: -len(".alpha")], "alpha"
    return None


def _peft_scale(meta: Mapping[str, Any], comp_key: str, module: str, rank: int) -> float | None:
    """peft's scaling for one module from the lora_adapter_metadata config, None without one."""
    cfg = {k.partition(".")[2]: v for k, v in meta.items() if k.partition(".")[0] == comp_key}
    if "lora_alpha" not in cfg:
        return None
    if cfg.get("use_dora"):
        raise InputError(f"adapter {comp_key}: DoRA (use_dora) is not applied by this runtime")
    alpha = float(cfg["lora_alpha"])
    for pattern, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(a)
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def read_adapter(path: str | Path, name: str, slots: Mapping[str, Slots], denoiser: str = "unet") -> Adapter:
    """Every layer of a LoRA file, checked against the compiled slots: a key naming a component or
    module without LoRA inputs, a layer whose shapes do not fit, or a non-LoRA key is one
    InputError naming the file and the key."""
    f = lora_file(path)
    tensors, header = read_safetensors(f)
    meta_raw = header.get("lora_adapter_metadata")
    try:
        meta = json.loads(meta_raw) if meta_raw else {}
    except json.JSONDecodeError as e:
        raise InputError(f"{f}: lora_adapter_metadata is not JSON ({e})") from None
    parts: dict[tuple[str, str], dict[str, Any]] = {}
    for key, t in tensors.items():
        comp, rest = _split_component(key, denoiser, slots)
        mp = _module_and_part(rest)
        if mp is None:
            raise InputError(f"{f}: key {key!r} is not a LoRA down/up weight or alpha this runtime applies")
        module, part = mp
        if comp in slots:
            known = {**slots[comp].inert, **slots[comp].layers}
            module = next((m for m in _spellings(module) if m in known), module)
        if comp not in slots:
            raise InputError(
                f"{f}: key {key!r} adapts {comp}, which was compiled without LoRA inputs "
                f"(those with them: {sorted(slots)})"
            )
        if module in slots[comp].unslotted:
            raise InputError(
                f"{f}: key {key!r}: {comp} {module} is split into several matmuls by the export and "
                "takes no LoRA input yet"
            )
        if module not in slots[comp].layers and module not in slots[comp].inert:
            raise InputError(f"{f}: key {key!r}: {comp} has no LoRA input for layer {module!r}")
        parts.setdefault((comp, module), {})[part] = (key, t)
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (comp, module), p in parts.items():
        if "down" not in p or "up" not in p:
            raise InputError(f"{f}: layer {comp} {module} has no {'up' if 'down' in p else 'down'} weight")
        (kd, down), (ku, up) = p["down"], p["up"]
        s = slots[comp]
        fin, fout = (
            (s.layers[module].features_in, s.layers[module].features_out)
            if module in s.layers
            else s.inert[module]
        )
        r = down.shape[0]
        if r == 0 or down.shape != (r, fin) or up.shape != (fout, r):
            raise InputError(
                f"{f}: {kd} {list(down.shape)} / {ku} {list(up.shape)} do not fit {comp} {module} "
                f"({fin} -> {fout})"
            )
        if module in s.inert:
            log.info(
                "%s: %s %s is not computed by the graph (nothing it returns reads it): ignored",
                f,
                comp,
                module,
            )
            continue
        if "alpha" in p:  # kohya / diffusers network alphas
            scale = float(p["alpha"][1].reshape(-1)[0]) / r
        else:
            scale = _peft_scale(meta, comp, module, r)  # the metadata's prefix: the component
            scale = 1.0 if scale is None else scale  # no config: diffusers' lora_alpha = r
        if not np.isfinite(down).all() or not np.isfinite(up).all() or not math.isfinite(scale):
            raise InputError(f"{f}: layer {comp} {module} has non-finite weights")
        layers.setdefault(comp, {})[module] = LoraLayer(down, up, scale)
    if not layers:
        raise InputError(f"{f}: no LoRA layers in the file")
    return Adapter(name, f, layers)


def zero_feeds(slots: Slots) -> dict[str, np.ndarray]:
    """No adapter: rank-0 factors, so each branch adds exact zeros."""
    feeds = {}
    for s in slots.layers.values():
        feeds[s.a] = np.zeros((s.features_in, 0), s.dtype)
        feeds[s.b] = np.zeros((0, s.features_out), s.dtype)
    return feeds


def adapter_feeds(comp: str, slots: Slots, active: Iterable[tuple[Adapter, float]]) -> dict[str, np.ndarray]:
    """One component's LoRA feeds for the active adapters with their weights (rank-concatenated)."""
    active = [(a, float(w)) for a, w in active]
    feeds = zero_feeds(slots)
    for module, s in slots.layers.items():
        found = [(x, w) for a, w in active if (x := a.layers.get(comp, {}).get(module)) is not None]
        if not found:
            continue
        rank = sum(x.down.shape[0] for x, _ in found)
        if rank > slots.max_rank:
            names = ", ".join(a.name for a, _ in active)
            raise InputError(
                f"adapters {names}: {comp} {module} needs rank {rank}, over the {slots.max_rank} "
                "this output was compiled for (dd-compile --lora-rank)"
            )
        feeds[s.a] = np.ascontiguousarray(np.concatenate([x.down.T for x, _ in found], axis=1), s.dtype)
        feeds[s.b] = np.ascontiguousarray(
            np.concatenate([(x.up * np.float32(w * x.scale)).T for x, w in found], axis=0), s.dtype
        )
    return feeds


# the rank a static-shape backend runs when no adapter is set: 1, zeros (TensorRT's profiles and
# OpenVINO's static compiles; a rank-0 tensor is what neither takes well)
STATIC_IDLE_RANK = 1


def rank_profiles(slots: Slots, opt_rank: int = 16) -> dict[str, tuple[tuple[int, ...], ...]]:
    """TensorRT optimization-profile shapes (min, opt, max) of a graph's LoRA inputs: rank from
    STATIC_IDLE_RANK (no adapter: zeros) to the compiled max_rank, tuned at min(opt_rank, max)."""
    lo, hi = STATIC_IDLE_RANK, slots.max_rank
    opt = max(lo, min(opt_rank, hi))
    out: dict[str, tuple[tuple[int, ...], ...]] = {}
    for s in slots.layers.values():
        out[s.a] = ((s.features_in, lo), (s.features_in, opt), (s.features_in, hi))
        out[s.b] = ((lo, s.features_out), (opt, s.features_out), (hi, s.features_out))
    return out


def graph_zero_feeds(inputs: Iterable[tuple[str, list[Any], Any]], rank: int = 0) -> dict[str, np.ndarray]:
    """Zero feeds for a session's LoRA inputs ((name, shape, numpy dtype) each) at `rank` (0: empty
    factors; a backend that compiles static shapes takes rank-1 zeros, which add exact zeros for
    finite activations): a graph with LoRA inputs runs as its base model wherever a caller feeds
    only the model's own inputs."""
    feeds = {}
    for name, shape, dtype in inputs:
        if name.startswith((INPUT_A, INPUT_B)):
            feeds[name] = np.zeros([d if isinstance(d, int) else rank for d in shape], dtype)
    return feeds


class AdapterSet:
    """The adapters a pipeline has loaded and the weights it runs them at (diffusers' API:
    load_lora_weights, set_adapters, disable_lora, unload_lora_weights). Feeds are computed once per
    change, checked whole before any runner sees them, then bound to each component's runner."""

    def __init__(
        self, slots: Mapping[str, Slots], runners: Mapping[str, Any], denoiser: str, refuse: str | None = None
    ):
        """`refuse`: why these runners cannot take adapters (one line for any load)."""
        self.slots, self.runners, self.denoiser, self.refuse = dict(slots), runners, denoiser, refuse
        self.loaded: dict[str, Adapter] = {}
        self.active: dict[str, float] = {}

    def load(self, path: str | Path, name: str | None = None) -> str:
        """Read and check a LoRA file; like diffusers, the adapter just loaded is then the only
        one active, at weight 1."""
        if not self.slots:
            raise InputError("this output takes no LoRA adapters: compile it with dd-compile --lora-rank R")
        if self.refuse:
            raise InputError(self.refuse)
        name = name or f"default_{len(self.loaded)}"
        if name in self.loaded:
            raise InputError(
                f"adapter name {name!r} is already loaded (unload_lora_weights, or another name)"
            )
        adapter = read_adapter(path, name, self.slots, self.denoiser)
        self.loaded[name] = adapter
        try:
            self.set({name: 1.0})
        except InputError:
            del self.loaded[name]
            raise
        return name

    def set(self, weights: Mapping[str, float]) -> None:
        unknown = [n for n in weights if n not in self.loaded]
        if unknown:
            raise InputError(f"adapter(s) {unknown} not loaded (loaded: {sorted(self.loaded)})")
        bad = [
            n
            for n, w in weights.items()
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w)
        ]
        if bad:
            raise InputError(f"adapter weight(s) for {bad} must be finite numbers")
        active = [(self.loaded[n], float(w)) for n, w in weights.items()]
        feeds = {c: adapter_feeds(c, s, active) for c, s in self.slots.items()}
        for c, f in feeds.items():
            self.runners[c].extra_feeds = f if active else {}
        self.active = {n: float(w) for n, w in weights.items()}

    def unload(self) -> None:
        if self.slots:
            self.set({})
        self.loaded.clear()


def parse_request_adapters(text: str, loaded: Iterable[str]) -> str:
    """A request's `adapters` (JSON {name: weight}, as set_adapters takes them) checked against the
    adapters a server loaded; the canonical JSON its batch key compares ("" for none)."""
    names = sorted(loaded)
    try:
        d = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise InputError(f'adapters: not JSON ({e.msg}); send {{"name": weight}}') from None
    if not isinstance(d, dict):
        raise InputError('adapters: a JSON object {"name": weight} is expected')
    for n, w in d.items():
        if n not in names:
            raise InputError(f"adapters: {n!r} is not loaded by this server (loaded: {names or 'none'})")
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise InputError(f"adapters: the weight of {n!r} must be a finite number, not {w!r}")
    return json.dumps({n: float(d[n]) for n in sorted(d)}) if d else ""


class ComponentAdapters:
    """One component's LoRA feeds per adapter combination (canonical JSON), computed once: what a
    served component model applies to the rows of a batch that name those adapters."""

    def __init__(self, comp: str, adapters: AdapterSet, cache: int = 16):
        self.comp, self.adapters, self.max = comp, adapters, cache
        self._feeds: dict[str, dict[str, np.ndarray]] = {}

    def feeds(self, key: str) -> dict[str, np.ndarray]:
        if not key:
            return {}
        if key not in self._feeds:
            weights = json.loads(key)
            active = [(self.adapters.loaded[n], float(w)) for n, w in weights.items()]
            if len(self._feeds) >= self.max:
                self._feeds.pop(next(iter(self._feeds)))
            self._feeds[key] = adapter_feeds(self.comp, self.adapters.slots[self.comp], active)
        return self._feeds[key]
