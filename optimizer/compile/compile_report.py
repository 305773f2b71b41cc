"""The compile report: an object first (`bool(report)` is pass/fail), then JSON and Markdown.
Only the CLI turns it into an exit code."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class VariantResult:
    backend: str
    precision: str
    path: str
    parity: dict[str, Any] = field(default_factory=dict)  # {"call": {...}, "sample": {...}}
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # level -> b -> median
    timings: dict[str, Any] = field(default_factory=dict)  # full stats (p10/p50/p90/p99, n)
    speedup_vs_teacher: dict[str, dict[int, float]] = field(default_factory=dict)
    precision_info: dict[str, Any] = field(default_factory=dict)  # from the quantize stage
    passed: bool = False
    recommended: bool = False
    failures: list[str] = field(default_factory=list)


@dataclass
class CompileReport:
    student: dict[str, Any]
    teacher: dict[str, Any]
    variants: list[VariantResult] = field(default_factory=list)
    distribution: dict[str, Any] | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # findings a user should read (e.g. INT8 pay-off)
    threads: dict[str, Any] | None = None  # the threads grid (optimizer.threads_grid.summary)
    seconds: float = 0.0
    run_id: str | None = None  # the dd-compile run that wrote it (the manifest's run.id)

    @property
    def failures(self) -> list[str]:
        out = [f"{v.backend}/{v.precision}: {f}" for v in self.variants for f in v.failures]
        if self.distribution and not self.distribution.get("passed", True):
            out += [f"distribution: {n}" for n in self.distribution.get("notes", [])]
        return out

    @property
    def passed(self) -> bool:
        return bool(self.variants) and not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def recommend(self) -> VariantResult | None:
        """Flag the fastest passing variant at the largest batch (per call)."""
        ok = [v for v in self.variants if v.passed and v.latency_ms.get("per_call")]
        for v in self.variants:
            v.recommended = False
        if not ok:
            return None
        b = max(max(v.latency_ms["per_call"]) for v in ok)
        best = min(ok, key=lambda v: v.latency_ms["per_call"].get(b, float("inf")))
        best.recommended = True
        self._precision_payoff(b, best)
        return best

    def _precision_payoff(self, b: int, best: VariantResult) -> None:
        """Say plainly when a lower precision does not pay for itself on this target."""
        by = {(v.backend, v.precision): v for v in self.variants}
        for (backend, p), v in by.items():
            base = by.get((backend, "fp32"))
            if p == "fp32" or base is None or b not in v.latency_ms.get("per_call", {}):
                continue
            ratio = base.latency_ms["per_call"][b] / v.latency_ms["per_call"][b]
            if ratio < 1.1 and v is best:
                self.notes.append(
                    f"{p} is the fastest variant that passes, but only {ratio:.2f}x fp32 "
                    f"on {backend} here (per call, batch {b}): within measurement noise"
                )
            elif ratio < 1.1:
                self.notes.append(
                    f"{p} runs at {ratio:.2f}x the speed of fp32 on {backend} here (per call, batch {b}): "
                    f"it does not pay off on this target; recommended: {best.backend} {best.precision}"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {"passed": self.passed, "failures": self.failures, **d}
        return json.loads(json.dumps(d, default=str))  # int dict keys -> str, numpy -> str

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        t = self.teacher
        lines = [f"# dd-compile report: {'PASSED' if self.passed else 'FAILED'}", ""]
        lines.append(
            f"Student: `{self.student.get('path')}` ({self.student.get('model_class')}, "
            f"{self.student.get('steps')} {self.student.get('sampler')} steps, "
            f"{self.student.get('params', 0):,} params)  "
        )
        if t.get("available"):
            lines.append(
                f"Teacher: `{t.get('path')}`, reference {t.get('reference_sampler')} "
                f"{t.get('reference_steps')} steps"
            )
        else:
            lines.append(f"Teacher: skipped ({t.get('reason')})")
        lines += [
            "",
            "| variant | call rel. L2 | max abs | cosine | sample PSNR dB | "
            "per call ms (b) | speedup per call | end to end ms | speedup e2e | pass |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in self.variants:
            c, s = v.parity.get("call", {}), v.parity.get("sample", {})
            pc, e2e = v.latency_ms.get("per_call", {}), v.latency_ms.get("end_to_end", {})
            sp_pc = v.speedup_vs_teacher.get("per_call", {})
            sp_e2e = v.speedup_vs_teacher.get("end_to_end", {})
            fmt = lambda d, f: (  # noqa: E731
                " / ".join(f"{'n/a' if x is None else f.format(x)} ({b})" for b, x in d.items()) or "-"
            )
            name = f"{v.backend} {v.precision}" + (" **recommended**" if v.recommended else "")
            lines.append(
                f"| {name} | {c.get('rel_l2', float('nan')):.2e} | {c.get('max_abs', float('nan')):.2e} "
                f"| {c.get('cosine', float('nan')):.6f} | {s.get('psnr_db', float('nan')):.1f} "
                f"| {fmt(pc, '{:.2f}')} | {fmt(sp_pc, '{:.2f}x')} | {fmt(e2e, '{:.1f}')} "
                f"| {fmt(sp_e2e, '{:.1f}x')} | {'yes' if v.passed else 'NO'} |"
            )
        if self.distribution:
            d = self.distribution
            lines += [
                "",
                f"Distribution ({d['feature_space']}, {d['n_samples']} samples): "
                f"paired PSNR to the teacher {d['paired_psnr_db']:.1f} dB",
            ]
            for k in ("fid_student", "fid_teacher", "fid_teacher_low_steps", "fid_student_vs_teacher"):
                if d.get(k) is not None:
                    lines.append(f"- {k.replace('_', ' ')}: {d[k]:.2f}")
        for v in self.variants:
            info = v.precision_info
            kept = info.get("kept_float") or []
            if info:
                counts = ", ".join(f"{k} {n}" for k, n in info.get("counts", {}).items())
                lines += [
                    "",
                    f"**{v.precision}** nodes by precision: {counts}; {len(kept)} node(s) kept in float",
                ]
                for n in kept[:25]:
                    fig = n.get("figure")
                    lines.append(
                        f"- `{n.get('name')}` {n.get('op_type', '')} `{n.get('module', '')}`: "
                        f"{n.get('reason', '')}"
                        + (f" ({fig:.3g})" if fig is not None else "")
                        + (f" {n['note']}" if n.get("note") else "")
                    )
                if len(kept) > 25:
                    lines.append(f"- ... {len(kept) - 25} more in report.json")
        if self.threads:
            from optimizer.threads_grid import table_rows

            th, rows = self.threads, table_rows(self.threads)
            lines += [
                "",
                f"Per call at threads {th['grid']} ({th['cores']} cores; ~ = median not stable):",
                "",
            ]
            lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
            lines += [""] + [f"- {v['verdict']}" for v in th["verdicts"].values()]
            rec = th["recommendation"]
            lines.append(f"- serves best: {rec['summary'] if rec else 'no passing, stable point'}")
        if self.notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        if self.skipped:
            lines += ["", "Skipped:"] + [f"- {s}" for s in self.skipped]
        if self.failures:
            lines += ["", "Failures:"] + [f"- {f}" for f in self.failures]
        env = self.environment
        lines += [
            "",
            f"Environment: {env.get('cpu', '')}, "
            f"{env.get('threads') or 'default'} threads of {env.get('cores')} cores, "
            + ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items()),
        ]
        return "\n".join(lines) + "\n"


def environment(threads: int | None = None) -> dict[str, Any]:
    import importlib.metadata as md
    import os

    libs = {}
    for pkg in ("torch", "diffusers", "onnx", "onnxruntime", "polygraphy", "tensorrt"):
        try:
            libs[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": libs,
    }
