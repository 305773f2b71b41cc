"""Inpainting on the bundled digits teacher: repaint a masked digit with another digit and colour.

    python benchmarks/inpaint_demo.py                      # 120 images, DDIM 50 + CFG 7.5 (~3 min)
    python benchmarks/inpaint_demo.py --compiled out/      # a dd-compile output instead

Sources are real coloured digits (the teacher's training distribution, rendered at 32x32); each
gets a hole: the digit's bounding box (pixels over 0.1 of full ink) grown by 2 pixels and snapped
outward to the VAE's 4-pixel cells, so the latent mask covers it whole. The prompt asks for
another digit in another colour. The fp32 torch-free runtime (exported from the teacher folder, or
the given compiled output's recommended mix) inpaints it with the teacher's text-to-image UNet
(diffusers' blend: after each step the kept region is reset to the source's noised latent).

Judged per image:
- in the hole: the digit-and-colour judge (optimizer/demo/t2i/classifier.py) on the whole image
  against the prompt's digit and colour (adherence), beside the same prompts generated from
  scratch (the teacher's own text-to-image adherence) and the sources themselves (the floor);
- outside it: PSNR (uint8) of the inpainted image against the source, there only;
- parity: the first images against diffusers' StableDiffusionInpaintPipeline on the teacher's torch
  modules from the same seeds (optimizer/t2i/reference.py).

Writes benchmarks/results/inpaint_demo.json and inpaint_demo.png (source | mask | inpainted rows).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEACHER = ROOT / "optimizer" / "demo" / "t2i" / "teacher"
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("inpaint_demo")
CELL = 4  # the demo VAE's pixels per latent cell


def holes(ink: np.ndarray) -> np.ndarray:
    """[N, 32, 32] ink in [0, 1] -> uint8 masks (255: repaint): the ink's box + 2 px, cell-snapped."""
    out = np.zeros(ink.shape, np.uint8)
    for i, m in enumerate(ink):
        ys, xs = np.nonzero(m > 0.1)
        y0, y1 = max(ys.min() - 2, 0) // CELL * CELL, min(-(-(ys.max() + 3) // CELL) * CELL, m.shape[0])
        x0, x1 = max(xs.min() - 2, 0) // CELL * CELL, min(-(-(xs.max() + 3) // CELL) * CELL, m.shape[1])
        out[i, y0:y1, x0:x1] = 255
    return out


def sources(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[Any], list[Any]]:
    """(uint8 NHWC sources, masks, the sources' examples, the prompts' examples: another digit
    and another colour each)."""
    from optimizer.demo.t2i.data import COLOURS, ColouredDigits, Example, prompt_for, render

    rng = np.random.default_rng(seed)
    data = ColouredDigits.load()
    idx = rng.choice(len(data.digits), n, replace=False)
    colours = rng.integers(0, len(COLOURS), n)
    imgs = render(data.masks[idx], colours)  # [-1, 1] NCHW
    u8 = ((imgs.transpose(0, 2, 3, 1) + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
    src_ex = [Example(int(data.digits[i]), int(c), "") for i, c in zip(idx, colours, strict=True)]
    want = []
    for e in src_ex:
        d = (e.digit + 1 + int(rng.integers(0, 9))) % 10
        c = (e.colour + 1 + int(rng.integers(0, len(COLOURS) - 1))) % len(COLOURS)
        want.append(Example(d, c, prompt_for(d, c, int(rng.integers(0, 6)))))
    return u8, holes(data.masks[idx]), src_ex, want


def psnr_outside(a: np.ndarray, b: np.ndarray, masks: np.ndarray) -> list[float]:
    out = []
    for x, y, m in zip(a, b, masks, strict=True):
        keep = m == 0
        if not keep.any():
            out.append(float("nan"))
            continue
        mse = np.mean((x[keep].astype(np.float64) - y[keep]) ** 2)
        out.append(float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)))
    return out


def to_judge(u8: np.ndarray) -> np.ndarray:
    return (u8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 * 2 - 1).astype(np.float32)


def grid(rows: list[np.ndarray], path: Path, k: int = 12) -> None:
    """Rows of k images (uint8 NHWC, masks as grey) with 2-pixel gaps, 4x nearest upscale."""
    from PIL import Image

    tiles = []
    for r in rows:
        r = r[:k] if r.ndim == 4 else np.repeat(r[:k, ..., None], 3, -1)
        pad = np.full((r.shape[0], r.shape[1] + 2, r.shape[2] + 2, 3), 40, np.uint8)
        pad[:, 1:-1, 1:-1] = r
        tiles.append(np.concatenate(list(pad), axis=1))
    img = np.concatenate(tiles, axis=0)
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)


def windows(n: int, seed: int, size: int = 16) -> np.ndarray:
    """uint8 masks: one size x size window per image at a random cell-aligned place (255: repaint)."""
    rng = np.random.default_rng(seed + 1)
    out = np.zeros((n, 32, 32), np.uint8)
    for i in range(n):
        y, x = (int(v) * CELL for v in rng.integers(0, (32 - size) // CELL + 1, 2))
        out[i, y : y + size, x : x + size] = 255
    return out


def run_task(
    pipe: Any, prompts: list[str], image: np.ndarray, masks: np.ndarray, seeds: list[int], kw: dict
) -> np.ndarray:
    b = pipe.max_batch
    return np.concatenate(
        [
            pipe(
                prompts[i : i + b],
                image=image[i : i + b],
                mask_image=masks[i : i + b],
                seeds=seeds[i : i + b],
                **kw,
            )
            for i in range(0, len(prompts), b)
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--parity", type=int, default=8, help="images also run through diffusers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compiled", type=Path, help="a dd-compile output (default: export the teacher, fp32)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    torch.set_num_threads(args.threads)
    import engines
    from engines.images import preprocess
    from engines.pipeline import seed_generator, to_uint8
    from optimizer.bench.fingerprint import fingerprint
    from optimizer.demo.t2i.classifier import load_judge
    from optimizer.demo.t2i.data import prompt_for
    from optimizer.metrics import psnr_db
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, img2img_images, img2img_pipeline

    judge = load_judge()
    src, boxes, src_ex, want = sources(args.n, args.seed)
    wins = windows(args.n, args.seed)
    repaint = [e.prompt for e in want]
    restore = [prompt_for(e.digit, e.colour, i) for i, e in enumerate(src_ex)]
    seeds = list(range(args.seed, args.seed + args.n))
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    with tempfile.TemporaryDirectory() as tmp:
        if args.compiled is None:
            from engines.t2i import TextToImagePipeline

            log.info("exporting the teacher (fp32)")
            pipe = TextToImagePipeline(export_pipeline(load_pipeline(TEACHER), Path(tmp) / "out"))
            what = "the teacher exported fp32 (optimizer/t2i/export.py), ONNX Runtime"
        else:
            pipe = engines.load(args.compiled)
            what = f"{args.compiled} (engines.load: its recommended mix)"
        with pipe:
            t0 = time.perf_counter()
            repainted = run_task(pipe, repaint, src, boxes, seeds, kw)
            secs = time.perf_counter() - t0
            log.info("repainted %d digits in %.1f s", args.n, secs)
            restored = run_task(pipe, restore, src, wins, seeds, kw)
            b = pipe.max_batch
            scratch = np.concatenate(
                [pipe(repaint[i : i + b], seeds=seeds[i : i + b], **kw) for i in range(0, args.n, b)]
            )
            # the VAE's own round trip: the most a latent inpainting can keep of the sources
            rngs = [seed_generator("torch", s) for s in seeds]
            trip = np.concatenate(
                [
                    to_uint8(
                        pipe.decode(
                            pipe.encode_image(
                                preprocess(src[i : i + b], len(src[i : i + b]), 3), rngs[i : i + b]
                            )
                        )
                    )
                    for i in range(0, args.n, b)
                ]
            )
        k = min(args.parity, args.n)
        ref = img2img_pipeline(diffusers_pipeline(load_pipeline(TEACHER)), "inpaint")
        theirs = img2img_images(
            ref, repaint[:k], src[:k], 1.0, args.steps, args.guidance, seeds[:k], mask=boxes[:k]
        )
    parity = psnr_db(repainted[:k].astype(np.float64), theirs.astype(np.float64), data_range=255.0)
    none = np.zeros_like(wins)
    fp = fingerprint(args.threads)
    report = {
        "what": "demo inpainting on the digits teacher (fp32 runtime, strength 1, DDIM + CFG)",
        "runtime": what,
        "machine": {"cpu": fp["cpu"]["model"], "isa": fp["cpu"]["isa"], "threads": args.threads},
        "n": args.n,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "repaint": {
            "task": "the digit's box (+2 px, cell-snapped) repainted as another digit in another colour",
            "hole_fraction": float((boxes > 0).mean()),
            "adherence": judge.adherence(to_judge(repainted), want).to_dict(),
            "adherence_text_to_image_same_prompts": judge.adherence(to_judge(scratch), want).to_dict(),
            "adherence_of_the_sources_to_the_prompts": judge.adherence(to_judge(src), want).to_dict(),
            "psnr_outside_hole_db_median": float(np.nanmedian(psnr_outside(repainted, src, boxes))),
            "seconds": round(secs, 1),
        },
        "restore": {
            "task": "a 16x16 window repainted with the source's own digit and colour in the prompt",
            "hole_fraction": float((wins > 0).mean()),
            "adherence": judge.adherence(to_judge(restored), src_ex).to_dict(),
            "psnr_outside_hole_db_median": float(np.nanmedian(psnr_outside(restored, src, wins))),
            "psnr_inside_hole_db_median": float(np.nanmedian(psnr_outside(restored, src, 255 - wins))),
            "vae_round_trip_psnr_outside_db_median": float(np.nanmedian(psnr_outside(trip, src, wins))),
            "vae_round_trip_psnr_db_median": float(np.nanmedian(psnr_outside(trip, src, none))),
        },
        "parity_vs_diffusers_inpaint": {"images": k, "psnr_db": parity},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inpaint_demo.json").write_text(json.dumps(report, indent=1) + "\n")
    grid([src, boxes, repainted, wins, restored], RESULTS / "inpaint_demo.png")
    print(json.dumps({k_: v for k_, v in report.items() if k_ != "machine"}, indent=1))


if __name__ == "__main__":
    main()
