"""What dd-triton and dd-serve share across the pixel and text-to-image flows.

Below engines/triton.py, engines/triton_t2i.py, engines/serve.py and engines/serve_t2i.py, and
importing none of them: the entry modules (triton.py, serve.py) dispatch on the output's kind and
call down into the per-kind modules, which take their common pieces from here, so no deploy
module imports one above it.

    Triton repositories: the dtype table and parameters text of config.pbtxt, the swap of a
                         staged repository onto the target
    dd-serve (PyTriton): ServeConfig, the server config, a runner bound as a batched callable,
                         loading the Python-backend model once the bound models are up
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.errors import BackendError, InputError
from engines.iospec import IOSpec
from engines.outdir import is_ours

# -- Triton model repositories ---------------------------------------------------------------------
# numpy dtype name -> Triton's DataType enum (model_config.proto)
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
}


def parameters_text(params: dict[str, str]) -> str:
    """config.pbtxt `parameters` entries (string values: what dd-triton records about a model)."""
    return "".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in params.items()
    )


def swap_in(new: Path, repo_dir: Path, option: str, kind: str = "triton-repo") -> None:
    """Rename `new` onto `repo_dir`. An existing repository is renamed away under a fresh name
    (never onto anything that exists) and deleted only once the new one is in place."""
    if not repo_dir.exists():
        new.rename(repo_dir)
        return
    if repo_dir.is_dir() and not any(repo_dir.iterdir()):
        repo_dir.rmdir()  # an empty folder holds nothing to lose
        new.rename(repo_dir)
        return
    if not is_ours(repo_dir, kind):  # changed since check_target: refuse, touch nothing
        raise InputError(
            f"{option} {repo_dir}: no longer a folder dd-compile wrote ({kind}); nothing was replaced"
        )
    old = repo_dir.with_name(f".{repo_dir.name}.old-{uuid.uuid4().hex}")
    repo_dir.rename(old)
    new.rename(repo_dir)
    shutil.rmtree(old)


# -- dd-serve (PyTriton) ---------------------------------------------------------------------------
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
    # dd-serve: LoRA adapters requests may name (an output compiled with --lora-rank)
    lora_dir: Path | None = None


def server_config(config: ServeConfig, repo: Path) -> Any:
    """PyTriton's TritonConfig: our ports and addresses, `repo` as the (explicitly loaded) model
    repository the Python-backend model is written into once the bound models are up."""
    from pytriton.triton import TritonConfig

    return TritonConfig(
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


def runner_function(runner: Runner, spec: IOSpec) -> Any:
    """The callable PyTriton binds for a runner: one batch of feeds -> its outputs."""
    from pytriton.decorators import batch

    flat = {t.name for t in spec.inputs if len(t.shape) == 1}  # [batch] tensors arrive as [B, 1]

    @batch
    def infer(**feeds: np.ndarray) -> dict[str, np.ndarray]:
        return runner.infer({k: v.reshape(-1) if k in flat else v for k, v in feeds.items()})

    return infer


def load_model(config: ServeConfig, access_token: str | None, name: str) -> None:
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
