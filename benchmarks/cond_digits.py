"""A UNet2DConditionModel with trained weights through `dd-compile --cond`, every precision.

    python benchmarks/cond_digits.py                       # train (~10 min on 1 core), compile, measure
    python benchmarks/cond_digits.py --out runs/cond_digits --iters 1500 --steps 8 --json r.json

No model hub here, so the conditional teacher is trained on the spot: Stable Diffusion's block
layout in miniature (CrossAttnDownBlock2D / CrossAttnUpBlock2D around plain blocks) on sklearn's
digits, conditioned on "prompt embeddings": one fixed N(0, 1) [tokens x dim] embedding per digit
class, standing in for a text encoder's output. Then:

1. cond.npz holds the embeddings row by row (row i = digit i mod 10);
2. `dd-compile teacher --steps N --cond cond.npz` exports, quantizes (fp16 islands, INT8 with the
   per-node sensitivity selection: no per-model code) and validates the three variants;
3. the conditioning must still steer every variant: the bundled digits classifier labels each
   variant's samples for the cond rows (class accuracy), next to the torch model's, and each
   variant's samples are compared with the torch model's (PSNR), all from the same noise.

The student is the teacher itself at N DDIM steps (no distillation), so the student-vs-teacher
distribution bars are relaxed in the dd-compile call; the parity bars are the defaults.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("cond_digits")

UNET = dict(  # ~1M parameters; cross-attention at the 8x8 level, as SD has it at the top levels
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TOKENS = 4


def class_embeddings(seed: int = 0) -> np.ndarray:
    """[10, TOKENS, dim]: one fixed "prompt embedding" per digit."""
    g = np.random.default_rng(seed)
    return g.standard_normal((10, TOKENS, UNET["cross_attention_dim"])).astype(np.float32)


def train_teacher(out: Path, iters: int, seed: int) -> float:
    from diffusers import UNet2DConditionModel

    from optimizer.demo.train_teacher import TeacherConfig, train

    emb = torch.from_numpy(class_embeddings(seed))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    ema, scheduler, seconds = train(
        iters, seed, TeacherConfig(), unet=unet,
        cond=lambda labels: {"encoder_hidden_states": emb[labels]},
    )  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    ema.save_pretrained(tmp / "unet")
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "train.json").write_text(json.dumps({"iters": iters, "seed": seed, "train_seconds": seconds}))
    tmp.rename(out)
    return seconds


def variant_samples(out: Path, spec, schedule, noise, cond) -> dict[str, np.ndarray]:
    """Each compiled variant's samples (ONNX Runtime) from the same noise and conditioning."""
    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from engines.schedule import Sampler

    res = {}
    for p in ("fp32", "fp16", "int8"):
        path = out / "onnx" / f"student.{p}.onnx"
        if path.exists():
            with OnnxRuntimeRunner(path, spec, threads=1) as r:
                res[p] = Sampler(schedule, r, max_batch=16)(noise, None, cond)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/cond_digits"))
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=8, help="DDIM steps of the compiled sampler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=100, help="cond.npz rows (and samples measured)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.out / "teacher"
    result: dict = {"unet": UNET, "tokens": TOKENS, "iters": args.iters, "steps": args.steps}
    if not teacher.exists():
        train_teacher(teacher, args.iters, args.seed)
    if (teacher / "train.json").exists():
        result["training"] = json.loads((teacher / "train.json").read_text())
    emb = class_embeddings(args.seed)
    labels = np.arange(args.rows) % 10
    cond_path = args.out / "cond.npz"
    np.savez(cond_path, encoder_hidden_states=emb[labels])

    compiled = args.out / "compiled"
    cmd = [
        sys.executable,
        "-m",
        "optimizer.cli",
        str(teacher),
        "--steps",
        str(args.steps),
        "-o",
        str(compiled),
        "--cond",
        str(cond_path),
        "--threads",
        "1",
        "--batch-sizes",
        "1,16",
        "--bar",
        "fid_margin=1e9",
        "--bar",
        "paired_psnr=-100",
    ]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    result["dd_compile"] = {"exit_code": rc, "seconds": time.perf_counter() - t0, "cmd": " ".join(cmd[1:])}
    rep = json.loads((compiled / "report.json").read_text())
    result["variants"] = {
        v["precision"]: {
            "passed": v["passed"] if "passed" in v else None,
            "call_rel_l2": v["parity"]["call"]["rel_l2"],
            "sample_psnr_db": v["parity"]["sample"]["psnr_db"],
            "nodes": (v.get("precision_info") or {}).get("counts"),
            "per_call_ms_b16": v["latency_ms"]["per_call"].get("16"),
        }
        for v in rep["variants"]
    }

    # Does the conditioning still steer every variant? Class accuracy of its samples.
    from engines.iospec import IOSpec
    from engines.schedule import Sampler
    from engines.torch_runner import TorchRunner
    from optimizer.compile.quality import load_digits_feature_extractor
    from optimizer.metrics import psnr_db
    from optimizer.models import Denoiser, load_teacher

    man = json.loads((compiled / "manifest.json").read_text())
    spec = IOSpec.from_dict(man["io_spec"])
    t = load_teacher(teacher)
    schedule = t.schedule(args.steps)
    noise = np.stack([np.random.default_rng(50_000 + i).standard_normal((1, 8, 8)) for i in range(args.rows)])
    noise = noise.astype(np.float32)
    cond = {"encoder_hidden_states": emb[labels]}
    with TorchRunner(Denoiser(t.model), spec) as tr:
        ref = Sampler(schedule, tr, max_batch=16)(noise, None, cond)
    clf = load_digits_feature_extractor()
    samples = {"torch": ref, **variant_samples(compiled, spec, schedule, noise, cond)}
    acc = {}
    for k, x in samples.items():
        x = np.clip(x, -1, 1)
        acc[k] = float((clf.predict(x) == labels).mean())
        psnr = None if k == "torch" else psnr_db(x, np.clip(ref, -1, 1))
        result.setdefault("conditioning", {})[k] = {"class_accuracy": acc[k], "psnr_vs_torch_db": psnr}
    print(
        f"\nUNet2DConditionModel {sum(p.numel() for p in t.model.parameters()) / 1e6:.2f}M params, "
        f"{args.steps} DDIM steps, {args.rows} conditioned samples; dd-compile exit {rc}"
    )
    print(
        f"{'variant':<8} {'call relL2':>10} {'sample PSNR':>11} {'int8 nodes':>10} {'class acc':>9} "
        f"{'PSNR vs torch':>13}"
    )
    for k, c in result["conditioning"].items():
        v = result["variants"].get(k, {})
        n8 = (v.get("nodes") or {}).get("int8", "") if k == "int8" else ""
        print(
            f"{k:<8} {v.get('call_rel_l2', float('nan')):>10.2e} "
            f"{v.get('sample_psnr_db', float('nan')):>11.1f} {n8!s:>10} {c['class_accuracy']:>9.2f} "
            f"{c['psnr_vs_torch_db'] or float('nan'):>13.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
