"""dd-compile against its peers, end to end on the same diffusers pipeline folder: prompt -> uint8
image, batch 1, the same prompt, seed, steps, guidance and size, 2 threads each (issue #25).

The peers' packages do not resolve beside the project's (the project has diffusers 0.42 and
transformers 5), so they live in a venv of their own, made once (here pip's find-links supplied
torch 2.13.0+cpu; elsewhere add `--extra-index-url https://download.pytorch.org/whl/cpu` to keep
CUDA wheels off a CPU machine):

    python -m venv /root/.cache/dd-compile/peers-venv
    /root/.cache/dd-compile/peers-venv/bin/pip install torch==2.13.0 "optimum-intel[openvino,diffusers]" \
        openvino-genai "optimum-onnx[onnxruntime]"
    # measured with: torch 2.13.0+cpu, diffusers 0.39.0, transformers 4.57.6, optimum-intel 1.27.0,
    # optimum-onnx 0.1.0 (optimum 2.1.0), openvino / openvino-genai / openvino-tokenizers 2026.4.1,
    # onnxruntime 1.32.0

Subcommands: `peers` (peers venv), `ours` and `merge` (project venv), `sd15-folder` (project venv).
Run each folder's `peers` and `ours` back to back on a quiet machine (every python process with
OMP_WAIT_POLICY=PASSIVE, which the script sets when unset):

    PEERS=/root/.cache/dd-compile/peers-venv/bin/python
    # dd-compile's outputs: the bundled LCM student (4 steps, guidance 2 embedded, 32 px) and the
    # demo teacher at its reference DDIM 50 + CFG 2; OpenVINO without int8 (see below)
    .venv/bin/dd-compile --demo -o /tmp/peers/demo-out
    .venv/bin/dd-compile --demo --backend openvino --precision fp32,fp16,bf16 -o /tmp/peers/demo-out-ov
    .venv/bin/dd-compile optimizer/demo/t2i/teacher --steps 50 -o /tmp/peers/teacher-out
    .venv/bin/dd-compile optimizer/demo/t2i/teacher --steps 50 --backend openvino \
        --precision fp32,fp16,bf16 -o /tmp/peers/teacher-out-ov
    # the student (the teacher the same with optimizer/demo/t2i/teacher and teacher-out*)
    $PEERS benchmarks/peers.py peers --folder optimizer/demo/t2i/student_lcm4 --work /tmp/peers/work \
        --rounds 21 --json /tmp/peers/student.peers.json
    .venv/bin/python benchmarks/peers.py ours --out /tmp/peers/demo-out --out /tmp/peers/demo-out-ov \
        --rounds 21 --peers-json /tmp/peers/student.peers.json --json /tmp/peers/student.ours.json
    .venv/bin/python benchmarks/peers.py merge --peers-json /tmp/peers/student.peers.json \
        --ours-json /tmp/peers/student.ours.json --name demo_student   # -> benchmarks/results/peers_*
    # an SD 1.5-architecture LCM, random weights, 256 px: the peers only (dd-compile on it takes
    # > 10 min and > 15 GB here), in two processes to stay within 23 GB (each with its own torch)
    .venv/bin/python benchmarks/peers.py sd15-folder --out /tmp/peers/sd15_lcm_random
    SD15="--folder /tmp/peers/sd15_lcm_random --name sd15_lcm_random_256 --size 256 --steps 4 \
        --guidance 8.5 --quality-prompts 1 --rounds 5 --work /tmp/peers/work"
    $PEERS benchmarks/peers.py peers $SD15 --prompt "a photo of an astronaut riding a horse on mars" \
        --only optimum-onnx-ort-fp32,optimum-intel-ov-f32,optimum-intel-ov-bf16 --json /tmp/peers/sd15.a.json
    $PEERS benchmarks/peers.py peers $SD15 --prompt "a photo of an astronaut riding a horse on mars" \
        --only openvino-genai-f32,openvino-genai-bf16 --json /tmp/peers/sd15.b.json
    .venv/bin/python benchmarks/peers.py merge --peers-json /tmp/peers/sd15.a.json \
        --peers-json /tmp/peers/sd15.b.json --name sd15_lcm_random_256

int8 is left out of the OpenVINO compiles: on 2026-12-07 the demo's OpenVINO int8 mix failed its
sample bar (12.7 dB < 22 dB; img2img 44.9, inpaint 51.5 dB), and a run that fails a check
publishes none of its mixes as servable (`engines.load` refuses them all without
allow_unvalidated), so `ours` would have had no OpenVINO row at all.

The peers (`peers`):
- `diffusers-torch-fp32`: the folder's own diffusers pipeline, torch fp32, torch.set_num_threads(2):
  the reference every PSNR is measured against.
- `optimum-onnx-ort-fp32`: optimum.onnxruntime's ORT{StableDiffusion,LatentConsistencyModel}Pipeline
  (the folder's class: ORTDiffusionPipeline itself cannot infer a task for a local folder)
  .from_pretrained(folder, export=True), saved to --work and loaded from there afterwards; CPU
  provider, intra_op 2 threads, inter_op 1, otherwise ONNX Runtime's and optimum's defaults (idle
  workers spin). `-nospin` adds session.intra_op.allow_spinning=0, as dd-compile's runtime runs:
  optimum's pipeline does torch work between the sessions' calls, and spinning workers take the
  two cores from it.
- `optimum-intel-ov-{f32,bf16}`: optimum.intel's exporter (see export_ov: the same main_export as
  OVDiffusionPipeline.from_pretrained(folder, export=True)) into --work; OVDiffusionPipeline
  .from_pretrained(that folder, compile=False), .reshape(batch_size=1, height=H,
  width=W, num_images_per_prompt=1) (static shapes), .compile(), ov_config
  INFERENCE_PRECISION_HINT f32 / bf16, INFERENCE_NUM_THREADS 2, PERFORMANCE_HINT LATENCY.
- `openvino-genai-{f32,bf16}`: openvino_genai.Text2ImagePipeline on the IR optimum-intel wrote,
  .reshape(1, H, W, guidance) then .compile("CPU", INFERENCE_PRECISION_HINT=..., 2 threads), as
  its docs do for static shapes.

The torch-interface pipelines get the same initial latents (drawn from torch.Generator("cpu")
.manual_seed(seed), then that generator for any later draw, as diffusers does without latents);
openvino.genai gets TorchGenerator(seed), which reproduces torch's CPU randn. Each tool is warmed up
once (that call's images are the ones compared), then timed in --rounds alternated rounds (the order
rotates every round, --gap s of untimed sleep before each call) in one process: median and spread
per tool. The images go to an .npz beside
--json (keys `<tool>/<i>`: i = 0 is the timed prompt, then the --quality-prompts extra ones).

Folders saved by transformers 5 (the bundled demo's are) keep CLIPTextModel's weights without the
`text_model.` prefix and, for the demo, the tokenizer as tokenizer.json only: transformers 4 (the
peers venv) would load a randomly initialised text encoder with only a warning, and optimum would
export that one. So the peers run on a copy in --work/<name>/src with the prefix added and
vocab.json / merges.txt written from tokenizer.json (the same BPE); the JSON records what was
rewritten, transformers 4's loading report on the folder as saved (the missing keys) and on the copy
(none), that the copy's slow tokenizer gives tokenizer.json's ids, and each exported text encoder's
output against torch's (encode_prompt). `ours` runs diffusers torch fp32 on the original folder in
the project venv too: its PSNR against the peers' reference says the copy is the same model.

`ours` times `engines.load(out, precision=mix, backend=...)` for every mix each --out published and
validated for onnxruntime and openvino, beside diffusers torch fp32 in the same process (the only
fair baseline for its ratios); `merge` puts both JSONs in one table. A ratio across the two
processes (dd-compile's best vs the best peer) is only as good as the machine was quiet and alike
for both: the loads are recorded, and the two diffusers torch medians show the drift.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime as dt
import gc
import hashlib
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THREADS = 2
FLAGS_CMD = "grep -o -w -E 'avx512_bf16|amx_bf16|amx_int8|avx512_vnni|avx512f' /proc/cpuinfo | sort -u"
DEFAULT_PROMPT = "a red seven"
QUALITY_PROMPTS = ("the digit 3 in green", "a blue two", "nine, yellow")
SD15_PROMPT = "a photo of an astronaut riding a horse on mars"
REFERENCE = "diffusers-torch-fp32"
Image = np.ndarray  # uint8 [H, W, 3]


# ---------------------------------------------------------------- shared


def cpu_flags() -> list[str]:
    out = subprocess.run(["bash", "-c", FLAGS_CMD], capture_output=True, text=True, check=False)
    return out.stdout.split()


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "flags": cpu_flags(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
    }


def psnr(a: Image, b: Image) -> float | None:
    """PSNR in dB of uint8 images; None when identical (infinite)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def to_uint8(images: Any) -> Image:
    """diffusers' output_type='np' [B, H, W, 3] floats in [0, 1] -> uint8 as its numpy_to_pil does."""
    x = np.asarray(images)
    return (x[0] * 255).round().astype(np.uint8)


def time_rounds(
    tools: dict[str, Callable[[str, int], Image]], prompt: str, seed: int, rounds: int, gap: float = 0.1
) -> dict[str, list[float]]:
    """Alternated rounds, the order rotating each round; ms per end-to-end call. `gap` seconds of
    sleep (untimed) before each call let the previous tool's worker threads (ONNX Runtime's
    spinning, OpenVINO's TBB) go idle, so no tool is timed against the last one's leftovers."""
    names = list(tools)
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            time.sleep(gap)
            t0 = time.perf_counter()
            tools[n](prompt, seed)
            ms[n].append((time.perf_counter() - t0) * 1e3)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {ms[n][-1]:.1f}" for n in names), flush=True)
    return ms


def summary(ms: list[float]) -> dict[str, Any]:
    med = statistics.median(ms)
    q = np.percentile(ms, [25, 75])
    return {
        "ms": [round(x, 3) for x in ms],
        "median_ms": round(med, 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
        "iqr_ms": round(float(q[1] - q[0]), 3),
        "spread_pct": round(100 * (max(ms) - min(ms)) / med, 1),
    }


def capture(
    tools: dict[str, Callable[[str, int], Image]], prompts: list[str], seed: int
) -> dict[str, list[Image]]:
    """Each tool's images for every prompt (the first call is the warm-up)."""
    return {n: [f(p, seed + i) for i, p in enumerate(prompts)] for n, f in tools.items()}


def quality(images: dict[str, list[Image]], ref: list[Image]) -> dict[str, Any]:
    out = {}
    for n, imgs in images.items():
        ps = [psnr(a, b) for a, b in zip(imgs, ref, strict=True)]
        finite = [p for p in ps if p is not None]
        out[n] = {
            "psnr_db_timed_prompt": None if ps[0] is None else round(ps[0], 2),
            "psnr_db_each": [None if p is None else round(p, 2) for p in ps],
            "psnr_db_min": round(min(finite), 2) if finite else None,
            "identical": [p is None for p in ps],
            "max_abs_diff": int(
                max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(imgs, ref, strict=True))
            ),
        }
    return out


def save_images(path: Path, images: dict[str, list[Image]]) -> str:
    arrays = {f"{n}/{i}": im for n, imgs in images.items() for i, im in enumerate(imgs)}
    np.savez_compressed(path, **arrays)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_images(path: Path) -> dict[str, list[Image]]:
    out: dict[str, list[Image]] = {}
    with np.load(path) as z:
        for key in sorted(z.files, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
            out.setdefault(key.rsplit("/", 1)[0], []).append(z[key])
    return out


def write_grid(path: Path, images: dict[str, list[Image]]) -> None:
    """One row per tool, one column per prompt (nearest-upscaled to at least 96 px)."""
    from PIL import Image as PILImage

    rows = [np.concatenate(imgs, axis=1) for imgs in images.values()]
    grid = np.concatenate(rows, axis=0)
    k = max(1, 96 // rows[0].shape[0])
    PILImage.fromarray(grid).resize((grid.shape[1] * k, grid.shape[0] * k), PILImage.NEAREST).save(path)


# ---------------------------------------------------------------- peers half (peers venv)


def run_settings(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Steps / guidance from the folder's dd-distill record or demo teacher record unless given."""
    index = json.loads((folder / "model_index.json").read_text())
    steps, guidance = args.steps, args.guidance
    for rec, s_key, g_key in (
        ("distill.json", "steps", "guidance_scale"),
        ("teacher.json", "reference_steps", "reference_guidance_scale"),
    ):
        if (folder / rec).exists():
            r = json.loads((folder / rec).read_text())
            steps = steps if steps is not None else r.get(s_key)
            guidance = guidance if guidance is not None else r.get(g_key)
    if steps is None or guidance is None:
        raise SystemExit(f"{folder}: no distill.json / teacher.json: pass --steps and --guidance")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    size = args.size or int(unet["sample_size"]) * factor
    return {
        "pipeline": index["_class_name"],
        "scheduler": index["scheduler"][1],
        "steps": int(steps),
        "guidance_scale": float(guidance),
        "height": size,
        "width": size,
        "latent_shape": [1, int(unet["in_channels"]), size // factor, size // factor],
        "embedded_guidance": unet.get("time_cond_proj_dim") is not None,
        "prompt": args.prompt,
        "seed": args.seed,
        "quality_prompts": list(QUALITY_PROMPTS[: args.quality_prompts]),
        "threads": THREADS,
    }


def prepare_source(folder: Path, dest: Path) -> dict[str, Any]:
    """A copy of `folder` that transformers 4 loads as transformers 5 does (see the docstring)."""
    done = dest / ".peers_fixes.json"
    if done.exists():
        return json.loads(done.read_text())
    from safetensors.numpy import load_file, save_file

    if dest.exists():  # not a copy this script finished: the user's to look at, never deleted here
        raise SystemExit(f"{dest}: exists but is not a finished peers copy (no {done.name}); remove it")
    # built beside dest and renamed into place once fixed: an interrupted run leaves no dest
    work = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.copytree(folder, work)
    fixes: dict[str, Any] = {}
    for sub in sorted(p for p in work.iterdir() if p.is_dir()):
        cfg = sub / "config.json"
        weights = sub / "model.safetensors"
        if cfg.exists() and weights.exists():
            arch = json.loads(cfg.read_text()).get("architectures", [""])[0]
            if arch in ("CLIPTextModel", "CLIPTextModelWithProjection"):
                sd = load_file(str(weights))
                bare = [k for k in sd if not k.startswith(("text_model.", "text_projection."))]
                if bare:
                    save_file(
                        {(f"text_model.{k}" if k in bare else k): v for k, v in sd.items()}, str(weights)
                    )
                    fixes[sub.name] = (
                        f"{len(bare)} of {len(sd)} weights renamed with the 'text_model.' prefix"
                    )
        tj = sub / "tokenizer.json"
        if tj.exists() and not (sub / "vocab.json").exists():
            model = json.loads(tj.read_text())["model"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            (sub / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
            (sub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
            fixes[sub.name] = (
                "vocab.json + merges.txt written from tokenizer.json's BPE (the slow CLIPTokenizer)"
            )
    (work / done.name).write_text(json.dumps(fixes, indent=1))
    work.rename(dest)
    return fixes


def check_source(folder: Path, src: Path, prompts: list[str]) -> dict[str, Any]:
    """transformers 4's view of the folder as saved and of the fixed copy."""
    import transformers
    from tokenizers import Tokenizer

    out: dict[str, Any] = {}
    for sub in ("text_encoder", "text_encoder_2"):
        if not (folder / sub / "config.json").exists():
            continue
        arch = json.loads((folder / sub / "config.json").read_text())["architectures"][0]
        cls = getattr(transformers, arch)
        rep = {}
        for what, path in (("as_saved", folder / sub), ("peers_copy", src / sub)):
            _, info = cls.from_pretrained(path, output_loading_info=True)
            rep[what] = {
                "missing_keys": len(info["missing_keys"]),
                "unexpected_keys": len(info["unexpected_keys"]),
                "example_missing": sorted(info["missing_keys"])[:2],
            }
        out[sub] = rep
    for sub in ("tokenizer", "tokenizer_2"):
        if not (folder / sub / "tokenizer.json").exists():
            continue
        fast = Tokenizer.from_file(str(folder / sub / "tokenizer.json"))
        fast.no_padding()
        slow = transformers.CLIPTokenizer.from_pretrained(src / sub)
        same = []
        for p in prompts:
            ids = slow(p, max_length=slow.model_max_length, truncation=True).input_ids
            same.append(ids == fast.encode(p).ids)
        out[sub] = {"slow_copy_equals_tokenizer_json": all(same), "model_max_length": slow.model_max_length}
    return out


def torch_style(pipe: Any, s: dict[str, Any]) -> Callable[[str, int], Image]:
    """A diffusers-interface pipeline (diffusers, optimum-onnx, optimum-intel) as prompt -> uint8."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    def run(prompt: str, seed: int) -> Image:
        g = torch.Generator("cpu").manual_seed(seed)
        latents = randn_tensor(tuple(s["latent_shape"]), generator=g, dtype=torch.float32)
        out = pipe(
            prompt,
            height=s["height"],
            width=s["width"],
            num_inference_steps=s["steps"],
            guidance_scale=s["guidance_scale"],
            generator=g,
            latents=latents,
            output_type="np",
        )
        return to_uint8(out.images)

    return run


def text_encoder_check(pipes: dict[str, Any], ref: Any, prompts: list[str]) -> dict[str, Any]:
    """Each exported pipeline's encode_prompt against torch's: the transformers-5 pitfall shows here."""
    import torch

    out = {}
    with torch.no_grad():
        want = [ref.encode_prompt(p, "cpu", 1, False)[0].float().numpy() for p in prompts]
        for n, p in pipes.items():
            got = [p.encode_prompt(q, "cpu", 1, False)[0] for q in prompts]
            got = [np.asarray(g.float().numpy() if hasattr(g, "numpy") else g) for g in got]
            rel = max(
                float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-12))
                for g, w in zip(got, want, strict=True)
            )
            out[n] = {"encode_prompt_rel_l2_max": rel, "matches": rel < 1e-2}
    return out


def ort_class(pipeline: str) -> Any:
    """The ORT pipeline of the folder's class: ORTDiffusionPipeline itself has no task to export a
    local folder with (optimum cannot infer one), its subclasses have 'text-to-image'."""
    import optimum.onnxruntime as ort_pipes

    return getattr(ort_pipes, f"ORT{pipeline}", ort_pipes.ORTDiffusionPipeline)


def export_ort(src: Path, dest: Path, pipeline: str) -> float:
    if (dest / "model_index.json").exists():
        return 0.0
    t0 = time.perf_counter()
    pipe = ort_class(pipeline).from_pretrained(str(src), export=True)
    pipe.save_pretrained(dest)
    del pipe
    return time.perf_counter() - t0


def export_ov(src: Path, dest: Path) -> dict[str, Any]:
    """optimum-intel's exporter into `dest` (`optimum-cli export openvino --model SRC --task
    text-to-image DEST`, the path openvino.genai's docs give: OVDiffusionPipeline.from_pretrained(
    export=True) runs the same main_export with the same (no) weight compression below 1B parameters,
    but into a temporary folder whose openvino_tokenizer.xml save_pretrained does not copy). Where
    optimum skips the tokenizer (it hands the slow CLIPTokenizer to openvino_tokenizers, which takes
    only fast ones, when the tokenizer folder is not written yet) it is converted here from the
    fast tokenizer of the same files, as optimum does when the folder exists."""
    rec: dict[str, Any] = {"export_s": 0.0}
    if not (dest / "model_index.json").exists():
        from optimum.exporters.openvino import main_export

        t0 = time.perf_counter()
        main_export(str(src), output=str(dest), task="text-to-image", library_name="diffusers")
        rec["export_s"] = round(time.perf_counter() - t0, 1)
    for sub in ("tokenizer", "tokenizer_2"):
        if (dest / sub).is_dir() and not (dest / sub / "openvino_tokenizer.xml").exists():
            import openvino
            from openvino_tokenizers import convert_tokenizer
            from transformers import CLIPTokenizerFast

            tok, detok = convert_tokenizer(
                CLIPTokenizerFast.from_pretrained(dest / sub), with_detokenizer=True
            )
            openvino.save_model(tok, dest / sub / "openvino_tokenizer.xml")
            openvino.save_model(detok, dest / sub / "openvino_detokenizer.xml")
            (dest / sub / ".converted_here").write_text(
                "openvino_tokenizers.convert_tokenizer(CLIPTokenizerFast)\n"
            )
        if (dest / sub / ".converted_here").exists():
            rec[f"{sub}_ir"] = "converted by this script (optimum-intel's export skipped it)"
    return rec


def load_peers(src: Path, work: Path, s: dict[str, Any], only: set[str]) -> tuple[dict, dict, dict]:
    """(callables, pipeline objects for the text encoder check, load records) per tool."""
    import torch

    torch.set_num_threads(THREADS)
    tools: dict[str, Callable[[str, int], Image]] = {}
    objs: dict[str, Any] = {}
    rec: dict[str, Any] = {}

    def want(name: str) -> bool:
        return name == REFERENCE or not only or name in only

    def load(name: str, fn: Callable[[], tuple[Any, Callable[[str, int], Image], dict]]) -> None:
        if not want(name):
            return
        t0 = time.perf_counter()
        try:
            obj, run, info = fn()
        except Exception as e:  # a peer that cannot run this folder is reported, not fatal
            rec[name] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
            print(f"{name}: FAILED to load: {rec[name]['error']}", flush=True)
            return
        rec[name] = {"load_s": round(time.perf_counter() - t0, 2), **info}
        tools[name] = run
        if obj is not None:
            objs[name] = obj
        print(f"{name}: loaded in {rec[name]['load_s']} s", flush=True)

    def diffusers_torch():
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe, torch_style(pipe, s), {"threads": f"torch.set_num_threads({THREADS})"}

    load(REFERENCE, diffusers_torch)

    for spin in (True, False):

        def ort(spin=spin):
            import onnxruntime as ort_

            exp = export_ort(src, work / "ort", s["pipeline"])
            so = ort_.SessionOptions()
            so.intra_op_num_threads = THREADS
            so.inter_op_num_threads = 1
            if not spin:  # as dd-compile's runtime: idle workers block instead of spinning
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            pipe = ort_class(s["pipeline"]).from_pretrained(
                str(work / "ort"), export=False, session_options=so
            )
            pipe.set_progress_bar_config(disable=True)
            info = {
                "class": type(pipe).__name__,
                "export_s": round(exp, 1),
                "threads": "intra_op 2, inter_op 1",
                "allow_spinning": spin,
            }
            return pipe, torch_style(pipe, s), info

        load("optimum-onnx-ort-fp32" + ("" if spin else "-nospin"), ort)

    for hint in ("f32", "bf16"):

        def ov(hint=hint):
            from optimum.intel import OVDiffusionPipeline

            exp = export_ov(src, work / "ov")
            cfg = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": str(THREADS)}
            cfg["PERFORMANCE_HINT"] = "LATENCY"
            pipe = OVDiffusionPipeline.from_pretrained(str(work / "ov"), compile=False, ov_config=cfg)
            pipe.reshape(batch_size=1, height=s["height"], width=s["width"], num_images_per_prompt=1)
            pipe.compile()
            pipe.set_progress_bar_config(disable=True)
            info = {
                "class": type(pipe).__name__,
                **exp,
                "ov_config": cfg,
                "shapes": "static",
            }
            return pipe, torch_style(pipe, s), info

        load(f"optimum-intel-ov-{hint}", ov)

    for hint in ("f32", "bf16"):

        def genai(hint=hint):
            import openvino_genai as ov_genai

            exp = export_ov(src, work / "ov")
            pipe = ov_genai.Text2ImagePipeline(str(work / "ov"))
            pipe.reshape(1, s["height"], s["width"], s["guidance_scale"])
            props = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": THREADS}
            props["PERFORMANCE_HINT"] = "LATENCY"
            pipe.compile("CPU", **props)

            def run(prompt: str, seed: int) -> Image:
                t = pipe.generate(
                    prompt,
                    width=s["width"],
                    height=s["height"],
                    num_inference_steps=s["steps"],
                    guidance_scale=s["guidance_scale"],
                    num_images_per_prompt=1,
                    generator=ov_genai.TorchGenerator(seed),
                )
                return np.array(t.data[0], dtype=np.uint8)

            info = {
                "properties": props,
                "generator": "TorchGenerator(seed)",
                "shapes": "static (reshape)",
                **exp,
            }
            return None, run, info

        load(f"openvino-genai-{hint}", genai)
    return tools, objs, rec


def cmd_peers(args: argparse.Namespace) -> None:
    import diffusers
    import openvino
    import torch
    import transformers

    folder = Path(args.folder).resolve()
    name = args.name or folder.name
    work = Path(args.work).resolve() / name
    work.mkdir(parents=True, exist_ok=True)
    s = run_settings(folder, args)
    start = machine()
    prompts = [s["prompt"], *s["quality_prompts"]]
    fixes = prepare_source(folder, work / "src")
    checks = check_source(folder, work / "src", prompts)
    print(f"peers copy {work / 'src'}: {fixes or 'nothing rewritten'}", flush=True)
    print(f"loading checks: {json.dumps(checks)}", flush=True)
    if args.export_only:
        t = {"ort_export_s": round(export_ort(work / "src", work / "ort", s["pipeline"]), 1)}
        t.update(export_ov(work / "src", work / "ov"))
        print(f"exports in {work}: {t}")
        return
    only = set(filter(None, (args.only or "").split(",")))
    tools, objs, rec = load_peers(work / "src", work, s, only)
    ref = objs.get(REFERENCE)
    te = text_encoder_check({n: o for n, o in objs.items() if n != REFERENCE}, ref, prompts) if ref else {}
    images = capture(tools, prompts, s["seed"])  # also each tool's warm-up
    ms = time_rounds(tools, s["prompt"], s["seed"], args.rounds, args.gap)
    q = quality(images, images[REFERENCE])
    out_json = Path(args.json)
    npz = out_json.with_suffix(".npz")
    sha = save_images(npz, images)
    write_grid(out_json.with_suffix(".png"), images)
    ref_ms = statistics.median(ms[REFERENCE])
    result = {
        "format": "dd-compile.peers/1",
        "half": "peers",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "folder": str(folder),
        "name": name,
        "work": str(work),
        "settings": s,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "openvino": openvino.__version__,
            **{p: _version(p) for p in ("optimum-intel", "optimum-onnx", "openvino-genai", "onnxruntime")},
        },
        "source_fixes": fixes,
        "source_checks": checks,
        "text_encoder_check": te,
        "machine_start": start,
        "loadavg_end": list(os.getloadavg()),
        "rounds": args.rounds,
        "gap_s": args.gap,
        "tools": {
            n: {
                **rec.get(n, {}),
                **(summary(ms[n]) if n in ms else {}),
                **({"speedup_vs_torch": round(ref_ms / statistics.median(ms[n]), 3)} if n in ms else {}),
                **(q.get(n, {})),
            }
            for n in rec
        },
        "images": {"npz": str(npz), "sha256": sha, "keys": "<tool>/<i>, i = 0 the timed prompt"},
    }
    out_json.write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {
                n: {k: t.get(k) for k in ("median_ms", "psnr_db_min", "error")}
                for n, t in result["tools"].items()
            }
        )
    )


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- ours half (project venv)


def cmd_ours(args: argparse.Namespace) -> None:
    import torch

    import engines
    from engines.manifest import Manifest

    torch.set_num_threads(THREADS)
    peers = json.loads(Path(args.peers_json).read_text())
    s = peers["settings"]
    prompts = [s["prompt"], *s["quality_prompts"]]
    ref_images = load_images(Path(peers["images"]["npz"]))[REFERENCE]
    start = machine()
    tools: dict[str, Callable[[str, int], Image]] = {}
    rec: dict[str, Any] = {}

    from diffusers import DiffusionPipeline

    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(peers["folder"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    tools[REFERENCE] = _project_torch(pipe, s)
    rec[REFERENCE] = {
        "load_s": round(time.perf_counter() - t0, 2),
        "venv": "project",
        "folder": peers["folder"],
    }

    backends = [b for b in args.backends.split(",") if b]
    for out in args.out:
        man = Manifest.load(out)
        mixes = sorted({a.precision for a in man.find("pipeline") if a.precision})
        for backend in backends:
            for mix in mixes:
                n = f"dd-compile-{backend}-{mix}"
                t0 = time.perf_counter()
                try:
                    p = engines.load(out, precision=mix, backend=backend, threads=THREADS)
                except Exception as e:  # not validated for this backend, or not built: skipped, said
                    print(f"{n} ({out}): skipped: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                if n in tools:
                    n = f"{n}@{Path(out).name}"
                tools[n] = _engine_run(p, s)
                rec[n] = {
                    "load_s": round(time.perf_counter() - t0, 2),
                    "out": str(out),
                    "mix": mix,
                    "backend": backend,
                }
                print(f"{n}: loaded in {rec[n]['load_s']} s", flush=True)
    images = capture(tools, prompts, s["seed"])
    ms = time_rounds(tools, s["prompt"], s["seed"], args.rounds, args.gap)
    q = quality(images, ref_images)
    ref_ms = statistics.median(ms[REFERENCE])
    out_json = Path(args.json)
    sha = save_images(out_json.with_suffix(".npz"), images)
    import diffusers
    import transformers

    result = {
        "format": "dd-compile.peers/1",
        "half": "ours",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "folder": peers["folder"],
        "name": peers["name"],
        "peers_json": str(Path(args.peers_json).resolve()),
        "settings": s,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            **{p: _version(p) for p in ("dd-compile", "onnxruntime", "openvino")},
        },
        "machine_start": start,
        "loadavg_end": list(os.getloadavg()),
        "rounds": args.rounds,
        "gap_s": args.gap,
        "psnr_reference": f"the peers JSON's {REFERENCE} images (peers venv)",
        "tools": {
            n: {
                **rec[n],
                **summary(ms[n]),
                "speedup_vs_torch": round(ref_ms / statistics.median(ms[n]), 3),
                **q[n],
            }
            for n in tools
        },
        "images": {"npz": str(out_json.with_suffix(".npz")), "sha256": sha},
    }
    out_json.write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {n: {k: t.get(k) for k in ("median_ms", "psnr_db_min")} for n, t in result["tools"].items()}
        )
    )


def _project_torch(pipe: Any, s: dict[str, Any]) -> Callable[[str, int], Image]:
    return torch_style(pipe, s)


def _engine_run(p: Any, s: dict[str, Any]) -> Callable[[str, int], Image]:
    def run(prompt: str, seed: int) -> Image:
        out = p(
            prompt=[prompt],
            seeds=[seed],
            guidance_scale=s["guidance_scale"],
            num_inference_steps=s["steps"],
            height=s["height"],
            width=s["width"],
        )
        return np.asarray(out[0], dtype=np.uint8)

    return run


# ---------------------------------------------------------------- merge


def _fmt_psnr(t: dict[str, Any]) -> str:
    if "psnr_db_min" not in t:
        return ""
    if all(t.get("identical", [])):
        return "identical"
    return f"{t['psnr_db_min']:.1f}"


def cmd_merge(args: argparse.Namespace) -> None:
    plist = [json.loads(Path(p).read_text()) for p in args.peers_json]
    peers = plist[0]
    ours = json.loads(Path(args.ours_json).read_text()) if args.ours_json else None
    s = peers["settings"]
    for other in plist[1:]:
        if other["settings"] != s:
            raise SystemExit(f"{other['folder']}: other settings than {peers['folder']}'s: not one table")
    flags = cpu_flags()
    guided = " (embedded)" if s["embedded_guidance"] else " (CFG)" if s["guidance_scale"] > 1 else ""
    lines = [
        f"### {args.name}: {peers['folder']}",
        "",
        f"{s['pipeline']} ({s['scheduler']}), {s['steps']} steps, guidance {s['guidance_scale']}{guided}, "
        f"{s['height']}x{s['width']}, batch 1, prompt {s['prompt']!r} seed {s['seed']}, "
        f"{s['threads']} threads each; {peers['rounds']} alternated rounds after one warm-up per tool "
        f"({peers.get('gap_s', 0)} s untimed gap before each call); CPU flags: {' '.join(flags)}.",
        "",
        "| tool | process | median ms | min-max ms | speedup vs diffusers torch (same process) "
        "| PSNR vs diffusers torch fp32, dB (min over prompts) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    halves = [(f"peers venv{f' #{i + 1}' if len(plist) > 1 else ''}", p) for i, p in enumerate(plist)]
    halves += [("project venv", ours)] if ours else []
    for where, half in halves:
        for n, t in half["tools"].items():
            if "error" in t:
                lines.append(f"| {n} | {where} | failed: {t['error'][:160]} | | | |")
                continue
            lines.append(
                f"| {n} | {where} | {t['median_ms']:.1f} | {t['min_ms']:.1f}-{t['max_ms']:.1f} "
                f"| {t['speedup_vs_torch']:.2f}x | {_fmt_psnr(t)} |"
            )
    summary_: dict[str, Any] = {"cpu_flags": flags}
    peer_ok = {
        n: (t, half)
        for half in plist
        for n, t in half["tools"].items()
        if "median_ms" in t and n != REFERENCE
    }
    if peer_ok:
        best_peer = min(peer_ok, key=lambda n: peer_ok[n][0]["median_ms"])
        bp, bp_half = peer_ok[best_peer]
        summary_["best_peer"] = {"tool": best_peer, "median_ms": bp["median_ms"]}
    if ours and peer_ok:
        mine = {n: t for n, t in ours["tools"].items() if n.startswith("dd-compile")}
        t_peer = bp_half["tools"][REFERENCE]["median_ms"]
        t_ours = ours["tools"][REFERENCE]["median_ms"]
        summary_["torch_median_peers_over_project"] = round(t_peer / t_ours, 3)
        for what, keep in (("best", lambda n: True), ("best fp32", lambda n: n.endswith(("fp32", "f32")))):
            m = {n: t for n, t in mine.items() if keep(n)}
            pk = {n: v for n, v in peer_ok.items() if keep(n)}
            if not m or not pk:
                continue
            best = min(m, key=lambda n: m[n]["median_ms"])
            bpn = min(pk, key=lambda n: pk[n][0]["median_ms"])
            r = pk[bpn][0]["median_ms"] / m[best]["median_ms"]
            summary_[what.replace(" ", "_")] = {
                "ours": best,
                "ours_ms": m[best]["median_ms"],
                "peer": bpn,
                "peer_ms": pk[bpn][0]["median_ms"],
                "ours_speedup_over_peer": round(r, 3),
            }
            lines += [
                "",
                f"dd-compile's {what} ({best}, {m[best]['median_ms']:.1f} ms) vs the {what} peer "
                f"({bpn}, {pk[bpn][0]['median_ms']:.1f} ms): dd-compile's speedup over it **{r:.2f}x**"
                f"{' (below 1: the peer is faster)' if r < 1 else ''}.",
            ]
        if mine:
            pv = bp_half["versions"]
            lines += [
                "",
                "Those ratios are across the two processes (run back to back), so less sure than the "
                f"same-process column: diffusers torch fp32 took {t_peer:.1f} ms in the peers venv "
                f"(diffusers {pv['diffusers']}, transformers {pv['transformers']}) "
                f"and {t_ours:.1f} ms in the project venv (diffusers {ours['versions']['diffusers']}, "
                f"transformers {ours['versions']['transformers']}).",
            ]
            tp = ours["tools"][REFERENCE]
            if "psnr_db_min" in tp:
                same = "identical images" if all(tp.get("identical", [])) else f"{_fmt_psnr(tp)} dB"
                lines += [
                    "",
                    f"diffusers torch fp32 of the original folder in the project venv vs the peers' (on "
                    f"their rewritten copy): {same}.",
                ]
    loads = [f"{w} {_load(h)}" for w, h in halves]
    lines += ["", f"1-minute load average (start -> end of each process): {'; '.join(loads)}."]
    fixes = peers.get("source_fixes") or {}
    if fixes:
        lines += [
            "",
            "The peers ran on a copy of the folder: "
            + "; ".join(f"{k}: {v}" for k, v in fixes.items())
            + ".",
        ]
    te = {n: v for p in plist for n, v in (p.get("text_encoder_check") or {}).items()}
    if te:
        lines += [
            "Exported text encoders vs torch's (encode_prompt, max rel. L2): "
            + ", ".join(f"{n} {v['encode_prompt_rel_l2_max']:.1e}" for n, v in te.items())
            + "."
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    date = peers["date"][:10]  # the measurement's, not the merge's
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"peers_{args.name}_{date}"
    Path(f"{base}.md").write_text(text)
    Path(f"{base}.json").write_text(json.dumps({"summary": summary_, "peers": plist, "ours": ours}, indent=1))
    print(f"wrote {base}.md and {base}.json")


def _load(half: dict[str, Any]) -> str:
    return f"{half['machine_start']['loadavg'][0]:.2f} -> {half['loadavg_end'][0]:.2f}"


# ---------------------------------------------------------------- an SD 1.5-shaped LCM folder


def cmd_sd15_folder(args: argparse.Namespace) -> None:
    """An SD 1.5-architecture LatentConsistencyModelPipeline with random weights (no hub here):
    CLIP ViT-L/14 text tower, the 860M UNet with time_cond_proj_dim 256 (LCM_Dreamshaper_v7's), the
    SD VAE (configs from benchmarks/real_components.py / optimizer/model_zoo.py), LCMScheduler with
    SD's betas, the project's offline CLIP BPE tokenizer at 77 tokens. Saved by the project venv
    (transformers 5: the text encoder without `text_model.`, as the demo's)."""
    import torch
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(HERE))
    from real_components import LCM_COND, TE, UNET, VAE

    from optimizer.demo.t2i.tokenizer import build_tokenizer

    out = Path(args.out)
    if (out / "model_index.json").exists():
        print(f"{out}: already built")
        return
    torch.manual_seed(args.seed)
    words = f"{SD15_PROMPT} {' '.join(QUALITY_PROMPTS)}".replace(",", " ").split()
    tok = build_tokenizer(words, max_length=77)
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    te = CLIPTextModel(CLIPTextConfig(**TE["full"], **{f"{k}_token_id": v for k, v in ids.items()})).eval()
    unet = UNet2DConditionModel(**UNET["full"], time_cond_proj_dim=LCM_COND["full"]).eval()
    vae = AutoencoderKL(**VAE["full"]).eval()
    sched = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="leading",
        original_inference_steps=50,
    )
    pipe = LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    print(f"wrote {out}")


# ---------------------------------------------------------------- cli


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("peers", help="time the peers (run with the peers venv's python)")
    p.add_argument("--folder", required=True, help="a diffusers text-to-image pipeline folder")
    p.add_argument("--work", required=True, help="export cache (not re-exported when present)")
    p.add_argument("--json", required=True)
    p.add_argument("--name", help="default: the folder's name")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--size", type=int, help="square size in px (default: unet sample_size x VAE factor)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality-prompts", type=int, default=len(QUALITY_PROMPTS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--gap", type=float, default=0.1, help="untimed sleep before each call, s")
    p.add_argument("--export-only", action="store_true", help="fill --work's export cache, time nothing")
    p.add_argument("--only", help="comma-separated peer names (diffusers torch always runs)")
    o = sub.add_parser("ours", help="time dd-compile's output (run with the project venv's python)")
    o.add_argument("--out", action="append", required=True, help="a dd-compile output folder (repeatable)")
    o.add_argument("--peers-json", required=True)
    o.add_argument("--json", required=True)
    o.add_argument("--backends", default="onnxruntime,openvino")
    o.add_argument("--rounds", type=int, default=7)
    o.add_argument("--gap", type=float, default=0.1, help="untimed sleep before each call, s")
    m = sub.add_parser("merge", help="one Markdown table; writes benchmarks/results/peers_<name>_<date>.*")
    m.add_argument("--peers-json", action="append", required=True, help="repeatable (a split run)")
    m.add_argument("--ours-json")
    m.add_argument("--name", required=True)
    b = sub.add_parser("sd15-folder", help="build the SD 1.5-shaped random LCM folder (project venv)")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd in ("peers", "ours") and args.rounds < 5:
        ap.error("--rounds: at least 5")
    gc.collect()
    cmds = {"peers": cmd_peers, "ours": cmd_ours, "merge": cmd_merge, "sd15-folder": cmd_sd15_folder}
    cmds[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
