"""Triton model repository from a manifest: the UNet as an ONNX Runtime or TensorRT model, and
the few-step sampler as a Python-backend (BLS) model that calls it.

    dd-triton out/ --repo triton_repo/ --precision fp16 --backend onnxruntime
    tritonserver --model-repository=$PWD/triton_repo

Layout written (atomically: built in a staging folder beside DIR, then swapped in):

    DIR/README.md                 versions the models need, the tritonserver command, a client call
    DIR/dd_unet/config.pbtxt      from the IO spec: inputs/outputs/dims, max_batch_size,
                                  dynamic_batching (preferred sizes), instance_group, version 1
    DIR/dd_unet/1/model.onnx      (or model.plan for TensorRT)
    DIR/dd_sampler/config.pbtxt   backend "python": seed or noise in, images in [0, 1] out
    DIR/dd_sampler/1/model.py     BLS: each sampler step is one inference request to dd_unet
    DIR/dd_sampler/1/dd_schedule.py   a copy of engines/schedule.py (numpy only), so the Python
                                  backend needs numpy and nothing of dd-compile
    DIR/dd_sampler/1/sampler.json the schedule, sample shape and tensor names
    DIR/.dd-compile.json          the marker (engines/outdir.py): DIR was written by dd-triton

DIR must be new, empty or a repository dd-triton wrote (it holds the marker); it may not be, hold
or lie inside OUT. Only an artifact that OUT's published run validated is exported, unless
--allow-unvalidated (then README.md and config.pbtxt record it).

No library writes these: the config text is generated here; tests parse it against Triton's
model_config.proto (tritonclient.grpc.model_config_pb2) and compare it with the ONNX graph.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.deploy_common import TRITON_DTYPES, parameters_text, swap_in
from engines.errors import InputError
from engines.fileio import sha256_file
from engines.iospec import IOSpec, TensorSpec
from engines.manifest import Artifact, Manifest
from engines.outdir import check_target, claim
from engines.runtime import pick_artifact
from engines.triton_t2i import is_t2i_folder, write_t2i_repo

log = logging.getLogger(__name__)

UNET_MODEL = "dd_unet"
SAMPLER_MODEL = "dd_sampler"
BACKENDS = ("onnxruntime", "tensorrt")
SAMPLER_TEMPLATE = Path(__file__).with_name("triton_sampler_model.py")


@dataclass(frozen=True)
class TritonConfig:
    precision: str = "fp16"
    backend: str = "onnxruntime"  # "onnxruntime" -> onnxruntime_onnx, "tensorrt" -> tensorrt_plan
    unet_instances: int = 1  # UNet instances per device (instance_group count)
    sampler_instances: int = 1  # Python-backend sampler instances (CPU; they only orchestrate)
    max_queue_delay_us: int = 2000  # how long the batcher may hold a request to fill a batch
    bench_json: Path | None = None  # dd-bench output: preferred batch sizes = best throughput
    # the artifact was exported although the published run did not validate it (or it failed)
    allow_unvalidated: bool = False


# -- config.pbtxt text -----------------------------------------------------------------------------
def _dims(t: TensorSpec, batched: bool) -> list[int]:
    """Triton dims exclude the batch axis when max_batch_size > 0; other axes must be fixed."""
    shape = list(t.shape[1:] if batched else t.shape)
    bad = [d for d in shape if not isinstance(d, int)]
    if bad:
        raise InputError(
            f"{t.name}: dynamic axes {bad} besides batch are not supported in Triton "
            "configs (export with a fixed sample size)"
        )
    return [int(d) for d in shape]


def _tensor_block(t: TensorSpec, batched: bool, optional: bool = False) -> str:
    if t.dtype not in TRITON_DTYPES:
        raise InputError(f"{t.name}: dtype {t.dtype} has no Triton type")
    dims = _dims(t, batched)
    # A [batch] tensor: Triton needs dims [1]; reshape {shape: []} hands the model [batch].
    reshape = "\n    reshape: { shape: [ ] }" if batched and not dims else ""
    dims = dims or [1]
    opt = "\n    optional: true" if optional else ""
    return (
        f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_DTYPES[t.dtype]}\n'
        f"    dims: [ {', '.join(map(str, dims))} ]{reshape}{opt}\n  }}"
    )


def _io_blocks(kind: str, tensors: list[tuple[TensorSpec, bool]], batched: bool) -> str:
    body = ",\n".join(_tensor_block(t, batched, opt) for t, opt in tensors)
    return f"{kind} [\n{body}\n]\n"


def preferred_batch_sizes(manifest: Manifest, max_batch: int, bench_json: Path | None) -> list[int]:
    """Sizes the dynamic batcher should aim for: from a benchmark if given, else the manifest's."""
    if bench_json is not None:
        sizes = _best_throughput_batches(Path(bench_json), max_batch)
    else:
        sizes = [int(b) for b in manifest.meta.get("batch_sizes") or [max_batch]]
    sizes = sorted({b for b in sizes if 1 <= b <= max_batch})
    return sizes or [max_batch]


def _bench_rows(obj: Any) -> list[tuple[int, float]]:
    """(batch, throughput) from any dicts in a bench JSON that name a batch size and a latency
    (ms, per call) or a throughput; the format of dd-bench's output is free to evolve."""
    rows: list[tuple[int, float]] = []
    if isinstance(obj, dict):
        b = next((obj[k] for k in ("batch", "batch_size") if isinstance(obj.get(k), int)), None)
        if b:
            tput = next(
                (
                    obj[k]
                    for k in ("throughput", "images_per_s", "samples_per_s")
                    if isinstance(obj.get(k), int | float)
                ),
                None,
            )
            ms = next(
                (
                    obj[k]
                    for k in ("median_ms", "latency_ms", "p50_ms", "ms")
                    if isinstance(obj.get(k), int | float)
                ),
                None,
            )
            if tput is None and ms:
                tput = b / (ms / 1e3)
            if tput:
                rows.append((b, float(tput)))
        for v in obj.values():
            rows += _bench_rows(v)
    elif isinstance(obj, list):
        for v in obj:
            rows += _bench_rows(v)
    return rows


def _best_throughput_batches(path: Path, max_batch: int, within: float = 0.9) -> list[int]:
    if not path.exists():
        raise InputError(f"{path}: no such bench file")
    try:
        rows = _bench_rows(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not any(b <= max_batch for b, _ in rows):
        raise InputError(f"{path}: no entries with a batch size (<= {max_batch}) and a latency or throughput")
    best: dict[int, float] = {}
    for b, t in rows:
        if b > max_batch:  # sizes the model cannot take do not set the bar
            continue
        best[b] = max(best.get(b, 0.0), t)
    top = max(best.values())
    # Preferred sizes are those within 10% of the best throughput (Triton's guide: the sizes
    # the model serves best); waiting to fill a bigger batch buys nothing beyond them.
    return sorted(b for b, t in best.items() if t >= within * top)


def _engine_target(art: Artifact) -> tuple[str | None, str | None]:
    """(TensorRT version, compute capability "8.9") from an engine artifact's record."""
    tgt = art.target or {}
    trt = tgt.get("tensorrt") or tgt.get("tensorrt_version") or art.libraries.get("tensorrt")
    cc = tgt.get("compute_capability") or tgt.get("cc")
    if cc is None and tgt.get("sm"):
        sm = str(tgt["sm"]).removeprefix("sm").removeprefix("_")
        cc = f"{sm[:-1]}.{sm[-1]}" if sm.isdigit() and len(sm) >= 2 else None
    return (str(trt) if trt else None), (str(cc) if cc else None)


def _onnx_opset(path: Path) -> int | None:
    """The graph's default-domain opset, when the onnx package is there (build machines)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def unet_config(manifest: Manifest, art: Artifact, cfg: TritonConfig, name: str = UNET_MODEL) -> str:
    spec: IOSpec = manifest.io_spec
    max_batch = spec.dims["batch"].max if "batch" in spec.dims else 0
    batched = max_batch > 0
    trt = cfg.backend == "tensorrt"
    filename = "model.plan" if trt else "model.onnx"
    text = (
        f"# generated by dd-triton from {manifest.path.name}; artifact {art.name} "
        f"sha256 {art.sha256}\n"
        f'name: "{name}"\nplatform: "{"tensorrt_plan" if trt else "onnxruntime_onnx"}"\n'
        f"max_batch_size: {max_batch}\n"
        f'default_model_filename: "{filename}"\n'
        "version_policy: { specific: { versions: [ 1 ] } }\n"
    )
    params = {"dd_artifact_sha256": art.sha256, "dd_precision": art.precision or cfg.precision}
    if cfg.allow_unvalidated:
        params["dd_allow_unvalidated"] = "true"
    if trt:
        trt_version, cc = _engine_target(art)
        portable = (art.target or {}).get("hardware_compatibility_level") == "ampere_plus"
        if cc and not portable:  # Triton loads the plan only on a GPU of this compute capability
            text += f'cc_model_filenames [\n  {{ key: "{cc}" value: "{filename}" }}\n]\n'
            params["dd_compute_capability"] = cc
        if trt_version:
            params["dd_tensorrt_version"] = trt_version
    else:
        ort = art.libraries.get("onnxruntime")
        if ort:
            params["dd_validated_onnxruntime"] = ort
    text += _io_blocks("input", [(t, False) for t in spec.inputs], batched)
    text += _io_blocks("output", [(t, False) for t in spec.outputs], batched)
    if batched:
        sizes = preferred_batch_sizes(manifest, max_batch, cfg.bench_json)
        text += (
            "dynamic_batching {\n"
            f"  preferred_batch_size: [ {', '.join(map(str, sizes))} ]\n"
            f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}\n"
        )
    kind = "KIND_GPU" if trt else "KIND_AUTO"  # ORT: GPU where Triton sees one, else CPU
    text += f"instance_group [\n  {{ count: {cfg.unet_instances} kind: {kind} }}\n]\n"
    return text + parameters_text(params)


def sampler_tensors(manifest: Manifest) -> tuple[list[tuple[TensorSpec, bool]], TensorSpec]:
    """The sampler's inputs (spec, optional) and its output: seed or noise (+ step noise for a
    multistep consistency student), the UNet's conditioning inputs, images [C, H, W]."""
    c, h, w = (int(d) for d in manifest.meta["sample_shape"])
    steps = manifest.schedule.steps
    ins: list[tuple[TensorSpec, bool]] = [
        (TensorSpec("seed", "int64", ("batch",)), True),
        (TensorSpec("noise", "float32", ("batch", c, h, w)), True),
    ]
    if manifest.schedule.kind == "consistency" and steps > 1:
        ins.append((TensorSpec("step_noise", "float32", ("batch", steps - 1, c, h, w)), True))
    ins += [(t, False) for t in manifest.io_spec.inputs if t.name not in ("sample", "timestep")]
    return ins, TensorSpec("images", "float32", ("batch", c, h, w))


def sampler_config(manifest: Manifest, cfg: TritonConfig, name: str = SAMPLER_MODEL) -> str:
    spec = manifest.io_spec
    max_batch = spec.dims["batch"].max if "batch" in spec.dims else 0
    ins, out = sampler_tensors(manifest)
    text = (
        f"# generated by dd-triton: the student's {manifest.schedule.kind} sampler, "
        f'{manifest.schedule.steps} steps, calling "{UNET_MODEL}" per step (BLS)\n'
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        "version_policy: { specific: { versions: [ 1 ] } }\n"
    )
    text += _io_blocks("input", ins, max_batch > 0)
    text += _io_blocks("output", [(out, False)], max_batch > 0)
    if max_batch > 0:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}\n"
    text += f"instance_group [\n  {{ count: {cfg.sampler_instances} kind: KIND_CPU }}\n]\n"
    return text


def sampler_settings(manifest: Manifest, unet_name: str = UNET_MODEL) -> dict[str, Any]:
    spec = manifest.io_spec
    return {
        "unet_model": unet_name,
        "schedule": manifest.schedule.to_dict(),
        "sample_shape": list(manifest.meta["sample_shape"]),
        "unet_inputs": [t.to_dict() for t in spec.inputs],
        "unet_output": spec.output_names[0],
        "max_batch": spec.dims["batch"].max if "batch" in spec.dims else 0,
    }


def write_sampler_model(repo: Path, manifest: Manifest, cfg: TritonConfig) -> Path:
    """repo/dd_sampler: config, model.py, dd_schedule.py (a copy of engines/schedule.py) and
    sampler.json. dd-serve writes this same folder (its UNet is bound through PyTriton instead)."""
    samp = repo / SAMPLER_MODEL
    (samp / "1").mkdir(parents=True)
    (samp / "config.pbtxt").write_text(sampler_config(manifest, cfg))
    shutil.copyfile(SAMPLER_TEMPLATE, samp / "1" / "model.py")
    shutil.copyfile(Path(__file__).with_name("schedule.py"), samp / "1" / "dd_schedule.py")
    (samp / "1" / "sampler.json").write_text(json.dumps(sampler_settings(manifest), indent=2))
    return samp


def readme(manifest: Manifest, art: Artifact, cfg: TritonConfig, repo_dir: Path) -> str:
    trt = cfg.backend == "tensorrt"
    lines = [
        f"# Triton model repository for {manifest.meta.get('model_class', 'the student')}",
        "",
        f"Generated by `dd-triton` from `{manifest.path}` (artifact `{art.name}`, precision "
        f"{art.precision}, sha256 `{art.sha256[:16]}...`).",
        "",
        *(
            [
                "**allow_unvalidated: true** — exported with `--allow-unvalidated`: the published "
                "dd-compile run did not validate this artifact, or it failed validation.",
                "",
            ]
            if cfg.allow_unvalidated
            else []
        ),
        f"- `{UNET_MODEL}`: the denoiser, platform "
        f"`{'tensorrt_plan' if trt else 'onnxruntime_onnx'}`, dynamic batching.",
        f"- `{SAMPLER_MODEL}`: Python backend (BLS), the {manifest.schedule.steps}-step "
        f"{manifest.schedule.kind} sampler; send `seed` (INT64 [B, 1]) or `noise` "
        "(FP32 [B, C, H, W]), get `images` (FP32 [B, C, H, W] in [0, 1]).",
        "",
        "## Versions this repository needs",
        "",
    ]
    if trt:
        trt_version, cc = _engine_target(art)
        lines += [
            f"- TensorRT **{trt_version or 'unknown (not recorded in the manifest)'}** "
            "exactly: a plan does not load in another TensorRT version. Use the "
            "Triton release (NGC `nvcr.io/nvidia/tritonserver:<yy.mm>-py3`) whose release "
            f"notes list TensorRT {trt_version or '(the build version)'}.",
            f"- A GPU of compute capability **{cc or 'unknown'}** (the plan was built for "
            "it; `cc_model_filenames` in the config pins it).",
        ]
    else:
        opset = art.extra.get("opset") or art.config.get("opset") or _onnx_opset(manifest.file(art))
        ort = art.libraries.get("onnxruntime")
        lines += [
            f"- Triton with the `onnxruntime` backend, whose ONNX Runtime supports opset "
            f"{opset or 'of the graph'} (validated with onnxruntime {ort or 'unknown'}).",
            "- Any CPU or NVIDIA GPU (instance_group `KIND_AUTO`).",
        ]
    lines += [
        "- The Python backend with numpy (in every Triton `-py3` image); the sampler imports nothing else.",
        "",
        "## Serve",
        "",
        "```sh",
        f"tritonserver --model-repository={repo_dir.resolve()}",
        "# or, with Docker:",
        f"docker run --rm {'--gpus all ' if trt else ''}-p8000:8000 -p8001:8001 "
        f"-v {repo_dir.resolve()}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
        "tritonserver --model-repository=/models",
        "```",
        "",
        "## Call",
        "",
        "```python",
        "import numpy as np, tritonclient.http as http",
        "c = http.InferenceServerClient('localhost:8000')",
        "seed = http.InferInput('seed', [4, 1], 'INT64')",
        "seed.set_data_from_numpy(np.arange(4, dtype=np.int64)[:, None])",
        f"images = c.infer('{SAMPLER_MODEL}', [seed]).as_numpy('images')",
        "```",
        "",
        "The same seeds give the same images as `engines.load(out/)(seeds=...)` (same noise, "
        "same sampler code: `dd_sampler/1/dd_schedule.py` is a copy of engines/schedule.py).",
        "",
    ]
    return "\n".join(lines)


def write_triton_repo(
    out_dir: Path,
    repo_dir: Path,
    precision: str = "fp16",
    backend: str = "onnxruntime",
    bench_json: Path | None = None,
    *,
    unet_instances: int = 1,
    max_queue_delay_us: int = 2000,
    allow_unvalidated: bool = False,
    option: str = "--repo",
) -> Path:
    """Write the Triton model repository for `out_dir`'s student into `repo_dir`; returns it.

    `repo_dir` is checked before any work (engines/outdir.py): it may not be, hold or lie inside
    `out_dir`, and an existing one is replaced only if dd-triton wrote it. `option` names it in
    errors (dd-compile passes "--triton-repo").
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown Triton backend {backend!r}; choose from {list(BACKENDS)}")
    if is_t2i_folder(out_dir):  # a text-to-image pipeline: its components + the dd_t2i model
        if backend != "onnxruntime":
            raise InputError(f"--backend {backend}: a text-to-image repository has onnxruntime models only")
        return write_t2i_repo(
            Path(out_dir),
            Path(repo_dir),
            instances=unet_instances,
            max_queue_delay_us=max_queue_delay_us,
            allow_unvalidated=allow_unvalidated,
            option=option,
        )
    repo_dir = check_target(repo_dir, "triton-repo", option, protect=[out_dir])
    manifest = Manifest.load(out_dir)
    if manifest.io_spec is None or manifest.schedule is None or "sample_shape" not in manifest.meta:
        raise InputError(f"{manifest.path}: lacks io_spec, schedule or meta.sample_shape")
    art = pick_artifact(manifest, precision, backend)
    unvalidated = manifest.require_servable(art, allow_unvalidated, backend) is not None
    cfg = TritonConfig(
        precision,
        backend,
        unet_instances,
        1,
        max_queue_delay_us,
        Path(bench_json) if bench_json else None,
        unvalidated,
    )
    src = manifest.verify(art)  # never ship a file that differs from what was validated
    ext = manifest.inside(src.with_name(src.name + ".data"), f"external data of {art.name!r}")
    repo_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}.staging-", dir=repo_dir.parent))
    try:
        unet = tmp / UNET_MODEL
        (unet / "1").mkdir(parents=True)
        dest = unet / "1" / ("model.plan" if backend == "tensorrt" else "model.onnx")
        shutil.copyfile(src, dest)
        if ext.exists():  # external weights keep their recorded name
            shutil.copyfile(ext, unet / "1" / ext.name)
        (unet / "config.pbtxt").write_text(unet_config(manifest, art, cfg))
        write_sampler_model(tmp, manifest, cfg)
        (tmp / "README.md").write_text(readme(manifest, art, cfg, repo_dir))
        if sha256_file(dest) != art.sha256:
            raise InputError(f"{dest}: copy does not match the manifest's sha256")
        # the marker goes in before the swap: the repository never appears without it
        run_id = (manifest.run or {}).get("id") or art.sha256
        claim(tmp, "triton-repo", run_id, artifact=art.name, allow_unvalidated=unvalidated)
        swap_in(tmp, repo_dir, option)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote Triton model repository %s (%s, %s)", repo_dir, backend, precision)
    return repo_dir


def main(argv: list[str] | None = None) -> None:
    """Console script `dd-triton`."""
    import click

    from engines.cli_errors import GuardedCommand

    @click.command(
        cls=GuardedCommand, prog="dd-triton", context_settings={"help_option_names": ["-h", "--help"]}
    )
    @click.argument("out_dir", type=click.Path(path_type=Path))
    @click.option(
        "--repo",
        "repo_dir",
        required=True,
        type=click.Path(path_type=Path),
        help="Model repository folder to write: new, empty, or one dd-triton wrote (then replaced).",
    )
    @click.option(
        "--precision", default="fp16", show_default=True, type=click.Choice(["fp32", "fp16", "int8"])
    )
    @click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKENDS))
    @click.option(
        "--bench-json",
        type=click.Path(path_type=Path),
        help="dd-bench JSON: preferred batch sizes = those within 10%% of the best "
        "throughput (default: the manifest's batch sizes).",
    )
    @click.option(
        "--instances", default=1, show_default=True, type=click.IntRange(1), help="UNet instances per device."
    )
    @click.option("--max-queue-delay-us", default=2000, show_default=True, type=click.IntRange(0))
    @click.option(
        "--allow-unvalidated",
        is_flag=True,
        help="Export an artifact the published run did not validate or that failed (logs a "
        "warning; README.md and config.pbtxt record it).",
    )
    def cli(
        out_dir: Path,
        repo_dir: Path,
        precision: str,
        backend: str,
        bench_json: Path | None,
        instances: int,
        max_queue_delay_us: int,
        allow_unvalidated: bool,
    ) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # errors: one line and an exit code (engines/cli_errors.py)
        repo = write_triton_repo(
            out_dir,
            repo_dir,
            precision,
            backend,
            bench_json,
            unet_instances=instances,
            max_queue_delay_us=max_queue_delay_us,
            allow_unvalidated=allow_unvalidated,
        )
        click.echo(f"wrote {repo}\nserve it: tritonserver --model-repository={repo.resolve()}")

    cli.main(args=argv, prog_name="dd-triton", standalone_mode=True)


if __name__ == "__main__":
    main()
