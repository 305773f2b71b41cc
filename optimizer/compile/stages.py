"""dd-compile: student.ckpt -> export -> quantize -> (build) -> validate -> report -> publish.

The only module that chains stages. `run` reads as the list of stages; each stage is a function of
a `CompileContext` (what every stage reads) and the artifacts before it, usable alone from Python.
A stage is skipped when the previous run's manifest shows the same input sha256 and config (its
file is then hard-linked into this run). The run publishes at its end, in one atomic step
(optimizer/compile/publish.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.errors import BackendUnavailable, InputError
from engines.fileio import sha256_file, write_json_atomic, write_text_atomic
from engines.iospec import IOSpec
from engines.manifest import Manifest
from engines.outdir import check_target, claim, is_ours
from engines.schedule import Sampler, draw_noise
from engines.torch_runner import TorchRunner
from optimizer.bars import ParityBars
from optimizer.checkpoint import StudentCheckpoint, TeacherRef, check_teacher, load_checkpoint
from optimizer.compile.batching import BatchWindow, check_batch_memory
from optimizer.compile.build import TrtBuildConfig
from optimizer.compile.compile_report import CompileReport, VariantResult, environment
from optimizer.compile.export import ExportConfig, export_onnx
from optimizer.compile.publish import RunDir
from optimizer.compile.speed import SpeedConfig, measure, speedups
from optimizer.compile.validate import call_parity, distribution, sample_parity
from optimizer.conditioning import load_conditioning, n_classes
from optimizer.families.table import RUNTIME_PRECISIONS
from optimizer.model_io import conditioning_feeds, io_spec_for, sample_shape
from optimizer.models import Denoiser, Teacher, load_teacher, teacher_reference_samples
from optimizer.process import process_state
from optimizer.progress import Stages, fault_at
from optimizer.quantize import Int8Config
from optimizer.seeds import SeedPlan

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # RUNTIME_PRECISIONS (bf16) run the fp32 graph
BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "openvino")
DEMO_DIR = Path(__file__).parents[1] / "demo"


@dataclass
class CompileConfig:
    out: Path
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    backend: str = "onnxruntime"
    # the one place batch sizes live: the exported batch range, validation, timing, TensorRT profiles
    batch_sizes: tuple[int, ...] = (1, 16)
    teacher: Path | None = None  # overrides the checkpoint's teacher path
    require_teacher: bool = False  # a missing teacher is an error (exit 2), not a skipped check
    seed: int = 0
    steps: int | None = None  # for a diffusers folder input: the student's step count
    threads: int | None = None  # ORT/torch intra-op threads (None: library default)
    n_samples: int = 64  # sample-level parity (each variant's sampler vs the torch student's)
    n_fid_samples: int = 256  # distribution level (student vs teacher; FID needs more than 64)
    calib_seeds: int = 8  # trajectories captured for calibration
    speed: SpeedConfig = field(default_factory=SpeedConfig)  # its batch_sizes: taken from batch_sizes
    bars: ParityBars = field(default_factory=ParityBars)
    triton_repo: Path | None = None
    trt: TrtBuildConfig = field(default_factory=TrtBuildConfig)  # --backend tensorrt (--trt-*)
    # --int8-*; None: the defaults, with Q/DQ placement chosen by ORT CPU timings only where ORT
    # CPU is the target
    int8: Int8Config | None = None
    cond: Path | None = None  # --cond: conditioning rows (.npz) for calibration and validation

    @property
    def batch_range(self) -> tuple[int, int]:
        return min(self.batch_sizes), max(self.batch_sizes)

    @property
    def seeds(self) -> SeedPlan:
        return SeedPlan(base=self.seed, calibrate=self.calib_seeds, batch_range=self.batch_range)

    def int8_config(self) -> Int8Config:
        if self.int8 is not None:
            return self.int8
        return Int8Config(placement="measure" if self.backend == "onnxruntime" else "fixed")

    def speed_config(self) -> SpeedConfig:
        return replace(self.speed, batch_sizes=tuple(self.batch_sizes))

    def trt_config(self) -> TrtBuildConfig:
        return replace(self.trt, batch_sizes=tuple(self.batch_sizes))


@dataclass
class CompileContext:
    """What every stage reads: the student, its IO, conditioning, seeds and this run's folders."""

    cfg: CompileConfig
    source: Path
    ckpt: StudentCheckpoint
    model: torch.nn.Module
    ckpt_sha: str
    spec: IOSpec
    shape: tuple[int, ...]
    seeds: SeedPlan
    teacher: Teacher | None
    cond_fn: Any  # (batch, rng=None) -> conditioning feeds, or None for unconditional models
    cond_sha: str | None
    run: RunDir
    manifest: Manifest  # this run's manifest, rooted at its staging folder
    report: CompileReport
    torch_ref: TorchRunner  # the torch student, activated once: every stage's reference
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return self.run.out

    @property
    def run_id(self) -> str:
        return self.run.run_id


@dataclass
class ValidationSet:
    """The report's noise and the torch student's samples from it: the reference every variant
    meets. Noise is drawn per seed, so the first n_samples of the distribution set are the sample set."""

    noise: np.ndarray  # all samples (n_samples, or n_fid_samples with a teacher)
    step_noise: np.ndarray
    cond: dict[str, np.ndarray] | None
    student: np.ndarray  # the torch student's samples from `noise`
    n: int  # samples for sample-level parity
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # samples.png rows

    def first(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
        n = self.n
        cond = {k: v[:n] for k, v in self.cond.items()} if self.cond else None
        return self.noise[:n], self.step_noise[:, :n], cond


def run(source: Path, cfg: CompileConfig) -> CompileReport:
    """Compile, validate and publish; the report says pass/fail (the CLI makes it an exit code)."""
    with process_state(cfg.threads, cfg.seed):
        ctx = prepare(Path(source), cfg)  # every input checked before any work
        quantized = [p for p in cfg.precisions if p != "fp32" and p not in RUNTIME_PRECISIONS]
        _stage = Stages(["export", *(f"quantize-{p}" for p in quantized), "validate", "timing", "report"])
        try:
            _stage("export")
            graphs = {"fp32": export(ctx)}
            calib = calibrate(ctx)
            for p in quantized:
                _stage(f"quantize-{p}")
                graphs[p] = quantize(ctx, p, calib)
            for p in (p for p in cfg.precisions if p in RUNTIME_PRECISIONS):
                graphs[p] = runtime_precision(ctx, p)
            runners = activate_runners(ctx, graphs)
            try:
                _stage("validate")
                vs = reference_samples(ctx)
                validate(ctx, runners, vs)
                judge_distribution(ctx, vs)
                _stage("timing")
                timings = time_variants(ctx, runners)
            finally:
                for r in runners.values():
                    r.deactivate()
            _stage("report")
            write_report(ctx, vs, timings)
            publish(ctx)
        except BaseException:
            ctx.run.abandon()
            raise
    if cfg.triton_repo:
        _write_triton_repo(ctx)
    return ctx.report


def _write_triton_repo(ctx: CompileContext) -> None:
    """The Triton repository of the recommended variant; none when no variant passed (the run
    still exits 1 with its report: a failed parity check is not bad input)."""
    from engines.triton import write_triton_repo

    if ctx.run.kept_previous:  # this run failed and is not the served one: nothing of it to package
        log.warning(
            "--triton-repo %s: not written: this run did not replace the served one", ctx.cfg.triton_repo
        )
        return
    best = next((v for v in ctx.report.variants if v.recommended), None)
    if best is None:
        log.warning("--triton-repo %s: not written: no variant passed validation", ctx.cfg.triton_repo)
        return
    write_triton_repo(ctx.out, Path(ctx.cfg.triton_repo), precision=best.precision, option="--triton-repo")


def _as_student(source: Path, steps: int | None) -> tuple[StudentCheckpoint, torch.nn.Module]:
    """A student.ckpt, or a diffusers folder packed as a student with a DDIM schedule."""
    if source.is_dir():
        if not steps:
            raise InputError(f"{source}: a diffusers folder needs --steps N (the student's step count)")
        t = load_teacher(source)
        # The teacher is the folder itself (resolved: a relative path would be read as relative
        # to the "checkpoint's" folder, i.e. the folder's parent).
        ckpt = StudentCheckpoint(
            model_class=t.model_class,
            model_config=dict(t.model.config),
            scheduler_class=type(t.scheduler).__name__,
            scheduler_config=dict(t.scheduler.config),
            schedule=t.schedule(steps),
            teacher=TeacherRef(
                str(source.resolve()), t.weights_sha256, t.reference_sampler, t.reference_steps
            ),
            distillation={"method": "none", "note": "diffusers folder packed with a DDIM schedule"},
            path=source,
        )
        return ckpt, t.model
    if steps:
        raise InputError(
            f"{source}: --steps applies to a diffusers folder; a student.ckpt carries its schedule"
        )
    ckpt = load_checkpoint(source)
    return ckpt, ckpt.build_model()


def _load_teacher(ckpt: StudentCheckpoint, cfg: CompileConfig, report: CompileReport) -> Teacher | None:
    path = cfg.teacher or (Path(ckpt.teacher.path) if ckpt.teacher.path else None)
    if cfg.teacher is None and path is not None and not path.is_absolute() and ckpt.path is not None:
        path = ckpt.path.parent / path  # a stored relative path is relative to the checkpoint
    reason = None
    if path is None:
        reason = "the checkpoint names no teacher and --teacher was not given"
    elif not path.exists():
        reason = f"teacher folder {path} not found (pass --teacher DIR)"
    if reason:
        if cfg.require_teacher:
            raise InputError(f"{ckpt.path}: {reason}")
        report.skipped.append(f"teacher checks: {reason}")
        report.teacher = {"available": False, "reason": reason}
        return None
    teacher = load_teacher(path, reference_steps=ckpt.teacher.reference_steps)
    check_teacher(ckpt, teacher)
    if ckpt.teacher.sha256 and teacher.weights_sha256 != ckpt.teacher.sha256:
        log.warning("teacher weights at %s differ from the ones the student was distilled from", path)
        report.skipped.append("teacher sha256 differs from the checkpoint's record (compared anyway)")
    report.teacher = {
        "available": True,
        "path": str(path),
        "sha256": teacher.weights_sha256,
        "reference_sampler": teacher.reference_sampler,
        "reference_steps": teacher.reference_steps,
    }
    return teacher


def _cond_keys(spec: IOSpec) -> list[str]:
    return [t.name for t in spec.inputs if t.name not in ("sample", "timestep")]


def _cond_fn(spec: IOSpec, seed: int, cond: dict[str, np.ndarray] | None = None, n_classes: int = 1):
    """Conditioning inputs (text embeddings, labels) of batch b; None for unconditional models.

    From --cond: validation samples take the file's rows in order (sample i <- row i mod N), each
    calibration trajectory draws its rows with its own seed; without it, N(0, 1) embeddings."""
    if not _cond_keys(spec):
        return None
    if cond is None:
        return lambda b, rng=None: conditioning_feeds(spec, b, rng or np.random.default_rng(seed), n_classes)
    n = len(next(iter(cond.values())))

    def from_file(b: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        idx = np.arange(b) % n if rng is None else rng.integers(0, n, size=b)
        return {k: v[idx] for k, v in cond.items()}

    return from_file


def _load_cond(
    cfg: CompileConfig, ckpt: StudentCheckpoint, report: CompileReport
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """--cond checked against the student's conditioning inputs; (arrays, sha256) or (None, None)."""
    keys = _cond_keys(io_spec_for(ckpt.model_class, ckpt.model_config))
    if cfg.cond is None:
        if keys:
            msg = (
                f"no --cond: {', '.join(keys)} drawn at random (N(0, 1) embeddings, uniform labels); "
                "INT8 ranges and FID then reflect random conditioning, pass --cond with real ones"
            )
            log.warning(msg)
            report.notes.append(msg)
        return None, None
    if not keys:
        raise InputError(f"{cfg.cond}: --cond given, but {ckpt.model_class} takes no conditioning input")
    cond = load_conditioning(cfg.cond, keys, ckpt.model_config)
    report.notes.append(
        f"conditioning: {cfg.cond} ({len(next(iter(cond.values())))} rows of "
        f"{', '.join(f'{k} {list(v.shape[1:])}' for k, v in cond.items())})"
    )
    return cond, sha256_file(cfg.cond)


def prepare(source: Path, cfg: CompileConfig) -> CompileContext:
    """Load and check every input, refuse unsafe output folders, then claim `out` and open staging."""
    for p in cfg.precisions:
        if p not in PRECISIONS:
            raise InputError(f"--precision: unknown precision {p!r} (choose from {', '.join(PRECISIONS)})")
    if cfg.backend not in BACKENDS:
        raise InputError(f"--backend: unknown backend {cfg.backend!r} (choose from {', '.join(BACKENDS)})")
    if "bf16" in cfg.precisions:
        if cfg.backend != "openvino":
            raise InputError(
                f"--precision bf16: needs --backend openvino (OpenVINO's bf16 hint), not {cfg.backend}"
            )
        from engines.openvino_runner import check_precision_hint

        check_precision_hint("bf16")  # BackendUnavailable on CPUs without AVX512-BF16/AMX
    ckpt, model = _as_student(source, cfg.steps)
    model = model.eval().float()
    shell = CompileReport(student={}, teacher={})
    teacher = _load_teacher(ckpt, cfg, shell)  # before any work: a missing one may be an error
    # -o may be a finished dd-compile output, never the student or teacher it reads
    out = check_target(cfg.out, "compile", "-o", protect=[source, *([teacher.path] if teacher else [])])
    if cfg.triton_repo:
        check_target(cfg.triton_repo, "triton-repo", "--triton-repo", protect=[out])
    cond, cond_sha = _load_cond(cfg, ckpt, shell)
    ehs = (cond or {}).get("encoder_hidden_states")
    tokens = {"seq_len": ehs.shape[1]} if ehs is not None else {}
    spec = io_spec_for(ckpt.model_class, ckpt.model_config, list(cfg.batch_sizes), **tokens)
    check_batch_memory(spec, cfg.batch_sizes)
    if cfg.backend == "tensorrt":
        from optimizer.compile.build import check_tensorrt_available

        check_tensorrt_available()  # raises BackendUnavailable with the extra to install
    shape = sample_shape(ckpt.model_class, ckpt.model_config)
    ckpt_sha = sha256_file(source) if source.is_file() else f"diffusers:{ckpt.teacher.sha256}"

    _check_writable(out)  # the first write: every check above passed
    rundir = RunDir(cfg.out)
    if not is_ours(cfg.out, "compile"):
        claim(cfg.out, "compile", rundir.run_id)
    rundir.begin()
    report = CompileReport(
        student={
            "path": str(source),
            "sha256": ckpt_sha,
            "model_class": ckpt.model_class,
            "params": sum(p.numel() for p in model.parameters()),
            "steps": ckpt.schedule.steps,
            "sampler": ckpt.schedule.kind,
            "timesteps": list(ckpt.schedule.timesteps),
            "distillation": ckpt.distillation,
        },
        teacher=shell.teacher,
        skipped=shell.skipped,
        notes=shell.notes,
        environment=environment(cfg.threads),
        run_id=rundir.run_id,
    )
    meta = {
        "student_checkpoint": str(source.resolve()),
        "student_sha256": ckpt_sha,
        "model_class": ckpt.model_class,
        "sample_shape": list(shape),
        "batch_sizes": list(cfg.batch_sizes),
        # the teacher actually used (resolved), so dd-bench and others find it from out/ alone
        "teacher": {
            "path": str(teacher.path.resolve()) if teacher else ckpt.teacher.path,
            "sha256": ckpt.teacher.sha256,
            "reference_sampler": ckpt.teacher.reference_sampler,
            "reference_steps": ckpt.teacher.reference_steps,
        },
        "created_by": "dd-compile",
    }
    torch_ref = TorchRunner(Denoiser(model), spec, name="torch-student")
    torch_ref.activate()
    return CompileContext(
        cfg=cfg,
        source=source,
        ckpt=ckpt,
        model=model,
        ckpt_sha=ckpt_sha,
        spec=spec,
        shape=shape,
        seeds=cfg.seeds,
        teacher=teacher,
        cond_fn=_cond_fn(spec, cfg.seed, cond, n_classes(ckpt.model_config) or 1),
        cond_sha=cond_sha,
        run=rundir,
        manifest=Manifest(rundir.staging, spec, ckpt.schedule, meta),
        report=report,
        torch_ref=torch_ref,
    )


def export(ctx: CompileContext) -> Path:
    """Stage 1: the student -> onnx/student.fp32.onnx (reused when the checkpoint is unchanged)."""
    cfg = ExportConfig()
    name, rel = "onnx/fp32", "onnx/student.fp32.onnx"
    if ctx.run.reuse(ctx.manifest, name, ctx.ckpt_sha, cfg.to_dict()):
        log.info("export: up to date (%s)", rel)
        return ctx.manifest.file(ctx.manifest.get(name))
    path = ctx.manifest.root / rel
    log.info("export: %s", path)
    export_onnx(Denoiser(ctx.model), ctx.spec, path, cfg)
    ctx.manifest.add(
        name,
        path,
        "onnx",
        precision="fp32",
        backend=None,
        input_sha256=ctx.ckpt_sha,
        config=cfg.to_dict(),
        libraries=environment()["libraries"],
    )
    return path


def _trajectory(ctx: CompileContext, seeds: list[int]) -> list[dict[str, np.ndarray]]:
    """Feeds the student sees along its own sampling trajectory, batched within the exported range."""
    from optimizer.quantize import calibration_feeds

    r = ctx.torch_ref
    return calibration_feeds(
        r, r.spec, ctx.ckpt.schedule, ctx.shape, seeds, ctx.cfg.batch_range[1], ctx.cond_fn
    )


def calibrate(ctx: CompileContext) -> list[dict[str, np.ndarray]]:
    """Calibration feeds for the quantizers (none needed when only fp32 is asked for)."""
    if all(p == "fp32" for p in ctx.cfg.precisions):
        return []
    return _trajectory(ctx, ctx.seeds.calibration())


def _sample_psnr_check(ctx: CompileContext):
    """For INT8 layer selection: sample-level PSNR of a candidate graph vs the torch student."""
    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from optimizer.compile.validate import psnr_db

    seeds = ctx.seeds.int8_samples()  # not the report's seeds
    noise, step_noise = draw_noise(seeds, ctx.shape, ctx.ckpt.schedule.steps)
    cond = ctx.cond_fn(len(seeds)) if ctx.cond_fn else None
    lo, hi = ctx.cfg.batch_range
    out_name = ctx.spec.output_names[0]
    ref = Sampler(ctx.ckpt.schedule, BatchWindow(ctx.torch_ref, lo, hi), output_name=out_name, max_batch=hi)(
        noise, step_noise, cond
    )

    def check(path: Path) -> float:
        with OnnxRuntimeRunner(path, ctx.spec, threads=ctx.cfg.threads) as r:
            out = Sampler(ctx.ckpt.schedule, BatchWindow(r, lo, hi), output_name=out_name, max_batch=hi)(
                noise, step_noise, cond
            )
        return psnr_db(out, ref) if np.isfinite(out).all() else float("-inf")

    return check


def quantize(ctx: CompileContext, precision: str, calib: list[dict[str, np.ndarray]]) -> Path:
    """Stage 2: onnx/student.fp32.onnx -> onnx/student.<precision>.onnx (fp16 or int8)."""
    from optimizer import quantize as q

    bars = ctx.cfg.bars  # the search aims inside the bars this variant is judged by
    qcfg = q.Fp16Config.from_bars(bars) if precision == "fp16" else ctx.cfg.int8_config().resolve(bars)
    # the calibration inputs are part of the config: a new --cond file re-quantizes
    config = {
        "precision": precision,
        **qcfg.to_dict(),
        "calib_seeds": ctx.cfg.calib_seeds,
        "seed": ctx.cfg.seed,
        "cond_sha256": ctx.cond_sha,
    }
    name, rel = f"onnx/{precision}", f"onnx/student.{precision}.onnx"
    fp32 = ctx.manifest.get("onnx/fp32")
    if ctx.run.reuse(ctx.manifest, name, fp32.sha256, config):
        log.info("quantize %s: up to date (%s)", precision, rel)
        return ctx.manifest.file(ctx.manifest.get(name))
    path = ctx.manifest.root / rel
    log.info("quantize %s: %s", precision, path)
    src = ctx.manifest.file(fp32)
    if precision == "fp16":
        res = q.quantize_fp16(src, path, calib, qcfg)
    else:
        res = q.quantize_int8(src, path, calib, qcfg, parity_check=_sample_psnr_check(ctx))
    ctx.manifest.add(
        name,
        path,
        "onnx",
        precision=precision,
        backend=None,
        input_sha256=fp32.sha256,
        config=config,
        libraries=environment()["libraries"],
        extra=res.to_dict(),
    )
    return path


def runtime_precision(ctx: CompileContext, precision: str) -> Path:
    """A precision the runtime applies to the fp32 graph (bf16: OpenVINO's inference hint): an
    artifact of its own, so it is validated, served and refused on its own record."""
    fp32 = ctx.manifest.get("onnx/fp32")
    path = ctx.manifest.file(fp32)
    ctx.manifest.add(
        f"onnx/{precision}",
        path,
        "onnx",
        precision=precision,
        backend=ctx.cfg.backend,
        input_sha256=fp32.sha256,
        config={"precision": precision, "inference_precision_hint": precision, "graph": "onnx/fp32"},
        libraries=environment()["libraries"],
    )
    return path


def _openvino_runners(
    ctx: CompileContext, graphs: dict[str, Path], threads: int | None
) -> dict[tuple[str, str], Any]:
    from engines.openvino_runner import OpenVINORunner

    runners = {}
    for p, path in graphs.items():
        r = OpenVINORunner(
            path,
            ctx.spec,
            # static shapes per batch size: dynamic ones ran at half the speed (openvino_runner.py)
            batch_sizes=ctx.cfg.batch_sizes,
            precision_hint="bf16" if p == "bf16" else "f32",
            threads=threads,
        )
        try:
            r.activate()
        except (InputError, BackendUnavailable):
            raise
        except Exception as e:  # OpenVINO refusing a graph is bad input, not a crash
            raise InputError(f"{path}: OpenVINO cannot compile it ({e})") from None
        runners[(p, "openvino")] = r
    return runners


def activate_runners(
    ctx: CompileContext, graphs: dict[str, Path], threads: int | None = None
) -> dict[tuple[str, str], Any]:
    """Stage 3: one activated runner per variant (TensorRT: engines built first); the caller
    deactivates them once validation and timing are done. threads: intra-op threads of the CPU
    sessions (None: the run's --threads)."""
    threads = ctx.cfg.threads if threads is None else threads
    if ctx.cfg.backend == "tensorrt":
        return _tensorrt_runners(ctx, graphs)
    if ctx.cfg.backend == "openvino":
        return _openvino_runners(ctx, graphs, threads)
    from engines.onnxruntime_runner import OnnxRuntimeRunner

    runners = {}
    for p, path in graphs.items():
        r = OnnxRuntimeRunner(path, ctx.spec, backend=ctx.cfg.backend, threads=threads)
        try:
            r.activate()
        except BackendUnavailable:
            raise
        except Exception as e:  # ORT refusing a graph is bad input, not a crash
            raise InputError(f"{path}: ONNX Runtime cannot load it ({e})") from None
        runners[(p, ctx.cfg.backend)] = r
    return runners


def _tensorrt_runners(ctx: CompileContext, graphs: dict[str, Path]) -> dict[tuple[str, str], Any]:
    from engines.tensorrt_runner import TensorRTRunner
    from optimizer.compile.build import build_engine

    runners = {}
    for p, onnx_path in graphs.items():
        res = build_engine(
            onnx_path, ctx.spec, ctx.manifest.root / "engines", ctx.cfg.trt_config(), precision=p
        )
        ctx.manifest.add(**res.to_manifest())
        r = TensorRTRunner(res.path, ctx.spec)
        r.activate()
        runners[(p, "tensorrt")] = r
    return runners


def reference_samples(ctx: CompileContext) -> ValidationSet:
    """The torch student's samples from the report's noise (sample parity and the distribution)."""
    cfg = ctx.cfg
    n_all = max(cfg.n_samples, cfg.n_fid_samples if ctx.teacher is not None else 0)
    noise, step_noise = draw_noise(ctx.seeds.samples(n_all), ctx.shape, ctx.ckpt.schedule.steps)
    cond = ctx.cond_fn(n_all) if ctx.cond_fn else None
    lo, hi = cfg.batch_range
    sampler = Sampler(
        ctx.ckpt.schedule,
        BatchWindow(ctx.torch_ref, lo, hi),
        output_name=ctx.spec.output_names[0],
        max_batch=hi,
    )
    student = sampler(noise, step_noise, cond)
    vs = ValidationSet(noise, step_noise, cond, student, cfg.n_samples)
    vs.rows["torch student"] = student[: cfg.n_samples]
    return vs


def _graph_failures(precision: str, info: dict[str, Any]) -> list[str]:
    if precision != "fp32" and info.get("counts", {}).get(precision) == 0:
        # parity would pass trivially: the graph is the fp32 one
        return [f"no node runs in {precision} within the {precision} bars: this graph is the fp32 one"]
    return []


def validate(ctx: CompileContext, runners: dict[tuple[str, str], Any], vs: ValidationSet) -> None:
    """Stage 4: call- and sample-level parity of every variant vs the torch student; one
    VariantResult each in ctx.report, and a validation record on each of its artifacts."""
    cfg, lo, hi = ctx.cfg, *ctx.cfg.batch_range
    val_feeds = _trajectory(ctx, ctx.seeds.validation())
    noise, step_noise, cond = vs.first()
    for (p, backend), runner in runners.items():
        art = ctx.manifest.get(f"onnx/{p}")
        v = VariantResult(backend=backend, precision=p, path=f"runs/{ctx.run_id}/{art.path}")
        v.precision_info = art.extra or {}
        cp = call_parity(ctx.torch_ref, runner, val_feeds, p, cfg.bars)
        sp, samples = sample_parity(
            vs.student[: vs.n],
            ctx.ckpt.schedule,
            BatchWindow(runner, lo, hi),
            noise,
            step_noise,
            p,
            cond,
            hi,
            cfg.bars,
        )
        v.parity = {"call": cp.to_dict(), "sample": sp.to_dict()}
        v.failures += cp.failures() + sp.failures() + _graph_failures(p, v.precision_info)
        v.passed = not v.failures
        vs.rows[f"{backend} {p}"] = samples
        ctx.report.variants.append(v)
        _record_validation(ctx, p, backend, v)
        log.info("%s %s: call rel. L2 %.2e, sample PSNR %.1f dB", backend, p, cp.rel_l2, sp.psnr_db)


def _record_validation(ctx: CompileContext, precision: str, backend: str, v: VariantResult) -> None:
    record = {
        "run_id": ctx.run_id,
        "student_sha256": ctx.ckpt_sha,
        "passed": v.passed,
        "failures": v.failures,
        "backend": backend,
    }
    for art in ctx.manifest.find(precision=precision):
        if art.kind == "engine" and art.backend == backend:
            art.validation = dict(record)
        elif art.kind == "onnx":
            # an engine's graph was not itself run here: the engine carries the verdict
            ran = backend != "tensorrt"
            art.validation = (
                dict(record)
                if ran
                else {
                    **record,
                    "passed": False,
                    "failures": [f"not run here: validated as the {backend} engine"],
                }
            )


def judge_distribution(ctx: CompileContext, vs: ValidationSet) -> None:
    """Stage 4b: the torch student's samples vs the teacher's (FID, paired PSNR), when it is here."""
    teacher = ctx.teacher
    if teacher is None:
        return
    steps = ctx.ckpt.schedule.steps
    log.info("teacher: %d samples at %d and %d steps", len(vs.noise), teacher.reference_steps, steps)
    t_noise = torch.from_numpy(vs.noise)
    tcond = {k: torch.from_numpy(v) for k, v in vs.cond.items()} if vs.cond else None
    t_ref = teacher_reference_samples(teacher, t_noise, teacher.reference_steps, tcond).numpy()
    t_low = teacher_reference_samples(teacher, t_noise, steps, tcond).numpy()
    vs.rows = {
        f"teacher {teacher.reference_steps} steps": t_ref[: vs.n],
        f"teacher {steps} steps": t_low[: vs.n],
        **vs.rows,
    }
    ctx.report.distribution = _distribution(vs.student, t_ref, t_low, ctx.shape, ctx.cfg).to_dict()


def _medians(levels: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[int, float]]:
    return {lvl: {b: t["median_ms"] for b, t in levels[lvl].items()} for lvl in ("per_call", "end_to_end")}


def time_variants(ctx: CompileContext, runners: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """Stage 5: the teacher and every variant timed side by side in this process."""
    teacher = ctx.teacher
    timed = {f"{b} {p}": (r, ctx.ckpt.schedule) for (p, b), r in runners.items()}
    baseline = None
    if teacher is not None:
        t_runner = TorchRunner(Denoiser(teacher.model), ctx.spec, name="torch-teacher")
        t_runner.activate()
        baseline = (t_runner, teacher.schedule(teacher.reference_steps))
    timings = measure(
        baseline,
        timed,
        ctx.shape,
        ctx.cond_fn,
        ctx.cfg.speed_config(),
        teacher_dir=teacher.path if teacher is not None else None,
    )
    for v in ctx.report.variants:
        key = f"{v.backend} {v.precision}"
        v.timings = timings[key]
        v.latency_ms = _medians(timings[key])
        if teacher is not None:
            v.speedup_vs_teacher = speedups(timings, key)
    if teacher is not None:
        ctx.report.teacher["latency_ms"] = _medians(timings["teacher"])
        ctx.report.teacher["timing"] = timings["teacher"]  # the baseline, in-run vs fresh process
    best = ctx.report.recommend()
    if best:
        log.info("recommended: %s %s", best.backend, best.precision)
    time_threads(ctx)
    return timings


GRID_BACKENDS = ("onnxruntime", "openvino")  # CPU runtimes whose thread count is a setting


def time_threads(ctx: CompileContext) -> None:
    """Stage 5b: every variant per call at each thread count of the grid, sessions built per count
    (optimizer.threads_grid); the recommendation names variant, threads and batch."""
    from optimizer import threads_grid as tg

    cfg = ctx.cfg
    grid = cfg.speed.threads_grid
    grid = tg.default_grid() if grid is None else grid
    if not grid or cfg.backend not in GRID_BACKENDS or not ctx.report.variants:
        return
    graphs = {
        v.precision: ctx.manifest.file(ctx.manifest.get(f"onnx/{v.precision}")) for v in ctx.report.variants
    }
    meta = {
        f"{v.backend} {v.precision}": {"backend": v.backend, "precision": v.precision, "passed": v.passed}
        for v in ctx.report.variants
    }

    def open_runner(name: str, threads: int):
        p = meta[name]["precision"]
        return activate_runners(ctx, {p: graphs[p]}, threads=threads)[(p, cfg.backend)]

    rng = np.random.default_rng(ctx.cfg.seed)

    def feeds(b: int) -> dict[str, np.ndarray]:
        x = rng.standard_normal((b, *ctx.shape)).astype(np.float32)
        t = np.full((b,), ctx.ckpt.schedule.timesteps[0], np.float32)
        return {"sample": x, "timestep": t, **(ctx.cond_fn(b) if ctx.cond_fn else {})}

    points = tg.time_grid(open_runner, meta, grid, cfg.batch_sizes, feeds, cfg.speed_config().rule())
    ctx.report.threads = tg.summary(points, tg.usable_cores(), grid)
    rec = ctx.report.threads["recommendation"]
    if rec:
        log.info("recommended (threads grid): %s", rec["summary"])


def write_report(ctx: CompileContext, vs: ValidationSet, timings: dict[str, Any]) -> None:
    """Stage 6: report.json, report.md, samples.png, latency.png into this run's folder."""
    from optimizer.plots import latency_png, samples_png

    root = ctx.manifest.root
    samples_png(vs.rows, root / "samples.png")
    latency_png({k: _medians(v) for k, v in timings.items()}, root / "latency.png")
    ctx.report.seconds = time.perf_counter() - ctx.t_start
    write_json_atomic(root / "report.json", ctx.report.to_dict())
    write_text_atomic(root / "report.md", ctx.report.to_markdown())
    for f in ("report.json", "report.md", "samples.png", "latency.png"):
        ctx.manifest.add(f"report/{f}", root / f, "report", input_sha256=ctx.ckpt_sha)


def publish(ctx: CompileContext) -> Manifest:
    """Stage 7: this run's folder and manifest become the published output, in one atomic step."""
    run = {
        "student_sha256": ctx.ckpt_sha,
        "report": f"runs/{ctx.run_id}/report.json",
        "passed": ctx.report.passed,
        "allow_unvalidated": False,
    }
    return ctx.run.publish(ctx.manifest, run, fault=fault_at)


def _distribution(student, t_ref, t_low, shape, cfg: CompileConfig):
    from optimizer.compile import quality

    # Scored as images: clipped to the data range, as the teacher's own FID figures are.
    student, t_ref = np.clip(student, -1, 1), np.clip(t_ref, -1, 1)
    t_low = np.clip(t_low, -1, 1) if t_low is not None else None
    real = None
    extractor = quality.default_feature_extractor(shape)
    space = type(extractor).__name__
    if tuple(shape) == (1, 8, 8):
        real, _ = quality.load_digits_images()
        space = "digit classifier features (real data: sklearn digits)"
    return distribution(student, t_ref, t_low, extractor, real, space, cfg.bars)


def _check_writable(out: Path) -> None:

    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise InputError(f"{out}: output directory is not writable")
    out.mkdir(parents=True, exist_ok=True)


def demo_source() -> tuple[Path, int | None]:
    """The bundled distilled student if present, else the demo teacher packed at 4 DDIM steps."""
    ckpt = DEMO_DIR / "student" / "student.ckpt"
    if ckpt.exists():
        return ckpt, None
    teacher = DEMO_DIR / "teacher"
    if not (teacher / "unet").exists():
        raise InputError(f"{teacher}: the bundled demo teacher is missing (reinstall dd-compile)")
    return teacher, 4


def report_summary(report: CompileReport) -> dict[str, Any]:
    return {"passed": report.passed, "failures": report.failures}
