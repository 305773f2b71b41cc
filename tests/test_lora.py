"""LoRA at run time (engines/lora.py, optimizer/t2i/lora_slots.py): graphs with LoRA inputs take
diffusers / peft and kohya files with weights, with no re-export; they reproduce diffusers'
load_lora_weights + set_adapters, match a graph exported with the adapter merged into its weights,
and with no adapter give the base images bit for bit (after any swap: no refit residue)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engines.errors import InputError
from tests.test_img2img import psnr

PROMPTS = ["a red seven", "Green  SEVEN, green!"]
SEEDS = [5, 6]
STEPS = 4
RANK = 16


def _add_peft_adapter(module, name: str, targets: list[str], r: int, alpha: float, seed: int, **kw):
    """A peft LoRA on `module` with random (non-zero) factors, as a trained adapter would have."""
    import torch
    from peft import LoraConfig

    module.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if f"lora_B.{name}" in n or f"lora_A.{name}" in n:
                p.copy_(
                    torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in n else 1.0 / p.shape[-1] ** 0.5)
                )


def _save_adapter(pipe, folder, name: str, text: bool) -> None:
    """diffusers' save_lora_weights as its training scripts call it (peft state dict converted to
    diffusers names, the peft config as metadata)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kw = dict(
        unet_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.unet, adapter_name=name)
        ),
        unet_lora_adapter_metadata=pipe.unet.peft_config[name].to_dict(),
    )
    if text:
        te = pipe.text_encoder
        kw.update(
            text_encoder_lora_layers=convert_state_dict_to_diffusers(
                get_peft_model_state_dict(te, adapter_name=name)
            ),
            text_encoder_lora_adapter_metadata=te.peft_config[name].to_dict(),
        )
    type(pipe).save_lora_weights(folder, **kw)


@pytest.fixture(scope="module")
def lora_env(tmp_path_factory):
    """A tiny SD pipeline exported with LoRA inputs (UNet and text encoder, rank <= 16), two LoRA
    files made by peft and saved by diffusers (a: UNet attention, alpha 2r; b: UNet attention and
    feed-forward plus the text encoder, rank pattern and alpha pattern), and diffusers' pipeline."""
    import torch

    from engines.iospec import DimRange
    from optimizer.t2i.components import Profile
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.lora_stage import slot_graphs
    from optimizer.t2i.precision import Graph
    from optimizer.t2i.reference import diffusers_pipeline
    from tests.t2i_tiny import make_tiny_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    src = make_tiny_pipeline(root / "pipe")
    lat = DimRange(8, 8, 8)
    loaded = load_pipeline(src, profile=Profile(latent_height=lat, latent_width=lat))
    out = export_pipeline(loaded, root / "out")
    graphs = {(k, "fp32"): Graph(k, "fp32", out / f"onnx/{k}.fp32.onnx") for k in ("unet", "text_encoder")}
    shutil.copytree(out, root / "plain")  # the same export without LoRA inputs
    slots = slot_graphs(loaded, graphs, RANK)
    d = json.loads((out / "t2i.json").read_text())
    for (k, _), s in slots.items():
        d["components"][k]["lora"] = s.to_dict()
    (out / "t2i.json").write_text(json.dumps(d))
    # the reference: diffusers over its own copy of the modules, adapters through peft
    ref = diffusers_pipeline(load_pipeline(src, profile=Profile(latent_height=lat, latent_width=lat)))
    attn = ["to_q", "to_k", "to_v", "to_out.0"]
    _add_peft_adapter(ref.unet, "a", attn, r=4, alpha=8, seed=1)
    _add_peft_adapter(
        ref.unet, "b", [*attn, "ff.net.0.proj", "ff.net.2"], r=8, alpha=8, seed=2,
        rank_pattern={"to_k": 4}, alpha_pattern={"ff.net.2": 2},
    )  # fmt: skip
    _add_peft_adapter(ref.text_encoder, "b", ["q_proj", "v_proj", "fc1"], r=4, alpha=4, seed=3)
    files = {}
    for name, text in (("a", False), ("b", True)):
        files[name] = root / f"lora_{name}"
        _save_adapter(ref, files[name], name, text)
    ref.disable_lora()
    return {"out": out, "loaded": loaded, "ref": ref, "files": files, "root": root}


def _latents(shape=(2, 4, 8, 8)) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _ours(pipe, **kw) -> np.ndarray:
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, latents=_latents(), **kw)


def _diffusers(ref) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = ref(
            PROMPTS,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            latents=torch.from_numpy(_latents()),
            output_type="np",
        ).images
    return (out * 255).round().clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pipe(lora_env):
    from engines.t2i import TextToImagePipeline

    with TextToImagePipeline(lora_env["out"]) as p:
        yield p


def test_adapters_reproduce_diffusers_set_adapters(lora_env, pipe):
    """One adapter, then two with weights: the images diffusers makes with peft from the same files."""
    ref = lora_env["ref"]
    pipe.unload_lora_weights()
    base = _ours(pipe)
    ref.disable_lora()
    assert psnr(base, _diffusers(ref)) >= 40
    pipe.load_lora_weights(lora_env["files"]["a"], adapter_name="a")
    assert pipe.get_active_adapters() == ["a"]
    a = _ours(pipe)
    ref.enable_lora()
    ref.set_adapters(["a"], [1.0])
    assert psnr(a, _diffusers(ref)) >= 40
    assert psnr(a, base) < 30  # the adapter changes the images (the check above is not vacuous)
    pipe.load_lora_weights(lora_env["files"]["b"], adapter_name="b")
    pipe.set_adapters({"a": 0.8, "b": 0.4})
    ref.set_adapters(["a", "b"], [0.8, 0.4])
    both = _ours(pipe)
    assert psnr(both, _diffusers(ref)) >= 40
    te = pipe.runners["text_encoder"]
    feeds, te.extra_feeds = te.extra_feeds, {}  # b's text-encoder layers count in that match
    assert psnr(_ours(pipe), both) < 40
    te.extra_feeds = feeds
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.4])  # diffusers' call form: the same images
    assert np.array_equal(_ours(pipe), both)
    ref.disable_lora()


def test_swap_and_none_return_base_bit_for_bit(lora_env, pipe):
    pipe.unload_lora_weights()
    base = _ours(pipe)
    pipe.load_lora_weights(lora_env["files"]["a"], adapter_name="a")
    a = _ours(pipe)
    pipe.load_lora_weights(lora_env["files"]["b"], adapter_name="b")
    b = _ours(pipe)
    pipe.set_adapters({"a": 1.0})
    assert np.array_equal(_ours(pipe), a)
    pipe.set_adapters({})
    assert np.array_equal(_ours(pipe), base)
    pipe.set_adapters({"b": 1.0})
    assert np.array_equal(_ours(pipe), b)
    pipe.disable_lora()
    assert np.array_equal(_ours(pipe), base) and pipe.get_active_adapters() == []
    pipe.unload_lora_weights()


def test_slotted_graph_without_adapter_equals_the_plain_graph(lora_env):
    """The branch adds exact zeros and the base layers' nodes are untouched: the UNet with LoRA
    inputs and none fed equals the plain export bit for bit on ONNX Runtime."""
    from engines.iospec import IOSpec
    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from optimizer.t2i.components import dummy_inputs

    loaded, root = lora_env["loaded"], lora_env["root"]
    spec = loaded.spec.component("unet").io
    plain = root / "plain/onnx/unet.fp32.onnx"
    feeds = dummy_inputs(IOSpec.from_dict(spec.to_dict()), np.random.default_rng(1), "opt", 10)
    with (
        OnnxRuntimeRunner(plain, spec) as r0,
        OnnxRuntimeRunner(lora_env["out"] / "onnx/unet.fp32.onnx", spec) as r1,
    ):
        assert r1.lora_defaults and not r0.lora_defaults
        want, got = r0.infer(feeds)["out_sample"], r1.infer(feeds)["out_sample"]
    assert np.array_equal(want, got)


def test_lora_inputs_match_an_export_with_the_adapter_merged(lora_env, pipe):
    """Fused export (W + s B A in the weights) vs base graph + LoRA inputs: per call within 1e-5
    rel. L2 and the same uint8 images."""
    from engines.iospec import IOSpec
    from engines.lora import adapter_feeds, read_adapter
    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from engines.safetensors_io import write_safetensors
    from optimizer.metrics import rel_l2
    from optimizer.t2i.components import dummy_inputs
    from optimizer.t2i.export import export_component
    from optimizer.t2i.lora_stage import merged, synthetic_adapter

    loaded, root = lora_env["loaded"], lora_env["root"]
    slots = pipe.adapters.slots
    tensors = synthetic_adapter(loaded, slots, seed=7)
    write_safetensors(root / "synthetic.safetensors", tensors)
    fused = merged(loaded, tensors, ["unet"])
    spec = loaded.spec.component("unet").io
    path = export_component(
        "unet", fused.module("unet"), spec, loaded.spec.component("unet").config, root / "fused.onnx"
    )
    adapter = read_adapter(root / "synthetic.safetensors", "s", slots)
    rng = np.random.default_rng(2)
    with (
        OnnxRuntimeRunner(path, spec) as rf,
        OnnxRuntimeRunner(lora_env["out"] / "onnx/unet.fp32.onnx", spec) as rl,
    ):
        rl.extra_feeds = adapter_feeds("unet", slots["unet"], [(adapter, 1.0)])
        for _ in range(3):
            f = dummy_inputs(IOSpec.from_dict(spec.to_dict()), rng, "opt", 10)
            assert rel_l2(rl.infer(f)["out_sample"], rf.infer(f)["out_sample"]) <= 1e-5


def test_kohya_names_and_alphas_give_the_same_feeds(lora_env, pipe):
    """The peft file a, renamed as kohya's sd-scripts names it (lora_unet_..., lora_down / lora_up,
    .alpha = scale x rank): identical images."""
    from engines.safetensors_io import read_safetensors, write_safetensors

    tensors, _ = read_safetensors(lora_env["files"]["a"] / "pytorch_lora_weights.safetensors")
    kohya = {}
    for k, v in tensors.items():
        mod, _, part = k.removeprefix("unet.").rpartition(".lora.")
        base = "lora_unet_" + mod.replace(".", "_")
        kohya[f"{base}.{'lora_down' if part.startswith('down') else 'lora_up'}.weight"] = v
        kohya[f"{base}.alpha"] = np.array(8.0, np.float32)  # alpha 8 at rank 4: file a's scale 2
    path = lora_env["root"] / "kohya.safetensors"
    write_safetensors(path, kohya)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_env["files"]["a"], adapter_name="peft")
    want = _ours(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(path, adapter_name="kohya")
    assert np.array_equal(_ours(pipe), want)
    pipe.unload_lora_weights()


def test_bad_lora_files_and_calls_are_one_line(lora_env, pipe, tmp_path):
    from engines.safetensors_io import write_safetensors

    def refused(fn, *words):
        with pytest.raises(InputError) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    pipe.unload_lora_weights()
    bad = tmp_path / "conv.safetensors"  # a layer compiled without LoRA inputs (a resnet conv)
    write_safetensors(
        bad,
        {
            "unet.down_blocks.0.resnets.0.conv1.lora_A.weight": np.zeros((4, 16, 3, 3), np.float32),
            "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": np.zeros((16, 4, 1, 1), np.float32),
        },
    )
    refused(lambda: pipe.load_lora_weights(bad), "conv1", "no LoRA input")
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    write_safetensors(
        bad,
        {
            f"{name}.lora_A.weight": np.zeros((4, 15), np.float32),
            f"{name}.lora_B.weight": np.zeros((16, 4), np.float32),
        },
    )
    refused(lambda: pipe.load_lora_weights(bad), "do not fit", "16 -> 16")
    write_safetensors(
        bad,
        {
            f"{name}.lora_A.weight": np.zeros((RANK + 1, 16), np.float32),
            f"{name}.lora_B.weight": np.zeros((16, RANK + 1), np.float32),
        },
    )
    refused(lambda: pipe.load_lora_weights(bad), "rank 17", "--lora-rank")
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    refused(lambda: pipe.load_lora_weights(bad), str(bad), "not JSON")
    refused(lambda: pipe.load_lora_weights(tmp_path), "pytorch_lora_weights.safetensors")
    refused(lambda: pipe.set_adapters({"nope": 1.0}), "nope", "not loaded")
    pipe.load_lora_weights(lora_env["files"]["a"], adapter_name="a")
    refused(lambda: pipe.set_adapters({"a": float("nan")}), "finite")
    refused(lambda: pipe.set_adapters({"a": "0.5"}), "finite")
    refused(lambda: pipe.load_lora_weights(lora_env["files"]["a"], adapter_name="a"), "already loaded")
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []


def test_an_output_without_lora_inputs_refuses_adapters(lora_env):
    from engines.t2i import TextToImagePipeline

    with TextToImagePipeline(lora_env["root"] / "plain") as p, pytest.raises(InputError, match="--lora-rank"):
        p.load_lora_weights(lora_env["files"]["a"])


@pytest.mark.slow
def test_dd_compile_lora_rank_validates_the_adapter_path_per_mix(tmp_path):
    """dd-compile --lora-rank: every mix's graphs take adapters; the report holds the synthetic
    adapter's call parity per graph and image parity per mix, each at its precision's bar; the
    output loads with adapters, and what cannot feed LoRA inputs refuses it in one line."""
    from click.testing import CliRunner

    import engines
    from engines.layouts import command as layout_command
    from optimizer.cli import main
    from tests.t2i_tiny import make_tiny_pipeline

    src = make_tiny_pipeline(tmp_path / "sd")
    out = tmp_path / "out"
    common = "--steps 2 --threads 1 --bench-seconds 0.3 --samples 4 --fid-samples 4".split()
    res = CliRunner().invoke(
        main,
        [str(src), "-o", str(out), "--precision", "fp32,int8", "--lora-rank", "8", *common],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert "with a LoRA adapter" in res.output
    rep = json.loads((out / "report.json").read_text())
    lora = rep["lora"]
    assert lora["rank"] == 8 and lora["layers"]["unet"] == 40 and lora["layers"]["text_encoder"] == 12
    calls = lora["call_parity"]
    assert set(calls) == {"unet.fp32", "unet.int8", "text_encoder.fp32", "text_encoder.fp16"}
    assert calls["unet.fp32"]["rel_l2"] <= 1e-5 and calls["unet.int8"]["rel_l2"] <= calls["unet.int8"]["bar"]
    assert all(c["passed"] for c in calls.values())
    samples = lora["sample_parity"]
    assert samples["fp32"]["psnr_db"] in ("inf", float("inf")) or float(samples["fp32"]["psnr_db"]) >= 40
    assert float(samples["int8"]["psnr_db"]) >= samples["int8"]["bar"]
    assert "## LoRA inputs" in (out / "report.md").read_text()
    with engines.load(out) as pipe:
        assert set(pipe.adapters.slots) == {"unet", "text_encoder"}
        base = pipe("a red seven", num_inference_steps=2, seeds=[1])
        pipe.load_lora_weights(_synthetic_file(pipe, tmp_path))
        assert psnr(pipe("a red seven", num_inference_steps=2, seeds=[1]), base) < 40
        pipe.set_adapters({})
        assert np.array_equal(pipe("a red seven", num_inference_steps=2, seeds=[1]), base)
    # what cannot feed LoRA inputs: one line each, before any work
    res = CliRunner().invoke(
        main, [str(src), "-o", str(tmp_path / "trt"), "--lora-rank", "8", "--backend", "onnxruntime-trt"]
    )
    assert res.exit_code == 2 and "--lora-rank: LoRA inputs run on onnxruntime" in res.output
    res = CliRunner().invoke(layout_command(), [str(out), "-o", str(tmp_path / "optimum")])
    assert res.exit_code == 2 and "take LoRA inputs" in res.output and not (tmp_path / "optimum").exists()


def _synthetic_file(pipe, tmp_path):
    """A peft-named LoRA file over every slotted layer, random factors at rank 4."""
    from engines.safetensors_io import write_safetensors

    rng = np.random.default_rng(3)
    tensors = {}
    for comp, s in pipe.adapters.slots.items():
        for m, slot in s.layers.items():
            tensors[f"{comp}.{m}.lora_A.weight"] = (
                rng.standard_normal((4, slot.features_in)).astype(np.float32) * 0.3
            )
            tensors[f"{comp}.{m}.lora_B.weight"] = (
                rng.standard_normal((slot.features_out, 4)).astype(np.float32) * 0.3
            )
    write_safetensors(tmp_path / "s.safetensors", tensors)
    return tmp_path / "s.safetensors"


def test_openvino_runs_the_same_adapters(lora_env, pipe):
    """OpenVINO (static compiles per shape signature, rank 0 included) gives ONNX Runtime's images
    with and without adapters, and the base images again after a swap."""
    from engines.t2i import TextToImagePipeline

    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_env["files"]["b"], adapter_name="b")
    want = _ours(pipe)
    pipe.unload_lora_weights()
    with TextToImagePipeline(lora_env["out"], backend="openvino") as ov:
        base = _ours(ov)
        assert psnr(base, _ours(pipe)) >= 40
        ov.load_lora_weights(lora_env["files"]["b"], adapter_name="b")
        assert psnr(_ours(ov), want) >= 40
        ov.set_adapters({})
        assert np.array_equal(_ours(ov), base)


@pytest.mark.slow
def test_sdxl_adapters_on_unet_and_both_text_encoders_reproduce_diffusers(tmp_path):
    """SDXL: the UNet and both CLIP encoders take adapters (text_encoder_2 through its own prefix),
    and the images match diffusers' load of the same adapter."""
    import torch

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.lora_stage import slot_graphs
    from optimizer.t2i.precision import Graph
    from optimizer.t2i.reference import diffusers_pipeline
    from tests.t2i_tiny import make_tiny_sdxl

    torch.set_num_threads(1)
    out, loaded = _export(tmp_path, make_tiny_sdxl)
    kinds = ("unet", "text_encoder", "text_encoder_2")
    slots = slot_graphs(
        loaded, {(k, "fp32"): Graph(k, "fp32", out / f"onnx/{k}.fp32.onnx") for k in kinds}, RANK
    )
    assert {k for k, _ in slots} == set(kinds)
    _record_slots(out, slots)
    ref = diffusers_pipeline(load_pipeline(tmp_path / "pipe"))
    _add_peft_adapter(ref.unet, "x", ["to_q", "to_v", "ff.net.2"], r=4, alpha=4, seed=5)
    _add_peft_adapter(ref.text_encoder_2, "x", ["q_proj", "fc1"], r=2, alpha=4, seed=6)
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    type(ref).save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(ref.unet, adapter_name="x")
        ),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(ref.text_encoder_2, adapter_name="x")
        ),
        unet_lora_adapter_metadata=ref.unet.peft_config["x"].to_dict(),
        text_encoder_2_lora_adapter_metadata=ref.text_encoder_2.peft_config["x"].to_dict(),
    )
    with TextToImagePipeline(out) as pipe:
        base = _ours(pipe)
        pipe.load_lora_weights(tmp_path / "lora")
        got = _ours(pipe)
        assert psnr(got, base) < 30
        assert psnr(got, _diffusers(ref)) >= 40
        pipe.set_adapters({})
        assert np.array_equal(_ours(pipe), base)
        # the UNet part as kohya's sd-scripts names SDXL layers (SGM blocks, `.alpha`): diffusers'
        # own converter loads that file, and both give the same images
        from engines.lora import _sgm_names
        from engines.safetensors_io import read_safetensors, write_safetensors

        tensors, _ = read_safetensors(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
        sgm = _sgm_names(list(pipe.adapters.slots["unet"].layers))
        kohya = {}
        parts = {
            ".lora.down.weight": "lora_down",
            ".lora_A.weight": "lora_down",
            ".lora.up.weight": "lora_up",
        }
        parts[".lora_B.weight"] = "lora_up"  # diffusers' save mixes both spellings in one file
        for k, v in tensors.items():
            suffix = next((x for x in parts if k.endswith(x)), None)
            if k.startswith("unet.") and suffix:
                base_key = "lora_unet_" + sgm[k[len("unet.") : -len(suffix)]].replace(".", "_")
                kohya[f"{base_key}.{parts[suffix]}.weight"] = v
                kohya[f"{base_key}.alpha"] = np.array(4.0, np.float32)  # the file's scale 1 at rank 4
        write_safetensors(tmp_path / "kohya.safetensors", kohya)
        pipe.load_lora_weights(tmp_path / "kohya.safetensors", adapter_name="kohya")
        ref.delete_adapters("x")
        ref.load_lora_weights(tmp_path / "kohya.safetensors", adapter_name="kohya")
        k = _ours(pipe)
        assert psnr(k, base) < 30 and psnr(k, _diffusers(ref)) >= 40


def test_sgm_names_are_the_original_sdxl_blocks():
    """SDXL's layout (2 layers per block; attention in down blocks 1-2, up blocks 0-1): the names
    kohya's SDXL LoRAs carry."""
    from engines.lora import _sgm_names

    mods = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
        "mid_block.attentions.0.proj_in",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.1.attentions.2.proj_out",
    ]
    assert list(_sgm_names(mods).values()) == [
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "middle_block.1.proj_in",
        "output_blocks.0.1.transformer_blocks.0.attn2.to_k",
        "output_blocks.5.1.proj_out",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_families_take_adapters_per_call(family, tmp_path):
    """SD3's and Flux's transformers (their transformer blocks' linears; Flux's single blocks too):
    an adapter through the inputs matches the transformer exported with it merged (<= 1e-5)."""
    import torch

    from engines.lora import adapter_feeds, read_adapter
    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from engines.safetensors_io import write_safetensors
    from optimizer.metrics import rel_l2
    from optimizer.t2i.components import dummy_inputs
    from optimizer.t2i.export import export_component
    from optimizer.t2i.lora_stage import merged, slot_graphs, synthetic_adapter
    from optimizer.t2i.precision import Graph
    from tests.t2i_tiny import make_tiny_flux, make_tiny_sd3

    torch.set_num_threads(1)
    out, loaded = _export(tmp_path, make_tiny_flux if family == "flux" else make_tiny_sd3, only="transformer")
    slots = slot_graphs(loaded, {("transformer", "fp32"): Graph("transformer", "fp32", out)}, RANK)
    s = slots[("transformer", "fp32")]
    want = {
        n for n, _ in loaded.module("transformer").named_modules() if n.endswith(("attn.to_q", "ff.net.2"))
    }
    assert want and want <= set(s.layers)
    if family == "flux":  # single blocks' attention and MLP in; proj_out over their concat is split
        assert any(m.startswith("single_transformer_blocks.") for m in s.layers)
        assert s.unslotted == tuple(
            f"single_transformer_blocks.{i}.proj_out" for i in range(len(s.unslotted))
        )
    tensors = synthetic_adapter(loaded, {"transformer": s}, seed=9)
    write_safetensors(tmp_path / "a.safetensors", tensors)
    fused = merged(loaded, tensors, ["transformer"])
    c = loaded.spec.component("transformer")
    path = export_component(
        "transformer", fused.module("transformer"), c.io, c.config, tmp_path / "fused.onnx"
    )
    adapter = read_adapter(tmp_path / "a.safetensors", "a", {"transformer": s}, denoiser="transformer")
    feeds = dummy_inputs(c.io, np.random.default_rng(4), "opt", 10)
    with OnnxRuntimeRunner(path, c.io) as rf, OnnxRuntimeRunner(out, c.io) as rl:
        rl.extra_feeds = adapter_feeds("transformer", s, [(adapter, 1.0)])
        name = c.io.output_names[0]
        assert rel_l2(rl.infer(feeds)[name], rf.infer(feeds)[name]) <= 1e-5


def _export(tmp_path, make, only: str | None = None):
    """A tiny family folder exported (latents 8x8); `only`: that component's graph alone (its path)."""
    from engines.iospec import DimRange
    from optimizer.t2i.components import Profile
    from optimizer.t2i.export import export_component, export_pipeline
    from optimizer.t2i.load import load_pipeline

    lat = DimRange(8, 8, 8)
    loaded = load_pipeline(make(tmp_path / "pipe"), profile=Profile(latent_height=lat, latent_width=lat))
    if only is None:
        return export_pipeline(loaded, tmp_path / "out"), loaded
    c = loaded.spec.component(only)
    return export_component(only, loaded.module(only), c.io, c.config, tmp_path / f"{only}.fp32.onnx"), loaded


def _record_slots(out, slots) -> None:
    d = json.loads((out / "t2i.json").read_text())
    for (k, _), s in slots.items():
        d["components"][k]["lora"] = s.to_dict()
    (out / "t2i.json").write_text(json.dumps(d))


@pytest.mark.slow
def test_dd_serve_applies_adapters_per_request(lora_env, pipe, tmp_path):
    """dd-serve --lora-dir: requests name adapters with weights ({"a": 0.8}); concurrent requests
    with different adapters (or none) each get the runtime's image for theirs; an unknown adapter
    or a bad weight fails that request alone (HTTP 400). Needs the serve venv (.ci/setup-serve)."""
    from concurrent.futures import ThreadPoolExecutor

    from engines.t2i import TextToImagePipeline
    from tests.test_serve import http, require_serve_env, run_server
    from tests.test_serve_t2i import _input, prompt_inputs

    py = require_serve_env("tokenizers")
    lora_dir = tmp_path / "adapters"
    lora_dir.mkdir()
    shutil.copytree(lora_env["files"]["a"], lora_dir / "a")
    shutil.copyfile(lora_env["files"]["b"] / "pytorch_lora_weights.safetensors", lora_dir / "b.safetensors")
    asks = [None, '{"a": 1.0}', '{"b": 0.5, "a": 0.8}', '{"a": 0.8, "b": 0.5}', None, '{"b": 1}']
    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_env["files"]["a"], adapter_name="a")
    pipe.load_lora_weights(lora_env["files"]["b"], adapter_name="b")
    want = []
    for i, a in enumerate(asks):
        pipe.set_adapters(json.loads(a) if a else {})
        want.append(pipe([PROMPTS[i % 2]], seeds=[i], num_inference_steps=2))
    pipe.unload_lora_weights()

    def request(url, i, adapters):
        inputs = prompt_inputs(http, [PROMPTS[i % 2]], [i], 2)
        if adapters is not None:
            inputs.append(_input(http, "adapters", np.array([[adapters.encode()]], dtype=object), "BYTES"))
        try:
            return http.InferenceServerClient(url).infer("dd_t2i", inputs).as_numpy("image")
        except Exception as e:  # noqa: BLE001 (the refusal is the answer)
            return str(e)

    args = ("--allow-unvalidated", "--lora-dir", str(lora_dir))
    with run_server(tmp_path, lora_env["out"], "dd_t2i", *args, py=py) as s, ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda j: request(s["http"], *j), enumerate(asks)))
        bad = list(
            ex.map(lambda a: request(s["http"], 0, a), ['{"zzz": 1}', '{"a": "x"}', "[1]", '{"a": 1.0}'])
        )
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert not isinstance(g, str), g
        assert int(np.abs(g.astype(int) - w).max()) <= 1, (i, asks[i])
    assert (
        "'zzz' is not loaded by this server" in bad[0]
        and "finite number" in bad[1]
        and "JSON object" in bad[2]
    )
    assert not isinstance(bad[3], str)  # the good request among them is answered
    bls = TextToImagePipeline(lora_env["out"], runner_factory=lambda name, path, spec: pipe.runners[name])
    with pytest.raises(InputError, match="not applied yet"):
        bls.load_lora_weights(lora_env["files"]["a"])
