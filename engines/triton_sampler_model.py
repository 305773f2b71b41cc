"""Triton Python-backend model (BLS): the student's few-step sampler calling the UNet model.

dd-triton copies this file to <repo>/dd_sampler/1/model.py, with engines/schedule.py beside it as
dd_schedule.py and sampler.json (schedule, sample shape, tensor names). It needs numpy and
Triton's triton_python_backend_utils only, so it runs in any Triton `-py3` image.

Each request carries `seed` [B, 1] or `noise` [B, C, H, W] (plus `step_noise` [B, S-1, C, H, W]
for a multistep consistency student given noise, and the UNet's conditioning inputs); the
response is `images` [B, C, H, W] in [0, 1]. Requests the dynamic batcher groups are sampled as
one batch; each UNet call is a BLS request to the UNet model, whose own batcher can merge calls
from several sampler instances.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dd_schedule import Sampler, SamplingSchedule, draw_noise, to_images  # noqa: E402


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
        """(noise [B,...], step_noise [S-1,B,...] or None, cond) of one request, or ValueError."""
        seed = pb_utils.get_input_tensor_by_name(request, "seed")
        noise = pb_utils.get_input_tensor_by_name(request, "noise")
        if (seed is None) == (noise is None):
            raise ValueError("send exactly one of 'seed' [B, 1] or 'noise' [B, C, H, W]")
        steps = self.schedule.steps
        if seed is not None:
            seeds = [int(s) for s in seed.as_numpy().reshape(-1)]
            x, step_noise = draw_noise(seeds, self.sample_shape, steps)
        else:
            x = noise.as_numpy().astype(np.float32)
            sn = pb_utils.get_input_tensor_by_name(request, "step_noise")
            step_noise = None if sn is None else np.swapaxes(sn.as_numpy(), 0, 1).astype(np.float32)
            if self.schedule.kind == "consistency" and steps > 1 and step_noise is None:
                raise ValueError(
                    "a consistency student given 'noise' also needs 'step_noise' "
                    "[B, steps-1, C, H, W] (or send 'seed')"
                )
        cond = {}
        for name in self.cond_names:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                raise ValueError(f"missing conditioning input {name!r}")
            cond[name] = t.as_numpy()
        return x, step_noise, cond

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed = []
        for i, request in enumerate(requests):
            try:
                parsed.append((i, *self._parse(request)))
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
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
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                return responses
            start = 0
            for i, x, *_ in parsed:
                part = images[start : start + len(x)]
                start += len(x)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("images", np.ascontiguousarray(part))]
                )
        return responses
