"""dd-bench for text-to-image outputs (manifest meta.kind "text-to-image"), in the bench JSON of
optimizer/bench/schema.py, so merge, bench.md, the plots and dd-triton read it as they read a pixel
bench.

A pixel output is one network and a sampler schedule; a text-to-image output is a pipeline (text
encoder, UNet, VAE decoder, tokenizer, numpy scheduler) per published mix ("pipeline/<mix>"). Each
mix on each usable backend is one row ("onnxruntime/fp16"), opened through engines.load, which
checks validation and every sha256 (graphs, description, tokenizer, scheduler) before it builds
anything. Two phases per batch size, the variants of a (phase, batch) group interleaved by the one
timing loop:

- "e2e": one whole generation, prompts in, uint8 images out, at the manifest's steps and guidance
  (optimizer.t2i.speed.Generation: what a user of engines.load sees);
- "call": one UNet evaluation at the UNet's batch (2B under CFG with guidance > 1).

The teacher (its diffusers pipeline at its reference steps and guidance) is timed end to end only,
alone in a fresh process after every runtime here is closed (optimizer.compile.teacher_baseline):
torch eager beside other runtimes' thread pools reads slow and would flatter the speedups.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import BackendError, DDCompileError, InputError
from engines.manifest import Manifest
from optimizer.bench.fingerprint import fingerprint
from optimizer.bench.flops import matmul_peak_gflops
from optimizer.bench.measure import (
    _PROVENANCE,
    TEACHER_BASELINE,
    BenchConfig,
    _best,
    _derive,
    _resolve,
    _timing_dict,
    _usable_cores,
    bench_head,
    resolve_device,
    run_group,
)
from optimizer.bench.variants import VariantSpec, ort_has
from optimizer.families.table import RUNTIME_PRECISIONS
from optimizer.t2i.teacher_timing import MODULE as TEACHER_MODULE

log = logging.getLogger(__name__)

KIND = "text-to-image"  # manifest meta.kind of optimizer/t2i/stages.py's outputs
# Fixed prompts, so two benches of the same output tokenize the same text (cycled to the batch).
PROMPTS = (
    "a photo of a cat",
    "a red car on a street",
    "a bowl of fruit, oil painting",
    "a mountain lake at dawn",
)
BACKENDS = ("onnxruntime", "openvino", "onnxruntime-cuda", "onnxruntime-trt")
GRID_BACKENDS = ("onnxruntime", "openvino")  # CPU runtimes whose thread count is a setting
MEMORY_NOTE = (
    "not probed: the memory probe (optimizer/bench/memprobe.py) opens one network, not a "
    "text-to-image pipeline"
)
FLOPS_NOTE = (
    "not counted for text-to-image pipelines (three networks per generation; "
    "achieved_gflops and fraction_of_peak are null)"
)
CALL_NO_TEACHER = "the teacher is timed end to end only (its diffusers pipeline, prompts in, images out)"


@dataclass(frozen=True)
class PipelineInfo:
    """What the manifest says about the compiled pipeline: how a generation is run."""

    steps: int
    guidance_scale: float
    size: tuple[int, int]  # (height, width) in pixels
    guidance: str  # "cfg" | "embedded" | "none"
    family: str
    mixes: tuple[str, ...]

    @classmethod
    def from_manifest(cls, m: Manifest) -> PipelineInfo:
        meta = m.meta
        missing = [k for k in ("steps", "guidance_scale", "size") if k not in meta]
        if missing:
            raise InputError(f"{m.path}: text-to-image meta lacks {', '.join(missing)}")
        mixes = tuple(a.precision or a.name.rsplit("/", 1)[-1] for a in m.find("pipeline"))
        if not mixes:
            raise InputError(f"{m.path}: no pipeline artifact (a text-to-image output publishes one per mix)")
        h, w = meta["size"]
        return cls(
            steps=int(meta["steps"]),
            guidance_scale=float(meta["guidance_scale"]),
            size=(int(h), int(w)),
            guidance=str(meta.get("guidance", "cfg")),
            family=str(meta.get("family", "sd")),
            mixes=mixes,
        )

    @property
    def cfg_batch(self) -> bool:
        """The UNet runs at 2B (negative and positive prompts) only under CFG with guidance > 1."""
        return self.guidance == "cfg" and self.guidance_scale > 1


@dataclass(frozen=True)
class TeacherPlan:
    """The teacher row's inputs: its folder and how it generates (or why it is not benched)."""

    path: Path | None
    reference_steps: int | None
    guidance_scale: float | None
    why_not: str | None = None


@dataclass
class PipelineSetup:
    """Everything timing and assembly share: the manifest, the open pipelines, the rows."""

    manifest: Manifest
    info: PipelineInfo
    teacher: TeacherPlan | None
    variants: list[VariantSpec]
    skipped: list[tuple[VariantSpec, str]]
    runners: dict[str, Any]  # name -> Generation (a pipeline as a whole-generation "runner")
    unvalidated: dict[str, str]  # variant name -> why it is not servable (--allow-unvalidated)
    batches: list[int]
    threads: int
    device: str
    fingerprint: dict[str, Any]
    peaks: list[float] = field(default_factory=list)


def run_pipeline_bench(
    out_dir: str | Path, cfg: BenchConfig, *, allow_unvalidated: bool = False
) -> dict[str, Any]:
    """Bench every published mix of the text-to-image output `out_dir` on every usable backend,
    and its teacher: the bench JSON (optimizer/bench/schema.py)."""
    s = setup(out_dir, cfg, allow_unvalidated)
    try:
        results = time_variants(s, cfg)
    finally:
        for r in s.runners.values():
            r.deactivate()
    grid = time_threads(s, cfg, allow_unvalidated)
    # after every runtime is released: the teacher alone in a fresh process
    baseline = teacher_baseline(s, cfg, results)
    s.peaks.append(matmul_peak_gflops(s.device, "float32", cfg.peak_seconds))
    out = assemble(s, cfg, results, baseline)
    out["threads"] = grid
    return out


def _backends(cfg: BenchConfig, device: str) -> list[tuple[str, str | None]]:
    """(backend, why it cannot run here or None); a backend not installed is listed (as skipped)
    only when --backends asked for it."""
    asked = cfg.backends
    out: list[tuple[str, str | None]] = []
    for be in BACKENDS:
        if asked is not None and be not in asked:
            continue
        why: str | None = None
        if be == "openvino" and importlib.util.find_spec("openvino") is None:
            why = "openvino is not installed (pip install 'dd-compile[openvino]')"
        elif be.startswith("onnxruntime-"):
            provider = "CUDAExecutionProvider" if be == "onnxruntime-cuda" else "TensorrtExecutionProvider"
            if not device.startswith("cuda"):
                why = "no CUDA device"
            elif not ort_has(provider):
                why = f"onnxruntime has no {provider} (pip install 'dd-compile[gpu]')"
        if why is not None and asked is None:
            continue  # default: only what this machine has; asked for: say why not
        out.append((be, why))
    return out


def _teacher_plan(m: Manifest, cfg: BenchConfig) -> TeacherPlan | None:
    """The teacher folder (--teacher or meta.teacher.path) and its reference steps and guidance
    (the manifest's record, else the folder's teacher.json); a missing folder is a reason, not an
    error: the engine rows are still worth measuring."""
    if not cfg.teacher:
        return None
    rec = m.meta.get("teacher") or {}
    raw = cfg.teacher_path or rec.get("path")
    if not raw:
        return TeacherPlan(None, None, None, "the manifest names no teacher (pass --teacher DIR)")
    path = _resolve(str(raw), m.root)
    if not path.is_dir():
        return TeacherPlan(path, None, None, f"{path}: teacher folder not found (pass --teacher DIR)")
    steps, g = rec.get("reference_steps"), rec.get("guidance_scale")
    if steps is None or g is None:
        from optimizer.t2i.source import _teacher_info

        try:
            t = _teacher_info(path)
        except InputError as e:
            return TeacherPlan(path, None, None, str(e).splitlines()[0])
        steps, g = t.reference_steps, t.guidance_scale
    return TeacherPlan(path, int(steps), float(g))


def _open(out_dir: Path, mix: str, backend: str, threads: int, info: PipelineInfo, allow: bool) -> Any:
    """engines.load's pipeline for `mix` on `backend` as a Generation (verified before it is built)."""
    import engines
    from optimizer.t2i.speed import Generation

    pipe = engines.load(out_dir, precision=mix, backend=backend, allow_unvalidated=allow, threads=threads)
    return Generation(pipe, info.steps, info.guidance_scale, list(PROMPTS))


def _workload(s: PipelineSetup) -> dict[str, Any] | None:
    """An inpainting UNet's workload for the teacher (what its compiled pipelines run), else None."""
    w = next((r.workload for r in s.runners.values()), None)
    return w.to_dict() if w is not None and w.inpaint else None


def setup(out_dir: str | Path, cfg: BenchConfig, allow_unvalidated: bool = False) -> PipelineSetup:
    """Check the inputs, list the variants, open every pipeline (a backend that cannot start is a
    skipped row; a file that fails its sha256 or validation refuses the whole bench)."""
    out_dir = Path(out_dir)
    m = Manifest.load(out_dir)
    if m.meta.get("kind") != KIND:
        raise InputError(f"{m.path}: not a text-to-image output (meta.kind {m.meta.get('kind')!r})")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise InputError(f"batch sizes must be >= 1, got {list(cfg.batch_sizes)}")
    info = PipelineInfo.from_manifest(m)
    # every file a pipeline reads (descriptions, graphs, tokenizer, scheduler config) against its
    # sha256 before any session opens: a changed file refuses the bench (exit 2), whichever backend
    for art in (*m.find("pipeline"), *m.find("onnx"), *m.find("asset")):
        m.verify(art)
    device = resolve_device(cfg.device)
    threads = cfg.threads or _usable_cores()
    s = PipelineSetup(
        manifest=m,
        info=info,
        teacher=_teacher_plan(m, cfg),
        variants=[],
        skipped=[],
        runners={},
        unvalidated={},
        batches=sorted(set(cfg.batch_sizes)),
        threads=threads,
        device=device,
        fingerprint=fingerprint(threads),
    )
    t_setup = time.perf_counter()
    try:
        _open_all(s, out_dir, cfg, allow_unvalidated)
    except BaseException:
        for r in s.runners.values():  # a refusal (tampered file) leaves no session open behind it
            r.deactivate()
        raise
    if not s.variants:
        log.warning("%s: no pipeline to bench here (skipped: %s)", m.path, [v.name for v, _ in s.skipped])
    if s.teacher is not None:
        tv = VariantSpec(TEACHER_BASELINE, "teacher", "baseline", "torch", "fp32", device="cpu")
        if s.teacher.why_not:
            s.skipped.append((tv, s.teacher.why_not))
        else:
            s.variants.append(tv)  # timed later, alone, in a fresh process
    s.peaks.append(matmul_peak_gflops(device, "float32", cfg.peak_seconds))
    log.info("setup (loading %d pipelines, peak) took %.1f s", len(s.runners), time.perf_counter() - t_setup)
    return s


def _open_all(s: PipelineSetup, out_dir: Path, cfg: BenchConfig, allow_unvalidated: bool) -> None:
    """Each mix on each backend: opened (into s.variants, s.runners) or a reason (into s.skipped)."""
    m, info = s.manifest, s.info
    for mix in info.mixes:
        art = m.get(f"pipeline/{mix}")
        assert art is not None  # PipelineInfo listed it
        for be, why in _backends(cfg, s.device):
            dev = "cuda" if be.startswith("onnxruntime-") else "cpu"
            v = VariantSpec(f"{be}/{mix}", "student", "engine", be, mix, art.name, dev)
            if why is None and mix in RUNTIME_PRECISIONS and be != "openvino":
                # the fp32 graphs under OpenVINO's bf16 hint: no other runtime runs that mix
                why = f"{mix} is OpenVINO's inference hint on the fp32 graphs: openvino only"
            if why is None:
                # validated on another runtime family (OpenVINO for an ONNX Runtime compile): its
                # verdict does not carry over; a row saying so, not a refusal of the whole bench
                why = m.servable(art, be)
                if why is not None and allow_unvalidated:
                    s.unvalidated[v.name] = why
                    why = None
            if why is not None:
                s.skipped.append((v, why))
                continue
            try:
                s.runners[v.name] = _open(out_dir, mix, be, s.threads, info, allow_unvalidated)
            except (BackendError, RuntimeError, ImportError) as e:
                # InputError / IntegrityError (a tampered file) are not caught: exit 2, nothing written
                s.skipped.append((v, f"failed to load: {str(e).splitlines()[0][:300]}"))
                continue
            s.variants.append(v)


def unet_feeds(gen: Any, info: PipelineInfo, b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One UNet evaluation's inputs as a generation feeds them: the UNet batch (2B under CFG), the
    compiled latent size, the scheduler's first timestep, the guidance embedding when embedded."""
    from engines.iospec import DimRange
    from engines.schedulers import trial_timesteps
    from engines.t2i import guidance_scale_embedding
    from optimizer.t2i.components import dummy_inputs

    p = gen.pipe
    specs, c = p.specs, p.config
    spec = specs[c.denoiser]
    ub = 2 * b if info.cfg_batch else b
    k = c.vae_scale_factor
    # every input at its compiled size (the text states, SDXL's pooled width, SD3's joint sequence)
    sizes = {name: r.opt for name, r in spec.dims.items()}
    sizes.update(batch=ub, latent_height=info.size[0] // k, latent_width=info.size[1] // k)
    fixed = spec.__class__(
        spec.family, spec.inputs, spec.outputs, {n: DimRange(v, v, v) for n, v in sizes.items()}
    )
    feeds = dummy_inputs(fixed, rng, "opt")
    t0 = float(trial_timesteps(p.scheduler, info.steps)[0])  # on a copy: the pipeline owns its state
    feeds["timestep"] = np.full((ub,), t0, np.float32)
    if c.guidance == "embedded":
        w = np.full((ub,), info.guidance_scale - 1, np.float32)  # the LCM pipelines embed w - 1
        feeds["timestep_cond"] = guidance_scale_embedding(w, int(c.time_cond_proj_dim))
    if "time_ids" in feeds:  # SDXL: the size/crop ids at this size
        h, w_ = info.size
        feeds["time_ids"] = np.tile(np.array([[h, w_, 0, 0, h, w_]], np.float32), (ub, 1))
    return feeds


def _unet_batch_ok(gen: Any, ub: int) -> str | None:
    r = gen.pipe.specs[gen.pipe.config.denoiser].dims.get("batch")
    if r is not None and not (r.min <= ub <= r.max):
        return (
            f"UNet batch {ub} outside the graph's profile [{r.min}, {r.max}] "
            "(end to end, the pipeline runs it in chunks)"
        )
    return None


def time_variants(s: PipelineSetup, cfg: BenchConfig) -> dict[str, list[dict[str, Any]]]:
    """Every (batch, phase) group in turn, its pipelines interleaved; name -> result entries."""
    rng = np.random.default_rng(cfg.seed)
    engines_ = [v for v in s.variants if v.model == "student"]
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in s.variants}
    groups = [(b, ph) for b in s.batches for ph in ("call", "e2e")]
    t_start = time.perf_counter()
    for gi, (b, phase) in enumerate(groups):
        budget = max(0.0, cfg.seconds - (time.perf_counter() - t_start)) / (len(groups) - gi)
        fns: dict[str, Callable[[], object]] = {}
        ub = 2 * b if s.info.cfg_batch else b
        batch_feed = {"batch": np.array(b)}  # Generation's feeds: B prompts, B images
        for v in engines_:
            if v.name not in s.runners:
                continue  # dropped by an earlier group
            gen = s.runners[v.name]
            if phase == "e2e":
                fns[v.name] = lambda g=gen, fb=batch_feed: g.infer(fb)
                continue
            if (why := _unet_batch_ok(gen, ub)) is not None:
                results[v.name].append({"phase": phase, "batch": b, "skipped": why})
                continue
            unet, feeds = gen.pipe.runners[gen.pipe.config.denoiser], unet_feeds(gen, s.info, b, rng)
            fns[v.name] = lambda r=unet, f=feeds: r.infer(f)
        if not fns:
            continue
        g = run_group(fns, budget, cfg, phase, b, s.variants, s.skipped, s.runners, e2e_warmup=1)
        for name, t in g.timings.items():
            results[name].append(
                {
                    "phase": phase,
                    "batch": b,
                    "steps": s.info.steps if phase == "e2e" else 1,
                    "unet_batch": ub,
                    "method": "measured",
                    **_timing_dict(t, g.stable[name]),
                }
            )
        log.info("%s b=%d: %d rounds in %.1f s (budget %.1f s)", phase, b, g.rounds, g.seconds, budget)
    return results


def time_threads(s: PipelineSetup, cfg: BenchConfig, allow_unvalidated: bool) -> dict[str, Any] | None:
    """Every CPU variant, one whole generation per point, at each thread count of the grid, a
    pipeline per count, side by side (optimizer.threads_grid; as dd-compile's time_threads)."""
    from optimizer import threads_grid as tg

    grid = tg.default_grid() if cfg.threads_grid is None else cfg.threads_grid
    vs = {v.name: v for v in s.variants if v.model == "student" and v.backend in GRID_BACKENDS}
    if not grid or not vs:
        return None
    meta = {
        n: {"backend": v.backend, "precision": v.precision, "passed": n not in s.unvalidated}
        for n, v in vs.items()
    }
    root = s.manifest.root

    def open_pipeline(name: str, threads: int) -> Any:
        v = vs[name]
        return _open(root, v.precision, v.backend, threads, s.info, allow_unvalidated)

    points = tg.time_grid(
        open_pipeline,
        meta,
        grid,
        s.batches,
        lambda b: {"batch": np.array(b)},
        cfg.rule(cfg.seconds / (2 * len(s.batches)), 1),  # one warm-up generation per pipeline
    )
    out = tg.summary(points, tg.usable_cores(), grid)
    out["unit"] = "generation"
    out["note"] = (
        "each point is one whole generation (prompts in, images out, at the manifest's steps and "
        "guidance), not one UNet call; variants listed in the manifest are the validated ones"
    )
    return out


def teacher_baseline(
    s: PipelineSetup, cfg: BenchConfig, results: dict[str, list[dict[str, Any]]]
) -> dict[str, Any] | None:
    """The teacher's diffusers pipeline, end to end, timed alone in a fresh process at each thread
    count of a small grid; its fastest count per batch is the row's figure. No in-run figure is
    taken (that is what the fresh process replaces), so the provenance says unchecked."""
    from optimizer.compile import teacher_baseline as tb

    t = s.teacher
    if t is None or t.why_not or TEACHER_BASELINE not in results:
        return None
    grid = tb.thread_grid(s.threads)
    fresh, why = None, "disabled (BenchConfig.fresh_teacher)"
    if cfg.fresh_teacher:
        assert t.path is not None and t.reference_steps is not None and t.guidance_scale is not None
        req = tb.BaselineRequest(
            teacher=str(t.path.resolve()),
            batch_sizes=s.batches,
            steps=t.reference_steps,
            threads=grid,
            # a (phase, batch) group's share of the budget, split over the grid
            rule=cfg.rule(cfg.seconds / (2 * len(s.batches)) / len(grid), 1),
            seed=cfg.seed,
            device="cpu",
            family=s.info.family,
            prompts=list(PROMPTS),
            guidance_scale=t.guidance_scale,
            size=list(s.info.size),
            workload=_workload(s),
        )
        log.info("timing the teacher alone in a fresh process at threads %s", grid)
        # the diffusers pipeline end to end (optimizer/t2i/teacher_timing.py), not the pixel
        # flow's denoiser-only sampler
        fresh, why = tb.fresh_teacher_timing(req, module=TEACHER_MODULE)
    row = results[TEACHER_BASELINE]
    verdict = "unchecked: no in-run figure (the teacher is timed only alone, in a fresh process)"
    for b in s.batches:
        cands = [(th, r["end_to_end"][b]) for th, r in (fresh or {}).items() if b in r.get("end_to_end", {})]
        if not cands:
            row.append({"phase": "e2e", "batch": b, "skipped": why or "no fresh-process figure"})
            continue
        # the fastest median, stable or not: a speedup over an unstable one is not stated
        th, best = min(cands, key=lambda c: c[1]["median_ms"])
        same = dict(cands).get(s.threads)
        prov = {
            "source": "fresh process",
            "threads": th,
            "in_run_median_ms": None,
            "in_run_threads": None,
            "in_run_stable": None,
            "fresh_same_threads_median_ms": same["median_ms"] if same else None,
            "in_run_over_fresh": None,
            "tolerance": cfg.agree_tol,
            "verdict": verdict,
        }
        row.append(
            {
                "phase": "e2e",
                "batch": b,
                "steps": t.reference_steps,
                "method": "measured",
                **_timing_dict(best, best.get("stable")),
                "baseline": {k: prov[k] for k in _PROVENANCE},
            }
        )
    return {
        "method": "the teacher's diffusers pipeline (reference steps and guidance, prompts in, "
        "uint8 images out, the compiled size) timed alone in a fresh process (python -m "
        "optimizer.compile.teacher_baseline) after every runtime here was released, at each of "
        f"threads {grid}; its best thread count per batch is the baseline (end to end only)",
        "fresh_process": fresh is not None,
        "why_not": why or None,
        "verdict": "unchecked",
    }


def assemble(
    s: PipelineSetup,
    cfg: BenchConfig,
    results: dict[str, list[dict[str, Any]]],
    baseline: dict[str, Any] | None,
) -> dict[str, Any]:
    """The bench JSON (optimizer/bench/schema.py), the pixel bench's keys with a pipeline's values."""
    peak = {
        "method": f"best of torch.mm n x n, {cfg.peak_seconds:g} s before and again after the "
        f"timing (the max counts), {s.threads} threads",
        "fp32_gflops": round(max(s.peaks), 2),
        "fp16_gflops": None,
        "samples_gflops": {"float32": [round(x, 2) for x in s.peaks]},
    }
    flops: dict[str, Any] = {"student": None, "teacher": None, "method": FLOPS_NOTE}
    memory = {"method": MEMORY_NOTE}
    rows = [
        {
            **v.to_dict(),
            "skipped": None,
            "memory": memory,
            "results": results[v.name],
            **({"unvalidated": s.unvalidated[v.name]} if v.name in s.unvalidated else {}),
        }
        for v in s.variants
    ]
    rows += [{**v.to_dict(), "skipped": why, "memory": None, "results": []} for v, why in s.skipped]
    _derive(rows, flops, peak, cfg.min_samples)
    for row in rows:  # say why a per-call speedup is absent, rather than "no timing of the teacher"
        for x in row["results"]:
            if x.get("phase") == "call" and x.get("p50_ms"):
                x["speedup_null_reason"] = CALL_NO_TEACHER
    info, t = s.info, s.teacher
    head = bench_head(cfg, s.fingerprint, s.device, s.manifest)
    return {
        **head,
        "source": {
            **head["source"],
            "kind": KIND,
            "sample_shape": [info.size[0], info.size[1], 3],  # uint8 H x W x RGB per image
            "schedule": {"kind": _scheduler_kind(s.manifest), "steps": info.steps},
            "pipeline": {
                "family": info.family,
                "mixes": list(info.mixes),
                "guidance": info.guidance,
                "guidance_scale": info.guidance_scale,
                "size": list(info.size),
                "steps": info.steps,
                "prompts": list(PROMPTS),
            },
            "teacher": {
                "path": str(t.path),
                "reference_steps": t.reference_steps,
                "guidance_scale": t.guidance_scale,
            }
            if t is not None and not t.why_not
            else None,
        },
        "config": {**asdict(cfg), "batch_sizes": s.batches, "threads": s.threads, "device": s.device},
        "peak": peak,
        "flops": flops,
        "teacher_baseline": baseline,
        "variants": rows,
        "best": _best(rows),
    }


def _scheduler_kind(m: Manifest) -> str:
    """The runtime scheduler of the recommended mix (engines/schedulers.py's kind, e.g. "ddim")."""
    import json

    rec = m.meta.get("recommended")
    art = m.get(f"pipeline/{rec}") if rec else None
    art = art or next(iter(m.find("pipeline")), None)
    try:
        return str(json.loads(m.file(art).read_text())["scheduler"]["kind"]) if art else "unknown"
    except (OSError, ValueError, KeyError, TypeError, DDCompileError):
        return "unknown"
