"""`dd-serve OUT_DIR --port 8000`: the student's sampler behind a real Triton server (PyTriton).

PyTriton (package nvidia-pytriton) ships a tritonserver binary and binds a Python callable to it.
dd-serve runs two models in it:

    "dd_sampler"  the Python-backend model dd-triton generates (engines/triton_sampler_model.py,
                  numpy only), loaded from a repository written to a temporary folder: it checks
                  every request alone with the runtime's checks (engines.schedule.
                  check_sampler_inputs), samples the valid requests of a dynamic batch together
                  and calls the UNet per step (BLS).
    "dd_unet"     the denoiser, bound through PyTriton to `engines.load(OUT_DIR)`'s runner.

    dd_sampler:  input  seed INT64 [B, 1] or noise FP32 [B, C, H, W] (+ the conditioning inputs)
                 output images FP32 [B, C, H, W] in [0, 1]
    same seeds -> same images as engines.load(OUT_DIR)(seeds=...)

A text-to-image folder (t2i.json) is served by engines/serve_t2i.py: prompt strings in, uint8
images out. `--backend openvino` runs the UNet (or every component) on OpenVINO in either flow.

Why not the sampler as the PyTriton callable: PyTriton 0.7 has no per-request error. Whatever the
callable raises fails every request of the batch with HTTP 500 and the traceback as message, so
one bad request merged by the dynamic batcher failed its neighbours. The Python-backend model
answers each request with its own response, a bad one with INVALID_ARG (HTTP 400) and the
one-line reason. Triton itself refuses wrong names, dtypes, shapes and batch sizes (400).

PyTriton's Python-backend stub embeds libpython: it needs a Python with a shared libpython of
the same minor version as the stub (Debian's python3.11 + libpython3.11 works; a pyenv 3.11
without --enable-shared does not). .ci/setup-serve builds such a venv.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import BackendError, BackendUnavailable
from engines.iospec import IOSpec
from engines.manifest import Manifest
from engines.runtime import SamplerPipeline, load

log = logging.getLogger(__name__)

MODEL_NAME = "dd_sampler"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default; pass 0.0.0.0 deliberately to expose it
    port: int = 8000  # HTTP
    grpc_port: int = 8001
    metrics_port: int = 8002
    precision: str = "fp32"
    backend: str = "onnxruntime"
    max_queue_delay_us: int = 2000  # how long Triton may hold a request to fill a batch
    threads: int | None = None  # onnxruntime intra-op / OpenVINO threads (None: the backend's default)
    # serve an artifact the published run did not validate (or failed): a warning, not a refusal
    allow_unvalidated: bool = False
    # on SIGINT/SIGTERM, how long Triton lets in-flight requests finish (Triton's own default: 30)
    exit_timeout_s: int = 30


def write_sampler_repo(manifest: Manifest, repo: Path, max_queue_delay_us: int) -> Path:
    """The dd_sampler model folder exactly as dd-triton writes it (config, model.py, dd_schedule.py,
    sampler.json), without the UNet: dd-serve binds that through PyTriton."""
    from engines import triton

    samp = repo / triton.SAMPLER_MODEL
    (samp / "1").mkdir(parents=True)
    cfg = triton.TritonConfig(max_queue_delay_us=max_queue_delay_us)
    (samp / "config.pbtxt").write_text(triton.sampler_config(manifest, cfg))
    shutil.copyfile(triton.SAMPLER_TEMPLATE, samp / "1" / "model.py")
    shutil.copyfile(Path(triton.__file__).with_name("schedule.py"), samp / "1" / "dd_schedule.py")
    (samp / "1" / "sampler.json").write_text(json.dumps(triton.sampler_settings(manifest), indent=2))
    return repo


def unet_function(pipe: SamplerPipeline) -> Any:
    """The callable PyTriton binds as dd_unet: one batch of UNet feeds -> its output."""
    from pytriton.decorators import batch

    spec: IOSpec = pipe.manifest.io_spec
    flat = {t.name for t in spec.inputs if len(t.shape) == 1}  # [batch] tensors arrive as [B, 1]

    @batch
    def infer(**feeds: np.ndarray) -> dict[str, np.ndarray]:
        return pipe.runner.infer({k: v.reshape(-1) if k in flat else v for k, v in feeds.items()})

    return infer


def unet_tensors(spec: IOSpec) -> tuple[list[Any], list[Any]]:
    """PyTriton input/output specs of the UNet (shapes without the batch axis)."""
    from pytriton.model_config import Tensor

    def tensor(t: Any) -> Any:
        return Tensor(name=t.name, dtype=np.dtype(t.dtype), shape=tuple(int(d) for d in t.shape[1:]) or (1,))

    return [tensor(t) for t in spec.inputs], [tensor(t) for t in spec.outputs]


def load_model(config: ServeConfig, access_token: str | None, name: str = MODEL_NAME) -> None:
    """Ask the running server (explicit model control) to load `name` from the repository;
    PyTriton restricts the model-control API to the token it generated."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    try:
        http.InferenceServerClient(f"{host}:{config.port}").load_model(
            name, headers={"triton-access-token": access_token} if access_token else None
        )
    except InferenceServerException as e:
        raise BackendError(f"Triton did not load {name}: {str(e).strip().splitlines()[0]}") from None


def serve(out_dir: str | Path, config: ServeConfig = ServeConfig()) -> None:
    """Load the student (or the text-to-image pipeline) and serve it until SIGINT/SIGTERM."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise BackendUnavailable(
            "PyTriton is not installed: run .ci/setup-serve (a Python 3.11 "
            "venv with a shared libpython and nvidia-pytriton)"
        ) from None
    from engines.triton import UNET_MODEL
    from engines.triton_t2i import is_t2i_folder, open_t2i

    if is_t2i_folder(out_dir):
        from engines.serve_t2i import check_backend, serve_t2i

        check_backend(config)
        opened = open_t2i(
            out_dir,
            backend=config.backend,
            threads=config.threads,
            allow_unvalidated=config.allow_unvalidated,
            # a published pipeline: fp32 (the option's default) means its recommended mix
            precision=None if config.precision == "fp32" else config.precision,
        )
        return serve_t2i(opened, Path(out_dir), config)

    kw = {"threads": config.threads} if config.threads else {}
    pipe = load(
        out_dir,
        precision=config.precision,
        backend=config.backend,
        allow_unvalidated=config.allow_unvalidated,
        **kw,
    )
    max_batch = pipe.max_batch or 1
    tmp = Path(tempfile.mkdtemp(prefix="dd-serve-"))
    try:
        repo = tmp / "repo"
        repo.mkdir()  # empty at start: dd_sampler is loaded once dd_unet is up, so ready means ready
        triton_cfg = TritonConfig(
            http_address=config.host,
            http_port=config.port,
            grpc_address=config.host,
            grpc_port=config.grpc_port,
            metrics_address=config.host,
            metrics_port=config.metrics_port,
            model_repository=repo,
            exit_on_error=True,
            exit_timeout_secs=config.exit_timeout_s,
        )
        inputs, outputs = unet_tensors(pipe.manifest.io_spec)
        with Triton(config=triton_cfg) as triton:
            triton.bind(
                model_name=UNET_MODEL,
                infer_func=unet_function(pipe),
                inputs=inputs,
                outputs=outputs,
                config=ModelConfig(
                    max_batch_size=max_batch,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us),
                ),
                strict=True,
            )
            triton.run()  # starts the server and waits for dd_unet
            write_sampler_repo(pipe.manifest, repo, config.max_queue_delay_us)
            load_model(config, triton.get_access_token())
            log.info(
                "serving %s (%s/%s, max batch %d) on http://%s:%d and grpc %s:%d",
                out_dir,
                config.backend,
                config.precision,
                max_batch,
                config.host,
                config.port,
                config.host,
                config.grpc_port,
            )
            triton.serve()
    finally:
        pipe.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Console script `dd-serve`."""
    import signal

    import click

    from engines.cli_errors import GuardedCommand

    @click.command(
        cls=GuardedCommand, prog="dd-serve", context_settings={"help_option_names": ["-h", "--help"]}
    )
    @click.argument("out_dir", type=click.Path(path_type=Path))
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
    @click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
    @click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
    @click.option(
        "--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"])
    )
    @click.option(
        "--backend",
        default="onnxruntime",
        show_default=True,
        type=click.Choice(["onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "openvino"]),
    )
    @click.option("--max-queue-delay-us", default=2000, show_default=True, type=click.IntRange(0))
    @click.option(
        "--threads", type=click.IntRange(1), help="onnxruntime intra-op / OpenVINO inference threads."
    )
    @click.option(
        "--exit-timeout",
        "exit_timeout_s",
        default=30,
        show_default=True,
        type=click.IntRange(0),
        help="Seconds in-flight requests may take to finish after SIGINT/SIGTERM.",
    )
    @click.option(
        "--allow-unvalidated",
        is_flag=True,
        help="Serve an artifact the published run did not validate or that failed (logs a warning).",
    )
    def cli(out_dir: Path, **kw: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # SIGTERM -> KeyboardInterrupt, so Triton.serve() stops the server and cleans up.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        serve(out_dir, ServeConfig(**kw))  # errors: one line and an exit code (engines/cli_errors.py)

    cli.main(args=argv, prog_name="dd-serve", standalone_mode=True)


if __name__ == "__main__":
    main()
