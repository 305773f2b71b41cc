"""Stage `validate`: parity at three levels and speedup against the PyTorch teacher.

Running, comparing and judging are separate (after polygraphy's Comparator): the functions here
return plain result objects whose `passed` says pass/fail against configurable bars.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engines.base import Runner
from engines.schedule import Sampler, SamplingSchedule

# ParityBars lives in optimizer/bars.py: the quantizers need it and sit below compile/
from optimizer.bars import ParityBars
from optimizer.metrics import cosine, max_abs, psnr_db, rel_l2
from optimizer.process import polygraphy_quiet

log = logging.getLogger(__name__)
# frozen; a module-level default because ruff's B008 sees ParityBars as immutable only in its own module
DEFAULT_BARS = ParityBars()


@dataclass
class CallParity:
    rel_l2: float
    max_abs: float
    cosine: float
    nonfinite: int
    n_calls: int
    polygraphy: dict[str, Any]
    bar_rel_l2: float
    passed: bool

    def failures(self) -> list[str]:
        """Why it failed, one line per check ([] when it passed)."""
        if self.passed:
            return []
        return [
            f"call-level rel. L2 {self.rel_l2:.2e} (bar {self.bar_rel_l2:.0e}), "
            f"polygraphy {'pass' if self.polygraphy['passed'] else 'fail'}, "
            f"{self.nonfinite} non-finite"
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _polygraphy_compare(
    refs: list[np.ndarray], outs: list[np.ndarray], atol: float, rtol: float
) -> dict[str, Any]:
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc

    rr = RunResults()
    # polygraphy views arrays when aligning shapes: it needs them contiguous (a sliced output is not)
    rr.append(
        (
            "reference",
            [IterationResult({"y": np.ascontiguousarray(r)}, runner_name="reference") for r in refs],
        )
    )
    rr.append(
        (
            "candidate",
            [IterationResult({"y": np.ascontiguousarray(o)}, runner_name="candidate") for o in outs],
        )
    )
    with polygraphy_quiet():
        acc = Comparator.compare_accuracy(
            rr, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="median")
        )[0]
    iters = next(iter(acc.values()))
    res = [it["y"] for it in iters]
    return {
        "passed": bool(acc),
        "atol": atol,
        "rtol": rtol,
        "check_error_stat": "median",
        "median_absdiff": float(max(r.median_absdiff for r in res)),
        "max_absdiff": float(max(r.max_absdiff for r in res)),
    }


def call_parity(
    reference: Runner,
    candidate: Runner,
    feeds: list[dict[str, np.ndarray]],
    precision: str,
    bars: ParityBars = DEFAULT_BARS,
) -> CallParity:
    """Same inputs to both runners (inputs along the student's trajectory, all its timesteps)."""
    out_name = reference.spec.output_names[0]
    refs, outs = [], []
    for f in feeds:
        refs.append(reference.infer(f)[out_name])
        outs.append(candidate.infer(f)[out_name].astype(np.float32))
    return compare_calls(refs, outs, precision, bars)


def compare_calls(
    refs: list[np.ndarray], outs: list[np.ndarray], precision: str, bars: ParityBars = DEFAULT_BARS
) -> CallParity:
    """Candidate outputs vs reference outputs of the same calls: rel. L2, max abs, cosine, the
    non-finite count and Polygraphy's verdict, against the precision's bars (every family)."""
    ref, out = np.concatenate([r.ravel() for r in refs]), np.concatenate([o.ravel() for o in outs])
    nonfinite = int((~np.isfinite(out)).sum())
    err, mx, cos = rel_l2(out, ref), max_abs(out, ref), cosine(out, ref)  # inf, inf, nan if nonfinite
    pg = _polygraphy_compare(refs, outs, bars.polygraphy_atol[precision], bars.polygraphy_rtol[precision])
    bar = bars.call_rel_l2[precision]
    return CallParity(
        err, mx, cos, nonfinite, len(outs), pg, bar, passed=nonfinite == 0 and err <= bar and pg["passed"]
    )


@dataclass
class SampleParity:
    psnr_db: float
    rel_l2: float
    n_samples: int
    bar_psnr_db: float
    passed: bool

    def failures(self) -> list[str]:
        """Why it failed ([] when it passed)."""
        return [] if self.passed else [f"sample PSNR {self.psnr_db:.1f} dB < {self.bar_psnr_db} dB"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_parity(
    reference_samples: np.ndarray,
    schedule: SamplingSchedule,
    candidate: Runner,
    noise: np.ndarray,
    step_noise: np.ndarray | None,
    precision: str,
    cond: dict[str, np.ndarray] | None = None,
    max_batch: int | None = None,
    bars: ParityBars = DEFAULT_BARS,
) -> tuple[SampleParity, np.ndarray]:
    """Candidate's sampler vs the torch student's samples, from the same noise."""
    sampler = Sampler(schedule, candidate, output_name=candidate.spec.output_names[0], max_batch=max_batch)
    samples = sampler(noise, step_noise, cond)
    finite = bool(np.isfinite(samples).all())
    p, e = psnr_db(samples, reference_samples), rel_l2(samples, reference_samples)  # -inf, inf if not finite
    bar = bars.sample_psnr_db[precision]
    return SampleParity(p, e, len(samples), bar, passed=finite and p >= bar), samples


@dataclass
class Distribution:
    """Student vs teacher: paired PSNR from the same noise and FID in a feature space."""

    feature_space: str
    paired_psnr_db: float  # student vs teacher reference sampler, same noise
    fid_student: float | None = None  # vs real data where the tool has it (demo digits)
    fid_teacher: float | None = None  # teacher reference sampler vs real data
    fid_teacher_low_steps: float | None = None  # teacher DDIM at the student's step count
    fid_student_vs_teacher: float | None = None  # where no real data: distance to teacher samples
    n_samples: int = 0
    fid_margin: float | None = None
    min_paired_psnr_db: float | None = None
    passed: bool = True
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nonfinite_samples(x: np.ndarray) -> int:
    return int((~np.isfinite(x.reshape(len(x), -1))).any(axis=1).sum())


def distribution(
    student: np.ndarray,
    teacher: np.ndarray,
    teacher_low: np.ndarray | None,
    extractor: Any,
    real: np.ndarray | None,
    feature_space: str,
    bars: ParityBars = DEFAULT_BARS,
) -> Distribution:
    from optimizer.compile.quality import fid

    # Non-finite samples (NaN weights, an overflowing graph) have no FID: that score is a failed,
    # named result, never an exception from the feature extractor.
    sets = {"student": student, "teacher": teacher, "teacher at the student's steps": teacher_low}
    bad = {k: _nonfinite_samples(v) for k, v in sets.items() if v is not None}
    finite_pair = not bad["student"] and not bad["teacher"]
    d = Distribution(
        feature_space=feature_space,
        paired_psnr_db=psnr_db(student, teacher) if finite_pair else float("-inf"),
        n_samples=len(student),
        fid_margin=bars.fid_margin,
        min_paired_psnr_db=bars.min_paired_psnr_db,
    )
    for k, n in bad.items():
        if n:
            d.passed = False
            d.notes.append(f"{k}: {n} of {len(sets[k])} samples have NaN/Inf values: no FID for them")

    def score(x: np.ndarray | None, ref: np.ndarray, name: str) -> float | None:
        return None if x is None or bad.get(name) else float(fid(x, ref, extractor))

    if real is not None:
        d.fid_student = score(student, real, "student")
        d.fid_teacher = score(teacher, real, "teacher")
        d.fid_teacher_low_steps = score(teacher_low, real, "teacher at the student's steps")
        if d.fid_student is not None and d.fid_teacher is not None:
            if d.fid_student > bars.fid_margin * d.fid_teacher:
                d.passed = False
                d.notes.append(
                    f"student FID {d.fid_student:.2f} > {bars.fid_margin} x teacher {d.fid_teacher:.2f}"
                )
    else:
        d.fid_student_vs_teacher = float(fid(student, teacher, extractor)) if finite_pair else None
        d.notes.append("no real data for this model: FID is measured against the teacher's samples")
    if d.paired_psnr_db < bars.min_paired_psnr_db:
        d.passed = False
        d.notes.append(f"paired PSNR to the teacher {d.paired_psnr_db:.1f} dB < {bars.min_paired_psnr_db} dB")
    return d
