"""dd-compile --lora-rank R: LoRA inputs in every graph of the adapted components, and their check.

`slot_graphs` adds the inputs (optimizer/t2i/lora_slots.py) to each precision's graph of the
denoiser and the CLIP text encoders after quantization. `check_lora` validates the path a user
takes: a synthetic adapter (rank min(4, R), every slotted layer, its update 10% of the layer's
weight norm) written as a diffusers-named LoRA file, read by the runtime's own reader and fed
through the inputs, against the torch modules with that update merged into their weights, per call
(each graph, at its precision's call bar) and per image (each mix through
TextToImagePipeline.load_lora_weights, at its sample bar, vs diffusers over the merged modules).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.lora import Slots, adapter_feeds, read_adapter
from engines.safetensors_io import write_safetensors
from optimizer.t2i import precision as prec
from optimizer.t2i import validate as val
from optimizer.t2i.components import COMPONENTS
from optimizer.t2i.lora_slots import slot_graph, target_layers

log = logging.getLogger(__name__)
CHECK_RANK = 4
CHECK_IMAGES = 8  # sample parity with the adapter: at most this many images per mix
CHECK_UPDATE = 0.1  # ||B A|| / ||W|| of the synthetic adapter: a visible change, far from a new model


def adapted_components(loaded: Any, kinds: list[str]) -> dict[str, bool]:
    """Component -> whether it is a text encoder, for the components LoRA files adapt: the denoiser
    and the CLIP text encoders (T5 encoders are not adapted by the files users ship)."""
    spec = loaded.spec
    out = {}
    for kind in kinds:
        if kind == spec.denoiser:
            out[kind] = False
        elif kind.startswith("text_encoder") and type(loaded.module(kind)).__name__.startswith("CLIP"):
            out[kind] = True
    return out


def slot_graphs(
    loaded: Any, graphs: dict[tuple[str, str], prec.Graph], max_rank: int
) -> dict[tuple[str, str], Slots]:
    """LoRA inputs in every graph of the adapted components (one file per graph: bf16 shares fp32's)."""
    comps = adapted_components(loaded, sorted({k for k, _ in graphs}))
    targets = {k: target_layers(loaded.module(k), text) for k, text in comps.items()}
    done: dict[Path, Slots] = {}
    slots = {}
    for (kind, p), g in sorted(graphs.items()):
        if kind not in comps or not targets[kind]:
            continue
        if g.path not in done:
            done[g.path] = slot_graph(g.path, targets[kind], max_rank)
        slots[(kind, p)] = done[g.path]
    return slots


def synthetic_adapter(loaded: Any, slots: dict[str, Slots], seed: int) -> dict[str, np.ndarray]:
    """peft-named LoRA tensors over every slotted layer (what a diffusers save_lora_weights file holds)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for comp, s in sorted(slots.items()):
        layers = dict(loaded.module(comp).named_modules())
        # the inert layers too: merged in torch, ignored by the runtime, so one that is live fails
        shapes = {**{m: (x.features_in, x.features_out) for m, x in s.layers.items()}, **s.inert}
        for name, (fin, fout) in sorted(shapes.items()):
            r = min(CHECK_RANK, s.max_rank)
            a = (rng.standard_normal((r, fin)) / np.sqrt(fin)).astype(np.float32)
            b = rng.standard_normal((fout, r)).astype(np.float32)
            w = layers[name].weight.detach().numpy()
            b *= np.float32(CHECK_UPDATE * np.linalg.norm(w) / np.linalg.norm(b @ a))
            tensors[f"{comp}.{name}.lora_A.weight"] = a
            tensors[f"{comp}.{name}.lora_B.weight"] = b
    return tensors


def merged(loaded: Any, tensors: dict[str, np.ndarray], comps: list[str]) -> Any:
    """A LoadedPipeline whose `comps` modules have W + B A merged in (peft's merge_and_unload)."""
    import torch

    modules = dict(loaded.modules)
    for comp in comps:
        sub = COMPONENTS[comp].subfolder
        m = copy.deepcopy(loaded.module(comp))
        layers = dict(m.named_modules())
        prefix = f"{comp}."
        for key, a in tensors.items():
            if key.startswith(prefix) and key.endswith(".lora_A.weight"):
                name = key[len(prefix) : -len(".lora_A.weight")]
                b = tensors[f"{prefix}{name}.lora_B.weight"]
                with torch.no_grad():
                    layers[name].weight += torch.from_numpy(b @ a)
        modules[sub] = m
    return dataclasses.replace(loaded, modules=modules)


@dataclass(frozen=True)
class CheckIO:
    """What the check takes from the compile stages (optimizer/t2i/stages.py, which calls it)."""

    graph_path: Callable[[str, str], Path]  # (component, precision) -> the file its runner loads
    want: Callable[[Any], np.ndarray]  # diffusers pipeline -> uint8 images of the check's prompts
    got: Callable[[Any], np.ndarray]  # TextToImagePipeline -> its images of the same prompts


def check_lora(ctx: Any, mixes: dict[str, Any], vrecs: list[Any], io: CheckIO) -> None:
    """Call parity per slotted graph and sample parity per mix with the synthetic adapter; failures
    go to the mixes that use the graph (a mix compiled to take adapters must apply them right)."""
    from engines.t2i import TextToImagePipeline, component_runner
    from optimizer.t2i.reference import diffusers_pipeline

    cfg, loaded = ctx.cfg, ctx.src.student
    by_comp = {k: s for (k, _), s in ctx.lora.items()}
    tensors = synthetic_adapter(loaded, by_comp, cfg.seed)
    fused = merged(loaded, tensors, sorted(by_comp))
    make = component_runner(cfg.backend, cfg.threads)
    calls: dict[str, Any] = {}
    report: dict[str, Any] = {
        "rank": cfg.lora_rank,
        "layers": {k: len(s.layers) for k, s in by_comp.items()},
        "check": {"rank": min(CHECK_RANK, cfg.lora_rank), "update": CHECK_UPDATE},
    }
    with tempfile.TemporaryDirectory(prefix="dd-lora.") as d:
        path = Path(d) / "check.safetensors"
        write_safetensors(path, tensors)
        adapter = read_adapter(path, "check", by_comp, loaded.spec.denoiser)
        for (kind, p), slots in sorted(ctx.lora.items()):
            feeds = [f for r in vrecs for f in r.feeds(kind)]
            spec = loaded.spec.component(kind).io
            refs = val.torch_outputs(kind, fused.module(kind), feeds, spec)
            with make(f"{kind}.{p}", io.graph_path(kind, p), spec, precision=p) as r:
                r.extra_feeds = adapter_feeds(kind, slots, [(adapter, 1.0)])
                cp = val.call_parity(kind, p, r, feeds, refs, cfg.bars)
            calls[f"{kind}.{p}"] = cp
            log.info("lora call %s %s: rel. L2 %.2e over %d calls", kind, p, cp.rel_l2, cp.calls)
        report["call_parity"] = {k: v.to_dict() for k, v in calls.items()}
        want = io.want(diffusers_pipeline(fused))
        report["sample_parity"] = {}
        for variant in ctx.report["variants"]:
            mix = variant["mix"]
            with TextToImagePipeline(
                ctx.root, config=f"t2i.{mix}.json", backend=cfg.backend, threads=cfg.threads
            ) as ep:
                ep.load_lora_weights(path, "check")
                got = io.got(ep)
            sp = val.sample_parity(mix, got, want, cfg.bars)
            report["sample_parity"][mix] = sp.to_dict()
            log.info("lora sample %s: PSNR %.1f dB vs diffusers with the adapter merged", mix, sp.psnr_db)
            used = [f"{k}.{g.precision}" for k, g in mixes[mix].items()]
            failures = [f"lora {f}" for k in used if k in calls for f in calls[k].failures()]
            if not sp.passed:
                failures.append(
                    f"lora sample {mix}: PSNR {sp.psnr_db:.1f} dB < {sp.bar:g} dB "
                    "vs diffusers with the adapter merged"
                )
            variant["lora_failures"] = failures
            variant["failures"] += failures
            variant["passed"] = not variant["failures"]
    ctx.report["lora"] = report
