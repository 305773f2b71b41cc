"""TensorRT for pipelines: one engine per component, profiles from each component's own IO spec.
The plumbing is tested everywhere; the build and the run need TensorRT and a GPU (marked)."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines.iospec import DimRange
from engines.trt_target import TrtTarget
from optimizer.compile.build import EngineResult, engine_path_for
from optimizer.compile.trt_profiles import TrtBuildConfig, profiles_from_spec
from optimizer.t2i.components import Profile, build_specs
from optimizer.t2i.trt_build import engine_artifact

H100 = TrtTarget("11.4.0.106", "NVIDIA H100 80GB HBM3", "9.0", "12.8")
CONFIGS = {
    "text_encoder": {"hidden_size": 32},
    "unet": {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 32},
    "vae_decoder": {"latent_channels": 4, "block_out_channels": [8, 8]},
}


def test_engines_are_named_by_component():
    assert engine_path_for(Path("r/engines"), "int8", H100, "unet") == Path(
        f"r/engines/unet.int8.{H100.key}.plan"
    )
    res = EngineResult(Path("r/engines/x.plan"), "int8", "ab" * 32, H100, [], [], 1.0, 10, TrtBuildConfig())
    kw = engine_artifact("unet", res)
    assert kw["name"] == f"engine/unet/int8/{H100.key}" and kw["kind"] == "engine"
    assert kw["backend"] == "tensorrt" and kw["extra"]["component"] == "unet"


def test_component_profiles_come_from_their_own_specs():
    """Under CFG the UNet's profile spans B..2B; the text encoder and the VAE stay at B; the
    latent range is the pipeline profile's (what --resolutions sets)."""
    prof = Profile(
        batch=DimRange(1, 1, 4), latent_height=DimRange(8, 16, 32), latent_width=DimRange(8, 16, 32)
    )
    specs = build_specs(CONFIGS, prof, "cfg")
    unet = profiles_from_spec(specs["unet"])[0]
    assert unet["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))
    te = profiles_from_spec(specs["text_encoder"])[0]
    assert te["input_ids"] == ((1, 77), (1, 77), (4, 77))
    vae = profiles_from_spec(specs["vae_decoder"])[0]
    assert vae["latent_sample"][2] == (4, 4, 32, 32)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.slow
def test_compile_tiny_pipeline_on_tensorrt(tmp_path):
    """dd-compile --backend tensorrt on a tiny pipeline: an engine per component graph, validated
    (call and sample parity), loadable with engines.load(backend="tensorrt")."""
    import engines
    from optimizer.cli import main
    from tests.t2i_tiny import make_tiny_pipeline

    src = make_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "out"
    args = [str(src), "--steps", "2", "-o", str(out), "--backend", "tensorrt", "--precision", "fp32,fp16"]
    res = CliRunner().invoke(main, [*args, "--bench-seconds", "0.5", "--samples", "4", "--fid-samples", "8"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    eng = {a["extra"]["component"] for a in m["artifacts"] if a["name"].startswith("engine/")}
    assert eng == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    rep = json.loads((out / "report.json").read_text())
    assert rep["backend"] == "tensorrt" and all(v["passed"] for v in rep["variants"])
    with engines.load(out, precision="fp16", backend="tensorrt") as pipe:
        img = pipe(["a red seven"], seeds=[0])
    assert img.dtype == np.uint8 and img.shape[0] == 1


def test_lora_inputs_get_a_rank_range_in_every_engine_profile(monkeypatch, tmp_path):
    """--lora-rank with --backend tensorrt: a slotted graph's engine profiles hold each LoRA input
    from rank 1 (no adapter: zeros, engines/lora.STATIC_IDLE_RANK) to the compiled max; graphs
    without inputs get none. The build itself needs TensorRT (the marked test above)."""
    from engines.lora import Slot, Slots, graph_zero_feeds, rank_profiles
    from optimizer.t2i import trt_build

    slots = Slots({"to_q": Slot("lora_A:to_q", "lora_B:to_q", 32, 64)}, max_rank=64)
    prof = rank_profiles(slots)
    assert prof["lora_A:to_q"] == ((32, 1), (32, 16), (32, 64))
    assert prof["lora_B:to_q"] == ((1, 64), (16, 64), (64, 64))
    assert rank_profiles(Slots(slots.layers, max_rank=4))["lora_A:to_q"][1] == (32, 4)
    seen = {}

    def fake_build(path, spec, out, cfg, *, precision, stem, extra_profiles):
        seen[(stem, precision)] = extra_profiles
        return "engine"

    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    specs = build_specs(CONFIGS, Profile(), "cfg")
    graphs = {("unet", "int8"): tmp_path / "u.onnx", ("vae_decoder", "fp16"): tmp_path / "v.onnx"}
    trt_build.build_component_engines(tmp_path, graphs, specs, TrtBuildConfig(), {("unet", "int8"): slots})
    assert seen[("unet", "int8")] == prof and seen[("vae_decoder", "fp16")] is None
    # the runner's feeds where no adapter is set: zeros at each profile's min shape
    zeros = graph_zero_feeds([(n, list(s[0]), np.float32) for n, s in prof.items()])
    assert zeros["lora_A:to_q"].shape == (32, 1) and not zeros["lora_B:to_q"].any()
