"""Do optimum-onnx's and openvino.genai's pipelines, reading dd-layout folders, reproduce
dd-compile's own runtime?

Two halves in two venvs (optimum-onnx's packages do not resolve beside the project's):

    # the peers' venv, once (what CHECKED_WITH in engines/layouts.py was checked with):
    python3 -m venv ~/.cache/dd-compile/peers-venv
    ~/.cache/dd-compile/peers-venv/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]" \\
        "optimum-intel[openvino,diffusers]" openvino-genai

    dd-layout OUT --layout optimum-onnx -o LAYOUT                       # project venv
    python benchmarks/layout_check.py ours OUT --json refs.json         # project venv: our images
    ~/.cache/dd-compile/peers-venv/bin/python benchmarks/layout_check.py optimum LAYOUT \\
        --refs refs.json --json result.json                              # optimum's, PSNR vs ours
    dd-layout OUT --layout openvino -o OV_LAYOUT
    ~/.cache/dd-compile/peers-venv/bin/python benchmarks/layout_check.py genai OV_LAYOUT \
        --refs refs.json --json result.json                              # openvino.genai's

Both draw from the same seeds: dd-compile's runtime reproduces torch's CPU randn per seed
(engines/torch_rng.py), and optimum's pipeline gets one torch.Generator per seed, so the initial
latents and a stochastic scheduler's noise (LCM) are the same draws; genai's TorchGenerator(seed)
reproduces torch's draws too (its schedulers are its own C++ ones).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = ["a red seven", "a green two on a blue field", "a photo of a cat", ""]
SEEDS = [0, 1, 2, 3]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _encode(images: np.ndarray) -> dict:
    return {"shape": list(images.shape), "b64": base64.b64encode(images.astype(np.uint8).tobytes()).decode()}


def _decode(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), np.uint8).reshape(d["shape"])


def ours(out: str, precision: str | None, steps: int | None, guidance: float | None, backend: str) -> dict:
    import engines

    pipe = engines.load(out, precision=precision, backend=backend)
    d = pipe.parts.defaults
    steps = int(steps or d["num_inference_steps"])
    g = float(d["guidance_scale"] if guidance is None else guidance)
    images = pipe(PROMPTS, seeds=SEEDS, num_inference_steps=steps, guidance_scale=g)
    pipe.close()
    return {
        "prompts": PROMPTS,
        "seeds": SEEDS,
        "steps": steps,
        "guidance_scale": g,
        "height": int(d["height"]),
        "width": int(d["width"]),
        "images": _encode(images),
    }


def optimum(layout: str, refs: dict) -> dict:
    import importlib.metadata as md

    import torch
    from optimum.onnxruntime import ORTDiffusionPipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engines.layouts import check_reader

    versions = {p: md.version(p) for p in ("optimum-onnx", "diffusers", "onnxruntime")}
    warning = check_reader(layout, versions)
    if warning:
        print(warning, file=sys.stderr)
    t0 = time.perf_counter()
    pipe = ORTDiffusionPipeline.from_pretrained(layout)
    load_s = time.perf_counter() - t0
    gens = [torch.Generator().manual_seed(s) for s in refs["seeds"]]
    out = pipe(
        refs["prompts"],
        num_inference_steps=refs["steps"],
        guidance_scale=refs["guidance_scale"],
        height=refs["height"],
        width=refs["width"],
        generator=gens,
        output_type="np",
    ).images
    got = (np.asarray(out) * 255).round().astype(np.uint8)
    want = _decode(refs["images"])
    per_image = [_psnr(a, b) for a, b in zip(got, want, strict=True)]
    return {
        "runtime": "optimum-onnx ORTDiffusionPipeline",
        "pipeline_class": type(pipe).__name__,
        "versions": versions,
        "reader_warning": warning,
        "load_s": load_s,
        "psnr_db": _psnr(got, want),
        "psnr_db_per_image": per_image,
        "max_abs_levels": int(np.abs(got.astype(int) - want.astype(int)).max()),
    }


def genai(layout: str, refs: dict) -> dict:
    import importlib.metadata as md

    import openvino_genai as og

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engines.layouts import check_reader

    versions = {p: md.version(p) for p in ("openvino-genai", "openvino")}
    warning = check_reader(layout, versions)
    if warning:
        print(warning, file=sys.stderr)
    props = json.loads((Path(layout) / "dd-compile.json").read_text())["properties"]
    t0 = time.perf_counter()
    pipe = og.Text2ImagePipeline(layout, "CPU", **props)
    load_s = time.perf_counter() - t0
    got = []
    for p, s in zip(refs["prompts"], refs["seeds"], strict=True):
        out = pipe.generate(
            p,
            width=refs["width"],
            height=refs["height"],
            num_inference_steps=refs["steps"],
            guidance_scale=refs["guidance_scale"],
            generator=og.TorchGenerator(s),
        )
        # a copy while the tensor lives: .data is a view of memory the next generation reuses
        got.append(np.array(out.data)[0])
    got = np.stack(got)
    want = _decode(refs["images"])
    return {
        "runtime": "openvino.genai Text2ImagePipeline",
        "properties": props,
        "versions": versions,
        "reader_warning": warning,
        "load_s": load_s,
        "psnr_db": _psnr(got, want),
        "psnr_db_per_image": [_psnr(a, b) for a, b in zip(got, want, strict=True)],
        "max_abs_levels": int(np.abs(got.astype(int) - want.astype(int)).max()),
    }


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ours", help="dd-compile's runtime images (project venv)")
    a.add_argument("out")
    a.add_argument("--precision")
    a.add_argument("--steps", type=int)
    a.add_argument("--guidance-scale", type=float)
    a.add_argument("--backend", default="onnxruntime", help="the runtime our images come from")
    a.add_argument("--json", required=True)
    b = sub.add_parser("optimum", help="optimum-onnx on a dd-layout folder (peers venv)")
    b.add_argument("layout")
    b.add_argument("--refs", required=True)
    b.add_argument("--json", required=True)
    c = sub.add_parser("genai", help="openvino.genai on a dd-layout --layout openvino folder (peers venv)")
    c.add_argument("layout")
    c.add_argument("--refs", required=True)
    c.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.cmd == "ours":
        res = ours(args.out, args.precision, args.steps, args.guidance_scale, args.backend)
    else:
        check = optimum if args.cmd == "optimum" else genai
        res = check(args.layout, json.loads(Path(args.refs).read_text()))
        print(json.dumps({k: v for k, v in res.items() if k != "images"}, indent=2))
    Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
