"""dd-serve for a text-to-image folder: prompt strings in, uint8 images out, over HTTP and gRPC.

One PyTriton tritonserver: each component the family has, then the pipeline model:

    "dd_text_encoder", "dd_unet", "dd_vae_decoder" (SD; SDXL adds "dd_text_encoder_2", SD3 and Flux
                  run "dd_transformer" and T5; "dd_vae_encoder" where compiled)   bound through
                  PyTriton to the runners of TextToImagePipeline(folder, backend=...) (ONNX Runtime
                  or OpenVINO)
    "dd_t2i"      the Python-backend pipeline model dd-triton writes (engines/triton_t2i_model.py):
                  the runtime's own pipeline code, each component call a BLS request

    dd_t2i:  prompt BYTES [B, 1], seed INT64 [B, 1] (+ negative_prompt, guidance_scale,
             num_inference_steps; with a VAE encoder: image UINT8 [B, H, W, 3], mask_image UINT8
             [B, H, W], strength FP32 [B, 1]) -> image UINT8 [B, H, W, 3]
    same prompt and seed -> the image of TextToImagePipeline(folder, backend=...)(prompt, seeds=...)
    (with image=, mask_image=, strength= the image-to-image / inpainting image at the image's size)

Prompts over the token limit are refused with HTTP 400 / gRPC INVALID_ARGUMENT (the count and
the limit), not truncated; so is a bad image (not uint8 RGB, a size that is not a multiple of the
VAE factor or outside the profile), a mask of another size or a strength outside (0, 1], each
request alone. An empty prompt is a valid prompt (the unconditional image).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.deploy_common import ServeConfig, load_model, runner_function, server_config
from engines.errors import InputError
from engines.iospec import IOSpec
from engines.lora import WEIGHT_NAME, ComponentAdapters
from engines.triton_t2i import (
    PIPELINE_MODEL,
    OpenedT2I,
    T2ITritonConfig,
    component_dims,
    served_models,
    write_pipeline_model,
)

log = logging.getLogger(__name__)


def component_function(runner: Runner) -> Any:
    """The callable PyTriton binds for one component: a batch of feeds -> its outputs."""
    return runner_function(runner, runner.spec)


ADAPTERS_INPUT = "adapters"  # what dd_t2i sends a component with LoRA inputs: canonical JSON per row


def adapter_component_function(runner: Runner, adapters: ComponentAdapters) -> Any:
    """A component with LoRA inputs: the rows of a batch grouped by the adapters they name (the
    batcher may merge calls of different requests), each group run with its feeds, in order."""
    from pytriton.decorators import batch

    flat = {t.name for t in runner.spec.inputs if len(t.shape) == 1}

    @batch
    def infer(**feeds: np.ndarray) -> dict[str, np.ndarray]:
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in feeds.pop(ADAPTERS_INPUT).reshape(-1)]
        feeds = {k: v.reshape(-1) if k in flat else v for k, v in feeds.items()}
        parts: dict[str, list[np.ndarray]] = {}
        rows = np.arange(len(keys))
        for key in dict.fromkeys(keys):
            idx = rows[[k == key for k in keys]]
            runner.extra_feeds = adapters.feeds(key)
            out = runner.infer({k: v[idx] for k, v in feeds.items()})
            for n, v in out.items():
                parts.setdefault(n, []).append((idx, v))
        runner.extra_feeds = {}
        res = {}
        for n, chunks in parts.items():
            first = chunks[0][1]
            full = np.empty((len(keys), *first.shape[1:]), first.dtype)
            for idx, v in chunks:
                full[idx] = v
            res[n] = full
        return res

    return infer


def component_tensors(spec: IOSpec) -> tuple[list[Any], list[Any]]:
    """PyTriton specs without the batch axis; dynamic axes (latent height/width) as -1."""
    from pytriton.model_config import Tensor

    def tensor(t: Any) -> Any:
        return Tensor(name=t.name, dtype=np.dtype(t.dtype), shape=tuple(component_dims(t, spec)) or (1,))

    return [tensor(t) for t in spec.inputs], [tensor(t) for t in spec.outputs]


def load_adapter_dir(pipe: Any, folder: Path) -> list[str]:
    """--lora-dir: each *.safetensors file (named by its stem) and each folder holding diffusers'
    pytorch_lora_weights.safetensors (named by the folder) loaded into `pipe`, none active."""
    if not folder.is_dir():
        raise InputError(f"--lora-dir {folder}: not a folder")
    names = []
    for p in sorted(folder.iterdir()):
        if p.suffix == ".safetensors" or (p / WEIGHT_NAME).is_file():
            names.append(pipe.load_lora_weights(p, adapter_name=p.stem if p.is_file() else p.name))
    if not names:
        raise InputError(f"--lora-dir {folder}: no .safetensors file or folder with {WEIGHT_NAME}")
    pipe.set_adapters({})
    log.info("adapters loaded from %s: %s", folder, ", ".join(names))
    return names


def check_backend(config: ServeConfig) -> None:
    if config.backend not in ("onnxruntime", "openvino"):
        raise InputError(
            f"--backend {config.backend}: a text-to-image pipeline serves on onnxruntime or openvino"
        )


def serve_t2i(opened: OpenedT2I, source: Path, config: ServeConfig) -> None:
    """Serve the opened pipeline until SIGINT/SIGTERM."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton

    pipe = opened.pipe
    if config.lora_dir is not None:  # every adapter read and checked before the server starts
        load_adapter_dir(pipe, Path(config.lora_dir))
    tmp = Path(tempfile.mkdtemp(prefix="dd-serve-"))
    try:
        with pipe:
            repo = tmp / "repo"
            repo.mkdir()  # dd_t2i is loaded once the components are up, so ready means ready
            with Triton(config=server_config(config, repo)) as triton:
                lora = pipe.adapters.slots if pipe.adapters.loaded else {}
                for name, model in served_models(pipe).items():
                    spec = pipe.specs[name]
                    inputs, outputs = component_tensors(spec)
                    func = component_function(pipe.runners[name])
                    if name in lora:  # adapters per request (dd-serve --lora-dir)
                        inputs.append(Tensor(name=ADAPTERS_INPUT, dtype=bytes, shape=(1,)))
                        func = adapter_component_function(
                            pipe.runners[name], ComponentAdapters(name, pipe.adapters)
                        )
                    triton.bind(
                        model_name=model,
                        infer_func=func,
                        inputs=inputs,
                        outputs=outputs,
                        config=ModelConfig(
                            max_batch_size=spec.dims["batch"].max,
                            batcher=DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us),
                        ),
                        strict=True,
                    )
                triton.run()
                cfg = T2ITritonConfig(1, config.max_queue_delay_us, opened.unvalidated)
                write_pipeline_model(repo, pipe, cfg)
                load_model(config, triton.get_access_token(), PIPELINE_MODEL)
                log.info(
                    "serving text-to-image %s (%s, max batch %d) on http://%s:%d and grpc %s:%d",
                    source,
                    config.backend,
                    pipe.max_batch,
                    config.host,
                    config.port,
                    config.host,
                    config.grpc_port,
                )
                triton.serve()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
