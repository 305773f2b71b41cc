"""Torch-free runtime: manifest -> runner -> few-step sampler -> images.

import engines
pipe = engines.load("out/", precision="int8", backend="onnxruntime")
images = pipe(seeds=[0, 1, 2, 3])      # numpy [B, C, H, W] in [0, 1]

`load` serves only what the published run validated (engines.manifest.Manifest.servable).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.errors import InputError
from engines.manifest import MANIFEST_NAME, Artifact, Manifest
from engines.pipeline import CompiledPipeline, Parts
from engines.schedule import StudentScheduler, check_sampler_inputs

log = logging.getLogger(__name__)

ORT_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt")


def pick_artifact(manifest: Manifest, precision: str, backend: str) -> Artifact:
    kind, match = ("engine", {"backend": "tensorrt"}) if backend == "tensorrt" else ("onnx", {})
    found = manifest.find(kind, precision=precision, **match)
    if not found:
        have = sorted(
            {
                f"{a.backend or 'onnxruntime'}/{a.precision}"
                for a in manifest.artifacts.values()
                if a.kind in ("onnx", "engine")
            }
        )
        raise InputError(
            f"{manifest.path}: no {kind} for precision {precision!r} "
            f"and backend {backend!r} (have: {', '.join(have) or 'none'})"
        )
    return found[-1]


def make_runner(manifest: Manifest, art: Artifact, backend: str, **kw: Any) -> Runner:
    path = manifest.verify(art)
    spec = manifest.io_spec
    if backend in ORT_BACKENDS:
        from engines.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, spec, backend=backend, **kw)
    if backend == "tensorrt":
        from engines.tensorrt_runner import TensorRTRunner, check_engine_compatible

        check_engine_compatible(art)
        return TensorRTRunner(path, spec, **kw)
    if backend == "openvino":
        from engines.openvino_runner import OpenVINORunner

        hint = "bf16" if art.config.get("inference_precision_hint") == "bf16" else "f32"
        batches = manifest.meta.get("batch_sizes") or []
        return OpenVINORunner(path, spec, batch_sizes=batches, precision_hint=hint, **kw)
    raise InputError(f"unknown backend {backend!r}; choose from {[*ORT_BACKENDS, 'tensorrt', 'openvino']}")


class SamplerPipeline(CompiledPipeline):
    """A denoiser family's runtime: the student's runner and its own schedule (one component, no
    text encoder, no VAE); `pipe(seeds=...)` or `pipe(noise=...)` -> images [B, C, H, W] in [0, 1]."""

    def __init__(self, manifest: Manifest, runner: Runner):
        self.manifest, self.runner = manifest, runner
        self.schedule = manifest.schedule
        self.sample_shape = tuple(manifest.meta["sample_shape"])  # (C, H, W)
        spec = manifest.io_spec
        c, h, w = self.sample_shape
        super().__init__(
            Parts(
                runners={"denoiser": runner},
                specs={"denoiser": spec},
                denoiser="denoiser",
                scheduler=StudentScheduler(self.schedule),
                guidance="none",
                sample_channels=c,
                defaults={"num_inference_steps": self.schedule.steps, "height": h, "width": w},
                cond_names=tuple(n for n in spec.input_names if n not in ("sample", "timestep")),
            )
        )
        runner.activate()

    def __call__(  # type: ignore[override]  # the denoiser's own argument order, kept for callers
        self,
        seeds: list[int] | None = None,
        noise: np.ndarray | None = None,
        step_noise: np.ndarray | None = None,
        cond: dict[str, np.ndarray] | None = None,
        output: str = "images",
    ) -> np.ndarray:
        check_sampler_inputs(seeds, noise, step_noise, cond, self.sample_shape, self.schedule)
        latents = None if noise is None else noise.astype(np.float32)
        return super().__call__(
            seeds=None if seeds is None else list(seeds),
            latents=latents,
            step_noise=step_noise,
            cond=cond,
            output_type=output,
        )


T2I_KIND = "text-to-image"


def load_t2i(
    manifest: Manifest, precision: str | None, backend: str, allow_unvalidated: bool, **runner_kw: Any
) -> Any:
    """The TextToImagePipeline of a text-to-image output: the mix `precision` (default: the
    recommended one), its description, every graph it names and every asset of its run (tokenizer,
    scheduler config, t2i.json) checked (validated, sha256) before anything is constructed."""
    import json

    from engines.t2i import BACKENDS, TextToImagePipeline

    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: text-to-image pipelines run on {', '.join(BACKENDS)}")
    mix = precision or manifest.meta.get("recommended") or "fp32"
    art = manifest.get(f"pipeline/{mix}")
    if art is None:
        have = sorted(a.precision or "?" for a in manifest.find("pipeline"))
        raise InputError(
            f"{manifest.path}: no text-to-image pipeline {mix!r} (have: {', '.join(have) or 'none'})"
        )
    manifest.require_servable(art, allow_unvalidated, backend)
    path = manifest.verify(art)
    desc = json.loads(path.read_text())
    # a mix built for TensorRT names each component's engine; the others its ONNX graph
    # keyed by precision too: a bf16 component is the fp32 graph file under its own artifact
    # (validated on its own record), so a path alone may name two artifacts
    graphs = [*manifest.find("onnx"), *manifest.find("engine")]
    by_path = {a.path: a for a in graphs}
    by_key = {(a.path, a.precision): a for a in graphs}
    run_dir = art.path.rsplit("/", 1)[0]
    for kind, c in desc["components"].items():
        rel = f"{run_dir}/{c['path']}"
        g = by_key.get((rel, c.get("precision"))) or by_path.get(rel)
        if g is None:
            raise InputError(f"{path}: component {kind} graph {c['path']} is not in the manifest")
        if (g.kind == "engine") != (backend == "tensorrt"):
            what, use = (
                ("a TensorRT engine", "tensorrt") if g.kind == "engine" else ("an ONNX graph", "onnxruntime")
            )
            raise InputError(f"{path}: component {kind} is {what}; load this mix with backend={use!r}")
        manifest.require_servable(g, allow_unvalidated, backend)
        manifest.verify(g)
        if g.kind == "engine":
            from engines.trt_target import check_engine_compatible

            check_engine_compatible(g)
    # the files the pipeline reads besides the graphs: each must be one the manifest hashed
    assets = {a.path: a for a in manifest.find("asset") if a.path.startswith(f"{run_dir}/")}
    reads = {
        "tokenizer": (desc.get("tokenizer") or {}).get("path"),
        "scheduler": (desc.get("scheduler") or {}).get("config"),
    }
    for what, rel in reads.items():
        if not isinstance(rel, str) or f"{run_dir}/{rel}" not in assets:
            raise InputError(
                f"{path}: the {what} file {rel!r} is not in the manifest (nothing to verify it by)"
            )
    for a in assets.values():
        manifest.verify(a)
    pipe = TextToImagePipeline(path.parent, backend=backend, config=path.name, **runner_kw)
    return pipe.__enter__()  # ready to call, as SamplerPipeline; `with` still closes it


def _manifest_identity(out_dir: str | Path) -> tuple[int, ...] | None:
    """What changes when manifest.json is replaced (a new inode) or rewritten; None if absent."""
    p = Path(out_dir)
    p = p / MANIFEST_NAME if p.is_dir() else p
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def load(
    out_dir: str | Path,
    precision: str | None = None,
    backend: str = "onnxruntime",
    *,
    allow_unvalidated: bool = False,
    **runner_kw: Any,
) -> Any:
    """The student of `out_dir` at `precision` (default fp32) on `backend`, ready to sample; for a
    text-to-image output, its TextToImagePipeline (default: the recommended mix).

    Only an artifact that the published run validated (and passed) is loaded; anything else is
    refused with one line unless `allow_unvalidated=True` (then a warning is logged).

    A dd-compile re-run may publish while this reads: if loading fails and manifest.json was
    replaced meanwhile (a file it named may be gone), the new manifest is read and loaded once more.
    """
    before = _manifest_identity(out_dir)
    try:
        return _load(out_dir, precision, backend, allow_unvalidated, **runner_kw)
    except Exception as e:  # any failure: a vanished file is IntegrityError, OSError or ORT's NoSuchFile
        if _manifest_identity(out_dir) == before:
            raise  # nothing was published meanwhile: the failure stands
        log.info("%s: a new run was published while loading (%s); loading it", out_dir, type(e).__name__)
    return _load(out_dir, precision, backend, allow_unvalidated, **runner_kw)


def _load(
    out_dir: str | Path, precision: str | None, backend: str, allow_unvalidated: bool, **runner_kw: Any
) -> Any:
    manifest = Manifest.load(out_dir)
    if manifest.meta.get("kind") == T2I_KIND:
        return load_t2i(manifest, precision, backend, allow_unvalidated, **runner_kw)
    precision = precision or "fp32"
    missing = [k for k, v in (("io_spec", manifest.io_spec), ("schedule", manifest.schedule)) if v is None]
    missing += [] if "sample_shape" in manifest.meta else ["meta.sample_shape"]
    if missing:
        raise InputError(f"{manifest.path}: lacks {', '.join(missing)} (not a compiled student to sample)")
    art = pick_artifact(manifest, precision, backend)
    manifest.require_servable(art, allow_unvalidated, backend)
    return SamplerPipeline(manifest, make_runner(manifest, art, backend, **runner_kw))
