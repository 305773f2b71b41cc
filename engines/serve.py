"""`dd-serve OUT_DIR --port 8000`: the student's sampler behind a real Triton server (PyTriton).

PyTriton (package nvidia-pytriton) ships a tritonserver binary and binds a Python callable to it;
Triton does the HTTP/gRPC endpoints, request validation (names, dtypes, shapes, max batch size)
and dynamic batching; the callable runs `engines.load(OUT_DIR)` (the torch-free runtime).

    model "dd_sampler":  input  seed    INT64 [B, 1]  (+ the UNet's conditioning inputs, if any)
                         output images  FP32  [B, C, H, W] in [0, 1]
    same seeds -> same images as engines.load(OUT_DIR)(seeds=...)

PyTriton's Python-backend stub embeds libpython: it needs a Python with a shared libpython of
the same minor version as the stub (Debian's python3.11 + libpython3.11 works; a pyenv 3.11
without --enable-shared does not). .ci/setup-serve builds such a venv.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import BackendUnavailable
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
    threads: int | None = None  # onnxruntime intra-op threads (None: onnxruntime's default)
    # serve an artifact the published run did not validate (or failed): a warning, not a refusal
    allow_unvalidated: bool = False


def infer_function(pipe: SamplerPipeline) -> Any:
    """The callable PyTriton binds: a batch of seeds (and conditioning) -> images."""
    from pytriton.decorators import batch

    spec = pipe.manifest.io_spec
    cond_names = [t.name for t in spec.inputs if t.name not in ("sample", "timestep")]

    @batch
    def infer(seed: np.ndarray, **cond: np.ndarray) -> dict[str, np.ndarray]:
        seeds = [int(s) for s in seed.reshape(-1)]
        if min(seeds) < 0:  # numpy's generators reject negative seeds
            raise ValueError(f"seeds must be >= 0, got {min(seeds)}")
        extra = {
            k: (
                v.reshape(-1)
                if v.ndim == 2 and v.shape[1] == 1 and len(pipe.manifest.io_spec.input(k).shape) == 1
                else v
            )
            for k, v in cond.items()
            if k in cond_names
        }
        images = pipe(seeds=seeds, cond=extra or None)
        return {"images": images.astype(np.float32)}

    return infer


def tensors(pipe: SamplerPipeline) -> tuple[list[Any], list[Any]]:
    """PyTriton input/output specs from the manifest's IO spec (shapes without the batch axis)."""
    from pytriton.model_config import Tensor

    inputs = [Tensor(name="seed", dtype=np.int64, shape=(1,))]
    for t in pipe.manifest.io_spec.inputs:
        if t.name in ("sample", "timestep"):
            continue
        shape = tuple(int(d) for d in t.shape[1:]) or (1,)
        inputs.append(Tensor(name=t.name, dtype=np.dtype(t.dtype), shape=shape))
    outputs = [Tensor(name="images", dtype=np.float32, shape=tuple(pipe.sample_shape))]
    return inputs, outputs


def serve(out_dir: str | Path, config: ServeConfig = ServeConfig()) -> None:
    """Load the student and serve it until SIGINT/SIGTERM."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise BackendUnavailable(
            "PyTriton is not installed: run .ci/setup-serve (a Python 3.11 "
            "venv with a shared libpython and nvidia-pytriton)"
        ) from None
    kw = {"threads": config.threads} if config.threads else {}
    pipe = load(
        out_dir,
        precision=config.precision,
        backend=config.backend,
        allow_unvalidated=config.allow_unvalidated,
        **kw,
    )
    max_batch = pipe.max_batch or 1
    inputs, outputs = tensors(pipe)
    triton_cfg = TritonConfig(
        http_address=config.host,
        http_port=config.port,
        grpc_address=config.host,
        grpc_port=config.grpc_port,
        metrics_address=config.host,
        metrics_port=config.metrics_port,
        exit_on_error=True,
    )
    model_cfg = ModelConfig(
        max_batch_size=max_batch,
        batcher=DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us),
    )
    with Triton(config=triton_cfg) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer_function(pipe),
            inputs=inputs,
            outputs=outputs,
            config=model_cfg,
            strict=True,
        )
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
    pipe.close()


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
        type=click.Choice(["onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt"]),
    )
    @click.option("--max-queue-delay-us", default=2000, show_default=True, type=click.IntRange(0))
    @click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads.")
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
