"""Image and mask inputs of the runtime pipeline, without torch: what diffusers' VaeImageProcessor
does to a PIL image of the output's size.

- image: uint8 HWC RGB -> float32 NCHW in [-1, 1] (`/ 255`, then `2x - 1`);
- mask (the inpainting pipelines' `mask_processor`: no normalisation, grayscale, binarised):
  uint8 -> grayscale as PIL's convert("L") computes it -> `/ 255` -> 1 where >= 0.5 (white:
  repaint), else 0 -> float32 [N, 1, H, W];
- the mask at latent size: torch's F.interpolate default (nearest, floor(i * in / out)).

An image or mask may also be a file path (read with Pillow, RGB / L). Every problem is one
InputError line naming the input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import BackendUnavailable, InputError


def read_image(path: str | Path, mode: str, what: str) -> np.ndarray:
    """A PNG/JPEG/... file -> uint8 HWC (mode "RGB") or HW (mode "L")."""
    try:
        from PIL import Image
    except ImportError:
        raise BackendUnavailable(f"{what}: reading image files needs Pillow: pip install pillow") from None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: {p}: no such file")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert(mode))
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, ValueError, ...
        raise InputError(f"{what}: {p}: not an image Pillow reads ({type(e).__name__})") from None


def _batch(x: Any, what: str, mode: str) -> np.ndarray:
    """An array, a path or a list of them -> one stacked array (N first)."""
    if isinstance(x, str | Path):
        return read_image(x, mode, what)[None]
    if isinstance(x, list | tuple):
        if not x:
            raise InputError(f"{what}: an empty list")
        items = [read_image(i, mode, what) if isinstance(i, str | Path) else i for i in x]
        if not all(isinstance(i, np.ndarray) for i in items):
            raise InputError(f"{what}: a list must hold numpy arrays or file paths")
        if len({i.shape for i in items}) > 1:
            shapes = sorted({i.shape for i in items})
            raise InputError(f"{what}: the list's images differ in shape ({shapes})")
        return np.stack(items)
    if isinstance(x, np.ndarray):
        return x
    raise InputError(
        f"{what}: expected a uint8 numpy array, a file path or a list of them, got {type(x).__name__}"
    )


def preprocess(images: Any, b: int, channels: int) -> np.ndarray:
    """uint8 HWC, a batch NHWC, a file path or a list of them -> float32 NCHW in [-1, 1], as
    diffusers' VaeImageProcessor.preprocess does with a PIL image (/ 255, then 2x - 1); one per prompt."""
    listed = isinstance(images, list | tuple | str | Path)
    x = _batch(images, "image", "RGB")
    if x.dtype != np.uint8:
        raise InputError(f"image: expected uint8 {'images' if listed else '(HWC or NHWC)'}, got {x.dtype}")
    if not listed and x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"image: expected HWC or NHWC, got shape {x.shape[1:] if listed else x.shape}")
    if x.shape[-1] != channels:
        raise InputError(f"image: {x.shape[-1]} channels, expected {channels} (HWC, RGB)")
    if x.shape[0] != b:
        raise InputError(f"image: {x.shape[0]} image(s) for {b} prompt(s) (one image per prompt)")
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return (np.float32(2.0) * x - np.float32(1.0)).astype(np.float32)


def grayscale(x: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> uint8 [...] luma, PIL's convert("L") to the bit (ITU-R 601-2,
    fixed point: (19595 R + 38470 G + 7471 B + 2^15) >> 16)."""
    r, g, b = (x[..., i].astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)


def preprocess_mask(masks: Any, b: int, size: tuple[int, int]) -> np.ndarray:
    """Inpainting masks -> float32 [B, 1, H, W] of 0 (keep) and 1 (repaint), as the inpainting
    pipelines' mask_processor. A mask: uint8 or bool, HW, HWx1 or HWx3 (RGB, made grayscale), a
    batch of those, a file path or a list; one per prompt, at the image's size."""
    listed = isinstance(masks, list | tuple | str | Path)
    x = _batch(masks, "mask_image", "L")
    if x.dtype == np.bool_:
        x = x.astype(np.uint8) * np.uint8(255)
    if x.dtype != np.uint8:
        raise InputError(f"mask_image: expected uint8 or bool masks, got {x.dtype}")
    if not listed and (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3) and x.shape[0] != b)):
        x = x[None]  # one mask (HW, HWx1 or HWx3)
    if x.ndim == 4:
        if x.shape[-1] == 3:
            x = grayscale(x)
        elif x.shape[-1] == 1:
            x = x[..., 0]
        else:
            raise InputError(f"mask_image: {x.shape[-1]} channels, expected 1 or 3 (or an HW mask)")
    if x.ndim != 3:
        raise InputError(f"mask_image: expected HW, HWC or a batch of them, got shape {x.shape}")
    if x.shape[0] != b:
        raise InputError(f"mask_image: {x.shape[0]} mask(s) for {b} prompt(s) (one mask per prompt)")
    if tuple(x.shape[1:]) != tuple(size):
        raise InputError(
            f"mask_image: {x.shape[1]}x{x.shape[2]}, the image is {size[0]}x{size[1]} "
            "(a mask takes its image's size)"
        )
    m = x.astype(np.float32) / np.float32(255.0)
    return (m >= np.float32(0.5)).astype(np.float32)[:, None]


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, C, H, W] -> [N, C, *size], torch's F.interpolate(mode="nearest"): source index
    floor(i * in / out) (the scale in float32, as torch computes it)."""
    h, w = mask.shape[2:]
    rows = np.floor(np.arange(size[0], dtype=np.float32) * np.float32(h / size[0])).astype(np.int64)
    cols = np.floor(np.arange(size[1], dtype=np.float32) * np.float32(w / size[1])).astype(np.int64)
    return np.ascontiguousarray(mask[:, :, np.minimum(rows, h - 1)][:, :, :, np.minimum(cols, w - 1)])
