"""Text-to-image speed, side by side in one process (optimizer/timing.py's loop).

The baseline is the teacher as users run it: the diffusers pipeline at its reference steps and
guidance, prompt in, uint8 image out. Each compiled mix runs the same way through
engines/t2i.py. Per component: one text-encoder call, the UNet at its batch (2B under CFG) x the
number of calls a generation makes, one VAE decode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engines.iospec import DimRange, IOSpec
from optimizer.t2i.components import DENOISERS, dummy_inputs
from optimizer.t2i.reference import latent_channels, native_size, teacher_mode
from optimizer.t2i.workload import Workload
from optimizer.timing import StopRule, comparable, time_until_stable

log = logging.getLogger(__name__)
TEXT_TO_IMAGE = Workload()


@dataclass(frozen=True)
class T2ISpeedConfig:
    batch_sizes: tuple[int, ...] = (1, 4)
    max_seconds: float = 6.0  # per batch size, per level
    min_rounds: int = 3


class Generation:
    """A compiled pipeline as a runner-like "call" of one whole generation (prompts in, images
    out) for the threads grid and dd-bench: feeds {"batch": B} -> B images."""

    def __init__(self, pipe: Any, steps: int, g: float, prompts: list[str]):
        self.pipe, self.steps, self.g, self.prompts = pipe, steps, g, prompts
        self.workload = Workload.of_pipeline(pipe)  # an inpainting UNet's output inpaints

    def infer(self, feeds: dict[str, np.ndarray], check: bool = False) -> Any:
        b = int(feeds["batch"])
        ps = (self.prompts * b)[:b]
        more = self.workload.engine_kwargs(0, b, self.pipe.image_shape[:2])
        return self.pipe(
            ps, seeds=list(range(b)), guidance_scale=self.g, num_inference_steps=self.steps, **more
        )

    def deactivate(self) -> None:
        self.pipe.close()


def stop_rule(cfg: T2ISpeedConfig) -> StopRule:
    return StopRule(warmup=1, min_rounds=cfg.min_rounds, max_seconds=cfg.max_seconds, min_samples=3)


def _median(d: dict[str, Any]) -> float:
    return float(d["median_ms"])


def measure(
    teacher: tuple[Any, int, float] | None,
    variants: dict[str, tuple[Any, int, float]],
    prompts: list[str],
    cfg: T2ISpeedConfig,
    size: tuple[int, int] | None = None,
    workload: Workload = TEXT_TO_IMAGE,
) -> dict[str, Any]:
    """{"end_to_end": {name: {batch: timing}}, "per_component": {name: {batch: {component: ms}}},
    "unet_calls": {name: n}} for the diffusers teacher (pipe, steps, guidance) and each engine mix;
    an inpainting `workload`: every one inpaints its sources at `size`."""
    from optimizer.t2i.reference import images as torch_images

    out: dict[str, Any] = {"end_to_end": {}, "per_component": {}, "unet_calls": {}}
    for b in cfg.batch_sizes:
        ps = (prompts * b)[:b]
        fns: dict[str, Callable[[], object]] = {}
        if teacher is not None:
            pipe, steps, g = teacher
            k, c = pipe.vae_scale_factor, latent_channels(pipe)
            h, w = size or native_size(
                pipe
            )  # the compiled size; the fresh-process teacher draws the same latents
            lat = np.random.default_rng(0).standard_normal((b, c, h // k, w // k), dtype=np.float32)
            fns["teacher"] = lambda pipe=pipe, ps=ps, lat=lat, s=steps, g=g: torch_images(pipe, ps, lat, s, g)
            if workload.inpaint:
                fns["teacher"] = lambda pipe=pipe, ps=ps, s=steps, g=g, hw=(h, w): workload.torch_images(
                    pipe, ps, list(range(len(ps))), s, g, 0, hw
                )
        for name, (p, steps, g) in variants.items():
            more = workload.engine_kwargs(0, b, size or p.image_shape[:2])
            fns[name] = lambda p=p, ps=ps, s=steps, g=g, more=more: p(
                ps, seeds=list(range(len(ps))), guidance_scale=g, num_inference_steps=s, **more
            )
        run = time_until_stable(fns, stop_rule(cfg))
        for name, t in run.timings.items():
            out["end_to_end"].setdefault(name, {})[b] = t.to_dict()
        if teacher is not None:
            out["per_component"].setdefault("teacher", {})[b] = _teacher_components(teacher, b, cfg, size)
        for name, (p, steps, g) in variants.items():
            out["per_component"].setdefault(name, {})[b] = _engine_components(p, b, steps, g, cfg)
    if teacher is not None:
        out["unet_calls"]["teacher"] = _calls(None, teacher_mode(teacher[0]), teacher[1], teacher[2])
    for name, (p, steps, g) in variants.items():
        out["unet_calls"][name] = _calls({}, p.config.guidance, steps, g)
    return out


def _calls(_cfg: Any, mode: str, steps: int, g: float) -> dict[str, int]:
    cfg_batch = mode == "cfg" and g > 1
    return {
        "calls": steps,
        "batch_multiplier": 2 if cfg_batch else 1,
        "image_unet_evals": steps * (2 if cfg_batch else 1),
    }


def _feeds(
    specs: dict[str, IOSpec], b: int, ub: int, lat: tuple[int, int]
) -> dict[str, dict[str, np.ndarray]]:
    """Random inputs per component at batch b (the UNet's: ub) and latent size `lat`, from the IO specs
    (each family's inputs: SDXL's pooled embedding and time ids included)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, spec in specs.items():
        if name == "vae_encoder":  # image-to-image only: not part of a text-to-image generation
            continue
        sizes = {k: r.opt for k, r in spec.dims.items()}
        sizes.update(batch=ub if name in DENOISERS else b, latent_height=lat[0], latent_width=lat[1])
        fixed = IOSpec(
            spec.family, spec.inputs, spec.outputs, {k: DimRange(v, v, v) for k, v in sizes.items()}
        )
        out[name] = dummy_inputs(fixed, rng, "opt")
    return out


def _per_component(m: dict[str, float], steps: int, n_text: int, ub: int) -> dict[str, float]:
    text = [k for k in m if k.startswith("text_encoder")]
    den = next(k for k in m if k in DENOISERS)  # the UNet, or SD3's transformer (same columns)
    return {
        "text_encoder_ms": n_text * sum(m[k] for k in text),  # every text encoder, both CFG halves
        "unet_call_ms": m[den],
        "unet_total_ms": steps * m[den],
        "vae_decoder_ms": m["vae_decoder"],
        "unet_batch": ub,
    }


def _teacher_components(
    teacher: tuple[Any, int, float], b: int, cfg: T2ISpeedConfig, size: tuple[int, int] | None
) -> dict[str, float]:
    """The diffusers teacher's modules, each called alone as in its pipeline (in-run figures)."""
    from optimizer.families import family_of_pipeline
    from optimizer.t2i.components import COMPONENTS, Profile, build_specs, wrap

    pipe, steps, g = teacher
    family = family_of_pipeline(type(pipe).__name__)
    mode = teacher_mode(pipe)
    embedded = mode == "embedded"
    do_cfg = g > 1 and mode == "cfg"
    ub = 2 * b if do_cfg else b
    k = pipe.vae_scale_factor
    h, w = size or native_size(pipe)
    modules = {c: getattr(pipe, COMPONENTS[c].subfolder) for c in family.components}
    configs = {
        c: dict(m.config.to_dict() if hasattr(m.config, "to_dict") else m.config) for c, m in modules.items()
    }
    profile = Profile(tokens=pipe.tokenizer.model_max_length, t5_tokens=family.max_sequence_length)
    specs = build_specs(configs, profile, "embedded" if embedded else "cfg", family.conditioning)
    feeds = _feeds(specs, b, ub, (h // k, w // k))
    fns = {}
    for c, m in modules.items():
        wrapped = wrap(c, m, specs[c])
        tf = {n: torch.from_numpy(v) for n, v in feeds[c].items()}
        fns[c] = torch.no_grad()(lambda wrapped=wrapped, tf=tf: wrapped(**tf))
    run = time_until_stable(fns, stop_rule(cfg))
    return _per_component({c: t.median_ms for c, t in run.timings.items()}, steps, 2 if do_cfg else 1, ub)


def _engine_components(p: Any, b: int, steps: int, g: float, cfg: T2ISpeedConfig) -> dict[str, float]:
    specs = p.specs
    do_cfg = p.config.guidance == "cfg" and g > 1
    ub = 2 * b if do_cfg else b
    den = specs[p.config.denoiser]
    lat = den.dims["latent_height"].opt, den.dims["latent_width"].opt
    feeds = _feeds({n: specs[n] for n in p.config.required}, b, ub, lat)
    r = p.runners
    run = time_until_stable(
        {n: (lambda n=n: r[n].infer(feeds[n])) for n in feeds},
        stop_rule(cfg),
    )
    return _per_component({n: t.median_ms for n, t in run.timings.items()}, steps, 2 if do_cfg else 1, ub)


def baseline(timings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The teacher figure each speedup divides: the fresh-process one (teacher_baseline.judge) when
    it ran, else the in-run one."""
    return timings.get("teacher_baseline") or timings["end_to_end"].get("teacher") or {}


def fresh_baseline(timings: dict[str, Any], req: Any, in_run_threads: int) -> None:
    """Time the teacher alone in a fresh process (after this process's runtimes are released) and
    record the judged figure as timings["teacher_baseline"]; in-run and fresh figures are both kept."""
    from optimizer.compile import teacher_baseline as tb

    in_run = {"end_to_end": timings["end_to_end"]["teacher"]}
    from optimizer.t2i.teacher_timing import MODULE

    fresh, why = tb.fresh_teacher_timing(req, module=MODULE)
    timings["teacher_baseline"] = tb.judge(in_run, fresh, in_run_threads, why)["end_to_end"]


def speedups(timings: dict[str, Any], name: str) -> dict[int, float | None]:
    """End-to-end teacher median / variant median per batch size; None where either median is not
    stable or has too few repeats (the reason is in timings["speedup_null_reason"][name][b])."""
    base = baseline(timings)
    if not base:
        return {}
    out: dict[int, float | None] = {}
    for b, t in timings["end_to_end"][name].items():
        why = comparable(base.get(b), t, min_samples=3)
        timings.setdefault("speedup_null_reason", {}).setdefault(name, {})[b] = why
        out[b] = None if why else _median(base[b]) / _median(t)
    return out


def table(timings: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows: name, batch, end-to-end ms, x teacher, text encoder ms, UNet ms (calls x batch), VAE ms."""
    rows = [("pipeline", "batch", "e2e ms", "x teacher", "text enc ms", "UNet ms (calls x batch)", "VAE ms")]
    for name, per_b in timings["end_to_end"].items():
        sp = speedups(timings, name) if name != "teacher" else {}
        if name == "teacher" and timings.get("teacher_baseline"):  # the figure speedups divide
            per_b = {b: timings["teacher_baseline"].get(b, t) for b, t in per_b.items()}
        for b, t in per_b.items():
            comp = timings["per_component"].get(name, {}).get(b, {})
            calls = timings["unet_calls"].get(name, {}).get("calls", 0)
            ub = comp.get("unet_batch", "-")
            rows.append(
                (
                    name,
                    str(b),
                    f"{_median(t):.1f}",
                    f"{sp[b]:.1f}x" if sp.get(b) else "-",
                    f"{comp.get('text_encoder_ms', float('nan')):.2f}",
                    f"{comp.get('unet_total_ms', float('nan')):.1f} ({calls} x {ub})",
                    f"{comp.get('vae_decoder_ms', float('nan')):.2f}",
                )
            )
    return rows
