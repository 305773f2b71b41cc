"""Long CLIP prompts under long_prompts="chunk" (opt-in): chunks of 75 tokens with BOS/EOS each,
encoded apart and concatenated on the sequence axis, on a UNet compiled with --prompt-chunks N.

The runtime is checked against a torch reference doing the same chunking with transformers'
tokenizer and CLIP text encoders, fed to diffusers' own pipeline as prompt_embeds (SD: the exported
graphs, the UNet's tokens axis dynamic up to 3 chunks; SDXL: its torch modules behind the runtime's
runner interface, pooled text_embeds from the first chunk). Short prompts give truncate's images bit
for bit; truncate and refuse behave as before; what cannot be honoured is one line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines.base import Runner
from engines.errors import InputError
from engines.iospec import DimRange
from tests.t2i_tiny import make_tiny_pipeline, make_tiny_sdxl

LAT = DimRange(8, 8, 8)
STEPS = 3
# the tiny vocabulary: "red" and "seven" are one token each, "green" two
LONG = "red " * 100  # 100 tokens: 2 chunks
LONGER = "seven " * 160  # 3 chunks
TOO_LONG = "red " * 230  # 4 chunks


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from optimizer.metrics import psnr_db

    return psnr_db(a.astype(np.float64), b.astype(np.float64), data_range=255.0)


def _latents(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 4, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny SD pipeline folder, its runtime folder): text encoder, UNet with a 77..231 tokens axis
    (--prompt-chunks 3) and VAE decoder exported once per module (no VAE encoder: not needed here)."""
    import torch

    from optimizer.t2i.components import Profile
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("long_prompts")
    src = make_tiny_pipeline(root / "pipe")
    loaded = load_pipeline(src, profile=Profile(latent_height=LAT, latent_width=LAT, prompt_chunks=3))
    spec = loaded.spec
    spec = dataclasses.replace(spec, components=tuple(c for c in spec.components if c.kind != "vae_encoder"))
    return src, export_pipeline(dataclasses.replace(loaded, spec=spec), root / "out")


# -- the torch reference: the same chunking with transformers' tokenizer ---------------------------
def chunk_ids(tok, prompt: str, k: int):
    """[k, 77]: the prompt's ids without BOS/EOS in pieces of 75, each [BOS, piece, EOS] + pad,
    then empty chunks up to k (A1111 / compel)."""
    import torch

    n = tok.model_max_length - 2
    inner = tok(prompt, add_special_tokens=False).input_ids
    pieces = [inner[i : i + n] for i in range(0, len(inner), n)] or [[]]
    assert len(pieces) <= k
    pieces += [[]] * (k - len(pieces))
    rows = [[tok.bos_token_id, *p, tok.eos_token_id] + [tok.pad_token_id] * (n - len(p)) for p in pieces]
    return torch.tensor(rows)


def clip_states(encoder, ids, penultimate: bool):
    """[1, k 77, hidden] of one prompt's chunks, encoded one chunk per row; and the first chunk's
    projected pooled output where the encoder has one."""
    import torch

    with torch.no_grad():
        out = encoder(ids, output_hidden_states=penultimate)
    states = out.hidden_states[-2] if penultimate else out.last_hidden_state
    pooled = getattr(out, "text_embeds", None)
    return states.reshape(1, -1, states.shape[-1]), None if pooled is None else pooled[:1]


def sd_embeds(pipe, prompts: list[str], k: int):
    import torch

    return torch.cat(
        [clip_states(pipe.text_encoder, chunk_ids(pipe.tokenizer, p, k), False)[0] for p in prompts]
    )


def sdxl_embeds(pipe, prompts: list[str], k: int):
    """Both encoders' penultimate states concatenated on hidden, per chunk on the sequence axis;
    pooled text_embeds from encoder 2's first chunk (as compel and A1111 take it)."""
    import torch

    states, pooled = [], []
    for p in prompts:
        s1, _ = clip_states(pipe.text_encoder, chunk_ids(pipe.tokenizer, p, k), True)
        s2, p2 = clip_states(pipe.text_encoder_2, chunk_ids(pipe.tokenizer_2, p, k), True)
        states.append(torch.cat([s1, s2], dim=-1))
        pooled.append(p2)
    return torch.cat(states), torch.cat(pooled)


def _uint8(images) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


# -- SD: exported graphs ---------------------------------------------------------------------------
def test_chunk_matches_the_torch_reference(sd):
    """A 2-chunk prompt and a short one, under CFG with a 3-chunk negative prompt: every text padded
    to 3 chunks, the UNet at 231 tokens; diffusers from the reference's prompt_embeds, same latents."""
    import torch

    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    src, out = sd
    prompts, neg, lat = [LONG, "a red seven"], [LONGER, None], _latents(2)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0)
    with TextToImagePipeline(out, long_prompts="chunk") as pipe:
        assert pipe.prompt_chunks(prompts, neg) == 3
        got = pipe(prompts, negative_prompt=neg, latents=lat, **kw)
        cond = pipe.conditioning(prompts, neg, True, (16, 16))["encoder_hidden_states"]
    ref = diffusers_pipeline(load_pipeline(src))
    emb, neg_emb = sd_embeds(ref, prompts, 3), sd_embeds(ref, [LONGER, ""], 3)
    assert cond.shape == (4, 3 * 77, 32)
    np.testing.assert_allclose(cond, torch.cat([neg_emb, emb]).numpy(), atol=1e-5)
    want = ref(
        prompt_embeds=emb,
        negative_prompt_embeds=neg_emb,
        latents=torch.from_numpy(lat),
        output_type="np",
        **kw,
    ).images
    assert psnr(got, _uint8(want)) >= 40.0, psnr(got, _uint8(want))


def test_short_prompts_give_truncates_images_bit_for_bit(sd):
    """Within 77 tokens "chunk" is one chunk: the same ids, feeds and images as "truncate"."""
    from engines.t2i import TextToImagePipeline

    _, out = sd
    prompts, lat = ["a red seven", ""], _latents(2, 1)
    kw = dict(negative_prompt="green", num_inference_steps=STEPS, guidance_scale=5.0)
    with TextToImagePipeline(out) as cut, TextToImagePipeline(out, long_prompts="chunk") as chunk:
        assert chunk.prompt_chunks(prompts, ["green"] * 2) == 1
        np.testing.assert_array_equal(
            chunk.conditioning(prompts, ["green"] * 2, True, (16, 16))["encoder_hidden_states"],
            cut.conditioning(prompts, ["green"] * 2, True, (16, 16))["encoder_hidden_states"],
        )
        np.testing.assert_array_equal(chunk(prompts, latents=lat, **kw), cut(prompts, latents=lat, **kw))


def test_truncate_loses_the_tail_that_chunk_follows(sd):
    """Two prompts that differ only past token 77: the same image under truncate (the tail is cut,
    as diffusers cuts it), different images under chunk; refuse still refuses."""
    from engines.t2i import TextToImagePipeline

    _, out = sd
    a, b = "red " * 75 + "seven " * 10, "red " * 75 + "green " * 10
    lat, kw = _latents(1, 2), dict(num_inference_steps=STEPS, guidance_scale=5.0)
    with TextToImagePipeline(out) as cut, TextToImagePipeline(out, long_prompts="chunk") as chunk:
        assert np.array_equal(cut(a, latents=lat, **kw), cut(b, latents=lat, **kw))
        assert np.array_equal(cut(a, latents=lat, **kw), cut("red " * 75, latents=lat, **kw))
        assert np.abs(chunk(a, latents=lat, **kw).astype(int) - chunk(b, latents=lat, **kw)).max() > 0
    with TextToImagePipeline(out, long_prompts="refuse") as refuse, pytest.raises(InputError) as e:
        refuse(a, latents=lat, **kw)
    assert "prompt 0: 87 tokens (with BOS and EOS), over the limit of 77" in str(e.value)


def test_more_chunks_than_compiled_is_one_line(sd):
    from engines.t2i import TextToImagePipeline

    _, out = sd
    with TextToImagePipeline(out, long_prompts="chunk") as pipe:
        for call in (
            lambda: pipe(["a red seven", TOO_LONG], num_inference_steps=STEPS),
            lambda: pipe.check("a red seven", negative_prompt=TOO_LONG),
        ):
            with pytest.raises(InputError) as e:
                call()
            msg = str(e.value)
            assert "4 chunks of 75 tokens, over the 3 this pipeline was compiled for" in msg
            assert "--prompt-chunks 4" in msg and "\n" not in msg
        assert "prompt 1:" in str(pytest.raises(InputError, pipe, ["a", TOO_LONG]).value)


def test_a_77_token_output_refuses_chunk(sd, tmp_path):
    """An output compiled without --prompt-chunks (t2i.json without the field, a static tokens axis)
    runs truncate as before and refuses chunk in one line; a field the UNet contradicts is refused."""
    from engines.t2i import TextToImagePipeline

    _, out = sd
    d = json.loads((out / "t2i.json").read_text())
    assert d["prompt_chunks"] == 3 and d["components"]["unet"]["io"]["dims"]["tokens"] == [77, 77, 231]
    d["components"]["unet"]["io"]["dims"]["tokens"] = [77, 77, 77]
    (out / "t2i.old.json").write_text(json.dumps({k: v for k, v in d.items() if k != "prompt_chunks"}))
    with pytest.raises(InputError) as e:
        TextToImagePipeline(out, long_prompts="chunk", config="t2i.old.json")
    assert str(e.value) == (
        "long_prompts='chunk': this pipeline's UNet takes 77 tokens only; recompile it with "
        "dd-compile --prompt-chunks N (N >= 2)"
    )
    with TextToImagePipeline(out, config="t2i.old.json") as pipe:
        assert pipe.parts.text.max_chunks == 1
        assert pipe(LONG, num_inference_steps=STEPS).shape == (1, 16, 16, 3)  # truncated, as before
    (out / "t2i.bad.json").write_text(json.dumps({**d, "prompt_chunks": 3}))
    with pytest.raises(InputError, match="prompt_chunks 3, but the UNet's tokens axis takes 1"):
        TextToImagePipeline(out, config="t2i.bad.json")


@pytest.mark.parametrize("recipe", ["sd3", "flux"])
def test_t5_families_refuse_chunk(recipe):
    from engines.pipeline import CompiledPipeline, Parts, TextParts

    text = TextParts(tokenizer=None, long_prompts="chunk", recipe=recipe, max_chunks=4)
    with pytest.raises(InputError) as e:
        CompiledPipeline(Parts({}, {}, "transformer", None, "cfg", 16, {}, text=text))
    assert str(e.value) == (
        f"long_prompts='chunk': not for {recipe} pipelines (their T5 encoder reads long prompts); "
        "use 'truncate' or 'refuse'"
    )


def test_chunk_on_openvino_matches_onnxruntime(sd):
    """OpenVINO's dynamic-shape compile takes the 154-token UNet call as ONNX Runtime does."""
    pytest.importorskip("openvino")
    from engines.t2i import TextToImagePipeline

    _, out = sd
    lat, kw = _latents(1, 3), dict(num_inference_steps=STEPS, guidance_scale=5.0)
    with TextToImagePipeline(out, long_prompts="chunk") as ort:
        want = ort(LONG, latents=lat, **kw)
    with TextToImagePipeline(out, long_prompts="chunk", backend="openvino") as ov:
        got = ov(LONG, latents=lat, **kw)
    assert psnr(got, want) >= 40.0, psnr(got, want)


# -- SDXL: its torch modules behind the runtime's runners (its graphs are test_sdxl.py's) -----------
class ModuleRunner(Runner):
    backend = "torch"

    def __init__(self, module, spec):
        super().__init__(spec, name=f"torch:{spec.family}")
        self.module = module

    def activate_impl(self) -> None:
        pass

    def infer_impl(self, feeds):
        import torch

        with torch.no_grad():
            out = self.module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.numpy() for n, o in zip(self.spec.output_names, out, strict=True)}


def test_sdxl_chunk_matches_the_torch_reference(tmp_path):
    """Both encoders chunked alike; text_embeds from the first chunk; with a negative prompt and
    with none (force_zeros_for_empty_prompt: zero negatives of the chunked length)."""
    import torch

    from engines.fileio import write_json_atomic
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.components import Profile, wrap
    from optimizer.t2i.export import t2i_json, write_tokenizer_json
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline

    src, out = make_tiny_sdxl(tmp_path / "sdxl"), tmp_path / "sdxl-runtime"
    loaded = load_pipeline(src, profile=Profile(latent_height=LAT, latent_width=LAT, prompt_chunks=2))
    spec = loaded.spec
    for name, tok in (("tokenizer", spec.tokenizer), ("tokenizer_2", spec.tokenizer_2)):
        write_tokenizer_json(loaded.tokenizer_dirs[name], out / tok.path)
    write_json_atomic(out / "scheduler" / "scheduler_config.json", spec.scheduler_config)
    paths = {c.kind: f"onnx/{c.kind}.fp32.onnx" for c in spec.components}  # never opened
    vocab = int(spec.component("text_encoder").config["vocab_size"])
    write_json_atomic(out / "t2i.json", t2i_json(spec, paths, vocab))

    def runner(name, _path, io):
        return ModuleRunner(wrap(name, loaded.module(name), io), io)

    ref = diffusers_pipeline(load_pipeline(src))
    prompts, lat = [LONG, "a red seven"], _latents(2, 4)
    emb, pooled = sdxl_embeds(ref, prompts, 2)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0)
    with TextToImagePipeline(out, long_prompts="chunk", runner_factory=runner) as pipe:
        for neg in ("seven", None):
            got = pipe(prompts, negative_prompt=neg, latents=lat, **kw)
            neg_kw = {}
            if neg is not None:
                neg_emb, neg_pooled = sdxl_embeds(ref, [neg] * 2, 2)
                neg_kw = dict(negative_prompt_embeds=neg_emb, negative_pooled_prompt_embeds=neg_pooled)
            want = ref(
                prompt_embeds=emb,
                pooled_prompt_embeds=pooled,
                latents=torch.from_numpy(lat),
                output_type="np",
                **neg_kw,
                **kw,
            ).images
            assert got.shape == (2, 16, 16, 3)
            assert psnr(got, _uint8(want)) >= 40.0, (neg, psnr(got, _uint8(want)))


# -- dd-compile --prompt-chunks ------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "17", "two", "1.5"])
def test_bad_prompt_chunks_exit_2_in_one_line(value, tmp_path):
    from optimizer.cli import main

    res = CliRunner().invoke(main, ["--demo", "t2i", "--prompt-chunks", value, "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (
        f"dd-compile: error: --prompt-chunks {value}: must be an integer from 1 to 16"
    )
    assert not (tmp_path / "out").exists()
