"""Training pairs for text-to-image distillation: an imagefolder with captions, or data-free
latents the teacher samples itself from a prompts file (what users without the training set have).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from engines.errors import InputError
from optimizer.distill.guided import draw_w
from optimizer.distill.t2i import BatchFn, TextToImageTeacher

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts {path}: cannot read ({e})") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def imagefolder_batches(folder: str | Path, size: int) -> BatchFn:
    """Hugging Face `imagefolder` layout: images + metadata.jsonl rows {"file_name", "text"}."""
    from PIL import Image

    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise InputError(
            f"--data {folder}: no metadata.jsonl (imagefolder layout: file_name + text per line)"
        )
    images, captions, names = [], [], []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"--data {meta}:{n}: need a JSON object with 'file_name' and 'text'") from None
        if not isinstance(text, str) or not isinstance(name, str):
            raise InputError(f"--data {meta}:{n}: 'file_name' and 'text' must be strings")
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise InputError(f"--data {meta}:{n}: {name!r} lies outside {folder}")
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((size, size), Image.BICUBIC)
        except OSError as e:
            raise InputError(f"--data {meta}:{n}: cannot read image {name!r} ({e})") from None
        images.append(np.asarray(rgb, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        captions.append(text)
        names.append(name)
    if not images:
        raise InputError(f"--data {folder}: metadata.jsonl lists no images")
    # an image without a caption row means a broken metadata.jsonl, not an image to skip quietly
    listed = {(folder / r).resolve() for r in names}
    uncaptioned = sorted(
        f.relative_to(folder).as_posix()
        for f in folder.rglob("*")
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and f.resolve() not in listed
    )
    if uncaptioned:
        raise InputError(
            f"--data {folder}: {len(uncaptioned)} image(s) have no caption in metadata.jsonl "
            f'(first: {uncaptioned[0]!r}); add a {{"file_name", "text"}} row for each'
        )
    data = np.stack(images)
    log.info("--data %s: %d captioned images at %dx%d", folder, len(data), size, size)

    def fn(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        idx = rng.integers(0, len(data), n)
        return data[idx], [captions[i] for i in idx]

    return fn


@torch.no_grad()
def teacher_sample_batches(
    teacher: TextToImageTeacher,
    prompts: list[str],
    n: int,
    guidance: tuple[float, float],
    steps: int = 25,
    seed: int = 0,
    batch: int = 64,
) -> BatchFn:
    """Data-free: n latents from the teacher's own guided DDIM sampler, prompts taken in turn,
    each batch at a guidance scale drawn from the training range; made once, then drawn from."""
    pipe = teacher.pipe
    h = w = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    latents = []
    for lo in range(0, n, batch):
        s = float(draw_w(1, guidance, gen)[0]) + 1.0  # diffusers takes one scale per call
        out = pipe(
            chosen[lo : lo + batch],
            num_inference_steps=steps,
            guidance_scale=s,
            height=h * pipe.vae_scale_factor,
            width=w * pipe.vae_scale_factor,
            generator=gen,
            output_type="latent",
        ).images
        latents.append(out)
        log.info("data-free: %d/%d teacher samples", min(lo + batch, n), n)
    z = torch.cat(latents)

    def fn(rng: np.random.Generator, k: int) -> tuple[torch.Tensor, list[str]]:
        idx = rng.integers(0, n, k)
        return z[torch.from_numpy(idx)], [chosen[i] for i in idx]

    return fn
