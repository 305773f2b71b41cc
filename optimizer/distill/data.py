"""Training images: a folder of images, an .npy array, or (data-free) the teacher's own samples.

Images are float32 [N, C, H, W] in [-1, 1], the model's data space.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from engines.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_images(path: str | Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Read `path` (folder of images or .npy) and return [N, C, H, W] float32 in [-1, 1].

    .npy arrays may be [N, H, W], [N, C, H, W] or [N, H, W, C]; integer arrays are read as 0..255
    and float arrays must already be in [-1, 1] or [0, 1]. Images are resized to (H, W).
    """
    path = Path(path)
    c, h, w = shape
    if not path.exists():
        raise InputError(f"{path}: --data not found")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in --data folder")
        from PIL import Image

        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(c)
        if mode is None:
            raise InputError(f"{path}: cannot load images for a {c}-channel model")
        arrs = []
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((w, h), Image.BICUBIC)
                    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
            except OSError as e:
                raise InputError(f"{f}: not a readable image ({e})") from None
            arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        x = np.stack(arrs)
    elif path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # EOFError: an empty or cut-off file
            raise InputError(f"{path}: not a numpy .npy array ({e or type(e).__name__})") from None
        if x.size == 0:
            raise InputError(f"{path}: empty array {list(x.shape)}")
        if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise InputError(f"{path}: expected integer or float pixels, got dtype {x.dtype}")
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise InputError(f"{path}: expected an array [N, C, H, W] or [N, H, W], got {x.shape}")
        if x.shape[1] != c and x.shape[3] == c:
            x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float32) / 127.5 - 1.0
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise InputError(f"{path}: array contains NaN or Inf")
        if x.min() >= 0.0 and x.max() <= 1.0:
            x = x * 2.0 - 1.0
        elif x.min() < -1.001 or x.max() > 1.001:
            raise InputError(
                f"{path}: float values in [{x.min():.3g}, {x.max():.3g}]; "
                "expected [-1, 1] or [0, 1] (or integers 0..255)"
            )
        if x.shape[2:] != (h, w):
            x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(h, w), mode="area").numpy()
    else:
        raise InputError(f"{path}: --data must be a folder of images or an .npy file")
    if x.shape[1] != c:
        raise InputError(f"{path}: images have {x.shape[1]} channel(s), the teacher takes {c}")
    if len(x) < 2:
        raise InputError(f"{path}: need at least 2 images, found {len(x)}")
    log.info("data: %d images from %s", len(x), path)
    return np.ascontiguousarray(x, dtype=np.float32)


def data_free_images(
    teacher,
    n: int,
    shape: tuple[int, int, int],
    seed: int,
    batch_size: int = 512,
    cond: dict[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """Data-free mode: n samples of the teacher's reference sampler (diffusers DDIM) to train on."""
    from optimizer.models import teacher_reference_samples

    log.info("data-free: drawing %d teacher samples (DDIM, %d steps)", n, teacher.reference_steps)
    gen = torch.Generator().manual_seed(10_000_019 + seed)  # disjoint from the eval seeds
    out = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        noise = torch.randn((hi - lo, *shape), generator=gen)
        c = {k: v[lo:hi] for k, v in cond.items()} if cond else None  # row i for sample i
        out.append(teacher_reference_samples(teacher, noise, cond=c).clamp(-1, 1))
    return torch.cat(out).numpy()
