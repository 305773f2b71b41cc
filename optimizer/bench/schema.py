"""The bench JSON: a stable, versioned schema that `dd-bench merge` and other tools read.

Version 1 (``{"format": "dd-bench", "version": 1, ...}``); new keys may be added within a version,
keys are never renamed or removed without a version bump. Times in milliseconds, memory in MiB,
FLOPs as counts per image per model call (one UNet evaluation).

    format, version, created (ISO 8601 UTC)
    target: {name, fingerprint}              fingerprint: see optimizer/bench/fingerprint.py
    source: {manifest, manifest_sha256, sample_shape, schedule: {kind, steps},
             teacher: {path, reference_steps} | null}
    config: {batch_sizes, seconds, threads, warmup, min_rounds, rel_tol, ...}  (the BenchConfig)
    peak: {fp32_gflops, fp16_gflops | null, method}   matmul peak measured in the same run
    flops: {student: int | null, teacher: int | null, method}      per image per call
    teacher_baseline: {method, fresh_process, why_not, verdict: agree|disagree|unchecked} | null
    variants: [{
        name           "onnxruntime/fp16", "tensorrt/int8", "teacher/torch-eager/fp32", ...
        model          "student" | "teacher"
        role           "engine" | "baseline"
        backend, precision, artifact (manifest artifact name or null)
        skipped        null, or why the variant was not measured (one line)
        memory: {method, after_import_rss_mb, peak_rss_mb: {batch: MiB}, delta_rss_mb: {batch: MiB},
                 device_peak_mb: {batch: MiB} | null} | null
        results: [{
            phase          "call" (one model evaluation) | "e2e" (noise -> sample, all steps)
            batch, steps   steps = model calls per phase run (1 for "call")
            method         "measured" | "estimated" (e2e only: steps x per-call p50, when one run
                           would not fit the time budget; timing percentiles are then null)
            p10_ms, p50_ms, p90_ms, p99_ms, n, spread, stable   stable: optimizer.timing
            baseline       teacher/torch-eager/fp32 only: its figures are the fresh-process
                           ones; {source, threads, in_run_median_ms, in_run_threads,
                           fresh_same_threads_median_ms, in_run_over_fresh, tolerance, verdict}
            images_per_s           batch / p50
            speedup_vs_teacher     teacher's p50 / this p50, same phase and batch (e2e: the teacher
                                   with its reference steps vs the student sampler); null
                                   unless both timings are stable (speedup_null_reason says why)
            achieved_gflops, fraction_of_peak   phase "call" only; null without a FLOP count
        }]
    }]
    best: {phase: {batch: variant name}}   fastest measured student engine or baseline by p50
    threads: {grid, cores, pays_threshold, points: [{variant, backend, precision, threads, batch,
              median_ms, stable, n, images_per_s, images_per_s_per_core, replicas,
              serving_images_per_s}], verdicts: {variant: {vs_fp32: {threads: {batch: ratio}},
              batch, verdict}}, recommendation: {...point, rule, summary} | null} | null
              (optimizer/threads_grid.py: per call, one session per thread count, side by side)

Text-to-image outputs (manifest meta.kind "text-to-image"; optimizer/bench/pipeline.py) use the same
keys, read as follows, and add a few:

    source.kind            "text-to-image" (absent in a pixel bench)
    source.sample_shape    [H, W, 3]: one uint8 image
    source.schedule        {kind: the runtime scheduler of the recommended mix, steps: the manifest's}
    source.pipeline        {family, mixes, guidance, guidance_scale, size, steps, prompts}
    source.teacher         adds guidance_scale (the teacher's reference guidance)
    variants[].artifact    "pipeline/<mix>" (engines.load(out, precision=mix, backend=...))
    variants[].unvalidated why the pipeline is not servable (only with --allow-unvalidated)
    variants[].memory      {method: "not probed: ..."}: no per-pipeline memory probe
    results[].phase        "e2e": one whole generation, prompts in, uint8 images out, steps = the
                           manifest's steps (text encoder, UNet calls, VAE); "call": one UNet
                           evaluation through the pipeline's own runner
    results[].unet_batch   the UNet's batch in that phase (2 x batch under CFG with guidance > 1)
    flops                  {student: null, teacher: null, method: why not counted}
    teacher row            e2e only (its diffusers pipeline at its reference steps and guidance),
                           timed alone in a fresh process; baseline.verdict "unchecked: ..." and
                           in_run_* null (no in-run figure is taken); call results carry
                           speedup_vs_teacher null with that reason
    teacher_baseline.verdict  "unchecked"
    threads                adds unit: "generation" and note: each point is one whole generation
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engines.errors import InputError

BENCH_FORMAT = "dd-bench"
BENCH_VERSION = 1
PHASES = ("call", "e2e")


def load_bench(path: str | Path) -> dict[str, Any]:
    """Read and check a bench JSON; a one-line InputError names the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such bench file")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != BENCH_FORMAT:
        raise InputError(f'{p}: not a dd-bench file (no "format": "{BENCH_FORMAT}")')
    if d.get("version") != BENCH_VERSION:
        raise InputError(
            f"{p}: bench schema version {d.get('version')!r} is not supported "
            f"(this dd-bench reads version {BENCH_VERSION})"
        )
    for key in ("target", "variants"):
        if key not in d:
            raise InputError(f"{p}: bench file lacks {key!r}")
    if not isinstance(d["variants"], list) or not all(
        isinstance(v, dict) and "name" in v and isinstance(v.get("results"), list) for v in d["variants"]
    ):
        raise InputError(f'{p}: "variants" must be a list of {{name, results: [...]}}')
    _check_fields(p, d)
    return d


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_fields(p: Path, d: dict[str, Any]) -> None:
    """The types of every field a reader of the bench (merge, dd-triton) uses, each named."""

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise InputError(f"{p}: bench field {field} must be {what}")

    t = d["target"]
    need(isinstance(t, dict) and isinstance(t.get("name"), str), '"target.name"', "a string")
    fp = t.get("fingerprint")
    need(isinstance(fp, dict), '"target.fingerprint"', "an object")
    cpu = fp.get("cpu")
    need(
        isinstance(cpu, dict) and isinstance(cpu.get("model"), str),
        '"target.fingerprint.cpu.model"',
        "a string",
    )
    gpus = fp.get("gpus", [])
    need(
        isinstance(gpus, list) and all(isinstance(g, dict) and isinstance(g.get("name"), str) for g in gpus),
        '"target.fingerprint.gpus"',
        "a list of {name}",
    )
    need(isinstance(d.get("config", {}), dict), '"config"', "an object")
    need(isinstance(d.get("created", ""), str), '"created"', "a string")
    for i, v in enumerate(d["variants"]):
        need(isinstance(v["name"], str), f'"variants[{i}].name"', "a string")
        for j, r in enumerate(v["results"]):
            where = f'"variants[{i}].results[{j}]'
            need(isinstance(r, dict), where + '"', "an object")
            need(r.get("phase") in PHASES, where + '.phase"', f"one of {', '.join(PHASES)}")
            b = r.get("batch")
            need(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1,
                where + '.batch"',
                "an integer >= 1",
            )
            for k in ("p50_ms", "images_per_s", "speedup_vs_teacher"):
                need(r.get(k) is None or _num(r[k]), f'{where}.{k}"', "a number or null")
            need(isinstance(r.get("method", "measured"), str), where + '.method"', "a string")


def result(variant: dict[str, Any], phase: str, batch: int) -> dict[str, Any] | None:
    for r in variant.get("results", []):
        if r.get("phase") == phase and r.get("batch") == batch:
            return r
    return None
