"""What one generation is, for every stage that runs the student, the teacher or a compiled mix
(recording, sample parity, distribution, timing, the fresh-process teacher, the threads grid,
dd-bench): text-to-image from prompts and seeds, or, for an inpainting UNet (StableDiffusion(XL)-
InpaintPipeline's 9-channel UNet, which cannot draw from text alone), inpainting fixed synthetic
images under a box over their middle half, at the family's default inpainting strength.

The sources are a function of the image index and size only, so the diffusers pipeline, the
compiled mixes and a fresh teacher process inpaint the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TEXT_TO_IMAGE = "text-to-image"
INPAINT = "inpaint"
SOURCE_SEED = 7_919  # the synthetic images' own seed, apart from every noise seed


def synthetic_images(start: int, n: int, h: int, w: int) -> np.ndarray:
    """uint8 NHWC: smooth colour waves and a little noise (what a VAE encodes like a photo), image i
    from seed SOURCE_SEED + i alone."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) / max(h, w)
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(SOURCE_SEED + i)
        f, ph = rng.uniform(0.5, 2.0, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
        chans = [127.5 + 100 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + ph[c]) for c in range(3)]
        img = np.stack(chans, axis=-1) + rng.normal(0, 8, (h, w, 3))
        out.append(np.clip(img, 0, 255).round().astype(np.uint8))
    return np.stack(out)


def task_of(pipe: Any) -> str:
    """A diffusers pipeline's task: inpainting where its UNet reads 2C + 1 channels."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return TEXT_TO_IMAGE
    c = int(pipe.vae.config.latent_channels)
    return INPAINT if int(unet.config.in_channels) == 2 * c + 1 else TEXT_TO_IMAGE


@dataclass(frozen=True)
class Workload:
    task: str = TEXT_TO_IMAGE
    strength: float | None = None  # inpainting: the family's default (SD 1.0, SDXL 0.9999)
    cell: int = 8  # the mask box snaps to the latent grid (pixels per latent cell)

    @property
    def inpaint(self) -> bool:
        return self.task == INPAINT

    @classmethod
    def of_spec(cls, spec: Any) -> Workload:
        """A loaded pipeline's (optimizer/t2i/components.PipelineSpec): inpainting for an inpainting
        UNet, at its family's default strength (SD 1.0, SDXL 0.9999)."""
        if not spec.inpaint:
            return cls()
        from optimizer.t2i.export import default_strengths

        return cls(INPAINT, default_strengths(spec.family)[1], int(spec.vae_scale_factor))

    @classmethod
    def of_pipeline(cls, pipe: Any) -> Workload:
        """A compiled pipeline's (engines/pipeline.CompiledPipeline): its defaults give the strength."""
        if not getattr(pipe, "inpaint_only", False):
            return cls()
        strength = float(pipe.parts.defaults.get("inpaint_strength", 1.0))
        return cls(INPAINT, strength, int(pipe.parts.vae.scale_factor))

    def sources(self, start: int, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 NHWC, masks uint8 NHW: 255 over the middle half) for images start..start+n."""
        from optimizer.t2i.validate import task_inputs

        return task_inputs(synthetic_images(start, n, *size), self.cell)

    def engine_kwargs(self, start: int, n: int, size: tuple[int, int]) -> dict[str, Any]:
        """What a compiled pipeline's call takes besides prompts and seeds ({} for text-to-image)."""
        if not self.inpaint:
            return {}
        image, mask = self.sources(start, n, size)
        return {"image": image, "mask_image": mask, "strength": self.strength}

    def torch_images(
        self,
        pipe: Any,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance_scale: float,
        start: int,
        size: tuple[int, int],
    ) -> np.ndarray:
        """diffusers' inpainting images (`pipe`: its inpainting pipeline) with the runtime's draws
        from `seeds` (optimizer/t2i/reference.img2img_images)."""
        from optimizer.t2i.reference import img2img_images

        image, mask = self.sources(start, len(prompts), size)
        s = 1.0 if self.strength is None else self.strength
        return img2img_images(pipe, prompts, image, s, steps, guidance_scale, seeds, mask=mask)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "strength": self.strength, "cell": self.cell}
