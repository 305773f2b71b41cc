"""dd-bench CLI: `dd-bench OUT_DIR [options]` and `dd-bench merge A.json B.json -o t.md`."""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

import click

from engines.cli_errors import GuardedCommand, GuardedGroup
from engines.errors import DDCompileError
from engines.fileio import write_json_atomic, write_text_atomic
from engines.manifest import Manifest
from engines.outdir import check_target, claim

log = logging.getLogger("optimizer.bench")
PIXEL_BACKENDS = frozenset({"onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt"})
# text-to-image pipelines: engines/t2i.py's runners (OpenVINO included; no TensorRT plans)
PIPELINE_BACKENDS = frozenset({"onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "openvino"})
PIPELINE_KIND = "text-to-image"  # manifest meta.kind of a text-to-image output


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"batch sizes must be >= 1, got {value!r}")
    return out


class BenchGroup(GuardedGroup):
    """`dd-bench OUT_DIR ...` runs the bench; `dd-bench merge ...` is the one subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=BenchGroup, prog="dd-bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Benchmark a dd-compile output (every engine + the PyTorch teacher) on this machine.

    \b
      dd-bench out/ [--batch-sizes 1,8 --seconds 60 --threads 2]
      dd-bench merge cpu.json h100.json -o targets.md
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _fail(e: Exception) -> None:
    click.echo(f"dd-bench: error: {e}", err=True)
    sys.exit(2)


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


@main.command("run", cls=GuardedCommand, prog="dd-bench")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,8", callback=_ints, show_default=True)
@click.option(
    "--seconds",
    default=60.0,
    type=click.FloatRange(0),
    show_default=True,
    help="Timing budget for all phases and batch sizes (setup and memory probes extra).",
)
@click.option(
    "--threads", type=click.IntRange(1), default=None, help="Intra-op threads (default: usable cores)."
)
@click.option(
    "--threads-grid",
    default=None,
    help="Comma-separated thread counts at which every CPU student variant is timed per call, one "
    "session per count, side by side. [default: 1 and all cores; 0: off]",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--backends",
    default=None,
    help="Comma-separated subset of onnxruntime,onnxruntime-cuda,tensorrt; text-to-image outputs: "
    "onnxruntime,onnxruntime-cuda,onnxruntime-trt,openvino (default: all usable).",
)
@click.option(
    "--teacher",
    "teacher_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Teacher folder (default: the manifest's meta.teacher.path).",
)
@click.option("--no-teacher", is_flag=True, help="Skip the PyTorch teacher baselines.")
@click.option(
    "--compile",
    "compile_",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="torch.compile teacher baseline (auto: on GPU only).",
)
@click.option("--no-memory", is_flag=True, help="Skip the per-variant peak-memory probes.")
@click.option("--target", default=None, help="Target name used as the column in merge tables.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for bench.json, bench.md, latency.png, speedup.png (default: OUT_DIR/bench).",
)
@click.option("--no-progress", is_flag=True)
@click.option(
    "--allow-unvalidated",
    is_flag=True,
    help="Bench artifacts the published run did not validate or that failed (logs a warning; "
    "bench.json records it).",
)
def run(
    out_dir: Path,
    batch_sizes: tuple[int, ...],
    seconds: float,
    threads: int | None,
    threads_grid: str | None,
    device: str,
    backends: str | None,
    teacher_path: Path | None,
    no_teacher: bool,
    compile_: str,
    no_memory: bool,
    target: str | None,
    output: Path | None,
    no_progress: bool,
    allow_unvalidated: bool,
) -> None:
    """Bench OUT_DIR (a dd-compile output folder; a text-to-image output: optimizer/bench/pipeline.py)."""
    from optimizer.bench.bench_report import terminal_table, to_markdown
    from optimizer.bench.measure import BenchConfig, run_bench
    from optimizer.bench.plots import plot_latency, plot_speedup

    be = tuple(b.strip() for b in backends.split(",")) if backends else None
    try:
        # read once: meta.kind picks the bench (one network + sampler, or a text-to-image pipeline)
        manifest = Manifest.load(out_dir)
    except DDCompileError as e:
        _fail(e)
    pipeline = manifest.meta.get("kind") == PIPELINE_KIND
    known = PIPELINE_BACKENDS if pipeline else PIXEL_BACKENDS
    if be and set(be) - known:
        what = " for text-to-image outputs" if pipeline else ""
        _fail(ValueError(f"--backends: unknown {sorted(set(be) - known)}{what}; choose from {sorted(known)}"))
    cfg = BenchConfig(
        batch_sizes=batch_sizes,
        seconds=seconds,
        threads=threads,
        threads_grid=_threads_grid(threads_grid),
        device=device,
        backends=be,
        teacher=not no_teacher,
        teacher_path=str(teacher_path) if teacher_path else None,
        compile=compile_,
        memory=not no_memory,
        progress=not no_progress,
        target=target,
    )
    try:
        dest, unvalidated = _check_before_work(
            manifest, output or out_dir / "bench", be, allow_unvalidated, pipeline
        )
        if pipeline:
            from optimizer.bench.pipeline import run_pipeline_bench

            bench = run_pipeline_bench(out_dir, cfg, allow_unvalidated=allow_unvalidated)
        else:
            bench = run_bench(out_dir, cfg)
    except DDCompileError as e:
        _fail(e)
    if unvalidated:
        bench["allow_unvalidated"] = True
        bench["unvalidated"] = unvalidated  # artifact name -> why it is not servable
    claim(dest, "bench", uuid.uuid4().hex)
    write_json_atomic(dest / "bench.json", bench)
    write_text_atomic(dest / "bench.md", to_markdown(bench))
    plot_latency(bench, dest / "latency.png")
    plot_speedup(bench, dest / "speedup.png")
    click.echo(terminal_table(bench))
    click.echo(f"\nwrote {dest}/bench.json, bench.md, latency.png, speedup.png")


def _check_before_work(
    manifest: Manifest,
    output: Path,
    backends: tuple[str, ...] | None,
    allow_unvalidated: bool,
    pipeline: bool = False,
) -> tuple[Path, dict[str, str]]:
    """`output` (-o, default OUT_DIR/bench) is new, empty or an earlier dd-bench folder and holds none of the
    compiled output; every artifact to bench was validated by the published run (or is allowed).
    A text-to-image output: every published mix ("pipeline/<mix>") and every component graph it
    runs, whatever the backend (each backend runs the same graphs)."""
    protect = [manifest.path, *(manifest.file(a) for a in manifest.artifacts.values())]
    dest = check_target(output, "bench", "-o", protect=protect)
    if pipeline:
        arts = [*manifest.find("pipeline"), *manifest.find("onnx")]
    else:
        ort = backends is None or any(b.startswith("onnxruntime") for b in backends)
        trt = backends is None or "tensorrt" in backends
        arts = [*(manifest.find("onnx") if ort else []), *(manifest.find("engine") if trt else [])]
    unvalidated = {}
    for art in arts:
        why = manifest.require_servable(art, allow_unvalidated)
        if why is not None:
            unvalidated[art.name] = why
    return dest, unvalidated


@main.command("merge", cls=GuardedCommand, prog="dd-bench")
@click.argument("benches", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Markdown file.")
@click.option("--phase", type=click.Choice(["e2e", "call"]), default="e2e", show_default=True)
@click.option("--batch-sizes", default=None, help="Only these batch sizes (default: all common ones).")
def merge_cmd(benches: tuple[Path, ...], output: Path, phase: str, batch_sizes: str | None) -> None:
    """Merge bench JSONs from several targets into one Markdown table (rows: variants)."""
    from optimizer.bench.merge import merge

    bs = list(_ints(None, None, batch_sizes)) if batch_sizes else None  # type: ignore[arg-type]
    try:
        md = merge(list(benches), phase=phase, batch_sizes=bs)
    except DDCompileError as e:
        _fail(e)
    write_text_atomic(output, md)
    click.echo(md)
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
