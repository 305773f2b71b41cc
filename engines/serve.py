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

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# ServeConfig and load_model live in engines/deploy_common.py (serve_t2i.py uses them too)
from engines.deploy_common import ServeConfig, load_model, runner_function, server_config
from engines.errors import BackendUnavailable, InputError
from engines.iospec import IOSpec
from engines.manifest import Manifest
from engines.runtime import SamplerPipeline, load
from engines.serve_t2i import check_backend, serve_t2i
from engines.triton import SAMPLER_MODEL, UNET_MODEL, TritonConfig, write_sampler_model
from engines.triton_t2i import is_t2i_folder, open_t2i

log = logging.getLogger(__name__)

MODEL_NAME = SAMPLER_MODEL
# frozen; a module-level default because ruff's B008 sees ServeConfig as immutable only in its own module
DEFAULT_CONFIG = ServeConfig()


def write_sampler_repo(manifest: Manifest, repo: Path, max_queue_delay_us: int) -> Path:
    """The dd_sampler model folder exactly as dd-triton writes it (config, model.py, dd_schedule.py,
    sampler.json), without the UNet: dd-serve binds that through PyTriton."""
    write_sampler_model(repo, manifest, TritonConfig(max_queue_delay_us=max_queue_delay_us))
    return repo


def unet_function(pipe: SamplerPipeline) -> Any:
    """The callable PyTriton binds as dd_unet: one batch of UNet feeds -> its output."""
    return runner_function(pipe.runner, pipe.manifest.io_spec)


def unet_tensors(spec: IOSpec) -> tuple[list[Any], list[Any]]:
    """PyTriton input/output specs of the UNet (shapes without the batch axis)."""
    from pytriton.model_config import Tensor

    def tensor(t: Any) -> Any:
        return Tensor(name=t.name, dtype=np.dtype(t.dtype), shape=tuple(int(d) for d in t.shape[1:]) or (1,))

    return [tensor(t) for t in spec.inputs], [tensor(t) for t in spec.outputs]


def serve(out_dir: str | Path, config: ServeConfig = DEFAULT_CONFIG) -> None:
    """Load the student (or the text-to-image pipeline) and serve it until SIGINT/SIGTERM."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton
    except ImportError:
        raise BackendUnavailable(
            "PyTriton is not installed: run .ci/setup-serve (a Python 3.11 "
            "venv with a shared libpython and nvidia-pytriton)"
        ) from None
    if is_t2i_folder(out_dir):  # the manifest's meta.kind (or a bare export's t2i.json) picks the flow
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

    if config.lora_dir is not None:
        raise InputError(
            f"--lora-dir: {out_dir} is not a text-to-image output (LoRA adapters are for pipelines)"
        )
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
        inputs, outputs = unet_tensors(pipe.manifest.io_spec)
        with Triton(config=server_config(config, repo)) as triton:
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
            load_model(config, triton.get_access_token(), MODEL_NAME)
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
    @click.option(
        "--lora-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Text-to-image compiled with --lora-rank: LoRA files (*.safetensors, or diffusers folders) "
        'requests may name in their `adapters` input ({"name": weight}); loaded and checked at start.',
    )
    def cli(out_dir: Path, **kw: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # SIGTERM -> KeyboardInterrupt, so Triton.serve() stops the server and cleans up.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        serve(out_dir, ServeConfig(**kw))  # errors: one line and an exit code (engines/cli_errors.py)

    cli.main(args=argv, prog_name="dd-serve", standalone_mode=True)


if __name__ == "__main__":
    main()
