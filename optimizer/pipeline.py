"""dd-compile: student.ckpt -> export -> quantize -> (build) -> validate -> report.

The only module that chains stages. Each stage is skipped when the manifest shows the same input
sha256 and config; otherwise it runs again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.errors import BackendUnavailable, InputError
from engines.fileio import sha256_file, write_json_atomic, write_text_atomic
from engines.iospec import IOSpec
from engines.manifest import Manifest
from engines.schedule import draw_noise
from engines.torch_runner import TorchRunner
from optimizer.checkpoint import StudentCheckpoint, TeacherRef, load_checkpoint
from optimizer.conditioning import load_conditioning, n_classes
from optimizer.export import ExportConfig, export_onnx
from optimizer.iospec import conditioning_feeds, io_spec_for, sample_shape
from optimizer.models import Denoiser, Teacher, load_teacher, teacher_reference_samples
from optimizer.report import CompileReport, VariantResult, environment
from optimizer.speed import SpeedConfig, measure, speedups
from optimizer.validate import ParityBars, call_parity, distribution, sample_parity

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt")
DEMO_DIR = Path(__file__).parent / "demo"


@dataclass
class CompileConfig:
    out: Path
    precisions: tuple[str, ...] = PRECISIONS
    backend: str = "onnxruntime"
    batch_sizes: tuple[int, ...] = (1, 16)
    teacher: Path | None = None  # overrides the checkpoint's teacher path
    require_teacher: bool = False  # a missing teacher is an error (exit 2), not a skipped check
    seed: int = 0
    steps: int | None = None  # for a diffusers folder input: the student's step count
    threads: int | None = None  # ORT/torch intra-op threads (None: library default)
    n_samples: int = 64  # sample-level parity (each variant's sampler vs the torch student's)
    n_fid_samples: int = 256  # distribution level (student vs teacher; FID needs more than 64)
    calib_seeds: int = 8  # trajectories captured for calibration
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    bars: ParityBars = field(default_factory=ParityBars)
    triton_repo: Path | None = None
    trt_options: dict[str, Any] = field(default_factory=dict)  # TrtBuildConfig fields (--backend tensorrt)
    int8_options: dict[str, Any] = field(default_factory=dict)  # Int8Config fields (--int8-*)
    cond: Path | None = None  # --cond: conditioning rows (.npz) for calibration and validation


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


def _trajectory(runner, ckpt, shape, seeds, batch, cond_fn) -> list[dict[str, np.ndarray]]:
    """Feeds the student sees along its own sampling trajectory (calibration, call parity)."""
    from optimizer.quantize import calibration_feeds

    return calibration_feeds(runner, runner.spec, ckpt.schedule, shape, seeds, batch, cond_fn)


def _export(manifest: Manifest, model: torch.nn.Module, spec: IOSpec, ckpt_sha: str) -> Path:
    cfg = ExportConfig()
    name, path = "onnx/fp32", manifest.root / "onnx" / "student.fp32.onnx"
    if manifest.up_to_date(name, ckpt_sha, cfg.to_dict()):
        log.info("export: up to date (%s)", path)
        return path
    log.info("export: %s", path)
    export_onnx(Denoiser(model), spec, path, cfg)
    manifest.add(
        name,
        path,
        "onnx",
        precision="fp32",
        backend=None,
        input_sha256=ckpt_sha,
        config=cfg.to_dict(),
        libraries=environment()["libraries"],
    )
    return path


def _sample_psnr_check(torch_ref: TorchRunner, schedule, shape, cond_fn, cfg: CompileConfig):
    """For INT8 layer selection: sample-level PSNR of a candidate graph vs the torch student."""
    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from engines.schedule import Sampler
    from optimizer.validate import psnr_db

    seeds = list(range(30_000 + cfg.seed, 30_000 + cfg.seed + 16))  # not the report's seeds
    noise, step_noise = draw_noise(seeds, shape, schedule.steps)
    cond = cond_fn(len(seeds)) if cond_fn else None
    b = max(cfg.batch_sizes)
    ref = Sampler(schedule, torch_ref, output_name=torch_ref.spec.output_names[0], max_batch=b)(
        noise, step_noise, cond
    )

    def check(path: Path) -> float:
        with OnnxRuntimeRunner(path, torch_ref.spec, threads=cfg.threads) as r:
            out = Sampler(schedule, r, output_name=r.spec.output_names[0], max_batch=b)(
                noise, step_noise, cond
            )
        return psnr_db(out, ref) if np.isfinite(out).all() else float("-inf")

    return check


def _quantize(
    manifest: Manifest,
    precision: str,
    fp32: Path,
    calib: list[dict],
    cfg: CompileConfig,
    torch_ref: TorchRunner,
    schedule,
    shape,
    cond_fn,
    cond_sha: str | None,
) -> Path:
    from optimizer import quantize as q

    # Q/DQ placement is chosen by ORT CPU timings only where ORT CPU is the target
    int8_opts = {"placement": "measure" if cfg.backend == "onnxruntime" else "fixed", **cfg.int8_options}
    qcfg = q.Fp16Config() if precision == "fp16" else q.Int8Config(**int8_opts)
    config = {
        "precision": precision,
        **asdict(qcfg),
        "calib_seeds": cfg.calib_seeds,
        "seed": cfg.seed,
        "cond_sha256": cond_sha,
    }  # the calibration inputs: a new --cond file re-quantizes
    name, path = f"onnx/{precision}", manifest.root / "onnx" / f"student.{precision}.onnx"
    fp32_sha = manifest.get("onnx/fp32").sha256
    if manifest.up_to_date(name, fp32_sha, config):
        log.info("quantize %s: up to date (%s)", precision, path)
        return path
    log.info("quantize %s: %s", precision, path)
    if precision == "fp16":
        res = q.quantize_fp16(fp32, path, calib, qcfg)
    else:
        res = q.quantize_int8(
            fp32, path, calib, qcfg, parity_check=_sample_psnr_check(torch_ref, schedule, shape, cond_fn, cfg)
        )
    manifest.add(
        name,
        path,
        "onnx",
        precision=precision,
        backend=None,
        input_sha256=fp32_sha,
        config=config,
        libraries=environment()["libraries"],
        extra=res.to_dict(),
    )
    return path


def run(source: Path, cfg: CompileConfig) -> CompileReport:
    t_start = time.perf_counter()
    source = Path(source)
    out = Path(cfg.out)
    for p in cfg.precisions:
        if p not in PRECISIONS:
            raise InputError(f"--precision: unknown precision {p!r} (choose from {', '.join(PRECISIONS)})")
    if cfg.backend not in BACKENDS:
        raise InputError(f"--backend: unknown backend {cfg.backend!r} (choose from {', '.join(BACKENDS)})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    ckpt, model = _as_student(source, cfg.steps)
    model = model.eval().float()
    report_teacher = CompileReport(student={}, teacher={})
    teacher = _load_teacher(ckpt, cfg, report_teacher)  # before any work: a missing one may be an error
    _check_writable(out)
    cond, cond_sha = _load_cond(cfg, ckpt, report_teacher)
    ehs = (cond or {}).get("encoder_hidden_states")
    tokens = {"seq_len": ehs.shape[1]} if ehs is not None else {}
    spec = io_spec_for(ckpt.model_class, ckpt.model_config, list(cfg.batch_sizes), **tokens)
    shape = sample_shape(ckpt.model_class, ckpt.model_config)
    ckpt_sha = sha256_file(source) if source.is_file() else f"diffusers:{ckpt.teacher.sha256}"
    n_params = sum(p.numel() for p in model.parameters())
    report = CompileReport(
        student={
            "path": str(source),
            "sha256": ckpt_sha,
            "model_class": ckpt.model_class,
            "params": n_params,
            "steps": ckpt.schedule.steps,
            "sampler": ckpt.schedule.kind,
            "timesteps": list(ckpt.schedule.timesteps),
            "distillation": ckpt.distillation,
        },
        teacher=report_teacher.teacher,
        skipped=report_teacher.skipped,
        notes=report_teacher.notes,
        environment=environment(cfg.threads),
    )
    manifest = Manifest.open_or_create(
        out,
        spec,
        ckpt.schedule,
        {
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
        },
    )

    # 1. export, 2. quantize -- the graphs ONNX Runtime checks here are what TensorRT compiles.
    fp32 = _export(manifest, model, spec, ckpt_sha)
    manifest.save()
    torch_ref = TorchRunner(Denoiser(model), spec, name="torch-student")
    torch_ref.activate()
    cond_fn = _cond_fn(spec, cfg.seed, cond, n_classes(ckpt.model_config) or 1)
    calib_seeds = list(range(10_000 + cfg.seed, 10_000 + cfg.seed + cfg.calib_seeds))
    calib = _trajectory(torch_ref, ckpt, shape, calib_seeds, max(cfg.batch_sizes), cond_fn)
    graphs = {"fp32": fp32}
    for p in cfg.precisions:
        if p != "fp32":
            graphs[p] = _quantize(
                manifest, p, fp32, calib, cfg, torch_ref, ckpt.schedule, shape, cond_fn, cond_sha
            )
            manifest.save()

    # 3. build (TensorRT) -- fails fast with exit 2 when TensorRT/CUDA is missing; graphs are kept.
    runners = _runners(manifest, graphs, cfg)

    # 4. validate
    from engines.schedule import Sampler

    # Noise is drawn per seed, so the first n_samples of the distribution set are the sample set.
    n_all = max(cfg.n_samples, cfg.n_fid_samples if teacher is not None else 0)
    all_noise, all_step_noise = draw_noise(
        list(range(cfg.seed, cfg.seed + n_all)), shape, ckpt.schedule.steps
    )
    all_cond = cond_fn(n_all) if cond_fn else None
    max_b = max(cfg.batch_sizes)
    student_all = Sampler(ckpt.schedule, torch_ref, output_name=spec.output_names[0], max_batch=max_b)(
        all_noise, all_step_noise, all_cond
    )
    n = cfg.n_samples
    noise, step_noise = all_noise[:n], all_step_noise[:, :n]
    cond = {k: v[:n] for k, v in all_cond.items()} if all_cond else None
    ref_samples = student_all[:n]
    val_seeds = list(range(20_000 + cfg.seed, 20_000 + cfg.seed + 4))
    val_feeds = _trajectory(torch_ref, ckpt, shape, val_seeds, max_b, cond_fn)
    rows = {"torch student": ref_samples}
    for (p, backend), runner in runners.items():
        v = VariantResult(backend=backend, precision=p, path=str(graphs[p].relative_to(out)))
        art = manifest.get(f"onnx/{p}")
        v.precision_info = art.extra if art else {}
        with runner:
            cp = call_parity(torch_ref, runner, val_feeds, p, cfg.bars)
            sp, samples = sample_parity(
                ref_samples, ckpt.schedule, runner, noise, step_noise, p, cond, max_b, cfg.bars
            )
        v.parity = {"call": cp.to_dict(), "sample": sp.to_dict()}
        if not cp.passed:
            v.failures.append(
                f"call-level rel. L2 {cp.rel_l2:.2e} (bar {cp.bar_rel_l2:.0e}), "
                f"polygraphy {'pass' if cp.polygraphy['passed'] else 'fail'}, "
                f"{cp.nonfinite} non-finite"
            )
        if not sp.passed:
            v.failures.append(f"sample PSNR {sp.psnr_db:.1f} dB < {sp.bar_psnr_db} dB")
        if p != "fp32" and v.precision_info.get("counts", {}).get(p) == 0:
            # parity would pass trivially: the graph is the fp32 one
            v.failures.append(f"no node runs in {p} within the {p} bars: this graph is the fp32 one")
        rows[f"{backend} {p}"] = samples
        report.variants.append(v)
        log.info("%s %s: call rel. L2 %.2e, sample PSNR %.1f dB", backend, p, cp.rel_l2, sp.psnr_db)

    if teacher is not None:
        log.info(
            "teacher: %d samples at %d and %d steps", n_all, teacher.reference_steps, ckpt.schedule.steps
        )
        t_noise = torch.from_numpy(all_noise)
        tcond = {k: torch.from_numpy(v) for k, v in all_cond.items()} if all_cond else None
        t_ref = teacher_reference_samples(teacher, t_noise, teacher.reference_steps, tcond).numpy()
        t_low = teacher_reference_samples(teacher, t_noise, ckpt.schedule.steps, tcond).numpy()
        rows = {
            f"teacher {teacher.reference_steps} steps": t_ref[:n],
            f"teacher {ckpt.schedule.steps} steps": t_low[:n],
            **rows,
        }
        report.distribution = _distribution(student_all, t_ref, t_low, shape, cfg).to_dict()

    # speed: the teacher and every variant, side by side in this process
    timed = {f"{b} {p}": (r, ckpt.schedule) for (p, b), r in runners.items()}
    teacher_runner = None
    if teacher is not None:
        teacher_runner = TorchRunner(Denoiser(teacher.model), spec, name="torch-teacher")
        teacher_runner.activate()
    for r, _ in timed.values():
        r.activate()
    timings = measure(
        (teacher_runner, teacher.schedule(teacher.reference_steps)) if teacher else None,
        timed,
        shape,
        cond_fn,
        cfg.speed,
    )
    for r, _ in timed.values():
        r.deactivate()
    for v in report.variants:
        key = f"{v.backend} {v.precision}"
        v.timings = timings[key]
        v.latency_ms = {
            lvl: {b: t["median_ms"] for b, t in timings[key][lvl].items()}
            for lvl in ("per_call", "end_to_end")
        }
        if teacher is not None:
            v.speedup_vs_teacher = speedups(timings, key)
        v.passed = not v.failures
    if teacher is not None:
        report.teacher["latency_ms"] = {
            lvl: {b: t["median_ms"] for b, t in timings["teacher"][lvl].items()}
            for lvl in ("per_call", "end_to_end")
        }
    best = report.recommend()
    if best:
        log.info("recommended: %s %s", best.backend, best.precision)

    # 5. report + artifacts
    from optimizer.plots import latency_png, samples_png

    samples_png(rows, out / "samples.png")
    lat = {
        ("teacher" if k == "teacher" else k): {
            lvl: {b: t["median_ms"] for b, t in v[lvl].items()} for lvl in v
        }
        for k, v in timings.items()
    }
    latency_png(lat, out / "latency.png")
    report.seconds = time.perf_counter() - t_start
    write_json_atomic(out / "report.json", report.to_dict())
    write_text_atomic(out / "report.md", report.to_markdown())
    for f in ("report.json", "report.md", "samples.png", "latency.png"):
        manifest.add(f"report/{f}", out / f, "report", input_sha256=ckpt_sha)
    manifest.save()
    if cfg.triton_repo:
        from engines.triton import write_triton_repo

        write_triton_repo(out, Path(cfg.triton_repo), precision=_best_precision(report))
    return report


def _best_precision(report: CompileReport) -> str:
    best = next((v for v in report.variants if v.recommended), None)
    return best.precision if best else "fp32"


def _distribution(student, t_ref, t_low, shape, cfg: CompileConfig):
    from optimizer import quality

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


def _runners(manifest: Manifest, graphs: dict[str, Path], cfg: CompileConfig) -> dict:
    spec = manifest.io_spec
    if cfg.backend == "tensorrt":
        from optimizer.build import check_tensorrt_available

        check_tensorrt_available()  # raises BackendUnavailable with the extra to install
        return _tensorrt_runners(manifest, graphs, cfg)
    from engines.onnxruntime_runner import OnnxRuntimeRunner

    runners = {}
    for p, path in graphs.items():
        r = OnnxRuntimeRunner(path, spec, backend=cfg.backend, threads=cfg.threads)
        try:
            r.activate()
        except BackendUnavailable:
            raise
        except Exception as e:  # ORT refusing a graph is a failed variant, not a crash
            raise InputError(f"{path}: ONNX Runtime cannot load it ({e})") from None
        runners[(p, cfg.backend)] = r
    return runners


def _tensorrt_runners(manifest: Manifest, graphs: dict[str, Path], cfg: CompileConfig) -> dict:
    from engines.tensorrt_runner import TensorRTRunner
    from optimizer.build import TrtBuildConfig, build_engine

    runners = {}
    for p, onnx_path in graphs.items():
        res = build_engine(
            onnx_path,
            manifest.io_spec,
            manifest.root / "engines",
            TrtBuildConfig(batch_sizes=tuple(cfg.batch_sizes), **cfg.trt_options),
            precision=p,
        )
        manifest.add(**res.to_manifest())
        manifest.save()
        runners[(p, "tensorrt")] = TensorRTRunner(res.path, manifest.io_spec)
    return runners


def _check_writable(out: Path) -> None:
    import os

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
