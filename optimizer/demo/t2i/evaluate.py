"""Quality of a text-to-image pipeline on the demo's prompts: adherence and FID, side by side.

    python -m optimizer.demo.t2i.evaluate optimizer/demo/t2i/teacher --steps 50,4 --n 300

Samples a diffusers pipeline folder (the teacher, or any pipeline with the same components) with
diffusers' own DDIM scheduler and classifier-free guidance, from fixed latents per prompt index,
and judges the images with the digit-and-colour classifier: prompt adherence (digit, colour,
both) and FID against real rendered digits in the classifier's feature space.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimizer.demo.t2i.classifier import load_judge
from optimizer.demo.t2i.data import ColouredDigits, Example, evaluation_prompts

log = logging.getLogger(__name__)


def fixed_latents(n: int, seed: int = 0, shape: tuple[int, int, int] = (4, 8, 8)) -> torch.Tensor:
    """One latent per prompt index, independent of batch size: seed + i draws row i."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]
    )


@torch.no_grad()
def sample_pipeline(
    pipe,
    examples: list[Example],
    latents: torch.Tensor,
    steps: int,
    guidance: float,
    batch: int = 100,
    noise_seed: int = 0,
) -> np.ndarray:
    """Images [N, 3, 32, 32] in [-1, 1] from a diffusers StableDiffusionPipeline."""
    out = []
    for i in range(0, len(examples), batch):
        res = pipe(
            [e.prompt for e in examples[i : i + batch]],
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents[i : i + batch],
            # LCM's multistep sampler re-noises between steps: seeded, so a figure is reproducible
            generator=torch.Generator().manual_seed(noise_seed * 1_000_003 + i),
            output_type="np",
        ).images  # [B, H, W, 3] in [0, 1]
        out.append(res.transpose(0, 3, 1, 2) * 2.0 - 1.0)
    return np.concatenate(out).astype(np.float32)


def real_images(n: int, seed: int = 0) -> tuple[np.ndarray, list[Example]]:
    return ColouredDigits.load().batch(np.random.default_rng(seed), n)


def evaluate(
    folder: Path, steps: list[int], n: int, guidance: float, seed: int = 0, noise_seeds: int = 1
) -> dict[str, Any]:
    """Per step count: adherence and FID; with noise_seeds > 1 (LCM's re-noising draws; DDIM has
    none) each figure is the mean over the draws, with their standard deviation and range."""
    from diffusers import DiffusionPipeline

    from optimizer.compile.quality import frechet_distance

    # the teacher (StableDiffusionPipeline) or a distilled student (LatentConsistencyModelPipeline)
    pipe = DiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    record = folder / "distill.json"
    if record.exists() and json.loads(record.read_text()).get("guidance_mode") == "none":
        log.info("%s: guidance in its weights (LCM-LoRA): sampled at guidance 1, no CFG", folder)
        guidance = 1.0
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge()
    examples = evaluation_prompts(n, seed)
    latents = fixed_latents(n, seed)
    real, _ = real_images(2000, seed + 7)
    real_feats = judge(real)
    rows: dict[str, Any] = {}
    for s in steps:
        t0 = time.perf_counter()
        draws = []
        for k in range(noise_seeds):
            imgs = sample_pipeline(pipe, examples, latents, s, guidance, noise_seed=k)
            draws.append(
                {
                    **judge.adherence(imgs, examples).to_dict(),
                    "fid": frechet_distance(judge(imgs), real_feats),
                }
            )
        mean = {key: float(np.mean([d[key] for d in draws])) for key in draws[0]}
        rows[str(s)] = {
            "steps": s,
            "guidance_scale": guidance,
            "adherence": {k: v for k, v in mean.items() if k != "fid"},
            "fid": mean["fid"],
            "fid_std": float(np.std([d["fid"] for d in draws])),
            "fid_range": [min(d["fid"] for d in draws), max(d["fid"] for d in draws)],
            "noise_seeds": noise_seeds,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log.info("%d steps, guidance %.1f: %s", s, guidance, rows[str(s)])
    return {"n": n, "judge_test_accuracy": judge.metadata.get("test_accuracy"), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--steps", default="50,4")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0, help="prompts and latents (dd-distill judges at 1)")
    ap.add_argument("--noise-seeds", type=int, default=1, help="LCM re-noising draws to average over")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    res = evaluate(a.folder, [int(s) for s in a.steps.split(",")], a.n, a.guidance, a.seed, a.noise_seeds)
    text = json.dumps(res, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
