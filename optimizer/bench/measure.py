"""Measure every variant side by side: warm-up, interleaved rounds (A B A B ...) until each median
is stable or the time budget ends, per-call and end-to-end, with memory, FLOP/s and peak.

CPU timings are `time.perf_counter` around whole `runner.infer` calls (numpy in, numpy out: what a
user of `engines` sees); GPU runners return host arrays, so each call ends synchronized.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import DDCompileError, InputError
from engines.fileio import sha256_file
from engines.iospec import random_feeds
from engines.manifest import Manifest
from engines.schedule import Sampler, draw_noise
from optimizer import timing
from optimizer.bench.fingerprint import fingerprint, target_name
from optimizer.bench.flops import matmul_peak_gflops
from optimizer.bench.schema import BENCH_FORMAT, BENCH_VERSION
from optimizer.bench.variants import BenchContext, VariantSpec, cuda_available, discover
from optimizer.timing import StopRule, Timing, TimingRun

log = logging.getLogger(__name__)
TEACHER_BASELINE = "teacher/torch-eager/fp32"  # speedups are relative to this row


@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8)
    seconds: float = 60.0  # timing budget for all (phase, batch) groups; setup and probes extra
    threads: int | None = None  # intra-op threads for ORT and torch (None: the usable cores)
    device: str = "auto"  # "auto" (cuda if torch sees one), "cpu", "cuda"
    backends: tuple[str, ...] | None = None  # None: every backend usable here
    teacher: bool = True  # time the PyTorch teacher baselines
    teacher_path: str | None = None  # None: the manifest's meta["teacher"]["path"]
    compile: str = "auto"  # torch.compile baseline: "auto" (GPU only), "on", "off"
    memory: bool = True  # peak-memory probe, one fresh process per variant
    warmup: int = 2  # untimed calls per variant and batch size
    min_rounds: int = 3
    max_rounds: int = 200
    # stable (optimizer.timing): >= min_samples samples, median of the last half within rel_tol of
    # the whole median; speedups are stated only between stable timings
    min_samples: int = 5
    rel_tol: float = 0.05
    slice_s: float = 0.05  # per round, a variant repeats its call for at least this long
    fresh_teacher: bool = True  # re-time the teacher baseline in its own process
    agree_tol: float = 0.10  # in-run vs fresh-process teacher medians
    peak_seconds: float = 1.5  # matmul peak measurement per dtype
    seed: int = 0
    progress: bool = True  # tqdm bar on stderr while measuring
    target: str | None = None  # column name in merge tables (None: derived from the fingerprint)
    # per-call timing of each CPU student variant at each of these thread counts, one session per
    # count (optimizer.threads_grid); None: 1 and every usable core; (): not measured
    threads_grid: tuple[int, ...] | None = None  # budget per batch: a (phase, batch) group's share

    def rule(self, budget_s: float, warmup: int, min_rounds: int | None = None) -> StopRule:
        return StopRule(
            warmup=warmup,
            min_rounds=self.min_rounds if min_rounds is None else min_rounds,
            max_rounds=self.max_rounds,
            min_samples=self.min_samples,
            rel_tol=self.rel_tol,
            max_seconds=budget_s,
            slice_s=self.slice_s,
        )


def time_until_stable(
    fns: dict[str, Callable[[], object]],
    budget_s: float,
    cfg: BenchConfig,
    *,
    warmup: int,
    desc: str = "",
    min_rounds: int | None = None,
) -> TimingRun:
    """optimizer.timing's loop with dd-bench's rule and a progress bar: interleaved rounds, in each
    every variant runs for >= cfg.slice_s, until every median is stable or the budget is spent."""
    from tqdm import tqdm

    with tqdm(
        total=round(budget_s, 1),
        desc=desc,
        unit="s",
        leave=False,
        disable=not cfg.progress,
        file=sys.stderr,
        bar_format="{desc}: {bar} {n:.0f}/{total:.0f}s {postfix}",
    ) as bar:

        def show(run: TimingRun) -> None:
            bar.n = min(run.seconds, budget_s)
            bar.set_postfix_str(f"round {run.rounds}, {sum(run.stable.values())}/{len(run.stable)} stable")

        return timing.time_until_stable(fns, cfg.rule(budget_s, warmup, min_rounds), on_round=show)


def probe_memory(
    manifest_dir: Path, v: VariantSpec, ctx: BenchContext, timeout: float = 300
) -> dict[str, Any]:
    """Run optimizer.bench.memprobe for `v` in a fresh process (its docstring: the meaning)."""
    if v.backend == "torch-compile":
        return {
            "method": "not probed: compiling again in a fresh process would double the "
            "compile time; expect the eager figure plus compiled code"
        }
    req = {
        "manifest": str(manifest_dir),
        "variant": v.to_dict(),
        "batch_sizes": list(ctx.batch_sizes),
        "threads": ctx.threads,
        "teacher": str(ctx.teacher_path) if ctx.teacher_path else None,
    }
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run(
            [sys.executable, "-m", "optimizer.bench.memprobe", json.dumps(req)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"method": f"probe timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": f"probe failed: {last[:300]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return root / p  # relative paths in the manifest: relative to out/ when not to the cwd


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _count_flops(ctx: BenchContext, cfg: BenchConfig, root: Path) -> dict[str, Any]:
    """FLOPs per image per call: the manifest's record if the pipeline stored one, else counted."""
    from optimizer.bench.flops import count_flops
    from optimizer.models import Denoiser

    out: dict[str, Any] = {
        "student": None,
        "teacher": None,
        "method": "torch.utils.flop_counter.FlopCounterMode, batch 1, fp32 "
        "(matmul/conv/attention only, 2 FLOPs per MAC)",
    }
    rng = np.random.default_rng(cfg.seed)
    stored = ctx.manifest.meta.get("flops_per_call")
    if isinstance(stored, int | float):
        out["student"] = int(stored)
    elif ctx.manifest.meta.get("student_checkpoint"):
        from optimizer.checkpoint import load_checkpoint
        from optimizer.models import load_teacher

        src = _resolve(ctx.manifest.meta["student_checkpoint"], root)
        try:
            # dd-compile also takes a diffusers folder (a teacher packed as a few-step student)
            model = load_teacher(src).model if src.is_dir() else load_checkpoint(src).build_model()
            spec = ctx.manifest.io_spec.with_batch_range([1])
            out["student"] = count_flops(Denoiser(model), random_feeds(spec, {"batch": 1}, rng))
        except InputError as e:
            log.warning("student FLOPs not counted: %s", e)
    if cfg.teacher:
        out["teacher"] = count_flops(
            Denoiser(ctx.teacher.model),
            random_feeds(ctx.teacher_spec.with_batch_range([1]), {"batch": 1}, rng),
        )
    return out


def _timing_dict(t: Timing | dict[str, Any] | None, stable: bool | None) -> dict[str, Any]:
    if isinstance(t, dict):  # a Timing.to_dict() from another process
        return {
            **{k: round(t[k], 4) for k in ("p10_ms", "p90_ms", "p99_ms", "spread")},
            "p50_ms": round(t["median_ms"], 4),
            "n": t["n"],
            "stable": stable,
        }
    if t is None:
        return {
            "p10_ms": None,
            "p50_ms": None,
            "p90_ms": None,
            "p99_ms": None,
            "n": 0,
            "spread": None,
            "stable": None,
        }
    return {
        "p10_ms": round(t.quantile_ms(0.1), 4),
        "p50_ms": round(t.median_ms, 4),
        "p90_ms": round(t.quantile_ms(0.9), 4),
        "p99_ms": round(t.quantile_ms(0.99), 4),
        "n": len(t.samples_ms),
        "spread": round(t.spread, 4),
        "stable": stable,
    }


@dataclass
class BenchSetup:
    """Everything the timing and the assembly share: the context, the open runners, the probes."""

    manifest: Manifest
    ctx: BenchContext
    variants: list[VariantSpec]
    skipped: list[tuple[VariantSpec, str]]
    runners: dict[str, Any]
    batches: list[int]
    threads: int
    device: str
    fingerprint: dict[str, Any]
    flops: dict[str, Any]
    peak: dict[str, Any]
    peaks: dict[str, list[float]]
    memory: dict[str, dict[str, Any]]

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(self.peaks)


def run_bench(out_dir: str | Path, cfg: BenchConfig) -> dict[str, Any]:
    """Bench every variant of the student in `out_dir` (a dd-compile output) and the teacher."""
    s = setup_bench(out_dir, cfg)
    try:
        results = time_variants(s, cfg)
    finally:
        for r in s.runners.values():
            r.deactivate()
    grid = time_threads(s, cfg)
    # after every runtime is released: the teacher alone in a fresh process
    baseline = teacher_baseline(s, cfg, results)
    for dt in s.dtypes:
        s.peaks[dt].append(matmul_peak_gflops(s.device, dt, cfg.peak_seconds))
    out = assemble(s, cfg, results, baseline)
    out["threads"] = grid
    return out


GRID_BACKENDS = ("onnxruntime", "openvino")  # CPU runtimes whose thread count is a setting


def time_threads(s: BenchSetup, cfg: BenchConfig) -> dict[str, Any] | None:
    """Every CPU student variant per call at each thread count of the grid, side by side, one
    session per count (optimizer.threads_grid): images/s, per core, verdicts, the pick."""
    from optimizer import threads_grid as tg

    grid = tg.default_grid() if cfg.threads_grid is None else cfg.threads_grid
    vs = {v.name: v for v in s.variants if v.model == "student" and v.backend in GRID_BACKENDS}
    if not grid or not vs:
        return None
    meta = {n: {"backend": v.backend, "precision": v.precision, "passed": True} for n, v in vs.items()}

    def open_runner(name: str, threads: int):
        r = s.ctx.open(vs[name], threads=threads)
        r.activate()
        return r

    spec = s.ctx.spec(next(iter(vs.values())))
    rng = np.random.default_rng(cfg.seed)
    points = tg.time_grid(
        open_runner,
        meta,
        grid,
        s.batches,
        lambda b: random_feeds(spec, {"batch": b}, rng),
        cfg.rule(cfg.seconds / (2 * len(s.batches)), cfg.warmup),
    )
    out = tg.summary(points, tg.usable_cores(), grid)
    out["note"] = "variants listed in the manifest are the validated ones (dd-bench refuses others)"
    return out


def setup_bench(out_dir: str | Path, cfg: BenchConfig) -> BenchSetup:
    """Check the inputs, discover the variants, count FLOPs, measure the peak, probe memory, open
    every runner (one that cannot start is reported as skipped, not fatal)."""
    manifest = Manifest.load(out_dir)
    root = manifest.root
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise InputError(f"batch sizes must be >= 1, got {list(cfg.batch_sizes)}")
    device = resolve_device(cfg.device)
    threads = cfg.threads or _usable_cores()
    teacher_path = None
    if cfg.teacher:
        raw = cfg.teacher_path or (manifest.meta.get("teacher") or {}).get("path")
        if not raw:
            raise InputError(f"{manifest.path}: meta has no teacher path; pass --teacher DIR or --no-teacher")
        teacher_path = _resolve(raw, root)
        if not teacher_path.is_dir():
            raise InputError(f"{teacher_path}: teacher folder not found (pass --teacher DIR or --no-teacher)")
    batches = sorted(set(cfg.batch_sizes))
    ctx = BenchContext(
        manifest, teacher_path=teacher_path, threads=threads, device=device, batch_sizes=batches
    )
    variants, skipped = discover(
        ctx,
        backends=list(cfg.backends) if cfg.backends else None,
        teacher=cfg.teacher,
        compile_=cfg.compile,
    )
    import torch

    torch.set_num_threads(threads)
    fp = fingerprint(threads)
    t_setup = time.perf_counter()

    flops = _count_flops(ctx, cfg, root)
    cuda = device.startswith("cuda")
    peak: dict[str, Any] = {
        "method": f"best of torch.mm n x n, {cfg.peak_seconds:g} s before and again after the "
        f"timing (the max counts: a peak measured while the machine was busy reads low), "
        f"{threads} threads" + (", CUDA events" if cuda else "")
    }
    dtypes = ("float32", "float16") if cuda else ("float32",)
    peaks = {dt: [matmul_peak_gflops(device, dt, cfg.peak_seconds)] for dt in dtypes}

    memory: dict[str, dict[str, Any]] = {}
    if cfg.memory:
        for v in variants:
            log.info("memory probe: %s", v.name)
            memory[v.name] = probe_memory(root, v, ctx)

    runners: dict[str, Any] = {}
    for v in list(variants):
        try:
            r = ctx.open(v)
            r.activate()
            runners[v.name] = r
        except (DDCompileError, RuntimeError, OSError, ImportError) as e:
            skipped.append((v, f"failed to load: {str(e).splitlines()[0][:300]}"))
            variants.remove(v)
    log.info("setup (FLOPs, peak, memory probes, loading) took %.1f s", time.perf_counter() - t_setup)
    return BenchSetup(
        manifest, ctx, variants, skipped, runners, batches, threads, device, fp, flops, peak, peaks, memory
    )


def time_variants(s: BenchSetup, cfg: BenchConfig) -> dict[str, list[dict[str, Any]]]:
    """Every (batch, phase) group in turn, its variants interleaved; name -> result entries."""
    ctx, variants = s.ctx, s.variants
    rng = np.random.default_rng(cfg.seed)
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    groups = [(b, ph) for b in s.batches for ph in ("call", "e2e")]
    t_start = time.perf_counter()
    call_p50: dict[tuple[str, int], float] = {}
    for gi, (b, phase) in enumerate(groups):
        budget = max(0.0, cfg.seconds - (time.perf_counter() - t_start)) / (len(groups) - gi)
        fns: dict[str, Callable[[], object]] = {}
        steps: dict[str, int] = {}
        estimated: list[str] = []
        for v in list(variants):
            if (why := ctx.batch_supported(v, b)) is not None:
                results[v.name].append({"phase": phase, "batch": b, "skipped": why})
                continue
            spec, runner = ctx.spec(v), s.runners[v.name]
            if phase == "call":
                feeds = random_feeds(spec, {"batch": b}, rng)
                fns[v.name] = lambda r=runner, f=feeds: r.infer(f)
                steps[v.name] = 1
                continue
            sch = ctx.schedule(v)
            steps[v.name] = sch.steps
            if (v.name, b) not in call_p50:
                continue  # its per-call group failed
            # One e2e run costs about steps x per-call; when two runs would not fit the group's
            # budget, report steps x per-call p50 as an estimate rather than overrun.
            if sch.steps * call_p50[(v.name, b)] / 1e3 * 2 > budget:
                estimated.append(v.name)
                continue
            shape = ctx.sample_shape if v.model == "student" else _teacher_shape(ctx)
            noise, step_noise = draw_noise(list(range(b)), shape, sch.steps)
            from optimizer.model_io import conditioning_feeds

            cond = conditioning_feeds(spec, b, rng)
            sampler = Sampler(sch, runner, output_name=spec.output_names[0])
            fns[v.name] = lambda s=sampler, n=noise, sn=step_noise, c=cond: s(n, sn, c)
        g = run_group(fns, budget, cfg, phase, b, variants, s.skipped, s.runners)
        for name, t in g.timings.items():
            if phase == "call":
                call_p50[(name, b)] = t.median_ms
            results[name].append(
                {
                    "phase": phase,
                    "batch": b,
                    "steps": steps[name],
                    "method": "measured",
                    **_timing_dict(t, g.stable[name]),
                }
            )
        for name in estimated:
            results[name].append(_estimate(phase, b, steps[name], call_p50[(name, b)]))
        log.info("%s b=%d: %d rounds in %.1f s (budget %.1f s)", phase, b, g.rounds, g.seconds, budget)
    return results


def _estimate(phase: str, b: int, steps: int, call_p50_ms: float) -> dict[str, Any]:
    est = {"phase": phase, "batch": b, "steps": steps, "method": "estimated", **_timing_dict(None, None)}
    est["p50_ms"] = round(steps * call_p50_ms, 4)
    return est


def teacher_baseline(
    s: BenchSetup, cfg: BenchConfig, results: dict[str, list[dict[str, Any]]]
) -> dict[str, Any] | None:
    """Re-time the eager teacher in a fresh process (optimizer.compile.teacher_baseline) and put that figure
    in its row, the in-run one and the verdict beside it: speedups divide the fresh figure."""
    from optimizer.compile import teacher_baseline as tb

    row = results.get(TEACHER_BASELINE)
    if row is None:
        return None
    lvl_of = {"call": "per_call", "e2e": "end_to_end"}
    measured = [x for x in row if x.get("method") == "measured"]
    in_run = {lvl: {} for lvl in tb.LEVELS}
    for x in measured:
        in_run[lvl_of[x["phase"]]][x["batch"]] = {
            "median_ms": x["p50_ms"],
            "n": x["n"],
            "stable": x["stable"],
        }
    fresh, why = None, "disabled (BenchConfig.fresh_teacher)"
    grid = tb.thread_grid(s.threads)
    if cfg.fresh_teacher and in_run["per_call"]:
        n_groups = 2 * len(s.batches)
        req = tb.BaselineRequest(
            teacher=str(s.ctx.teacher_path),
            batch_sizes=sorted(in_run["per_call"]),
            steps=s.ctx.reference_steps,
            threads=grid,
            rule=cfg.rule(cfg.seconds / n_groups / len(grid), cfg.warmup),
            e2e_batches=sorted(in_run["end_to_end"]),
            seed=cfg.seed,
            device=s.device,
        )
        fresh, why = tb.fresh_teacher_timing(req)
    judged = tb.judge(in_run, fresh, s.threads, why, cfg.agree_tol)
    for x in measured:
        j = judged[lvl_of[x["phase"]]][x["batch"]]
        if j["source"] != "fresh process":
            x["baseline"] = {"source": j["source"], "verdict": j["verdict"]}
            continue
        x.update(_timing_dict(j, j.get("stable")))
        x["baseline"] = {k: j[k] for k in _PROVENANCE}
    call = {x["batch"]: x["p50_ms"] for x in row if x.get("phase") == "call" and x.get("p50_ms")}
    for x in row:  # estimates follow the per-call figure they are made of
        if x.get("method") == "estimated" and x["batch"] in call:
            x["p50_ms"] = round(x["steps"] * call[x["batch"]], 4)
    verdicts = [j["verdict"] for lvl in judged.values() for j in lvl.values()]
    return {
        "method": "the eager fp32 teacher re-timed in a fresh process (python -m "
        "optimizer.compile.teacher_baseline), after every runtime here was released, at each of "
        f"threads {grid}; its best thread count per phase and batch is the baseline, and the "
        f"in-run figure is checked against the fresh one at {s.threads} threads within "
        f"{cfg.agree_tol:.0%}",
        "fresh_process": fresh is not None,
        "why_not": why or None,
        "verdict": "agree"
        if verdicts and all(v == "agree" for v in verdicts)
        else "disagree"
        if any(v == "disagree" for v in verdicts)
        else "unchecked",
    }


_PROVENANCE = (
    "source",
    "threads",
    "in_run_median_ms",
    "in_run_threads",
    "in_run_stable",
    "fresh_same_threads_median_ms",
    "in_run_over_fresh",
    "tolerance",
    "verdict",
)


def assemble(
    s: BenchSetup,
    cfg: BenchConfig,
    results: dict[str, list[dict[str, Any]]],
    baseline: dict[str, Any] | None,
) -> dict[str, Any]:
    """The bench JSON (optimizer/bench/schema.py)."""
    peak, cuda = s.peak, s.device.startswith("cuda")
    peak["fp32_gflops"] = round(max(s.peaks["float32"]), 2)
    peak["fp16_gflops"] = round(max(s.peaks["float16"]), 2) if cuda else None
    peak["samples_gflops"] = {dt: [round(x, 2) for x in v] for dt, v in s.peaks.items()}
    rows = [
        {**v.to_dict(), "skipped": None, "memory": s.memory.get(v.name), "results": results[v.name]}
        for v in s.variants
    ]
    rows += [{**v.to_dict(), "skipped": why, "memory": None, "results": []} for v, why in s.skipped]
    _derive(rows, s.flops, peak, cfg.min_samples)
    sch, teacher_path = s.manifest.schedule, s.ctx.teacher_path
    head = bench_head(cfg, s.fingerprint, s.device, s.manifest)
    return {
        **head,
        "source": {
            **head["source"],
            "sample_shape": list(s.ctx.sample_shape),
            "schedule": {"kind": sch.kind, "steps": sch.steps},
            "teacher": {"path": str(teacher_path), "reference_steps": s.ctx.reference_steps}
            if teacher_path
            else None,
        },
        "config": {
            **asdict(cfg),
            "batch_sizes": s.batches,
            "threads": s.threads,
            "device": s.device,
        },
        "peak": peak,
        "flops": s.flops,
        "teacher_baseline": baseline,
        "variants": rows,
        "best": _best(rows),
    }


def resolve_device(device: str) -> str:
    """--device auto|cpu|cuda: auto picks CUDA when torch sees a device; cuda without one is refused."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        raise InputError("--device cuda: no CUDA device is visible to torch")
    return device


def bench_head(
    cfg: BenchConfig, fingerprint: dict[str, Any], device: str, manifest: Manifest
) -> dict[str, Any]:
    """What every bench JSON opens with (optimizer/bench/schema.py): format, version, when, the
    target and the manifest it measured; each kind of output adds its own source keys."""
    return {
        "format": BENCH_FORMAT,
        "version": BENCH_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": {
            "name": cfg.target or target_name(fingerprint, device),
            "device": device,
            "fingerprint": fingerprint,
        },
        "source": {"manifest": str(manifest.path.resolve()), "manifest_sha256": sha256_file(manifest.path)},
    }


def _teacher_shape(ctx: BenchContext) -> tuple[int, ...]:
    from optimizer.model_io import sample_shape

    return sample_shape(ctx.teacher.model_class, dict(ctx.teacher.model.config))


def run_group(
    fns: dict[str, Callable[[], object]],
    budget: float,
    cfg: BenchConfig,
    phase: str,
    b: int,
    variants: list[VariantSpec],
    skipped: list,
    runners: dict,
    e2e_warmup: int = 0,
) -> TimingRun:
    """Time one (phase, batch) group; a variant that raises is dropped with its error, not fatal.
    e2e_warmup: 0 where the call group already warmed the sessions a sampler reuses; a pipeline's
    text encoder and VAE first run in its e2e group (optimizer/bench/pipeline.py passes 1)."""
    while True:
        try:
            return time_until_stable(
                fns,
                budget,
                cfg,
                warmup=cfg.warmup if phase == "call" else e2e_warmup,
                desc=f"{phase} b={b}",
                min_rounds=cfg.min_rounds if phase == "call" else 2,
            )
        except (DDCompileError, RuntimeError, OSError, ValueError) as e:
            bad = _which_fails(fns)
            if bad is None:
                raise
            log.warning("%s failed at %s b=%d, dropped: %s", bad, phase, b, e)
            v = next(v for v in variants if v.name == bad)
            variants.remove(v)
            skipped.append((v, f"failed at {phase} b={b}: {str(e).splitlines()[0][:300]}"))
            runners.pop(bad).deactivate()
            fns = {k: f for k, f in fns.items() if k != bad}


def _which_fails(fns: dict[str, Callable[[], object]]) -> str | None:
    for k, fn in fns.items():
        try:
            fn()
        except Exception:  # noqa: BLE001 - we only want the culprit's name; the caller reports e
            return k
    return None


def _derive(
    rows: list[dict[str, Any]], flops: dict[str, Any], peak: dict[str, Any], min_samples: int
) -> None:
    """Fill images_per_s, speedup_vs_teacher (null, with speedup_null_reason, unless both timings
    are stable; estimates: their per-call timings), achieved_gflops, fraction_of_peak in place."""
    base = next((r for r in rows if r["name"] == TEACHER_BASELINE and not r["skipped"]), None)
    ref = {(x["phase"], x["batch"]): x for x in (base or {}).get("results", [])}
    for row in rows:
        n_flops = flops.get(row["model"])
        peak_g = (
            peak.get("fp16_gflops")
            if row["precision"] == "fp16" and peak.get("fp16_gflops")
            else peak.get("fp32_gflops")
        )
        calls = {x["batch"]: x for x in row["results"] if x.get("phase") == "call"}
        for x in row["results"]:
            p50 = x.get("p50_ms")
            if not p50:
                continue
            x["images_per_s"] = round(x["batch"] / (p50 / 1e3), 3)
            t = ref.get((x["phase"], x["batch"]))
            if x.get("method") == "estimated":
                why = timing.comparable(ref.get(("call", x["batch"])), calls.get(x["batch"]), min_samples)
            else:
                why = timing.comparable(t, x, min_samples)
            ok = t is not None and t.get("p50_ms") and why is None
            x["speedup_vs_teacher"] = round(t["p50_ms"] / p50, 3) if ok else None
            x["speedup_null_reason"] = None if ok else (why or "no teacher timing")
            if x["phase"] == "call" and n_flops:
                g = n_flops * x["batch"] / (p50 / 1e3) / 1e9
                x["achieved_gflops"] = round(g, 2)
                x["fraction_of_peak"] = round(g / peak_g, 4) if peak_g else None
            else:
                x["achieved_gflops"] = x["fraction_of_peak"] = None


def _best(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    best: dict[str, dict[str, str]] = {}
    cands: dict[tuple[str, int], list[tuple[float, str]]] = {}
    for row in rows:
        for x in row["results"]:
            if x.get("p50_ms") and x.get("method") == "measured":
                cands.setdefault((x["phase"], x["batch"]), []).append((x["p50_ms"], row["name"]))
    for (phase, b), c in sorted(cands.items()):
        best.setdefault(phase, {})[str(b)] = min(c)[1]
    return best
