"""dd-compile command line: exit 0 when every check passes, 1 when a check fails, 2 for bad input."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (shared machines)

import logging
import math
import sys
from pathlib import Path

import click

from engines.cli_errors import GuardedCommand
from engines.errors import InputError

log = logging.getLogger("dd-compile")


def _csv(kind, convert, allowed=None):
    def cb(ctx, param, value):
        if value is None:
            return None
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            raise click.BadParameter(f"empty {kind} list")
        try:
            out = tuple(convert(v) for v in items)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind}") from None
        if allowed:
            bad = [v for v in out if v not in allowed]
            if bad:
                raise click.BadParameter(f"unknown {kind} {bad[0]!r} (choose from {', '.join(allowed)})")
        if kind == "batch sizes" and any(v < 1 for v in out):
            raise click.BadParameter("batch sizes must be >= 1")
        return out

    return cb


def parse_bars(items: tuple[str, ...], family=None):
    """`--bar KEY=VALUE` items over the family's default bars (its sample-level bars differ:
    uint8 images for pipelines, float samples for denoisers)."""
    from optimizer.bars import ParityBars

    bars = ParityBars()
    if family is not None:
        bars = ParityBars(sample_psnr_db={**bars.sample_psnr_db, **family.sample_psnr_db})
    call, sample = dict(bars.call_rel_l2), dict(bars.sample_psnr_db)
    fid_margin, paired = bars.fid_margin, bars.min_paired_psnr_db
    for item in items:
        key, _, value = item.partition("=")
        try:
            v = float(value)
        except ValueError:
            raise click.BadParameter(f"--bar {item!r}: value is not a number") from None
        if not math.isfinite(v):  # a NaN bar compares false both ways: every check would "pass" or fail
            raise click.BadParameter(f"--bar {item!r}: value must be a finite number")
        level, _, prec = key.partition(".")
        if level == "call" and prec in call:
            call[prec] = v
        elif level == "sample" and prec in sample:
            sample[prec] = v
        elif key == "fid_margin":
            fid_margin = v
        elif key == "paired_psnr":
            paired = v
        else:
            raise click.BadParameter(
                f"--bar {item!r}: unknown key (call.<p>, sample.<p>, fid_margin, paired_psnr)"
            )
    return ParityBars(
        call_rel_l2=call, sample_psnr_db=sample, fid_margin=fid_margin, min_paired_psnr_db=paired
    )


def _threads_grid(text: str | None) -> tuple[int, ...] | None:
    from optimizer.threads_grid import parse_grid

    if text is None:
        return None
    if text.strip() == "0":
        return ()
    try:
        return parse_grid(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # importing torch (through diffusers) resets torch's loggers: import first, then set levels
    import diffusers.utils.logging as dlog

    for noisy in (
        "onnx_ir",
        "onnxscript",
        "torch.onnx",
        "torch._export",
        "polygraphy",
        "diffusers",
        "matplotlib",
        "PIL",
        "onnxruntime",  # its float16 converter logs whole node protos at INFO
        "transformers",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    dlog.set_verbosity_warning() if verbose else dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    import transformers.utils.logging as tlog  # "Loading weights" bars, torchvision notices

    tlog.set_verbosity_warning() if verbose else tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _echo_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


def _echo_threads(threads: dict | None, unit: str) -> None:
    if not threads:
        return
    from optimizer.threads_grid import table_rows

    click.echo(f"threads grid {threads['grid']} on {threads['cores']} cores ({unit}):")
    _echo_rows(table_rows(threads))
    for v in threads["verdicts"].values():
        click.echo(f"  {v['verdict']}")
    rec = threads["recommendation"]
    click.echo(f"serves best: {rec['summary']}" if rec else "serves best: no passing, stable point")


def print_table(report) -> None:
    rows = [
        ("variant", "call relL2", "sample PSNR", "per-call ms", "x teacher", "e2e ms", "x teacher", "pass")
    ]
    for v in report.variants:
        b = max(v.latency_ms.get("per_call", {0: 0}))
        pc = v.latency_ms.get("per_call", {}).get(b)
        spc = v.speedup_vs_teacher.get("per_call", {}).get(b)
        # end to end is measured at its own batch sizes (SpeedConfig.e2e_batches): the largest
        be = max(v.latency_ms.get("end_to_end") or {0: 0})
        e2e = v.latency_ms.get("end_to_end", {}).get(be)
        se = v.speedup_vs_teacher.get("end_to_end", {}).get(be)
        rows.append(
            (
                f"{v.backend} {v.precision}{' *' if v.recommended else ''}",
                f"{v.parity['call']['rel_l2']:.2e}",
                f"{v.parity['sample']['psnr_db']:.1f} dB",
                f"{pc:.2f} (b{b})" if pc else "-",
                f"{spc:.2f}x" if spc else "-",
                f"{e2e:.1f} (b{be})" if e2e else "-",
                f"{se:.1f}x" if se else "-",
                "yes" if v.passed else "NO",
            )
        )
    _echo_rows(rows)
    _echo_threads(report.threads, "per call")
    d = report.distribution
    if d:
        fids = ", ".join(
            f"{k[4:]} {d[k]:.2f}"
            for k in ("fid_student", "fid_teacher", "fid_teacher_low_steps", "fid_student_vs_teacher")
            if d.get(k) is not None
        )
        click.echo(f"distribution: paired PSNR to teacher {d['paired_psnr_db']:.1f} dB; FID {fids}")
    for s in report.skipped:
        click.echo(f"skipped: {s}")
    for n in report.notes:
        click.echo(f"note: {n}")
    click.echo("* recommended (fastest variant that passes)")


@click.command(
    cls=GuardedCommand, prog="dd-compile", context_settings={"help_option_names": ["-h", "--help"]}
)
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option(
    "--demo",
    type=click.Choice(["t2i", "pixel"]),
    is_flag=False,
    flag_value="t2i",
    default=None,
    help="Compile a bundled demo: 't2i' (the default: the text-to-image LCM student of the coloured-"
    "digits teacher) or 'pixel' (the unconditional 8x8 digits student).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder: manifest.json (the published run), runs/<id>/ (onnx/, engines/, report), "
    "copies of report.{json,md}, samples.png, latency.png. A new folder, an empty one or an earlier "
    "dd-compile output. [default: out/]",
)
@click.option(
    "--precision",
    "precisions",
    callback=_csv("precisions", str, ("fp32", "fp16", "int8", "bf16")),
    default="fp32,fp16,int8",
    show_default=True,
    help="Comma-separated variants to build and validate; fp16/int8 precision lives in the ONNX graph; "
    "bf16 (--backend openvino, AVX512-BF16/AMX CPUs) runs the fp32 graph with OpenVINO's bf16 hint.",
)
@click.option(
    "--backend",
    default="onnxruntime",
    show_default=True,
    type=click.Choice(["onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "openvino"]),
    help="Runtime that runs the graphs: ONNX Runtime (CPU, or its CUDA/TensorRT providers), "
    "TensorRT engines, or OpenVINO (CPU; static shapes per input shape).",
)
@click.option(
    "--batch-sizes",
    callback=_csv("batch sizes", int),
    default=None,
    help="Batch sizes to validate and time; min/max bound the dynamic batch axis "
    "(TensorRT profiles, Triton). [default: 1,16; text-to-image: 1,4]",
)
@click.option(
    "--teacher",
    type=click.Path(path_type=Path),
    default=None,
    help="Teacher diffusers folder (unet/ + scheduler/); overrides the path stored in the checkpoint.",
)
@click.option(
    "--require-teacher",
    is_flag=True,
    help="Fail (exit 2) instead of skipping teacher checks when the teacher is missing.",
)
@click.option(
    "--steps",
    type=click.IntRange(1),
    default=None,
    help="For a diffusers folder SOURCE: the student's DDIM step count.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Seed for validation noise and calibration trajectories.",
)
@click.option(
    "--samples",
    "n_samples",
    type=int,
    default=None,
    help="Samples for sample- and distribution-level checks. [default: 64; text-to-image: 16 images "
    "per mix for sample parity]",
)
@click.option(
    "--fid-samples",
    "n_fid_samples",
    type=int,
    default=None,
    help="Samples for the distribution level (student vs teacher, FID). [default: 256; "
    "text-to-image: 100 prompts]",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="Intra-op threads for ONNX Runtime and torch (default: all cores).",
)
@click.option(
    "--threads-grid",
    default=None,
    help="Comma-separated thread counts at which every CPU variant is timed per call, one session "
    "per count, side by side; the recommendation names variant, threads and batch. "
    "[default: 1 and all cores; 0: off]",
)
@click.option(
    "--bar",
    "bars",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a pass/fail bar: call.<precision>=REL_L2, sample.<precision>=PSNR_DB, "
    "fid_margin=X, paired_psnr=DB (repeatable).",
)
@click.option(
    "--bench-seconds",
    type=click.FloatRange(0),
    default=8.0,
    show_default=True,
    help="Time budget per batch size for the per-call timing and the threads grid; end to end (at "
    "the smallest batch size, where the teacher's reference sampler is cheapest) gets 2.5x it.",
)
@click.option(
    "--int8-calibration",
    type=click.Choice(["minmax", "percentile", "entropy"]),
    default="minmax",
    show_default=True,
    help="INT8 activation range calibration (minmax measured best on the demo).",
)
@click.option(
    "--int8-selection",
    type=click.Choice(["sensitivity", "graph-order"]),
    default="sensitivity",
    show_default=True,
    help="INT8 nodes: the largest set within the int8 bars, least sensitive first ('sensitivity': one "
    "measurement per node) or in graph order (no per-node measurement: faster on big models).",
)
@click.option(
    "--cond",
    type=click.Path(path_type=Path),
    default=None,
    help="Conditional students: .npz with encoder_hidden_states [N, tokens, dim] and/or class_labels [N] "
    "(e.g. real prompt embeddings) for calibration, parity and samples; default: random ones.",
)
@click.option(
    "--triton-repo",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write a Triton model repository here.",
)
@click.option(
    "--trt-opt-level",
    type=click.IntRange(0, 5),
    default=3,
    show_default=True,
    help="TensorRT builder optimization level (higher: longer build, maybe faster engine).",
)
@click.option(
    "--trt-hardware-compat",
    type=click.Choice(["none", "ampere_plus", "same_compute_capability"]),
    default="none",
    show_default=True,
    help="TensorRT hardware compatibility level of the engines.",
)
@click.option(
    "--trt-version-compatible",
    is_flag=True,
    help="Build TensorRT engines that run on newer TensorRT versions.",
)
@click.option(
    "--size",
    default=None,
    metavar="HxW",
    help="Text-to-image: the image size validated and timed (a multiple of the VAE factor x the "
    "UNet's down-sampling, inside --resolutions). [default: the UNet's sample_size]",
)
@click.option(
    "--resolutions",
    callback=_csv("resolutions", int),
    default=None,
    help="Text-to-image: square sizes the engines take (their min..max is the latent profile).",
)
@click.option(
    "--guidance-scale",
    type=float,
    default=None,
    help="Text-to-image: the student's guidance scale (default: its record, else the mode's default).",
)
@click.option(
    "--max-sequence-length",
    type=click.IntRange(1, 512),
    default=None,
    help="Text-to-image with T5 (SD3, Flux): the prompt's T5 token length the graphs are built for "
    "(default: the family's own, SD3 256, Flux 512).",
)
@click.option(
    "--lora-rank",
    type=click.IntRange(1, 1024),
    default=None,
    metavar="R",
    help="Text-to-image: graphs take LoRA adapters at run time (pipe.load_lora_weights / "
    "set_adapters, no rebuild) up to a total rank R per layer, summed over the active adapters; "
    "the denoiser's transformer blocks and CLIP's layers (ONNX Runtime, OpenVINO, TensorRT). [default: off]",
)
@click.option(
    "--prompt-chunks",
    default=None,
    metavar="N",
    help="Text-to-image with CLIP only (SD, SDXL): the UNet takes prompts of up to N chunks of the "
    "tokenizer's length (CLIP's 77), for the runtime's long_prompts='chunk'. [default: 1]",
)
@click.option(
    "--clip-model",
    type=click.Path(path_type=Path),
    default=None,
    help="Text-to-image: a local transformers CLIPModel folder; adds CLIP score to the distribution check.",
)
@click.option(
    "--export-cache",
    "export_cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="DD_COMPILE_EXPORT_CACHE",
    default=None,
    help="Keep exported fp32 graphs here, keyed by weights, code and versions; a re-run of the same "
    "student (other bars, precisions, out folder) skips the export. [env: DD_COMPILE_EXPORT_CACHE]",
)
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the table.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, library warnings included.")
def main(
    source,
    demo,
    out,
    precisions,
    backend,
    batch_sizes,
    teacher,
    require_teacher,
    steps,
    seed,
    n_samples,
    n_fid_samples,
    threads,
    threads_grid,
    bars,
    bench_seconds,
    int8_calibration,
    int8_selection,
    cond,
    triton_repo,
    trt_opt_level,
    trt_hardware_compat,
    trt_version_compatible,
    size,
    resolutions,
    guidance_scale,
    max_sequence_length,
    prompt_chunks,
    lora_rank,
    clip_model,
    export_cache_dir,
    as_json,
    verbose,
):
    """Compile a diffusion student for deployment and validate it against its teacher.

    SOURCE is a student.ckpt (from dd-distill) or a diffusers folder (unet/ + scheduler/) with
    --steps N. Writes ONNX graphs (fp32, fp16, int8), engines, a manifest and a report to --out.
    Exit code: 0 every check passed, 1 a parity/quality check failed (artifacts and report still
    written), 2 bad input, an unwritable output or a missing/failing backend, 4 an internal error.
    """
    setup_logging(verbose)
    from optimizer.compile import export_cache
    from optimizer.compile.backends import require as require_backend
    from optimizer.families.detect import family_of

    if (demo is not None) == (source is not None):
        raise click.UsageError("give exactly one of SOURCE or --demo")
    for opt, v in (("--samples", n_samples), ("--fid-samples", n_fid_samples)):
        if v is not None and v < 2:  # a covariance needs two samples; an FID of fewer means nothing
            raise click.BadParameter(f"{opt} must be >= 2")
    # every request is checked against the family before any work: an option, backend or
    # precision it cannot honour is refused in one line, never dropped
    family = family_of(source, demo)
    _check_options(family, backend)
    require_backend(backend)  # installed, with its device: else one line naming what is missing
    family.check_backend(backend)
    family.check_precisions(precisions, backend)
    click.get_current_context().with_resource(export_cache.using(export_cache_dir))
    common = dict(
        out=out or Path("out"),
        precisions=precisions,
        backend=backend,
        batch_sizes=batch_sizes or family.batch_sizes,
        teacher=teacher,
        require_teacher=require_teacher,
        steps=steps,
        seed=seed,
        threads=threads,
        n_samples=n_samples or family.n_samples,
        n_fid_samples=n_fid_samples or family.n_fid_samples,
        triton_repo=triton_repo,
        bars=parse_bars(bars, family),
    )
    from optimizer.compile.build import TrtBuildConfig

    trt = TrtBuildConfig(
        builder_optimization_level=trt_opt_level,
        hardware_compatibility_level=trt_hardware_compat,
        version_compatible=trt_version_compatible,
    )
    if family.flow == "pipeline":
        from optimizer.t2i.source import parse_size
        from optimizer.t2i.speed import T2ISpeedConfig

        bs = common["batch_sizes"]
        return _pipeline_main(
            source,
            dict(
                common,
                guidance_scale=guidance_scale,
                max_sequence_length=max_sequence_length,
                prompt_chunks=_prompt_chunks(prompt_chunks),
                lora_rank=lora_rank or 0,
                size=parse_size(size) if size else None,
                resolutions=resolutions,
                clip_model=clip_model,
                threads_grid=_threads_grid(threads_grid),
                trt=trt,
                speed=T2ISpeedConfig(batch_sizes=tuple(sorted(set(bs))), max_seconds=min(bench_seconds, 6.0)),
            ),
            as_json,
        )
    from optimizer.compile.speed import SpeedConfig
    from optimizer.compile.stages import DEMO_DIR, CompileConfig, demo_source, run
    from optimizer.quantize import Int8Config

    if demo:
        source, common["steps"] = demo_source()
        common["teacher"] = teacher or DEMO_DIR / "teacher"  # wherever the package is installed
    cfg = CompileConfig(
        **common,
        cond=cond,
        speed=SpeedConfig(max_seconds=bench_seconds, threads_grid=_threads_grid(threads_grid)),
        int8=Int8Config(
            calibration=int8_calibration,
            sensitivity="single" if int8_selection == "sensitivity" else "none",
            # Q/DQ placement chosen by ORT CPU timings only where ORT CPU is the target
            placement="measure" if backend == "onnxruntime" else "fixed",
        ),
        trt=trt,
    )
    report = run(source, cfg)
    if as_json:
        click.echo(report.to_json())
    else:
        print_table(report)
        click.echo(
            f"report: {cfg.out / 'report.md'}  manifest: {cfg.out / 'manifest.json'}  "
            f"({report.seconds:.0f} s)"
        )
    _exit(report.passed, report.failures, cfg.out, report.run_id)


MAX_PROMPT_CHUNKS = 16  # 1232 CLIP tokens: past any prompt a CLIP UNet was trained to follow


def _prompt_chunks(value: str | None) -> int:
    """--prompt-chunks N as an integer in [1, MAX_PROMPT_CHUNKS]; anything else one line, exit 2."""
    if value is None:
        return 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_PROMPT_CHUNKS:
        raise InputError(f"--prompt-chunks {value}: must be an integer from 1 to {MAX_PROMPT_CHUNKS}")
    return n


def _check_options(family, backend: str) -> None:
    """Refuse (one line) every option given on the command line that `family` does not honour, and
    the --trt-* options without --backend tensorrt."""
    from click.core import ParameterSource

    from engines.t2i import LORA_BACKENDS
    from optimizer.families import FAMILIES

    ctx = click.get_current_context()
    for p in ctx.command.params:
        if ctx.get_parameter_source(p.name) in (None, ParameterSource.DEFAULT):
            continue
        opt = max(p.opts, key=len)
        if not family.honours(p.name):
            others = [f.title for f in FAMILIES.values() if f.honours(p.name)]
            raise InputError(
                f"{opt}: not for {family.title} (it applies to {', '.join(others) or 'no family'})"
            )
        if opt.startswith("--trt-") and backend != "tensorrt":
            raise InputError(f"{opt}: only with --backend tensorrt (not {backend})")
        if opt == "--lora-rank" and backend not in LORA_BACKENDS:  # engines/t2i.py's runners
            raise InputError(
                f"--lora-rank: LoRA inputs run on {', '.join(LORA_BACKENDS)} (not {backend}: "
                "ONNX Runtime's TensorRT provider builds its profiles from the model's own inputs)"
            )


def _lora_cell(report: dict, mix: str) -> str:
    """ ", with a LoRA adapter X dB" for outputs compiled with --lora-rank (optimizer/t2i/lora_stage.py)."""
    sp = (report.get("lora") or {}).get("sample_parity", {}).get(mix)
    return f", with a LoRA adapter {sp['psnr_db']:.1f} dB" if sp else ""


def _g(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _pipeline_main(source: Path | None, options: dict, as_json: bool) -> None:
    """A pipeline family (optimizer/t2i/stages.py) with the T2ICompileConfig fields in `options`;
    same exit codes as the pixel flow."""
    import json

    from optimizer.t2i.source import demo_source as t2i_demo
    from optimizer.t2i.speed import table
    from optimizer.t2i.stages import T2ICompileConfig, run

    cfg = T2ICompileConfig(**options)
    source = t2i_demo() if source is None else source
    report = run(source, cfg)
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        for v in report["variants"]:
            comps = ", ".join(f"{k} {c['precision']}" for k, c in v["components"].items())
            click.echo(
                f"{v['backend']} {v['mix']}{' *' if v['mix'] == report.get('recommended') else ''}: "
                f"{comps}; sample PSNR {v['sample_parity']['psnr_db']:.1f} dB"
                + "".join(
                    f", {t} not validated" if "skipped" in p else f", {t} {p['psnr_db']:.1f} dB"
                    for t, p in (v.get("task_parity") or {}).items()
                )
                + _lora_cell(report, v["mix"])
                + f"; {'pass' if v['passed'] else 'FAIL'}"
            )
        d = report.get("distribution") or {}
        if d:
            click.echo(
                f"distribution (n={d['n']}): FID student {_g(d.get('fid_student'))} teacher "
                f"{_g(d.get('fid_teacher'))}; "
                f"adherence {d.get('adherence_student')} vs {d.get('adherence_teacher')}; "
                f"paired PSNR {d['paired_psnr_db']:.1f} dB"
            )
        _echo_rows(table(report["timings"]))
        _echo_threads(report.get("threads"), "one whole generation per call")
        for n in report.get("notes", []):
            click.echo(f"note: {n}")
        where = f"report: {cfg.out / 'report.md'}  manifest: {cfg.out / 'manifest.json'}"
        click.echo(f"{where}  ({report['seconds']:.0f} s)")
    _exit(report["passed"], report["failures"], cfg.out, report["run_id"])


def _exit(passed: bool, failures: list[str], out: Path, run_id: str | None) -> None:
    """Exit 1 naming each failure, and whether the folder still serves an earlier passing run."""
    if passed:
        return
    from optimizer.compile.publish import kept_note

    for f in failures:
        click.echo(f"FAILED {f}", err=True)
    note = kept_note(out, run_id) if run_id else None
    if note:
        click.echo(note, err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
