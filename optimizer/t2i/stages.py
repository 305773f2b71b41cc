"""dd-compile for text-to-image pipelines: prepare -> export -> record -> quantize -> validate ->
time -> report -> publish, each a function of one `T2IContext`.

The output run folder is itself a runtime folder (engines/t2i.py): onnx/<component>.<p>.onnx,
tokenizer/, scheduler/, one t2i.<mix>.json per deployment mix and t2i.json = the recommended mix.
It publishes through optimizer/compile/publish.py like the pixel flow (staging -> runs/<id>/ ->
one atomic manifest replace); the manifest's meta.kind "text-to-image" tells engines.load to
return a TextToImagePipeline.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InputError
from engines.fileio import sha256_file, write_json_atomic, write_text_atomic
from engines.manifest import Manifest
from engines.outdir import check_target, claim, is_ours
from optimizer.bars import ParityBars
from optimizer.compile.compile_report import environment
from optimizer.compile.publish import RunDir
from optimizer.compile.trt_profiles import TrtBuildConfig
from optimizer.families import FAMILIES, Family
from optimizer.process import process_state
from optimizer.progress import Stages, fault_at
from optimizer.t2i import precision as prec
from optimizer.t2i import validate as val
from optimizer.t2i.source import DEMO_T2I, T2ISource, resolve
from optimizer.t2i.speed import T2ISpeedConfig, measure, speedups, table
from optimizer.t2i.workload import Workload

log = logging.getLogger(__name__)
KIND = "text-to-image"
GRID_BACKENDS = ("onnxruntime", "openvino")  # CPU runtimes whose thread count is a setting
STEP_SEED_OFFSET = 1 << 20  # per-step noise seeds apart from the latents seeds (mt19937 takes 32 bits)
USER_PROMPTS = [
    "a photo of a cat",
    "a red car on a street",
    "a bowl of fruit, oil painting",
    "a mountain lake at dawn",
    "",
]


@dataclass
class T2ICompileConfig:
    out: Path
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    backend: str = "onnxruntime"  # engines/t2i.py's runners: validated and timed on this one
    batch_sizes: tuple[int, ...] = (1, 4)
    require_teacher: bool = False  # no teacher: exit 2 instead of skipping the distribution level
    steps: int | None = None
    guidance_scale: float | None = None
    max_sequence_length: int | None = None  # T5's token length (None: the family's own)
    prompt_chunks: int = 1  # the UNet's tokens axis: up to this many CLIP-length chunks
    lora_rank: int = 0  # LoRA inputs up to this total rank per layer (optimizer/t2i/lora_slots.py); 0: none
    teacher: Path | None = None
    size: tuple[int, int] | None = None
    resolutions: tuple[int, ...] | None = None
    seed: int = 0
    threads: int | None = None
    n_samples: int = 16  # sample parity images per mix
    n_fid_samples: int = 100  # distribution: student vs teacher images
    calib_prompts: int = 4
    clip_model: Path | None = None
    threads_grid: tuple[int, ...] | None = None  # None: 1 and every core; (): off
    trt: TrtBuildConfig = field(default_factory=TrtBuildConfig)  # --backend tensorrt (--trt-*)
    triton_repo: Path | None = None  # --triton-repo: engines/triton_t2i.py's repository, after publish
    bars: ParityBars = field(default_factory=lambda: val.default_bars())
    speed: T2ISpeedConfig = field(default_factory=T2ISpeedConfig)


@dataclass
class T2IContext:
    cfg: T2ICompileConfig
    src: T2ISource
    source_sha: str
    run: RunDir
    manifest: Manifest
    report: dict[str, Any]
    demo_judge: bool
    size: tuple[int, int]
    t_start: float = field(default_factory=time.perf_counter)
    engines: dict[tuple[str, str], Any] = field(default_factory=dict)  # (component, p) -> EngineResult
    # what a generation is: text-to-image, or inpainting for an inpainting UNet (optimizer/t2i/workload.py)
    workload: Workload = field(default_factory=Workload)
    # (component, precision) -> its graph's LoRA inputs (--lora-rank; optimizer/t2i/lora_stage.py)
    lora: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.manifest.root

    @property
    def family(self) -> Family:
        """The source's family (optimizer/families/table.py): its components and mixes."""
        return FAMILIES[self.src.student.spec.family]


def _source_sha(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    from optimizer.t2i.student import folder_sha256

    return f"pipeline:{folder_sha256(path)}"


def _is_demo_teacher(p: Path | None) -> bool:
    return p is not None and p.resolve() == (DEMO_T2I / "teacher").resolve()


def prepare(source: Path, cfg: T2ICompileConfig) -> T2IContext:
    """Every input checked (source, teacher, sizes, guidance, options) before the first write."""
    from optimizer.families.detect import family_of

    family = family_of(source)
    family.check_backend(cfg.backend)
    family.check_precisions(cfg.precisions, cfg.backend)
    from optimizer.compile.backends import require

    require(cfg.backend)  # installed, with its device: one line naming what is missing
    if cfg.backend == "tensorrt" and cfg.triton_repo is not None:
        raise InputError(
            "--triton-repo: the pipeline's Triton repository serves ONNX Runtime models; "
            "not with --backend tensorrt yet"
        )
    if cfg.triton_repo is not None and family.name != "sd":
        raise InputError(
            f"--triton-repo: the Triton repository serves SD 1.x/2.x pipelines; not {family.title} yet"
        )
    if cfg.lora_rank and cfg.triton_repo is not None:
        raise InputError(
            "--triton-repo: a Triton repository for graphs with LoRA inputs (--lora-rank) is not built yet"
        )
    if cfg.clip_model is not None and not (Path(cfg.clip_model) / "config.json").exists():
        raise InputError(f"--clip-model {cfg.clip_model}: no config.json (a transformers CLIPModel folder)")
    src = resolve(
        source,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        teacher=cfg.teacher,
        size=cfg.size,
        resolutions=cfg.resolutions,
        batch_sizes=cfg.batch_sizes,
        max_sequence_length=cfg.max_sequence_length,
        prompt_chunks=cfg.prompt_chunks,
    )
    if cfg.require_teacher and src.teacher is None:
        raise InputError(
            f"--require-teacher: {source} names no teacher pipeline (give --teacher PIPELINE_DIR)"
        )
    family.scheduler_kind(
        str(src.student.spec.scheduler_config.get("_class_name")),
        str(src.student.path / "scheduler" / "scheduler_config.json"),
    )
    protect = [source, src.student.path, *([src.teacher.path] if src.teacher else [])]
    out = check_target(cfg.out, "compile", "-o", protect=protect)
    if cfg.triton_repo is not None:
        check_target(cfg.triton_repo, "triton-repo", "--triton-repo", protect=[out, *protect])
    sha = _source_sha(source)
    lat = src.student.spec.profile
    size = (
        lat.latent_height.opt * src.student.spec.vae_scale_factor,
        lat.latent_width.opt * src.student.spec.vae_scale_factor,
    )
    out.mkdir(parents=True, exist_ok=True)
    rundir = RunDir(out)
    if not is_ours(out, "compile"):
        claim(out, "compile", rundir.run_id)
    rundir.begin()
    spec = src.student.spec
    meta = {
        "kind": KIND,
        "created_by": "dd-compile",
        "student": str(source.resolve()),
        "student_sha256": sha,
        "guidance": spec.guidance,
        "guidance_scale": src.guidance_scale,
        "steps": src.steps,
        "size": list(size),
        "batch_sizes": list(cfg.batch_sizes),
        "backend": cfg.backend,
        "family": family.name,
        "teacher": {
            "path": str(src.teacher.path.resolve()) if src.teacher else None,
            "reference_steps": src.teacher.reference_steps if src.teacher else None,
            "guidance_scale": src.teacher.guidance_scale if src.teacher else None,
        },
    }
    report = {
        "kind": KIND,
        "student": {
            "path": str(source),
            "sha256": sha,
            "pipeline_class": spec.pipeline_class,
            "guidance": spec.guidance,
            "guidance_scale": src.guidance_scale,
            "steps": src.steps,
            "scheduler": spec.scheduler_config.get("_class_name"),
            "distillation": src.distillation,
            "task": Workload.of_spec(spec).task,
        },
        "teacher": meta["teacher"],
        "size": list(size),
        "backend": cfg.backend,
        "family": family.name,
        "environment": environment(cfg.threads),
        "run_id": rundir.run_id,
        "notes": [],
        "failures": [],
    }
    demo = _is_demo_teacher(src.teacher.path if src.teacher else None) or _is_demo_teacher(src.student.path)
    work = Workload.of_spec(spec)
    if work.inpaint:
        report["notes"].append(
            f"an inpainting UNet: every generation here (parity, distribution, timing) inpaints the same "
            f"synthetic images under a box over their middle half, at strength {work.strength:g}"
        )
    return T2IContext(
        cfg, src, sha, rundir, Manifest(rundir.staging, None, None, meta), report, demo, size, workload=work
    )


# -- stages ----------------------------------------------------------------------------------
def export(ctx: T2IContext) -> dict[tuple[str, str], prec.Graph]:
    """fp32 graph per component + tokenizer.json + scheduler config (optimizer/t2i/export.py)."""
    from optimizer.t2i.export import export_pipeline

    export_pipeline(ctx.src.student, ctx.root)
    return {
        (k, "fp32"): prec.Graph(k, "fp32", ctx.root / f"onnx/{k}.fp32.onnx", {"passed": True}, "fp32 export")
        for k in ctx.family.exported  # SD: the VAE encoder too, every output serves image-to-image
    }


def prompts(ctx: T2IContext, n: int, offset: int = 0) -> tuple[list[str], list[Any] | None]:
    if ctx.demo_judge:
        from optimizer.demo.t2i.data import evaluation_prompts

        ex = evaluation_prompts(n + offset, ctx.cfg.seed)[offset:]
        return [e.prompt for e in ex], ex
    return [USER_PROMPTS[(i + offset) % len(USER_PROMPTS)] for i in range(n)], None


def latents(ctx: T2IContext, n: int, seed_offset: int = 0) -> np.ndarray:
    """Per-index latents (seed + i), as the runtime draws them from seeds (torch's CPU randn)."""
    from engines.torch_rng import TorchGenerator

    spec = ctx.src.student.spec
    k = spec.vae_scale_factor
    c = int(spec.component("vae_decoder").config["latent_channels"])  # unpacked (Flux packs in its graph)
    shape = (c, ctx.size[0] // k, ctx.size[1] // k)
    base = ctx.cfg.seed + seed_offset
    return np.stack([TorchGenerator(base + i).randn(shape) for i in range(n)])


def step_seeds(ctx: T2IContext, start: int, stop: int) -> list[int]:
    """Seeds of a stochastic scheduler's per-step draws beside `latents(ctx, ...)`: disjoint from the
    latents' seeds, else the first re-noising draw would repeat the image's initial noise."""
    return [ctx.cfg.seed + STEP_SEED_OFFSET + i for i in range(start, stop)]


def torch_images(
    ctx: T2IContext,
    pipe: Any,
    ps: list[str],
    seed_offset: int,
    step_start: int | None = None,
    steps: int | None = None,
    g: float | None = None,
) -> np.ndarray:
    """diffusers' images for `ps` (the student's steps and guidance unless given): from
    latents(ctx, n, seed_offset), with step_seeds from `step_start` for a stochastic scheduler; an
    inpainting UNet inpaints the workload's sources, every draw from seed + seed_offset + i."""
    from optimizer.t2i.reference import images

    n = len(ps)
    steps = ctx.src.steps if steps is None else steps
    g = ctx.src.guidance_scale if g is None else g
    if ctx.workload.inpaint:
        seeds = [ctx.cfg.seed + seed_offset + i for i in range(n)]
        return ctx.workload.torch_images(pipe, ps, seeds, steps, g, seed_offset, ctx.size)
    seeds = None if step_start is None else step_seeds(ctx, step_start, step_start + n)
    return images(pipe, ps, latents(ctx, n, seed_offset), steps, g, seeds)


def engine_images(ctx: T2IContext, ep: Any, ps: list[str], seed_offset: int) -> np.ndarray:
    """A compiled mix's images for what torch_images(ctx, ..., seed_offset, step_start=0) draws."""
    if ctx.workload.inpaint:
        return np.concatenate(
            [
                ep(
                    ps[i : i + ep.max_batch],
                    seeds=[ctx.cfg.seed + seed_offset + j for j in range(i, min(len(ps), i + ep.max_batch))],
                    guidance_scale=ctx.src.guidance_scale,
                    num_inference_steps=ctx.src.steps,
                    **ctx.workload.engine_kwargs(seed_offset + i, len(ps[i : i + ep.max_batch]), ctx.size),
                )
                for i in range(0, len(ps), ep.max_batch)
            ]
        )
    n = len(ps)
    lat, seeds = latents(ctx, n, seed_offset), step_seeds(ctx, 0, n)
    return _batched(ep, ps, lat, seeds, ctx.src.steps, ctx.src.guidance_scale)


def record(ctx: T2IContext, pipe: Any, n: int, offset: int) -> Any:
    """Component inputs along the student's own diffusers run (calibration or validation set)."""
    from optimizer.t2i.reference import recording

    ps, _ = prompts(ctx, n, offset)
    with recording(pipe) as rec:
        torch_images(ctx, pipe, ps, 10_000 + offset)
    return rec


def quantize(
    ctx: T2IContext, graphs: dict[tuple[str, str], prec.Graph], calib: Any
) -> dict[tuple[str, str], prec.Graph]:
    wanted = {(k, p) for mix in ctx.cfg.precisions for k, p in ctx.family.mixes[mix].items() if p != "fp32"}
    for kind, p in sorted(wanted):
        log.info("quantize %s %s", kind, p)
        graphs[(kind, p)] = prec.quantize_component(
            kind,
            p,
            graphs[(kind, "fp32")].path,
            ctx.root / f"onnx/{kind}.{p}.onnx",
            calib.feeds(kind),
            ctx.cfg.bars,
        )
    return graphs


def build(ctx: T2IContext, graphs: dict[tuple[str, str], prec.Graph]) -> None:
    """--backend tensorrt: one engine per component graph (optimizer/t2i/trt_build.py)."""
    from optimizer.t2i.trt_build import build_component_engines

    specs = {c.kind: c.io for c in ctx.src.student.spec.components}
    paths = {k: g.path for k, g in graphs.items()}
    ctx.engines = build_component_engines(ctx.root, paths, specs, ctx.cfg.trt, ctx.lora)


def _runnable(ctx: T2IContext, kind: str, g: prec.Graph) -> str:
    """What the runtime runs for a component graph, relative to the run folder: its engine under
    --backend tensorrt, else the graph itself."""
    eng = ctx.engines.get((kind, g.precision))
    return eng.path.relative_to(ctx.root).as_posix() if eng else f"onnx/{g.path.name}"


def write_mixes(
    ctx: T2IContext, graphs: dict[tuple[str, str], prec.Graph]
) -> dict[str, dict[str, prec.Graph]]:
    """t2i.<mix>.json per mix: the runtime description with that mix's graphs."""
    import json

    base = json.loads((ctx.root / "t2i.json").read_text())
    mixes = {}
    for mix in ctx.cfg.precisions:
        comps = prec.resolve_mix(ctx.family.mixes[mix], graphs)
        d = json.loads(json.dumps(base))
        for kind, g in comps.items():
            d["components"][kind].update(path=_runnable(ctx, kind, g), precision=g.precision)
            if (kind, g.precision) in ctx.lora:
                d["components"][kind]["lora"] = ctx.lora[(kind, g.precision)].to_dict()
        d["defaults"].update(
            num_inference_steps=ctx.src.steps,
            guidance_scale=ctx.src.guidance_scale,
            height=ctx.size[0],
            width=ctx.size[1],
        )
        write_json_atomic(ctx.root / f"t2i.{mix}.json", d)
        mixes[mix] = comps
    return mixes


def validate(
    ctx: T2IContext, graphs: dict[tuple[str, str], prec.Graph], mixes: dict[str, Any], pipe: Any
) -> None:
    """Call parity per component graph, sample parity per mix (engine vs diffusers student)."""
    from engines.iospec import IOSpec
    from engines.t2i import TextToImagePipeline, component_runner

    cfg = ctx.cfg
    make = component_runner(cfg.backend, cfg.threads)
    # validation trajectories (other prompts and latents) at every batch size the output is built
    # for: a static backend compiles each shape apart (OpenVINO's static int8 demo UNet was 10x off
    # at batch 4 while batch 2, which alone was checked here, passed)
    vrecs = [record(ctx, pipe, b, 1000 + 10 * b) for b in sorted(set(cfg.batch_sizes))]
    loaded = ctx.src.student
    calls: dict[str, Any] = {}
    for (kind, p), g in sorted(graphs.items()):
        feeds = [f for r in vrecs for f in r.feeds(kind)]
        spec = IOSpec.from_dict(loaded.spec.component(kind).io.to_dict())
        refs = val.torch_outputs(kind, loaded.module(kind), feeds, spec)
        with make(f"{kind}.{p}", ctx.root / _runnable(ctx, kind, g), spec, precision=p) as r:
            cp = val.call_parity(kind, p, r, feeds, refs, cfg.bars)
        calls[f"{kind}.{p}"] = cp
        log.info("call %s %s: rel. L2 %.2e over %d calls", kind, p, cp.rel_l2, cp.calls)
    ctx.report["call_parity"] = {k: v.to_dict() for k, v in calls.items()}
    n = cfg.n_samples
    ps, _ = prompts(ctx, n, 2000)
    seeds = step_seeds(ctx, 0, n)
    want = torch_images(ctx, pipe, ps, 2000, step_start=0)
    ctx.report["samples"] = {"torch": want[:8]}
    tasks = task_references(ctx, pipe, ps, want, seeds)
    variants = []
    for mix, comps in mixes.items():
        with TextToImagePipeline(
            ctx.root, config=f"t2i.{mix}.json", backend=cfg.backend, threads=cfg.threads
        ) as ep:
            got = engine_images(ctx, ep, ps, 2000)
            task_parity = {
                task: val.sample_parity(mix, _task_images(ctx, ep, t), t["want"], cfg.bars)
                for task, t in tasks.items()
                if "want" in t
            }
        sp = val.sample_parity(mix, got, want, cfg.bars)
        ctx.report["samples"][mix] = got[:8]
        bad = [calls[f"{k}.{g.precision}"] for k, g in comps.items()]
        failures = [f for c in bad for f in c.failures()]
        if not sp.passed:
            failures.append(f"sample {mix}: PSNR {sp.psnr_db:.1f} dB < {sp.bar:g} dB vs the torch student")
        for task, tp in task_parity.items():
            log.info("sample %s %s: PSNR %.1f dB vs diffusers' %s pipeline", mix, task, tp.psnr_db, task)
            if not tp.passed:
                failures.append(
                    f"sample {mix} {task}: PSNR {tp.psnr_db:.1f} dB < {tp.bar:g} dB "
                    f"vs diffusers' {task} pipeline"
                )
        variants.append(
            {
                "mix": mix,
                "backend": cfg.backend,
                "components": {
                    k: {"precision": g.precision, "path": f"onnx/{g.path.name}", "why": g.why}
                    for k, g in comps.items()
                },
                "sample_parity": sp.to_dict(),
                # image-to-image and inpainting from the same output, against diffusers' pipelines
                "task_parity": {
                    task: {**task_parity[task].to_dict(), "strength": t["strength"]}
                    if task in task_parity
                    else {"skipped": t["skipped"]}
                    for task, t in tasks.items()
                },
                "failures": failures,
                "passed": not failures,
            }
        )
        log.info("sample %s: PSNR %.1f dB vs the diffusers student (%d images)", mix, sp.psnr_db, n)
    ctx.report["variants"] = variants
    if ctx.lora:  # the adapters' path, per graph and per mix (optimizer/t2i/lora_stage.py)
        from optimizer.t2i.lora_stage import CHECK_IMAGES, CheckIO, check_lora

        ps, _ = prompts(ctx, min(n, CHECK_IMAGES), 3000)
        io = CheckIO(
            graph_path=lambda k, p: ctx.root / _runnable(ctx, k, graphs[(k, p)]),
            want=lambda pipe: torch_images(ctx, pipe, ps, 3000, step_start=0),
            got=lambda ep: engine_images(ctx, ep, ps, 3000),
        )
        check_lora(ctx, mixes, vrecs, io)


def task_references(
    ctx: T2IContext, pipe: Any, ps: list[str], want: np.ndarray, seeds: list[int]
) -> dict[str, dict[str, Any]]:
    """Image-to-image and inpainting inputs and diffusers' images for them (the family's Img2Img
    and Inpaint pipelines over the student's modules), from the torch student's first images;
    empty where the output has no VAE encoder."""
    from optimizer.t2i.reference import img2img_images, img2img_pipeline

    if "vae_encoder" not in ctx.family.exported or ctx.workload.inpaint:
        return {}  # an inpainting UNet: its sample parity is inpainting already
    k = min(2, len(ps))
    cell = int(pipe.vae_scale_factor) * (2 if ctx.family.name == "flux" else 1)
    src, masks = val.task_inputs(want[:k], cell)
    steps, g = ctx.src.steps, ctx.src.guidance_scale
    out = {}
    for task in ("img2img", "inpaint"):
        s = val.task_strength(steps)
        mask = masks if task == "inpaint" else None
        ref = img2img_pipeline(pipe, task)
        out[task] = {"prompts": ps[:k], "image": src, "mask": mask, "seeds": seeds[:k], "strength": s}
        try:
            out[task]["want"] = img2img_images(ref, ps[:k], src, s, steps, g, seeds[:k], mask=mask)
        except ValueError as e:  # diffusers' pipeline refuses the shape (SD3 inpainting: 16 or 33
            # transformer channels only): nothing to compare with, said in the report, not failed
            out[task]["skipped"] = f"diffusers' {type(ref).__name__} refuses this model: {e}".split("\n")[0]
            log.warning("%s: not validated: %s", task, out[task]["skipped"])
    return out


def _task_images(ctx: T2IContext, ep: Any, t: dict[str, Any]) -> np.ndarray:
    return ep(
        t["prompts"],
        image=t["image"],
        mask_image=t["mask"],
        strength=t["strength"],
        seeds=t["seeds"],
        guidance_scale=ctx.src.guidance_scale,
        num_inference_steps=ctx.src.steps,
    )


def _batched(ep: Any, ps: list[str], lat: np.ndarray, seeds: list[int], steps: int, g: float) -> np.ndarray:
    mb = ep.max_batch
    return np.concatenate(
        [
            ep(
                ps[i : i + mb],
                seeds=seeds[i : i + mb],
                latents=lat[i : i + mb],
                guidance_scale=g,
                num_inference_steps=steps,
            )
            for i in range(0, len(ps), mb)
        ]
    )


def judge_distribution(ctx: T2IContext, pipe: Any, teacher_pipe: Any | None) -> None:
    if teacher_pipe is None:
        ctx.report["notes"].append("distribution: skipped (no teacher pipeline)")
        return
    t = ctx.src.teacher
    n = ctx.cfg.n_fid_samples
    ps, ex = prompts(ctx, n)
    s_img = np.concatenate(
        [torch_images(ctx, pipe, ps[i : i + 50], i, step_start=i) for i in range(0, n, 50)]
    )
    t_img = np.concatenate(
        [
            torch_images(ctx, teacher_pipe, ps[i : i + 50], i, steps=t.reference_steps, g=t.guidance_scale)
            for i in range(0, n, 50)
        ]
    )
    info = {
        "teacher": {"steps": t.reference_steps, "guidance_scale": t.guidance_scale},
        "student": {"steps": ctx.src.steps, "guidance_scale": ctx.src.guidance_scale},
    }
    d = val.judge(s_img, t_img, ps, ex, ctx.cfg.bars, info, ctx.cfg.clip_model)
    ctx.report["distribution"] = d.to_dict()
    ctx.report["samples"]["teacher"] = t_img[:8]
    ctx.report["samples"]["student (torch)"] = s_img[:8]
    ctx.report["failures"] += d.failures
    log.info("distribution: %s", {k: v for k, v in d.to_dict().items() if k not in ("teacher", "student")})


def time_variants(ctx: T2IContext, teacher_pipe: Any | None) -> None:
    from engines.t2i import TextToImagePipeline

    cfg = ctx.cfg
    ps, _ = prompts(ctx, 4)
    pipes = {}
    try:
        for v in ctx.report["variants"]:
            p = TextToImagePipeline(
                ctx.root, config=f"t2i.{v['mix']}.json", backend=cfg.backend, threads=cfg.threads
            )
            p.__enter__()
            pipes[v["mix"]] = p
        teacher = None
        if teacher_pipe is not None:
            teacher = (teacher_pipe, ctx.src.teacher.reference_steps, ctx.src.teacher.guidance_scale)
        variants = {m: (p, ctx.src.steps, ctx.src.guidance_scale) for m, p in pipes.items()}
        timings = measure(teacher, variants, ps, cfg.speed, ctx.size, ctx.workload)
    finally:
        for p in pipes.values():
            p.__exit__(None)
    if teacher is not None:  # the honest baseline: the teacher alone, after the runtimes are gone
        _fresh_teacher(ctx, timings, ps)
    ctx.report["timings"] = timings
    for v in ctx.report["variants"]:
        v["speedup_end_to_end"] = speedups(timings, v["mix"])
        for b, why in timings.get("speedup_null_reason", {}).get(v["mix"], {}).items():
            if why:
                ctx.report["notes"].append(f"{v['mix']} b{b}: no speedup stated ({why})")
    passed = [v for v in ctx.report["variants"] if v["passed"]]
    best = (
        min(passed, key=lambda v: timings["end_to_end"][v["mix"]][max(cfg.batch_sizes)]["median_ms"])
        if passed
        else None
    )
    ctx.report["recommended"] = best["mix"] if best else None
    for row in table(timings):
        log.info("  ".join(row))


def time_threads(ctx: T2IContext) -> None:
    """Every mix end to end at each thread count of the grid (a pipeline per count), side by side;
    the recommendation names mix, backend, threads and batch (optimizer/threads_grid.py)."""
    from engines.t2i import TextToImagePipeline
    from optimizer import threads_grid as tg
    from optimizer.t2i.speed import Generation, stop_rule

    cfg = ctx.cfg
    grid = tg.default_grid() if cfg.threads_grid is None else cfg.threads_grid
    if not grid or cfg.backend not in GRID_BACKENDS or not ctx.report["variants"]:
        return
    ps, _ = prompts(ctx, 4)
    meta = {
        f"{cfg.backend} {v['mix']}": {"backend": cfg.backend, "precision": v["mix"], "passed": v["passed"]}
        for v in ctx.report["variants"]
    }

    def open_pipeline(name: str, threads: int) -> Generation:
        mix = meta[name]["precision"]
        p = TextToImagePipeline(ctx.root, config=f"t2i.{mix}.json", backend=cfg.backend, threads=threads)
        return Generation(p.__enter__(), ctx.src.steps, ctx.src.guidance_scale, ps)

    points = tg.time_grid(
        open_pipeline,
        meta,
        grid,
        cfg.speed.batch_sizes,
        lambda b: {"batch": np.array(b)},
        stop_rule(cfg.speed),
    )
    ctx.report["threads"] = tg.summary(points, tg.usable_cores(), grid)
    rec = ctx.report["threads"]["recommendation"]
    if rec:
        log.info("recommended (threads grid): %s", rec["summary"])


def _fresh_teacher(ctx: T2IContext, timings: dict[str, Any], ps: list[str]) -> None:
    import torch

    from optimizer.compile import teacher_baseline as tb
    from optimizer.t2i.speed import fresh_baseline, stop_rule

    t, threads = ctx.src.teacher, torch.get_num_threads()
    grid = tb.thread_grid(threads)
    req = tb.BaselineRequest(
        teacher=str(t.path.resolve()),
        batch_sizes=list(ctx.cfg.speed.batch_sizes),
        steps=t.reference_steps,
        threads=grid,
        # the in-run budget at each thread count: a teacher generation takes most of a second, so a
        # shared budget leaves too few repeats for a stable median (it stops early once stable)
        rule=stop_rule(ctx.cfg.speed),
        family=ctx.family.name,
        prompts=ps,
        guidance_scale=t.guidance_scale,
        size=list(ctx.size),
        workload=ctx.workload.to_dict() if ctx.workload.inpaint else None,
    )
    log.info("timing the teacher alone in a fresh process at %s threads", grid)
    fresh_baseline(timings, req, threads)
    ctx.report["notes"].append(
        f"teacher: end to end from a fresh process (its best thread count); its per-component "
        f"columns are in-run figures at {threads} threads"
    )
    for b, d in timings["teacher_baseline"].items():
        if d.get("verdict") != "agree":
            ctx.report["notes"].append(
                f"teacher b{b}: in-run {d.get('in_run_median_ms', 0):.1f} ms vs fresh process "
                f"{d.get('fresh_same_threads_median_ms') or float('nan'):.1f} ms ({d.get('verdict')}); "
                f"speedups divide the {d.get('source')} figure"
            )


def write_report(ctx: T2IContext) -> None:
    from optimizer.t2i.report import markdown, samples_png

    root = ctx.root
    samples = ctx.report.pop("samples", {})
    if samples:
        samples_png(samples, root / "samples.png")
    rec = ctx.report.get("recommended")
    if rec:  # t2i.json = the recommended mix (what TextToImagePipeline(run folder) loads)
        shutil.copyfile(root / f"t2i.{rec}.json", root / "t2i.json")
    ctx.report["failures"] = ctx.report["failures"] + [
        f for v in ctx.report["variants"] for f in v["failures"]
    ]
    ctx.report["passed"] = not ctx.report["failures"]
    ctx.report["seconds"] = time.perf_counter() - ctx.t_start
    write_json_atomic(root / "report.json", _jsonable(ctx.report))
    write_text_atomic(root / "report.md", markdown(ctx.report))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, np.floating | np.integer):
        return x.item()
    return x


def publish(ctx: T2IContext, graphs: dict[tuple[str, str], prec.Graph]) -> Manifest:
    m, rid = ctx.manifest, ctx.run.run_id
    calls = ctx.report["call_parity"]
    for (kind, p), g in graphs.items():
        cp = calls[f"{kind}.{p}"]
        art = m.add(
            f"onnx/{kind}/{p}",
            g.path,
            "onnx",
            precision=p,
            backend=None,
            input_sha256=ctx.source_sha,
            extra={"component": kind, **{k: v for k, v in g.info.items() if k in ("counts", "passed")}},
        )
        fails = [] if cp["passed"] else [f"call rel. L2 {cp['rel_l2']:.3g} > {cp['bar']:g} or non-finite"]
        eng = ctx.engines.get((kind, p))
        if eng is None:
            art.validation = _validation(ctx, not fails, fails)
            continue
        # the engine is what ran: it carries the verdict; the graph was not run here (as pixel runs)
        art.validation = _validation(ctx, False, ["not run here: validated as the tensorrt engine"])
        from optimizer.t2i.trt_build import engine_artifact

        e = m.add(**engine_artifact(kind, eng))
        e.validation = _validation(ctx, not fails, fails)
    # a mix carries its own failures and the run's (distribution, ...), not another mix's: a
    # failed int8 leaves the passing fp32 and bf16 mixes servable
    of_mixes = {f for v in ctx.report["variants"] for f in v["failures"]}
    run_failures = [f for f in ctx.report["failures"] if f not in of_mixes]
    for v in ctx.report["variants"]:
        art = m.add(
            f"pipeline/{v['mix']}",
            ctx.root / f"t2i.{v['mix']}.json",
            "pipeline",
            precision=v["mix"],
            backend=ctx.cfg.backend,
            input_sha256=ctx.source_sha,
            extra={"components": v["components"]},
        )
        ok = v["passed"] and not run_failures
        art.validation = _validation(ctx, ok, v["failures"] + run_failures)
    for rel in ("tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "t2i.json"):
        if (ctx.root / rel).exists():
            m.add(f"asset/{rel}", ctx.root / rel, "asset", input_sha256=ctx.source_sha)
    for f in ("report.json", "report.md", "samples.png"):
        if (ctx.root / f).exists():
            m.add(f"report/{f}", ctx.root / f, "report", input_sha256=ctx.source_sha)
    m.meta["pipelines"] = {v["mix"]: f"t2i.{v['mix']}.json" for v in ctx.report["variants"]}
    m.meta["recommended"] = ctx.report.get("recommended")
    run = {
        "student_sha256": ctx.source_sha,
        "report": f"runs/{rid}/report.json",
        "passed": ctx.report["passed"],
        "allow_unvalidated": False,
    }
    return ctx.run.publish(m, run, fault=fault_at)


def _validation(ctx: T2IContext, passed: bool, failures: list[str]) -> dict[str, Any]:
    return {
        "run_id": ctx.run.run_id,
        "student_sha256": ctx.source_sha,
        "passed": passed,
        "failures": failures,
        "backend": ctx.cfg.backend,
    }


def run(source: Path, cfg: T2ICompileConfig) -> dict[str, Any]:
    """Compile, validate, time and publish; the returned report says pass/fail."""
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    with process_state(cfg.threads, cfg.seed):
        ctx = prepare(Path(source), cfg)
        stage = Stages(
            ["export", "quantize", *(["build"] if cfg.backend == "tensorrt" else []), "validate"]
            + ["distribution", "timing", "report"]
        )
        try:
            stage("export")
            graphs = export(ctx)
            pipe = diffusers_pipeline(ctx.src.student)
            calib = record(ctx, pipe, cfg.calib_prompts, 0)
            stage("quantize")
            graphs = quantize(ctx, graphs, calib)
            if cfg.lora_rank:
                from optimizer.t2i.lora_stage import slot_graphs

                ctx.lora = slot_graphs(ctx.src.student, graphs, cfg.lora_rank)
            if cfg.backend == "tensorrt":
                stage("build")
                build(ctx, graphs)
            mixes = write_mixes(ctx, graphs)
            stage("validate")
            validate(ctx, graphs, mixes, pipe)
            teacher_pipe = None
            if ctx.src.teacher is not None:
                teacher_pipe = _teacher_pipeline(ctx, diffusers_pipeline(load_pipeline(ctx.src.teacher.path)))
            stage("distribution")
            judge_distribution(ctx, pipe, teacher_pipe)
            stage("timing")
            time_variants(ctx, teacher_pipe)
            time_threads(ctx)
            stage("report")
            write_report(ctx)
            publish(ctx, graphs)
        except BaseException:
            ctx.run.abandon()
            raise
    if cfg.triton_repo is not None:
        write_triton_repo(ctx, Path(cfg.out))
    return ctx.report


def _teacher_pipeline(ctx: T2IContext, pipe: Any) -> Any | None:
    """The teacher's diffusers pipeline where it runs the student's task (an inpainting UNet's
    text-to-image teacher has nothing to compare: no distribution level, no speedup, said so)."""
    from optimizer.t2i.workload import task_of

    if task_of(pipe) == ctx.workload.task:
        return pipe
    ctx.report["notes"].append(
        f"teacher: its task is {task_of(pipe)}, the student's {ctx.workload.task}: no distribution "
        "level and no speedup against it"
    )
    return None


def write_triton_repo(ctx: T2IContext, out: Path) -> None:
    """--triton-repo: the published pipeline (its recommended mix) as a Triton repository."""
    from engines.triton import write_triton_repo as write

    if ctx.run.kept_previous:  # this run failed and is not the served one: nothing of it to package
        log.warning(
            "--triton-repo %s: not written: this run did not replace the served one", ctx.cfg.triton_repo
        )
        return
    if not ctx.report.get("recommended"):
        log.warning("--triton-repo %s: not written: no mix passed validation", ctx.cfg.triton_repo)
        return
    write(out, Path(ctx.cfg.triton_repo), option="--triton-repo")
