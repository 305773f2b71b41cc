"""Pipelines no test builds: SDXL, SD3 and FLUX.1-dev folders in the shapes of diffusers' own fast
tests (its `get_dummy_components`, not tests/t2i_tiny.py's), compiled by `dd-compile` and judged
against diffusers from the same seeds.

    python benchmarks/heldout_families.py                     # all three (a few minutes)
    python benchmarks/heldout_families.py --families flux     # one

What differs from the suite's fixtures, so the family code meets shapes it was not written
against: SDXL's UNet with linear projections, 2 transformer layers in its second block, one norm
group and an 80-wide text_time embedding, a 128-sample VAE, EulerDiscrete with "leading" spacing;
SD3's transformer with patch size 1 on 4 latent channels, a one-block VAE (scale factor 1), static
shift 1; Flux's VAE with ONE latent channel (4 packed), the default FlowMatch scheduler (no dynamic
shifting: static shift 1) and T5 at 48 tokens (`--max-sequence-length 48`). Tokenizers are the
offline ones (no hub). Weights from torch.manual_seed(0).

Per family: `dd-compile FOLDER` in a child process (its exit code and every mix's checks, as a user
runs it), then the published fp32 pipeline (engines.load) from seeds against diffusers' pipeline
with torch.Generator(seed) at the same steps and guidance: PSNR on uint8 images (bar 40 dB, the
t2i fp32 sample bar). Results: benchmarks/results/heldout_families.json and a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.t2i_tiny's offline tokenizers

log = logging.getLogger("heldout_families")
FAMILIES = ("sdxl", "sd3", "flux")
PROMPTS = ["A painting of a squirrel eating a burger", "a red seven"]
SEEDS = [0, 2**33 + 5]
MIN_PSNR_DB = 40.0
# (dd-compile options, diffusers call options): sizes the folders' configs imply
RUN = {
    "sdxl": (["--size", "64x64"], {"num_inference_steps": 4, "guidance_scale": 5.0}),
    "sd3": (["--size", "32x32"], {"num_inference_steps": 4, "guidance_scale": 5.0}),
    "flux": (
        ["--size", "16x16", "--max-sequence-length", "48"],
        {
            "num_inference_steps": 4,
            "guidance_scale": 3.5,
            "height": 16,
            "width": 16,
            "max_sequence_length": 48,
        },
    ),
}


def _clip_config(tok: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tok),
        hidden_act="gelu",
        projection_dim=32,
    )


def _one_block_vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def make_sdxl(path: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tests.t2i_tiny import clip_tokenizer

    tok = clip_tokenizer(path.parent / "vocab")
    tok2 = clip_tokenizer(path.parent / "vocab2", pad_token="!")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 x 8 time ids + 32 pooled
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    torch.manual_seed(0)
    text = CLIPTextModel(_clip_config(tok))
    text_2 = CLIPTextModelWithProjection(_clip_config(tok2))
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
    ).save_pretrained(path, safe_serialization=True)


def make_sd3(path: Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from tests.t2i_tiny import clip_tokenizer, t5_tokenizer, tiny_t5_encoder

    tok = clip_tokenizer(path.parent / "vocab")
    tok2 = clip_tokenizer(path.parent / "vocab2")
    tok3 = t5_tokenizer(path.parent / "t5")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=48,  # the offline T5's width (diffusers' tiny-random-t5: 32)
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(0)
    text = CLIPTextModelWithProjection(_clip_config(tok))
    torch.manual_seed(0)
    text_2 = CLIPTextModelWithProjection(_clip_config(tok2))
    torch.manual_seed(0)
    text_3 = tiny_t5_encoder(tok3)
    torch.manual_seed(0)
    StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text,
        text_encoder_2=text_2,
        text_encoder_3=text_3,
        tokenizer=tok,
        tokenizer_2=tok2,
        tokenizer_3=tok3,
        transformer=transformer,
        vae=_one_block_vae(4),
    ).save_pretrained(path, safe_serialization=True)


def make_flux(path: Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from tests.t2i_tiny import clip_tokenizer, t5_tokenizer, tiny_t5_encoder

    tok = clip_tokenizer(path.parent / "vocab")
    tok2 = t5_tokenizer(path.parent / "t5")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # the offline T5's width
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,  # FLUX.1-dev
    )
    torch.manual_seed(0)
    text = CLIPTextModel(_clip_config(tok))
    torch.manual_seed(0)
    text_2 = tiny_t5_encoder(tok2)
    torch.manual_seed(0)
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tok,
        tokenizer_2=tok2,
        transformer=transformer,
        vae=_one_block_vae(1),
    ).save_pretrained(path, safe_serialization=True)


MAKE = {"sdxl": make_sdxl, "sd3": make_sd3, "flux": make_flux}


def compile_folder(family: str, src: Path, out: Path) -> dict[str, Any]:
    """`dd-compile` as a user runs it; its exit code and each mix's verdict."""
    cmd = [sys.executable, "-m", "optimizer.cli", str(src), "-o", str(out), *RUN[family][0]]
    cmd += ["--steps", str(RUN[family][1]["num_inference_steps"]), "--samples", "4", "--fid-samples", "8"]
    cmd += ["--bench-seconds", "1", "--batch-sizes", "1", "--threads-grid", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    res: dict[str, Any] = {
        "command": " ".join(["dd-compile", *cmd[3:]]),
        "exit_code": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if not (out / "report.json").exists():
        res["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return res
    rep = json.loads((out / "report.json").read_text())
    res["family"] = rep.get("family")
    res["mixes"] = {
        v["mix"]: {
            "passed": v["passed"],
            "sample_psnr_db": v.get("sample_parity", {}).get("psnr_db"),
            "precisions": {k: c["precision"] for k, c in v["components"].items()},
        }
        for v in rep["variants"]
    }
    return res


def against_diffusers(family: str, src: Path, out: Path) -> dict[str, Any]:
    """The published fp32 pipeline from SEEDS vs diffusers' from torch.Generator(seed)."""
    import torch

    import engines
    from optimizer.metrics import psnr_db
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    call = dict(RUN[family][1])
    pipe = diffusers_pipeline(load_pipeline(src))
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    want = pipe(PROMPTS, generator=gens, output_type="np", **call).images
    want = (want * 255).round().astype(np.uint8)
    call.pop("max_sequence_length", None)  # a build knob of the runtime, not a call option
    with engines.load(out, precision="fp32") as ep:
        got = ep(PROMPTS, seeds=SEEDS, **call)
    # over the whole batch (one figure; a per-image mean is inf as soon as one image is identical)
    psnr = psnr_db(got.reshape(1, -1).astype(np.float64), want.reshape(1, -1).astype(np.float64), 255.0)
    return {
        "shape": list(got.shape),
        "psnr_db": psnr,
        "max_diff_levels": int(np.abs(got.astype(int) - want).max()),
        "passed": bool(psnr >= MIN_PSNR_DB),
    }


def run(families: tuple[str, ...], work: Path) -> dict[str, Any]:
    from optimizer.bench.fingerprint import fingerprint

    fp = fingerprint(2)
    report: dict[str, Any] = {
        "what": "held-out pipelines (diffusers' fast-test shapes): dd-compile, fp32 runtime vs diffusers",
        "machine": {"cpu": fp["cpu"]["model"], "isa": fp["cpu"]["isa"], "libraries": fp["libraries"]},
        "families": {},
    }
    for family in families:
        log.info("%s: building the folder", family)
        src = work / family / "pipe"
        src.parent.mkdir(parents=True)
        MAKE[family](src)
        log.info("%s: dd-compile", family)
        res = compile_folder(family, src, work / family / "out")
        if res["exit_code"] == 0:
            log.info("%s: runtime vs diffusers from seeds", family)
            res["vs_diffusers"] = against_diffusers(family, src, work / family / "out")
        report["families"][family] = res
    return report


def _db(v: Any) -> str:
    return "identical" if v in ("inf", float("inf")) else f"{float(v):.1f} dB"


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| family | dd-compile exit | mixes (sample PSNR vs the fp32 graph) "
        "| fp32 runtime vs diffusers, from seeds |",
        "|---|---|---|---|",
    ]
    for fam, r in report["families"].items():
        mixes = ", ".join(
            f"{m} {'pass' if v['passed'] else 'FAIL'} ({_db(v['sample_psnr_db'])})"
            for m, v in r.get("mixes", {}).items()
        )
        vs = r.get("vs_diffusers")
        cmp_ = f"{vs['psnr_db']:.1f} dB, max {vs['max_diff_levels']} levels" if vs else "-"
        rows.append(f"| {fam} | {r['exit_code']} | {mixes or r.get('error')} | {cmp_} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {','.join(FAMILIES)}")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "heldout_families.json")
    a = ap.parse_args(argv)
    families = tuple(f.strip() for f in a.families.split(",") if f.strip())
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        sys.stderr.write(
            f"heldout_families: error: --families: {','.join(bad) or '(empty)'} not in {','.join(FAMILIES)}\n"
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="heldout.") as d:
        report = run(families, Path(d))
    from engines.fileio import write_json_atomic

    write_json_atomic(a.json, report)
    log.info("results: %s\n%s", a.json, markdown(report))
    ok = all(
        r["exit_code"] == 0 and r.get("vs_diffusers", {}).get("passed") for r in report["families"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
