"""Real-size component configs of every family with random weights: export, fp32/fp16 call parity,
CPU timing and peak memory per component (torch eager fp32 vs ONNX Runtime fp32 vs ORT fp16, one
process).

    python benchmarks/real_components.py --components te,vae      # SD 1.5's (the default: all SD 1.5)
    python benchmarks/real_components.py --components sdxl_te2,sdxl_vae,t5xxl,sd35m_transformer
    python benchmarks/real_components.py --scale tiny             # scaled-down configs, a quick check

Components (configs as in the published model folders, weights from torch.manual_seed, no hub):
- SD 1.5 (runwayml/stable-diffusion-v1-5): `te` CLIP ViT-L/14 text encoder (CLIPTextModel, 123M),
  `unet` UNet2DConditionModel (860M) at batch 2 (CFG), `lcm_unet` the same UNet with
  time_cond_proj_dim=256 fed timestep_cond at batch 1, `vae` the AutoencoderKL decoder from
  64x64x4 latents to 512x512.
- SDXL (stabilityai/stable-diffusion-xl-base-1.0): `sdxl_te2` the OpenCLIP bigG text encoder
  (CLIPTextModelWithProjection, 695M; penultimate states + pooled projection), `sdxl_vae` the
  decoder from 128x128x4 latents to 1024x1024 (SD 1.5's own text encoder is SDXL's first).
- SD3.5 medium (stabilityai/stable-diffusion-3.5-medium): `sd35m_transformer` the MMDiT at its
  real widths and 1024 px, CFG batch 2, 2 of its 24 layers (the first a dual-attention layer, the
  last context_pre_only as in the full model); `t5xxl` the T5-XXL encoder (SD3's and Flux's
  text_encoder_3 / _2) at its real widths, 256 tokens, 2 of its 24 layers.
- FLUX.1-dev: `flux_transformer` at its real widths, 512 px (1024 + 512 tokens), batch 1 with
  the guidance input, 1 of 19 double-stream and 1 of 38 single-stream blocks.
The reduced-depth rows are per-layer figures at real widths and sequence lengths; what the whole
model would need (published parameter counts x 4 bytes) is in each row's `full_model`: T5-XXL's
encoder (4.76B, 19 GB fp32) and Flux's transformer (11.9B, 48 GB) cannot be held here with an
export beside them; SD3.5 medium's (2.47B, 9.9 GB) could be held, but its export and ORT session
beside torch's copy would pass 24 GB.
Each is exported by the project's own path
(optimizer/t2i/export.py, IO specs from optimizer/t2i/components.py) and converted to fp16 by the
t2i compile flow's own call (optimizer/t2i/precision.quantize_component -> quantize_fp16) where the
fp32 graph fits one protobuf. Past 2 GB (the UNets) that pass cannot run: it serializes the whole
ModelProto for shape inference and exposes every intermediate (GBs per call at 64x64), so the
script converts those from the file instead (same converter, Sin/Cos phase islands kept fp32,
round-trip casts dropped) and says so in the JSON.

Parity: rel. L2 of each ORT graph's output vs the torch module on the same realistic inputs.
Timing: median of `--repeats` calls after a warm-up, the three runtimes one after the other (each
freed before the next: the UNet in fp32 is 3.4 GB), same threads. Full size runs each component in
a child process (memory freed between components; a kill or timeout is recorded, not hidden).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import logging
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InputError
from optimizer.model_zoo import SD15_UNET

log = logging.getLogger("real_components")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SD15 = ("te", "unet", "lcm_unet", "vae")
NAMES = (*SD15, "sdxl_te2", "sdxl_vae", "t5xxl", "sd35m_transformer", "flux_transformer")
KIND = {
    "te": "text_encoder",
    "unet": "unet",
    "lcm_unet": "unet",
    "vae": "vae_decoder",
    "sdxl_te2": "text_encoder_2",
    "sdxl_vae": "vae_decoder",
    "t5xxl": "text_encoder_3",
    "sd35m_transformer": "transformer",
    "flux_transformer": "transformer",
}
CONDITIONING = {"sdxl_te2": "sdxl", "t5xxl": "sd3", "sd35m_transformer": "sd3", "flux_transformer": "flux"}
LABEL = {
    "te": "CLIP ViT-L/14 text encoder",
    "unet": "UNet 860M (CFG batch 2)",
    "lcm_unet": "LCM UNet (time_cond_proj_dim 256, batch 1)",
    "vae": "VAE decoder 64x64x4 -> 512x512",
    "sdxl_te2": "SDXL text encoder 2 (OpenCLIP bigG, batch 2)",
    "sdxl_vae": "SDXL VAE decoder 128x128x4 -> 1024x1024",
    "t5xxl": "T5-XXL encoder, 2 of 24 layers, 256 tokens (batch 2)",
    "sd35m_transformer": "SD3.5-medium MMDiT, 2 of 24 layers (CFG batch 2)",
    "flux_transformer": "FLUX.1-dev transformer, 1+1 of 19+38 blocks (batch 1)",
}
# the whole model's published parameter count, for the rows built at reduced depth
FULL_PARAMS = {"t5xxl": 4.762e9, "sd35m_transformer": 2.47e9, "flux_transformer": 11.9e9}
SCALES = ("full", "tiny")
FP16_METHODS = ("auto", "project", "file")
SEED = 0
VAE_SCALING = 0.18215  # SD 1.5's vae.config.scaling_factor: the decoder sees latents / 0.18215

# runwayml/stable-diffusion-v1-5 text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
TE = {
    "full": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        layer_norm_eps=1e-5,
    ),
    "tiny": dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
    ),
}
# unet/config.json of SD 1.5 (diffusers' defaults cover the rest: flip_sin_to_cos, freq_shift 0, ...)
UNET = {
    "full": dict(SD15_UNET),  # optimizer/model_zoo.py, shared with benchmarks/gpu_baselines.py
    # the same block kinds at two levels: torch.export's time goes with the op count, not the width
    "tiny": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
}
LCM_COND = {"full": 256, "tiny": 16}  # time_cond_proj_dim (SimianLuo/LCM_Dreamshaper_v7: 256)
VAE = {
    "full": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=VAE_SCALING,
    ),
    "tiny": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=VAE_SCALING,
    ),
}
LATENT = {"full": 64, "tiny": 16}  # latent side: 512 px / 8 (tiny VAE: factor 2 -> 32 px)
LATENT_OF = {
    "sdxl_vae": {"full": 128, "tiny": 16},
    "sd35m_transformer": {"full": 128, "tiny": 8},
    "flux_transformer": {"full": 64, "tiny": 16},
}
SDXL_VAE_SCALING = 0.13025
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json
TE2 = {
    "full": dict(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1280,
        layer_norm_eps=1e-5,
    ),
    "tiny": dict(TE["tiny"], hidden_act="gelu"),
}
SDXL_VAE = {
    "full": dict(VAE["full"], sample_size=1024, scaling_factor=SDXL_VAE_SCALING, force_upcast=True),
    "tiny": dict(VAE["tiny"], scaling_factor=SDXL_VAE_SCALING),
}
# google/t5-v1_1-xxl (SD3's text_encoder_3, Flux's text_encoder_2), at `num_layers` of 24
T5 = {
    "full": dict(
        vocab_size=32128,
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=2,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
    ),
    "tiny": dict(vocab_size=1000, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2),
}
T5_TOKENS = {"full": 256, "tiny": 16}  # SD3's max_sequence_length
# stabilityai/stable-diffusion-3.5-medium transformer/config.json, at `num_layers` of 24
SD35M = {
    "full": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    "tiny": dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
}
# black-forest-labs/FLUX.1-dev transformer/config.json, at 1 + 1 of its 19 + 38 blocks
FLUX = {
    "full": dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    "tiny": dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
}
FLUX_T5_TOKENS = {"full": 512, "tiny": 16}
# where the project's fp16 pass (every intermediate of a calibration call kept for its range check)
# would not fit in 24 GB at this size; these convert from the file instead (Sin/Cos kept fp32)
ACTIVATION_HEAVY = {
    "sdxl_vae": "the project's pass keeps every intermediate of a 1024 px decode for its range check "
    "(up to 0.5 GB a tensor, far past 24 GB in all; the 512 px SD 1.5 decode peaked at 18 GB)",
    "sd35m_transformer": "the project's pass keeps every intermediate of a call for its range check "
    "(attention scores alone 24 heads x 4429^2 x 4 B = 1.9 GB per image per layer)",
    "flux_transformer": "the project's pass keeps every intermediate of a call for its range check "
    "(attention scores 24 heads x 1536^2 x 4 B per block, and the 4x-wide MLPs)",
}


@dataclass(frozen=True)
class BenchConfig:
    components: tuple[str, ...] = NAMES
    scale: str = "full"
    repeats: int = 3  # timed calls per runtime (median)
    warmup: int = 1
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    fp16: str = "auto"  # auto: the project's pass where the fp32 graph fits a protobuf, else "file"
    calib_feeds: int = 1  # fp16 calibration feeds (the project's pass runs each with intermediates)
    isolate: bool = False  # one child process per component
    timeout_s: float = 900.0  # per component, with isolate
    work_dir: Path | None = None  # keep the graphs here (default: a temp folder, removed)
    latent: int | None = None  # the latent side for the UNet / transformer / VAE rows (default: theirs)

    def __post_init__(self) -> None:
        bad = [c for c in self.components if c not in NAMES]
        if bad or not self.components:
            raise InputError(f"--components: {','.join(bad) or '(empty)'} not in {','.join(NAMES)}")
        if self.scale not in SCALES:
            raise InputError(f"--scale: {self.scale!r} not in {','.join(SCALES)}")
        if self.fp16 not in FP16_METHODS:
            raise InputError(f"--fp16: {self.fp16!r} not in {','.join(FP16_METHODS)}")
        for name, v in (
            ("--repeats", self.repeats),
            ("--threads", self.threads),
            ("--calib", self.calib_feeds),
        ):
            if v < 1:
                raise InputError(f"{name}: must be >= 1 (got {v})")


# -- machine ---------------------------------------------------------------------------------
def machine(threads: int) -> dict[str, Any]:
    from optimizer.bench.fingerprint import fingerprint

    fp = fingerprint(threads)
    return {
        "cpu": fp["cpu"]["model"],
        "usable_cores": fp["cpu"]["usable_cores"],
        "threads": threads,
        "isa": fp["cpu"]["isa"],
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "libraries": fp["libraries"],
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def label(name: str, scale: str, side: int | None = None) -> str:
    """The row's name; the transformers' with their image size (--latent changes it)."""
    if scale != "full":
        return f"{name} ({scale} config)"
    if name in ("sd35m_transformer", "flux_transformer"):
        return f"{LABEL[name]}, {8 * (side or latent(name, scale))} px"
    return LABEL[name] if side is None else f"{LABEL[name]}, latents {side}x{side} (--latent)"


# -- models and inputs -------------------------------------------------------------------------
def build(name: str, scale: str) -> Any:
    """The component's torch module with random weights (torch.manual_seed(SEED))."""
    import torch

    torch.manual_seed(SEED)
    if name == "te":
        from transformers import CLIPTextConfig, CLIPTextModel

        v = TE[scale]["vocab_size"]  # CLIP: <|startoftext|> = vocab - 2, <|endoftext|> = vocab - 1 (pad)
        cfg = CLIPTextConfig(**TE[scale], bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1)
        return CLIPTextModel(cfg).eval()
    if name == "sdxl_te2":
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        v = TE2[scale]["vocab_size"]
        cfg = CLIPTextConfig(**TE2[scale], bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1)
        return CLIPTextModelWithProjection(cfg).eval()
    if name == "t5xxl":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**T5[scale])).eval()
    if name in ("unet", "lcm_unet"):
        from diffusers import UNet2DConditionModel

        extra = {"time_cond_proj_dim": LCM_COND[scale]} if name == "lcm_unet" else {}
        return UNet2DConditionModel(**UNET[scale], **extra).eval()
    if name == "sd35m_transformer":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(**SD35M[scale]).eval()
    if name == "flux_transformer":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(**FLUX[scale]).eval()
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(SDXL_VAE if name == "sdxl_vae" else VAE)[scale]).eval()


def model_config(name: str, module: Any) -> dict[str, Any]:
    cfg = module.config.to_dict() if name in ("te", "sdxl_te2", "t5xxl") else dict(module.config)
    return json.loads(json.dumps(cfg, default=list))  # tuples -> lists, FrozenDict -> dict


def io_spec(name: str, config: dict[str, Any], scale: str, side: int | None = None) -> Any:
    """The component table's IO spec, at the profile the benchmark runs (SD 1.5: 64x64 latents)."""
    from engines.iospec import DimRange
    from optimizer.t2i.components import Profile, build_specs

    lat = side or latent(name, scale)
    t5 = (FLUX_T5_TOKENS if name == "flux_transformer" else T5_TOKENS)[scale]
    prof = Profile(latent_height=DimRange(lat, lat, lat), latent_width=DimRange(lat, lat, lat), t5_tokens=t5)
    guidance = {"unet": "cfg", "lcm_unet": "embedded", "sd35m_transformer": "cfg"}.get(name, "none")
    conditioning = CONDITIONING.get(name, "sd")
    return build_specs({KIND[name]: config}, prof, guidance, conditioning)[KIND[name]]


def latent(name: str, scale: str) -> int:
    return LATENT_OF.get(name, LATENT)[scale]


def inputs(
    name: str, config: dict[str, Any], scale: str, seed: int, side: int | None = None
) -> dict[str, np.ndarray]:
    """What the pipeline feeds each component: token ids of a prompt and of the empty prompt (CFG),
    the CFG pair of one latent at t=501, the LCM's first step (t=999, w=8.5 embedded), and the
    decoder's latents / scaling_factor."""
    rng = np.random.default_rng(seed)
    lat = side or latent(name, scale)
    if name == "t5xxl":  # a prompt + </s>, then <pad> (0), and the empty prompt's </s>
        n = T5_TOKENS[scale]
        k = min(20, n - 1)
        ids = np.zeros((2, n), dtype=np.int64)
        ids[0, :k] = rng.integers(2, int(config["vocab_size"]), size=k)
        ids[0, k] = ids[1, 0] = 1
        return {"input_ids": ids}
    if name == "sd35m_transformer":  # the CFG pair of one latent at sigma 0.5 (timestep sigma x 1000)
        x = rng.standard_normal((1, int(config["in_channels"]), lat, lat)).astype(np.float32)
        seq = 77 + T5_TOKENS[scale]
        return {
            "sample": np.concatenate([x, x]),
            "timestep": np.full((2,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, seq, int(config["joint_attention_dim"]))).astype(
                np.float32
            ),
            "pooled_projections": rng.standard_normal((2, int(config["pooled_projection_dim"]))).astype(
                np.float32
            ),
        }
    if name == "flux_transformer":  # FLUX.1-dev's first step: one pass, guidance 3.5 embedded
        c = int(config["in_channels"]) // 4
        return {
            "sample": rng.standard_normal((1, c, lat, lat)).astype(np.float32),
            "timestep": np.full((1,), 1000.0, np.float32),
            "encoder_hidden_states": rng.standard_normal(
                (1, FLUX_T5_TOKENS[scale], int(config["joint_attention_dim"]))
            ).astype(np.float32),
            "pooled_projections": rng.standard_normal((1, int(config["pooled_projection_dim"]))).astype(
                np.float32
            ),
            "guidance": np.full((1,), 3.5, np.float32),
        }
    if name in ("te", "sdxl_te2"):
        v, n = int(config["vocab_size"]), int(config["max_position_embeddings"])
        ids = np.full((2, n), v - 1, dtype=np.int64)  # padded with <|endoftext|>, as SD's tokenizer
        ids[:, 0] = v - 2
        ids[0, 1:13] = rng.integers(0, v - 2, size=12)  # a 12-token prompt, then <|endoftext|>
        return {"input_ids": ids}
    if name == "unet":
        x = rng.standard_normal((1, 4, lat, lat)).astype(np.float32)
        return {
            "sample": np.concatenate([x, x]),  # diffusers: torch.cat([latents] * 2)
            "timestep": np.full((2,), 501.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, config["cross_attention_dim"])).astype(
                np.float32
            ),
        }
    if name == "lcm_unet":
        from engines.t2i import guidance_scale_embedding

        return {
            "sample": rng.standard_normal((1, 4, lat, lat)).astype(np.float32),
            "timestep": np.full((1,), 999.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, config["cross_attention_dim"])).astype(
                np.float32
            ),
            # LatentConsistencyModelPipeline embeds w - 1 at guidance_scale 8.5
            "timestep_cond": guidance_scale_embedding(
                np.full((1,), 7.5, np.float32), int(config["time_cond_proj_dim"])
            ),
        }
    z = rng.standard_normal((1, int(config["latent_channels"]), lat, lat)).astype(np.float32)
    return {"latent_sample": z / np.float32(config.get("scaling_factor", VAE_SCALING))}


# -- fp16 ----------------------------------------------------------------------------------------
def external_data(path: Path) -> Path | None:
    d = path.with_name(path.name + ".data")
    return d if d.exists() else None


def fp16_project(name: str, fp32: Path, out: Path, calib: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """The t2i compile flow's own fp16 step (measured FP32 islands, verified on `calib`)."""
    from optimizer.bars import ParityBars
    from optimizer.t2i.precision import quantize_component

    g = quantize_component(KIND[name], "fp16", fp32, out, calib, ParityBars())
    return {
        "method": "project: optimizer/t2i/precision.quantize_component -> quantize_fp16",
        "passed_calibration_target": g.info.get("passed"),
        "why": g.why,
        "fp32_nodes": g.info.get("counts", {}).get("fp32"),
        "fp16_nodes": g.info.get("counts", {}).get("fp16"),
        "calib_rel_l2": g.info.get("call_rel_l2"),
    }


def _phase_nodes(model: Any) -> list[str]:
    """Sin/Cos and every node upstream of them: the timestep embedding, whose fp16 phase error at
    t ~ 1000 is what quantize_fp16's phase islands keep in FP32 (here found from the graph alone)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep: dict[str, Any] = {}
    todo = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    while todo:
        n = todo.pop()
        if n.name in keep:
            continue
        keep[n.name] = n
        todo += [producer[i] for i in n.input if i in producer]
    return sorted(keep)


def fp16_file(fp32: Path, out: Path, reason: str) -> dict[str, Any]:
    """fp16 from the graph file, for graphs past protobuf's 2 GB: the same converter and clean-up
    as quantize_fp16 (onnxruntime.transformers.float16 with keep_io_types; round-trip casts
    dropped), shape inference from the path, weights written as `<name>.data`. No measured
    islands: that needs every intermediate of a call in memory."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from optimizer.quantize.fp16 import _drop_roundtrip_casts
    from optimizer.quantize.onnx_graph import toposort

    block = _phase_nodes(onnx.load(str(fp32), load_external_data=False))
    m16 = convert_float_to_float16(str(fp32), keep_io_types=True, node_block_list=block)
    dropped = _drop_roundtrip_casts(m16)
    toposort(m16)
    # save under the final names in a temp folder beside `out`, check, then move data, then graph
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as d:
        tmp = Path(d) / out.name
        onnx.save(m16, str(tmp), save_as_external_data=True, location=out.name + ".data")
        del m16
        gc.collect()
        onnx.checker.check_model(str(tmp))
        os.replace(tmp.with_name(out.name + ".data"), out.with_name(out.name + ".data"))
        os.replace(tmp, out)
    return {
        "method": "file: onnxruntime.transformers.float16 on the graph file",
        "why": reason,
        "fp32_nodes": len(block),
        "roundtrip_casts_dropped": dropped,
    }


# -- one component -----------------------------------------------------------------------------
def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    from engines.onnxruntime_runner import session_options

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def _timed(fn: Any, cfg: BenchConfig) -> dict[str, Any]:
    from optimizer.timing import time_interleaved

    t = time_interleaved(
        {"x": fn}, warmup=cfg.warmup, repeats=cfg.repeats, min_repeats=cfg.repeats, max_seconds=1e9
    )["x"]
    return t.to_dict()


def _bytes(path: Path) -> int:
    d = external_data(path)
    return path.stat().st_size + (d.stat().st_size if d else 0)


def run_component(name: str, cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """Build, export, convert, then parity and timing of torch / ORT fp32 / ORT fp16."""
    import torch

    from optimizer.metrics import max_abs, rel_l2
    from optimizer.t2i.components import wrap
    from optimizer.t2i.export import export_component

    torch.set_num_threads(cfg.threads)
    res: dict[str, Any] = {
        "label": label(name, cfg.scale, cfg.latent),
        "kind": KIND[name],
        "status": "running",
    }
    phases: dict[str, float] = {}
    rss: dict[str, float] = {}

    def mark(phase: str, t0: float) -> None:
        phases[phase] = round(time.perf_counter() - t0, 2)
        rss[phase] = round(peak_rss_gb(), 2)
        log.info("%s: %s %.1f s (peak RSS %.2f GB)", name, phase, phases[phase], rss[phase])

    t0 = time.perf_counter()
    module = build(name, cfg.scale)
    config = model_config(name, module)
    spec = io_spec(name, config, cfg.scale, cfg.latent)
    res["params"] = int(sum(p.numel() for p in module.parameters()))
    if name in FULL_PARAMS and cfg.scale == "full":
        n = FULL_PARAMS[name]
        res["full_model"] = {"params": n, "fp32_gb": round(n * 4 / 1e9, 1), "built_here": False}
    # what the exported graph holds (the VAE's encoder and the TE's pooler head are not in it)
    mark("build", t0)
    t0 = time.perf_counter()
    fp32 = work / f"{name}.fp32.onnx"
    vocab = int(config.get("vocab_size", 2))
    export_component(KIND[name], module, spec, config, fp32, vocab_size=vocab)
    mark("export", t0)
    res["onnx_fp32"] = {"bytes": _bytes(fp32), "external_data": external_data(fp32) is not None}

    feeds = inputs(name, config, cfg.scale, SEED, cfg.latent)
    res["inputs"] = {k: list(v.shape) for k, v in feeds.items()}
    t0 = time.perf_counter()
    wrapped = wrap(KIND[name], module, spec)
    tfeeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        out = wrapped(**tfeeds)
        refs = [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
        timing = {"torch_fp32": _timed(lambda w=wrapped, f=tfeeds: w(**f), cfg)}
    mark("torch", t0)
    del wrapped, module, tfeeds
    gc.collect()

    t0 = time.perf_counter()
    fp16 = work / f"{name}.fp16.onnx"
    method = cfg.fp16
    big = cfg.scale == "full" and name in ACTIVATION_HEAVY
    if method == "auto":
        method = "file" if external_data(fp32) or big else "project"
    if method == "project":
        calib = [inputs(name, config, cfg.scale, SEED + 1 + i, cfg.latent) for i in range(cfg.calib_feeds)]
        res["fp16"] = fp16_project(name, fp32, fp16, calib)
    else:
        why = (
            "asked (--fp16 file)"
            if cfg.fp16 == "file"
            else ACTIVATION_HEAVY[name]
            if big and not external_data(fp32)
            else "fp32 graph > 2 GB: quantize_fp16 serializes one in-memory ModelProto (shape "
            "inference, intermediate runs), which protobuf refuses past 2 GB, and its range check "
            "holds every intermediate of a call in memory"
        )
        res["fp16"] = fp16_file(fp32, fp16, why)
    gc.collect()
    mark("fp16", t0)
    res["onnx_fp16"] = {"bytes": _bytes(fp16), "external_data": external_data(fp16) is not None}

    parity: dict[str, Any] = {}
    names = spec.output_names  # SDXL's encoder 2: penultimate states and the pooled projection
    for prec, path in (("fp32", fp32), ("fp16", fp16)):
        t0 = time.perf_counter()
        sess = _ort_session(path, cfg.threads)
        got = [g.astype(np.float32) for g in sess.run(names, feeds)]
        parity[f"ort_{prec}"] = {  # the worst output's figures
            "rel_l2": max(rel_l2(g, r) for g, r in zip(got, refs, strict=True)),
            "max_abs": max(max_abs(g, r) for g, r in zip(got, refs, strict=True)),
            "finite": all(bool(np.isfinite(g).all()) for g in got),
            "outputs": list(names),
        }
        timing[f"ort_{prec}"] = _timed(lambda s=sess: s.run(names, feeds), cfg)
        del sess, got
        gc.collect()
        mark(f"ort_{prec}", t0)
    res["parity_vs_torch"] = parity
    res["timing_ms"] = timing
    med = {k: v["median_ms"] for k, v in timing.items()}
    res["speedup_vs_torch"] = {k: med["torch_fp32"] / med[k] for k in ("ort_fp32", "ort_fp16")}
    res["fp16_vs_ort_fp32"] = med["ort_fp32"] / med["ort_fp16"]
    res["phases_s"], res["peak_rss_gb"] = phases, rss
    res["status"] = "ok"
    return res


# -- driver ------------------------------------------------------------------------------------
def run_isolated(name: str, cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """The component in a child process: its memory is freed at exit, an OOM kill or a timeout
    becomes a recorded failure instead of ending the whole run."""
    out = work / f"{name}.result.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--components",
        name,
        "--scale",
        cfg.scale,
        "--repeats",
        str(cfg.repeats),
        "--warmup",
        str(cfg.warmup),
        "--threads",
        str(cfg.threads),
        "--fp16",
        cfg.fp16,
        "--calib",
        str(cfg.calib_feeds),
        "--no-isolate",
        "--work-dir",
        str(work / name),
        *(["--latent", str(cfg.latent)] if cfg.latent else []),
        "--json",
        str(out),
    ]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = child.wait(timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's own process group
        child.wait()
        return {
            "label": label(name, cfg.scale, cfg.latent),
            "status": "failed",
            "reason": f"not done within the {cfg.timeout_s:.0f} s budget (killed)",
        }
    if rc == 0 and out.exists():
        return json.loads(out.read_text())["components"][name]
    why = "killed by SIGKILL (out of memory?)" if rc == -signal.SIGKILL else f"exit code {rc}"
    return {
        "label": label(name, cfg.scale, cfg.latent),
        "status": "failed",
        "reason": f"{why} after {time.perf_counter() - t0:.0f} s",
    }


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Every asked component; failures are recorded per component with their reason."""
    report: dict[str, Any] = {
        "what": "real-size component configs, random weights: export, call parity vs torch, CPU timing",
        "scale": cfg.scale,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": machine(cfg.threads),
        "load_avg_start": list(os.getloadavg()),
        "components": {},
    }
    keep = cfg.work_dir is not None
    work = Path(cfg.work_dir) if keep else Path(tempfile.mkdtemp(prefix="real_components."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in cfg.components:
            if cfg.isolate:
                res = run_isolated(name, cfg, work)
                if not keep:  # the UNet's graphs alone are 5 GB
                    shutil.rmtree(work / name, ignore_errors=True)
            else:
                cwork = work / name
                cwork.mkdir(parents=True, exist_ok=True)
                res = run_component(name, cfg, cwork)
                if not keep:
                    shutil.rmtree(cwork, ignore_errors=True)
            report["components"][name] = res
            gc.collect()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["load_avg_end"] = list(os.getloadavg())
    return report


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    isa = ", ".join(f for f, on in m["isa"].items() if on) or "none"
    rows = [
        f"Machine: {m['cpu']}, {m['threads']} thread(s) of {m['usable_cores']} cores, "
        f"{m['mem_gb']} GB; ISA: {isa}. Scale: {report['scale']}.",
        "",
        "| component | params | ONNX fp32 / fp16 | rel. L2 ORT fp32 | rel. L2 ORT fp16 | torch fp32 ms "
        "| ORT fp32 ms | ORT fp16 ms | ORT fp32 vs torch | ORT fp16 vs torch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["components"].values():
        if r.get("status") != "ok":
            rows.append(f"| {r['label']} | {r.get('reason', r.get('status'))} |||||||||")
            continue
        p, t, s = r["parity_vs_torch"], r["timing_ms"], r["speedup_vs_torch"]
        ext = " (external data)" if r["onnx_fp32"]["external_data"] else ""
        rows.append(
            f"| {r['label']} | {r['params'] / 1e6:.1f}M | {_gb(r['onnx_fp32']['bytes'])}{ext} / "
            f"{_gb(r['onnx_fp16']['bytes'])} | {p['ort_fp32']['rel_l2']:.1e} | {p['ort_fp16']['rel_l2']:.1e} "
            f"| {t['torch_fp32']['median_ms']:.0f} | {t['ort_fp32']['median_ms']:.0f} "
            f"| {t['ort_fp16']['median_ms']:.0f} | {s['ort_fp32']:.2f}x | {s['ort_fp16']:.2f}x |"
        )
    return "\n".join(rows)


def write_json(path: Path, report: dict[str, Any]) -> None:
    from engines.fileio import write_json_atomic

    write_json_atomic(path, report)


def parse(argv: list[str] | None = None) -> tuple[BenchConfig, Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--components", default=",".join(SD15), help=f"comma list of {','.join(NAMES)} (default: SD 1.5's)"
    )
    ap.add_argument("--scale", default="full", help="full (SD 1.5 configs) or tiny (a quick check)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--fp16", default="auto", help="auto | project | file (see the module docstring)")
    ap.add_argument("--calib", type=int, default=1, help="fp16 calibration feeds (project pass)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one child process per component (default: on at full scale)")  # fmt: skip
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per component, with --isolate")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the graphs here")
    ap.add_argument("--latent", type=int, default=None, help="latent side for the denoiser / VAE rows")
    ap.add_argument(
        "--json", type=Path, default=None, help="default: benchmarks/results/real_components[_tiny].json"
    )
    a = ap.parse_args(argv)
    cfg = BenchConfig(
        components=tuple(c.strip() for c in a.components.split(",") if c.strip()),
        scale=a.scale,
        repeats=a.repeats,
        warmup=a.warmup,
        threads=a.threads,
        fp16=a.fp16,
        calib_feeds=a.calib,
        isolate=a.scale == "full" if a.isolate is None else a.isolate,
        timeout_s=a.timeout_s,
        work_dir=a.work_dir,
        latent=a.latent,
    )
    default = RESULTS / ("real_components.json" if a.scale == "full" else "real_components_tiny.json")
    return cfg, a.json or default


def main(argv: list[str] | None = None) -> int:
    from engines.cli_errors import describe

    # INFO for ours only: the exporter's passes log a line per rewrite and folded initializer
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("real_components", "optimizer"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        cfg, json_path = parse(argv)
        report = run(cfg)
    except InputError as e:
        code, line = describe("real_components", e)
        sys.stderr.write(line + "\n")
        return code
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    write_json(json_path, report)
    log.info("results: %s\n%s", json_path, markdown(report))
    return 0 if all(r.get("status") == "ok" for r in report["components"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
