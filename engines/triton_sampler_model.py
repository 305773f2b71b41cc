"""Triton Python-backend model (BLS): the student's few-step sampler calling the UNet model.

dd-triton copies this file to <repo>/dd_sampler/1/model.py, with engines/schedule.py beside it as
dd_schedule.py and sampler.json (schedule, sample shape, tensor names). It needs numpy and
Triton's triton_python_backend_utils only, so it runs in any Triton `-py3` image.

Each request carries `seed` [B, 1] or `noise` [B, C, H, W] (plus `step_noise` [B, S-1, C, H, W]
for a multistep consistency student given noise, and the UNet's conditioning inputs); the
response is `images` [B, C, H, W] in [0, 1]. Each request is checked alone with the runtime's
checks (dd_schedule.check_sampler_inputs, the words engines.load uses): a bad one gets its own
INVALID_ARG response (HTTP 400, the one-line reason) and the valid requests the dynamic batcher
grouped with it are sampled as one batch; each UNet call is a BLS request to the UNet model,
whose own batcher can merge calls from several sampler instances. dd-serve runs this same file.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from engines.errors import InputError
except ImportError:  # a Triton image without dd-compile: dd_schedule's checks raise this stand-in
    import types

    class InputError(Exception):
        """Bad request input (engines.errors.InputError where dd-compile is installed)."""

    _errors = types.ModuleType("engines.errors")
    _errors.InputError = InputError
    sys.modules.setdefault("engines", types.ModuleType("engines"))
    sys.modules["engines.errors"] = _errors
from dd_schedule import (  # noqa: E402
    Sampler,
    SamplingSchedule,
    check_sampler_inputs,
    draw_noise,
    to_images,
)


def _error(message, invalid_arg=True):
    """A per-request error response: INVALID_ARG is HTTP 400 / gRPC INVALID_ARGUMENT."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_arg else "INTERNAL", None)
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=err)


def _line(e):
    """The first line of an exception's message (a TritonModelException may carry a traceback)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class _UNetViaBLS:
    """The `infer(feeds)` interface engines.schedule.Sampler drives, as BLS requests."""

    def __init__(self, model_name, inputs, output):
        self.model_name, self.inputs, self.output = model_name, inputs, output

    def infer(self, feeds):
        tensors = []
        for spec in self.inputs:
            a = np.ascontiguousarray(feeds[spec["name"]], dtype=spec["dtype"])
            if len(spec["shape"]) == 1:  # a [batch] tensor is dims [1] + reshape [] in Triton
                a = a.reshape(-1, 1)
            tensors.append(pb_utils.Tensor(spec["name"], a))
        request = pb_utils.InferenceRequest(
            model_name=self.model_name, inputs=tensors, requested_output_names=[self.output]
        )
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{self.model_name}: {response.error().message()}")
        return {self.output: pb_utils.get_output_tensor_by_name(response, self.output).as_numpy()}


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads((Path(__file__).resolve().parent / "sampler.json").read_text())
        self.schedule = SamplingSchedule.from_dict(cfg["schedule"])
        self.sample_shape = tuple(cfg["sample_shape"])
        unet_inputs = cfg["unet_inputs"]
        self.cond_names = [t["name"] for t in unet_inputs if t["name"] not in ("sample", "timestep")]
        runner = _UNetViaBLS(cfg["unet_model"], unet_inputs, cfg["unet_output"])
        self.sampler = Sampler(
            self.schedule, runner, output_name=cfg["unet_output"], max_batch=cfg["max_batch"] or None
        )

    def _parse(self, request):
        """(noise [B,...], step_noise [S-1,B,...] or None, cond) of one request, or InputError."""
        seed = pb_utils.get_input_tensor_by_name(request, "seed")
        noise = pb_utils.get_input_tensor_by_name(request, "noise")
        if (seed is None) == (noise is None):
            raise InputError("send exactly one of 'seed' [B, 1] or 'noise' [B, C, H, W]")
        steps = self.schedule.steps
        sn = pb_utils.get_input_tensor_by_name(request, "step_noise")
        step_noise = None if sn is None else np.swapaxes(sn.as_numpy(), 0, 1)
        cond = {}
        for name in self.cond_names:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                raise InputError(f"missing conditioning input {name!r}")
            cond[name] = t.as_numpy()
        seeds = None if seed is None else [int(s) for s in seed.as_numpy().reshape(-1)]
        x = None if noise is None else noise.as_numpy()
        check_sampler_inputs(seeds, x, step_noise, cond, self.sample_shape, self.schedule)
        if seeds is not None:
            return (*draw_noise(seeds, self.sample_shape, steps), cond)
        if self.schedule.kind == "consistency" and steps > 1 and step_noise is None:
            raise InputError(
                "a consistency student given 'noise' also needs 'step_noise' "
                "[B, steps-1, C, H, W] (or send 'seed')"
            )
        return x.astype(np.float32), None if step_noise is None else step_noise.astype(np.float32), cond

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed = []
        for i, request in enumerate(requests):
            try:
                parsed.append((i, *self._parse(request)))
            except InputError as e:  # this request alone fails; the others are still sampled
                responses[i] = _error(str(e))
            except Exception as e:  # a bug: still this request alone, one line, not a traceback
                responses[i] = _error(f"internal error (please report it): {_line(e)}", invalid_arg=False)
        if parsed:
            # One sampler pass over every valid request in the batch.
            noise = np.concatenate([p[1] for p in parsed])
            has_step = self.schedule.kind == "consistency" and self.schedule.steps > 1
            step_noise = np.concatenate([p[2] for p in parsed], axis=1) if has_step else None
            cond = {k: np.concatenate([p[3][k] for p in parsed]) for k in self.cond_names}
            try:
                images = to_images(self.sampler(noise, step_noise, cond)).astype(np.float32)
            except Exception as e:  # the UNet refused or failed: every request of the batch fails
                for i, *_ in parsed:
                    responses[i] = _error(f"sampling failed: {_line(e)}", invalid_arg=False)
                return responses
            start = 0
            for i, x, *_ in parsed:
                part = images[start : start + len(x)]
                start += len(x)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("images", np.ascontiguousarray(part))]
                )
        return responses
