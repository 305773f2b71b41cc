"""Text-to-image validation, three levels (defaults below; --bar changes the call bars).

- call: every component graph vs its torch module on the inputs recorded along the student's own
  diffusers run (tokenized prompts; each UNet call with both CFG halves; the final latents);
- sample: each deployment mix's engine images vs the diffusers pipeline holding the student UNet,
  same prompts and latents (and the same LCM re-noising draws): PSNR on the uint8 images;
- distribution: the student vs the teacher at its reference steps and guidance, same prompts and
  latents: FID (the demo judge's features, or CLIP image features with --clip-model), prompt
  adherence (demo judge), CLIP score (--clip-model), paired PSNR.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.iospec import IOSpec
from optimizer.bars import ParityBars
from optimizer.compile.validate import compare_calls
from optimizer.families import FAMILIES
from optimizer.metrics import psnr_db
from optimizer.t2i.components import wrap

log = logging.getLogger(__name__)

ADHERENCE_MARGIN = 0.05  # the student's digit/colour adherence may trail the teacher's by this


@dataclass
class ComponentParity:
    """One component graph's call parity: the pixel flow's CallParity (rel. L2, non-finite count,
    Polygraphy) named by component and precision."""

    kind: str
    precision: str
    calls: int
    rel_l2: float
    max_abs: float
    cosine: float
    bar: float
    nonfinite: int = 0
    polygraphy: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(
            np.isfinite(self.rel_l2)
            and self.rel_l2 <= self.bar
            and self.nonfinite == 0
            and self.polygraphy.get("passed", True)
        )

    def failures(self) -> list[str]:
        if self.passed:
            return []
        pg = "pass" if self.polygraphy.get("passed", True) else "fail"
        return [
            f"call {self.kind}.{self.precision}: rel. L2 {self.rel_l2:.2e} (bar {self.bar:g}), "
            f"polygraphy {pg}, {self.nonfinite} non-finite"
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _flat(outs: Any) -> np.ndarray:
    """One call's outputs as one float32 vector (a graph with several outputs, SDXL's text encoder 2,
    is compared over all of them at once, in the IO spec's order)."""
    parts = outs if isinstance(outs, tuple | list) else (outs,)
    return np.concatenate([np.asarray(o, dtype=np.float32).ravel() for o in parts])


def torch_outputs(kind: str, module: Any, feeds: list[dict[str, np.ndarray]], io: IOSpec) -> list[np.ndarray]:
    wrapped = wrap(kind, module, io)
    with torch.no_grad():
        res = [wrapped(**{k: torch.from_numpy(v) for k, v in f.items()}) for f in feeds]
    return [_flat(tuple(t.numpy() for t in r) if isinstance(r, tuple) else r.numpy()) for r in res]


def call_parity(
    kind: str,
    precision: str,
    runner: Any,
    feeds: list[dict[str, np.ndarray]],
    refs: list[np.ndarray],
    bars: ParityBars,
) -> ComponentParity:
    names = runner.spec.output_names
    outs = [_flat([o[n] for n in names]) for o in (runner.infer(f) for f in feeds)]
    cp = compare_calls(refs, outs, precision, bars)
    return ComponentParity(
        kind,
        precision,
        len(feeds),
        cp.rel_l2,
        cp.max_abs,
        cp.cosine,
        cp.bar_rel_l2,
        cp.nonfinite,
        cp.polygraphy,
    )


@dataclass
class SampleParity:
    mix: str
    psnr_db: float
    bar: float
    n: int

    @property
    def passed(self) -> bool:
        return bool(self.psnr_db >= self.bar)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def default_bars() -> ParityBars:
    """The pixel flow's call bars with the family's uint8-image sample bars."""
    bars = ParityBars()
    return ParityBars(sample_psnr_db={**bars.sample_psnr_db, **FAMILIES["sd"].sample_psnr_db})  # sdxl: same


def sample_bar(mix: str, bars: ParityBars) -> float:
    """The uint8-image bar of a mix: the bars the run was given (`--bar sample.<p>=DB` included)."""
    return bars.sample_psnr_db[mix]


def sample_parity(
    mix: str, engine_images: np.ndarray, torch_images: np.ndarray, bars: ParityBars | None = None
) -> SampleParity:
    p = psnr_db(engine_images.astype(np.float64), torch_images.astype(np.float64), data_range=255.0)
    return SampleParity(mix, p, sample_bar(mix, bars or default_bars()), len(engine_images))


# image tasks validated per mix like text-to-image: from the torch student's own images, a strength
# that keeps part of the schedule, and a cell-aligned hole over the middle half (inpainting)
TASK_STRENGTH = 0.75


def task_inputs(images: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """(source images, inpainting masks): the torch student's uint8 images and a white box over
    their middle half, snapped to `cell` pixels (the latent grid the blend happens on)."""
    n, h, w = images.shape[:3]
    masks = np.zeros((n, h, w), np.uint8)
    y0, x0 = h // 4 // cell * cell, w // 4 // cell * cell
    y1, x1 = max(-(-3 * h // 4 // cell) * cell, y0 + cell), max(-(-3 * w // 4 // cell) * cell, x0 + cell)
    masks[:, y0:y1, x0:x1] = 255
    return np.ascontiguousarray(images), masks


def task_strength(steps: int) -> float:
    """TASK_STRENGTH, or 1.0 where it would keep no step (int(steps * strength) = 0)."""
    return TASK_STRENGTH if int(steps * TASK_STRENGTH) >= 1 else 1.0


def to_pm1(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (what the judges read)."""
    return (images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


@dataclass
class Distribution:
    n: int
    teacher: dict[str, Any]  # {"steps", "guidance_scale"}
    student: dict[str, Any]
    paired_psnr_db: float
    feature_space: str | None = None
    fid_student: float | None = None
    fid_teacher: float | None = None
    adherence_student: dict[str, float] | None = None
    adherence_teacher: dict[str, float] | None = None
    clip_score_student: float | None = None
    clip_score_teacher: float | None = None
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge(
    student: np.ndarray,
    teacher: np.ndarray,
    prompts: list[str],
    examples: list[Any] | None,
    bars: ParityBars,
    info: dict[str, Any],
    clip_model: Path | None = None,
) -> Distribution:
    """Student vs teacher images (uint8, same prompts and latents) judged by the demo's classifier
    when `examples` name each prompt's digit and colour, and by CLIP with `clip_model`."""
    from optimizer.compile.quality import frechet_distance, paired_psnr

    s, t = to_pm1(student), to_pm1(teacher)
    d = Distribution(len(s), info["teacher"], info["student"], paired_psnr(s, t))
    if d.paired_psnr_db < bars.min_paired_psnr_db:
        d.failures.append(
            f"distribution: paired PSNR to the teacher {d.paired_psnr_db:.1f} dB < {bars.min_paired_psnr_db}"
        )
    fid_bar = None
    if examples is not None:
        from optimizer.demo.t2i.classifier import load_judge
        from optimizer.demo.t2i.evaluate import real_images

        j = load_judge()
        real_feats = j(real_images(2000, 7)[0])
        d.feature_space = "demo digit-and-colour classifier (64-d) vs 2000 real rendered digits"
        d.fid_student = frechet_distance(j(s), real_feats)
        d.fid_teacher = frechet_distance(j(t), real_feats)
        d.adherence_student = j.adherence(s, examples).to_dict()
        d.adherence_teacher = j.adherence(t, examples).to_dict()
        fid_bar = bars.fid_margin * d.fid_teacher
        for key in ("digit", "colour"):
            lo = d.adherence_teacher[key] - ADHERENCE_MARGIN
            if d.adherence_student[key] < lo:
                d.failures.append(
                    f"distribution: {key} adherence {d.adherence_student[key]:.3f} < teacher's "
                    f"{d.adherence_teacher[key]:.3f} - {ADHERENCE_MARGIN}"
                )
    if clip_model is not None:
        from optimizer.t2i.clip_score import ClipJudge

        cj = ClipJudge(clip_model)
        fs, ft = cj.image_features(student), cj.image_features(teacher)
        d.clip_score_student = cj.score(fs, prompts)
        d.clip_score_teacher = cj.score(ft, prompts)
        if examples is None:  # no better feature space: FID of the CLIP image embeddings
            d.feature_space = f"CLIP image embeddings ({clip_model}), student vs teacher"
            d.fid_student = frechet_distance(fs, ft)
    if fid_bar is not None and d.fid_student > fid_bar:
        d.failures.append(
            f"distribution: FID {d.fid_student:.1f} > {bars.fid_margin} x the teacher's {d.fid_teacher:.1f}"
        )
    return d
