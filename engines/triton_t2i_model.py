"""Triton Python-backend model (BLS): the text-to-image pipeline calling its component models.

dd-triton copies this file to <repo>/dd_t2i/1/model.py, with the runtime's own text-to-image code
beside it (1/engines/: t2i.py, tokenizer.py, schedulers.py, iospec.py, base.py, errors.py, numpy
and `tokenizers` only) and the pipeline's settings (1/pipeline/: t2i.json, tokenizer.json,
scheduler config) plus 1/t2i_model.json (component model names, the long-prompt policy). So the
served image is engines.t2i.TextToImagePipeline's, step for step; only its runners differ: each
component call is a BLS request to dd_text_encoder, dd_unet or dd_vae_decoder.

Per batch item: `prompt` BYTES (UTF-8), `seed` INT64, optional `negative_prompt` BYTES,
`guidance_scale` FP32, `num_inference_steps` INT32; with a VAE encoder (dd_vae_encoder) also
optional `image` UINT8 [H, W, 3] (image-to-image: the output takes its size), `mask_image` UINT8
[H, W] (inpainting, >= 128 repaints) and `strength` FP32; out: `image` UINT8 [H, W, 3]. Each
request is checked alone with the runtime's checks (TextToImagePipeline.check: image dtype, shape
and size, mask size, strength too); a bad one gets its own INVALID_ARG response (HTTP 400 / gRPC
INVALID_ARGUMENT, one line). The valid requests of a dynamic batch that share a batch key (guidance
scale, step count; for image requests size, strength and task: T2IRequest.batch_key) run as one
pipeline call.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the copied engines/ subset, whatever else is installed
from engines.base import Runner  # noqa: E402
from engines.errors import InputError  # noqa: E402
from engines.lora import parse_request_adapters  # noqa: E402
from engines.t2i import T2IRequest, TextToImagePipeline  # noqa: E402


def _error(message, invalid_arg=True):
    """A per-request error response: INVALID_ARG is HTTP 400 / gRPC INVALID_ARGUMENT."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_arg else "INTERNAL", None)
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=err)


def _line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class _BLSRunner(Runner):
    """A component as BLS requests to its Triton model (the spec checks run here first)."""

    backend = "triton-bls"

    def __init__(self, model_name, spec):
        super().__init__(spec, name=model_name)
        self.adapters = None  # a component with LoRA inputs (dd-serve --lora-dir): the call's JSON

    def activate_impl(self):
        pass

    def infer_impl(self, feeds):
        tensors = []
        for t in self.spec.inputs:
            a = np.ascontiguousarray(feeds[t.name])
            if len(t.shape) == 1:  # a [batch] tensor is dims [1] + reshape [] in Triton
                a = a.reshape(-1, 1)
            tensors.append(pb_utils.Tensor(t.name, a))
        if self.adapters is not None:  # every row of the call runs the same adapters
            rows = len(tensors[0].as_numpy())
            tensors.append(
                pb_utils.Tensor("adapters", np.array([[self.adapters.encode()]] * rows, dtype=object))
            )
        names = self.spec.output_names
        response = pb_utils.InferenceRequest(
            model_name=self.name, inputs=tensors, requested_output_names=names
        ).exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{self.name}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in names}


def _strings(request, name, required):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        if required:
            raise InputError(f"missing input {name!r} (BYTES [B, 1], UTF-8)")
        return None
    out = []
    for i, v in enumerate(t.as_numpy().reshape(-1)):
        if isinstance(v, str):
            out.append(v)
            continue
        try:
            out.append(bytes(v).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{name} {i}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return out


def _numbers(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy().reshape(-1).tolist()


def _array(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads((HERE / "t2i_model.json").read_text())
        models = cfg["models"]
        self.max_batch = int(cfg["max_batch"])
        self.pipe = TextToImagePipeline(
            HERE / "pipeline",
            runner_factory=lambda name, path, spec: _BLSRunner(models[name], spec),
            long_prompts=cfg["long_prompts"],
        )
        self.pipe.__enter__()
        self.adapter_names = cfg.get("adapters", [])
        for name in cfg.get("lora_components", []):  # they take an adapters input ("" for none)
            self.pipe.runners[name].adapters = ""

    def _parse(self, request):
        """A checked T2IRequest, or InputError with the one-line reason."""
        prompts = _strings(request, "prompt", True)
        neg = _strings(request, "negative_prompt", False)
        seeds = _numbers(request, "seed")
        if seeds is None:
            raise InputError("missing input 'seed' (INT64 [B, 1], one seed per prompt)")
        g = _numbers(request, "guidance_scale")
        steps = _numbers(request, "num_inference_steps")
        strength = _numbers(request, "strength")
        b = len(prompts)
        for name, v in (
            ("negative_prompt", neg),
            ("seed", seeds),
            ("guidance_scale", g),
            ("num_inference_steps", steps),
            ("strength", strength),
        ):
            if v is not None and len(v) != b:
                raise InputError(f"{name}: {len(v)} values for {b} prompts")
        if any(v is not None and len(set(v)) > 1 for v in (g, steps, strength)):
            raise InputError(
                "guidance_scale, num_inference_steps and strength: one value per request "
                "(send separate requests)"
            )
        adapters = _strings(request, "adapters", False)
        if adapters is not None and (len(adapters) != b or len(set(adapters)) > 1):
            raise InputError("adapters: one value per request, the same for each of its prompts")
        key = "" if adapters is None else parse_request_adapters(adapters[0], self.adapter_names)
        # image [B, H, W, 3] and mask_image [B, H, W]: dtype, shape, size and the strength are the
        # runtime's checks (one image and mask per prompt)
        r = self.pipe.check(
            prompts,
            neg,
            seeds,
            guidance_scale=None if g is None else float(g[0]),
            num_inference_steps=None if steps is None else int(steps[0]),
            image=_array(request, "image"),
            mask_image=_array(request, "mask_image"),
            # the decimal the client meant: FP32 0.7 is 0.69999999, and int(10 * that) keeps 6 steps
            strength=None if strength is None else float(str(np.float32(strength[0]))),
        )
        return dataclasses.replace(r, adapters=key)

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}  # T2IRequest.batch_key -> [(request index, T2IRequest)]
        for i, request in enumerate(requests):
            try:
                r = self._parse(request)
            except InputError as e:  # this request alone fails; the others still run
                responses[i] = _error(_line(e))
                continue
            except Exception as e:  # a bug: still this request alone, one line
                responses[i] = _error(f"internal error (please report it): {_line(e)}", invalid_arg=False)
                continue
            groups.setdefault(r.batch_key, []).append((i, r))
        for members in groups.values():
            merged = T2IRequest.merge([r for _, r in members])
            for runner in self.pipe.runners.values():
                if runner.adapters is not None:
                    runner.adapters = merged.adapters
            try:  # the batcher keeps a batch within max_batch_size, so one call takes it
                images = self.pipe.run(merged)
            except Exception as e:  # a component refused or failed: the group's requests fail
                for i, _ in members:
                    responses[i] = _error(f"text-to-image failed: {_line(e)}", invalid_arg=False)
                continue
            start = 0
            for i, r in members:
                part = images[start : start + len(r.prompts)]
                start += len(r.prompts)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("image", np.ascontiguousarray(part))]
                )
        return responses

    def finalize(self):
        self.pipe.close()
