"""The pipeline teacher timed in a process of its own (optimizer/compile/teacher_baseline.py's fresh
process, for pipeline families): `python -m optimizer.t2i.teacher_timing REQUEST_JSON` prints the
same JSON as the denoiser teacher's timing, level "end_to_end" only."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.compile.teacher_baseline import BaselineRequest
from optimizer.t2i.workload import Workload
from optimizer.timing import time_until_stable

MODULE = "optimizer.t2i.teacher_timing"


def time_pipeline_teacher(req: BaselineRequest) -> dict[str, Any]:
    """The teacher as users run it: its diffusers pipeline at its reference steps and guidance,
    prompts in, uint8 images out, at the compiled size (the same latents as the in-run figure)."""
    import torch

    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, images, latent_channels

    if not req.prompts or req.size is None or req.guidance_scale is None:
        raise ValueError("a pipeline teacher needs prompts, size and guidance_scale")
    pipe = diffusers_pipeline(load_pipeline(Path(req.teacher)))
    k, c = pipe.vae_scale_factor, latent_channels(pipe)
    h, w = req.size
    work = Workload(**req.workload) if req.workload else Workload()
    out: dict[str, Any] = {}
    for t in req.threads:
        torch.set_num_threads(t)
        res: dict[str, dict[int, Any]] = {"end_to_end": {}}
        for b in req.batch_sizes:
            ps = (req.prompts * b)[:b]
            lat = np.random.default_rng(req.seed).standard_normal((b, c, h // k, w // k), dtype=np.float32)
            fn = lambda ps=ps, lat=lat: images(pipe, ps, lat, req.steps, req.guidance_scale)  # noqa: E731
            if work.inpaint:  # an inpainting UNet's teacher inpaints what the compiled mixes did
                fn = lambda ps=ps: work.torch_images(  # noqa: E731
                    pipe, ps, list(range(len(ps))), req.steps, req.guidance_scale, 0, (h, w)
                )
            res["end_to_end"][b] = time_until_stable({"t": fn}, req.rule).timings["t"].to_dict()
        out[str(t)] = res
    return {"threads": out}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    res = time_pipeline_teacher(BaselineRequest.from_json(sys.argv[1]))
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
