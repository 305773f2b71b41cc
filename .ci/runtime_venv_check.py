"""Run by .ci/runtime-venv-check inside a venv holding only dd-compile[runtime]: no torch.

Loads OUT_DIR with engines.load (sha256 of the ONNX verified against the manifest), samples the
reference seeds and compares with the saved images. Tolerance: max |diff| <= 1e-3 on images in
[0, 1] and PSNR >= 60 dB (ARCHITECTURE.md's fp32 sample bar). Another CPU's onnxruntime kernels
(AVX2 / AVX-512 / NEON) reorder fp32 sums, giving ~1e-6 differences here; a wrong schedule, noise
or sampler gives ~1e-1.

A text-to-image output (references with "prompts"): engines.load gives its TextToImagePipeline;
prompt + seeds -> uint8 images, compared at PSNR >= 40 dB on 0..255 (the t2i fp32 sample bar) and
max |diff| <= 8 levels (kernel reordering flips a rounding here and there; a wrong tokenizer,
scheduler or guidance changes whole images). References: tests/data/demo_t2i_refs.npz, the
demo's fp32 mix from `dd-compile --demo` (written by the snippet in that file's "how" entry).
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np

ATOL = 1e-3
MIN_PSNR_DB = 60.0


def main(out_dir: str, refs_path: str) -> int:
    present = [m for m in ("torch", "diffusers", "onnx") if importlib.util.find_spec(m) is not None]
    if present:
        print(f"runtime-venv-check: FAIL: the runtime venv has {present} installed")
        return 1
    import engines

    if Path(engines.__file__).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        print(f"runtime-venv-check: FAIL: imported engines from the work tree ({engines.__file__})")
        return 1
    refs = np.load(refs_path)
    if "prompts" in refs:
        return check_t2i(engines, out_dir, refs)
    seeds = [int(s) for s in refs["seeds"]]
    precision, backend = str(refs["precision"]), str(refs["backend"])
    with engines.load(out_dir, precision=precision, backend=backend) as pipe:
        images = pipe(seeds=seeds)
    want = refs["images"]
    if images.shape != want.shape:
        print(f"runtime-venv-check: FAIL: images {images.shape}, references {want.shape}")
        return 1
    diff = float(np.abs(images - want).max())
    mse = float(np.mean((images - want) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    ok = bool(np.isfinite(images).all()) and diff <= ATOL and psnr >= MIN_PSNR_DB
    print(
        f"runtime-venv-check: {'ok' if ok else 'FAIL'}: {len(seeds)} images from {out_dir} "
        f"({backend}/{precision}, no torch), max |diff| {diff:.2e} (<= {ATOL:g}), "
        f"PSNR {psnr:.1f} dB (>= {MIN_PSNR_DB:g})"
    )
    return 0 if ok else 1


def check_t2i(engines, out_dir: str, refs) -> int:
    prompts, seeds = [str(p) for p in refs["prompts"]], [int(s) for s in refs["seeds"]]
    with engines.load(out_dir, precision=str(refs["precision"])) as pipe:
        images = pipe(prompts, seeds=seeds)
    want = refs["images"]
    if images.shape != want.shape or images.dtype != np.uint8:
        print(f"runtime-venv-check: FAIL: images {images.dtype} {images.shape}, references {want.shape}")
        return 1
    d = images.astype(np.float64) - want
    diff, mse = float(np.abs(d).max()), float(np.mean(d**2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    ok = diff <= 8 and psnr >= 40.0
    print(
        f"runtime-venv-check: {'ok' if ok else 'FAIL'}: {len(prompts)} text-to-image images from "
        f"{out_dir} ({refs['precision']}, no torch), max |diff| {diff:.0f} levels (<= 8), "
        f"PSNR {psnr:.1f} dB (>= 40)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
