"""Teacher quality vs sampling steps: FID of DDIM samples of the demo teacher against all digits.

    python benchmarks/teacher_quality.py                 # print the table
    python benchmarks/teacher_quality.py --write         # also store it in teacher.json "fid"

Loads optimizer/demo/teacher (UNet2DModel + scheduler config), samples --n images from fixed
per-sample seeds with DDIMScheduler.from_config(config, timestep_spacing="trailing") at each
step count, and prints FID vs all 1797 digits in the digit classifier's feature space, paired
PSNR to the reference-step samples (same noise), and the real-vs-real floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from optimizer.compile.quality import (  # noqa: E402
    fid,
    load_digits_feature_extractor,
    load_digits_images,
    paired_psnr,
    real_vs_real_floor,
)
from optimizer.demo.train_teacher import (  # noqa: E402
    DEFAULT_TEACHER_DIR,
    REFERENCE_STEPS,
    ddim_sample,
    fid_record,
    fixed_noise,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER_DIR)
    parser.add_argument("--n", type=int, default=1000, help="samples per step count")
    parser.add_argument("--seed", type=int, default=0, help="noise of sample i: seed + i")
    parser.add_argument("--steps", type=int, nargs="+", default=[64, 16, 8, 4, 2, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="store the FIDs in teacher.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(args.teacher / "unet", use_safetensors=True).eval()
    scheduler_config = DDPMScheduler.load_config(args.teacher / "scheduler")
    extractor = load_digits_feature_extractor()
    real, _ = load_digits_images()
    noise = fixed_noise(args.n, args.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"teacher {args.teacher} ({n_params:,} parameters), {args.n} samples vs {len(real)} digits")
    print(f"feature extractor: digit classifier, test accuracy {extractor.test_accuracy:.4f}")

    ref_steps = REFERENCE_STEPS if REFERENCE_STEPS in args.steps else max(args.steps)
    steps_sorted = sorted(args.steps, key=lambda s: s != ref_steps)  # reference first
    samples: dict[int, torch.Tensor] = {}
    fids: dict[int, float] = {}
    seconds: dict[int, float] = {}
    for steps in steps_sorted:
        t0 = time.perf_counter()
        samples[steps] = ddim_sample(unet, scheduler_config, noise, steps).clamp(-1, 1)
        seconds[steps] = time.perf_counter() - t0
        fids[steps] = fid(samples[steps].numpy(), real, extractor)
    floor = real_vs_real_floor(extractor)

    print(f"\n| DDIM steps | FID vs digits | PSNR to {ref_steps}-step (dB) | sampling s |")
    print("|---:|---:|---:|---:|")
    for steps in args.steps:
        psnr = paired_psnr(samples[steps].numpy(), samples[ref_steps].numpy())
        psnr_s = "ref" if steps == ref_steps else f"{psnr:.2f}"
        print(f"| {steps} | {fids[steps]:.3f} | {psnr_s} | {seconds[steps]:.1f} |")
    print(f"\nreal-vs-real floor (898 vs 899 digits): {floor:.3f}")

    if args.write:
        path = args.teacher / "teacher.json"
        info = json.loads(path.read_text()) if path.exists() else {}
        info["fid"] = fid_record({s: fids[s] for s in args.steps}, args.n, args.seed, floor, len(real))
        info["fid"]["measured_by"] = "benchmarks/teacher_quality.py"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
