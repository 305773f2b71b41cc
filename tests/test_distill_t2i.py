"""Text-to-image distillation on a tiny random pipeline: the students it writes are diffusers
pipelines that diffusers runs exactly as they were trained, and training moves the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.schedule import SamplingSchedule, trailing_timesteps
from optimizer.distill.consistency import lcm_timesteps
from optimizer.distill.sampling import sample
from optimizer.distill.t2i import T2IDistillConfig, T2IDistiller, TextToImageTeacher, WDenoiser, demo_batches
from optimizer.metrics import psnr_db


@pytest.fixture(scope="module")
def tiny_t2i_teacher(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from optimizer.demo.t2i.data import VOCAB_WORDS
    from optimizer.demo.t2i.tokenizer import build_tokenizer
    from optimizer.demo.t2i.train import build_schedulers, build_text_encoder, build_unet, build_vae

    torch.manual_seed(0)
    tok = build_tokenizer(VOCAB_WORDS)
    pipe = StableDiffusionPipeline(
        vae=build_vae(),
        text_encoder=build_text_encoder(len(tok), 32, tok.bos_token_id, tok.eos_token_id),
        tokenizer=tok,
        unet=build_unet((32, 64), 32),
        scheduler=build_schedulers()[1],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("t2i") / "teacher"
    pipe.save_pretrained(str(folder))
    return folder


def _distill(folder, tmp_path, **kw):
    teacher = TextToImageTeacher.load(folder)
    cfg = T2IDistillConfig(batch=4, log_every=1000, **kw)
    d = T2IDistiller(teacher, demo_batches(), cfg)
    student = d.run()
    return teacher, student, d.save(student, tmp_path / f"student-{cfg.method}")


def _diffusers_images(folder, prompts, latents, steps, scale):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompts, latents=latents, num_inference_steps=steps, guidance_scale=scale, output_type="np"
    ).images
    return type(pipe).__name__, out.transpose(0, 3, 1, 2) * 2.0 - 1.0


PROMPTS = ["a red seven", "two, blue", "the digit 4 in green"]


def test_guided_progressive_student_runs_in_diffusers_as_trained(tiny_t2i_teacher, tmp_path):
    teacher, student, folder = _distill(
        tiny_t2i_teacher,
        tmp_path,
        method="guided-progressive",
        steps=2,
        start_steps=4,
        stage1_iters=2,
        round_iters=2,
    )
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kind, got = _diffusers_images(folder, PROMPTS, latents, 2, 4.5)
    assert kind == "StableDiffusionPipeline"
    # our own sampler: trailing DDIM at the student's grid, w = 4.5 - 1 through timestep_cond, no CFG
    sched = SamplingSchedule.from_alphas(teacher.alphas, trailing_timesteps(1000, 2), "ddim", "epsilon")
    cond = {"encoder_hidden_states": teacher.encode_text(PROMPTS), "w": torch.full((3,), 3.5)}
    ref = teacher.decode(sample(WDenoiser(student), sched, latents, cond=cond))
    assert psnr_db(got, ref) > 40


def test_lcm_student_runs_in_diffusers_as_trained(tiny_t2i_teacher, tmp_path):
    teacher, student, folder = _distill(tiny_t2i_teacher, tmp_path, method="lcm", steps=1, lcm_iters=2)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    kind, got = _diffusers_images(folder, PROMPTS, latents, 1, 6.0)
    assert kind == "LatentConsistencyModelPipeline"
    ts = lcm_timesteps(dict(teacher.pipe.scheduler.config), 1, 50)
    sched = SamplingSchedule.from_alphas(teacher.alphas, ts, "consistency", "epsilon")
    cond = {"encoder_hidden_states": teacher.encode_text(PROMPTS), "w": torch.full((3,), 5.0)}
    ref = teacher.decode(sample(WDenoiser(student), sched, latents, cond=cond))
    assert psnr_db(got, ref) > 40


@pytest.mark.slow
def test_stage1_regression_lowers_its_loss_and_records_the_teacher(tiny_t2i_teacher, tmp_path):
    import json

    teacher = TextToImageTeacher.load(tiny_t2i_teacher)
    cfg = T2IDistillConfig(
        method="guided-progressive", steps=2, start_steps=4, stage1_iters=40, batch=8, lr=3e-5
    )
    d = T2IDistiller(teacher, demo_batches(), cfg)
    # the stage-1 objective on one fixed batch: the zero-init student (the conditional branch) vs trained
    from optimizer.distill.guided import guided_eps, make_w_student, student_eps

    # a batch drawn as training draws them (data latents noised at random t), kept fixed
    z0, tc, tu, w = d._batch()
    g = torch.Generator().manual_seed(9)
    t = torch.randint(0, 1000, (len(z0),), generator=g)
    a = torch.from_numpy(teacher.alphas.astype("float32"))[t].reshape(-1, 1, 1, 1)
    z = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=g)
    with torch.no_grad():
        target = guided_eps(teacher.unet, z, t, tc, tu, w)
        before = torch.nn.functional.mse_loss(student_eps(make_w_student(teacher.unet), z, t, tc, w), target)
    student = d.stage1()
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(student_eps(student, z, t, tc, w), target)
    assert after < 0.8 * before, (float(before), float(after))  # measured: 0.065 -> 0.048
    assert d.records[0].phase == "stage1-guided"
    out = d.save(student, tmp_path / "s")
    meta = json.loads((out / "distill.json").read_text())
    assert meta["guidance_mode"] == "embedded" and meta["w"] == cfg.eval_guidance - 1
    assert set(meta["teacher"]["components_sha256"]) >= {"vae/config.json", "text_encoder/config.json"}
    # a second save replaces the student folder it wrote; a foreign folder is refused
    d.save(student, out)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    from engines.errors import InputError

    with pytest.raises(InputError, match="was not written by dd-compile"):
        d.save(student, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_bad_configs_are_one_line():
    from engines.errors import InputError

    with pytest.raises(InputError, match="--method"):
        T2IDistillConfig(method="magic")
    with pytest.raises(InputError, match="start steps 12"):
        T2IDistillConfig(steps=4, start_steps=12)


@pytest.mark.slow
def test_lcm_lora_loads_into_a_diffusers_pipeline_and_changes_it_as_predicted(tiny_t2i_teacher, tmp_path):
    import json

    from diffusers import StableDiffusionPipeline

    teacher, student, folder = _distill(
        tiny_t2i_teacher, tmp_path, method="lcm", steps=1, lcm_iters=3, lora_rank=4
    )
    meta = json.loads((folder / "distill.json").read_text())
    lora = meta["lora"]
    assert meta["guidance_mode"] == "none" and lora["rank"] == 4
    assert 0 < lora["params"] < 0.05 * lora["unet_params"]  # the adapter is a small fraction
    # plug the adapter file into the teacher's own pipeline: its UNet now predicts what ours does
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_t2i_teacher), safety_checker=None)
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([259, 999])
    text = teacher.encode_text(["a red seven", "two, blue"])
    with torch.no_grad():
        base = pipe.unet(z, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(folder / "lora"))
        plugged = pipe.unet(z, t, encoder_hidden_states=text).sample
        ours = student(z, t, encoder_hidden_states=text).sample
    assert torch.allclose(plugged, ours, atol=1e-5)
    assert (plugged - base).abs().max() > 1e-4  # and the adapter did change the UNet
    # the saved student pipeline holds the adapter fused: same prediction, plain UNet weights
    from diffusers import UNet2DConditionModel

    fused = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    assert not any("lora" in k for k in fused.state_dict())
    with torch.no_grad():
        assert torch.allclose(fused(z, t, encoder_hidden_states=text).sample, ours, atol=1e-5)
    # the folder runs in diffusers as LCM-LoRA does (StableDiffusionPipeline + LCMScheduler,
    # guidance 1: no CFG batch); diffusers' LCM pipeline would fail on a UNet without w input
    assert meta["guidance_scale"] == 1.0 and meta["trained_guidance_scale"] == 4.0
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    name, imgs = _diffusers_images(folder, PROMPTS[:2], lat, 1, meta["guidance_scale"])
    assert name == "StableDiffusionPipeline" and np.isfinite(imgs).all() and imgs.std() > 1e-3
    from diffusers import LCMScheduler

    assert type(LCMScheduler.from_pretrained(str(folder / "scheduler"))).__name__ == "LCMScheduler"
    # and dd-compile reads its mode from the record: 'none', not the CFG a plain UNet would get
    from optimizer.t2i.source import resolve

    src = resolve(
        folder, steps=None, guidance_scale=None, teacher=None, size=None, resolutions=None, batch_sizes=(1,)
    )
    assert src.student.spec.guidance == "none" and src.guidance_scale <= 1 and src.steps == 1


@pytest.mark.slow
def test_data_sources_and_their_one_line_errors(tiny_t2i_teacher, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from engines.errors import InputError
    from optimizer.distill.t2i_cli import T2IRun, run_t2i
    from optimizer.distill.t2i_data import imagefolder_batches, read_prompts

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, text in enumerate(["a red seven", "two, blue"]):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    x, caps = imagefolder_batches(data, 32)(np.random.default_rng(0), 5)
    assert x.shape == (5, 3, 32, 32) and set(caps) <= {"a red seven", "two, blue"}
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png"}) + "\n")
    with pytest.raises(InputError, match=r"metadata.jsonl:1: need a JSON object with 'file_name' and 'text'"):
        imagefolder_batches(data, 32)
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "../x.png", "text": "t"}) + "\n")
    with pytest.raises(InputError, match="lies outside"):
        imagefolder_batches(data, 32)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    # data-free end to end: the teacher samples its latents from the prompts file
    (tmp_path / "p.txt").write_text("a red seven\nnine, cyan\n")
    cfg = T2IDistillConfig(method="lcm", steps=2, lcm_iters=2, batch=4)
    rec = run_t2i(
        T2IRun(tiny_t2i_teacher, tmp_path / "student", cfg, prompts=tmp_path / "p.txt", data_free_samples=8)
    )
    assert rec["method"] == "lcm" and rec["rounds"][0]["iters"] == 2
    with pytest.raises(InputError, match="--prompts FILE"):
        run_t2i(T2IRun(tiny_t2i_teacher, tmp_path / "s2", cfg))


@pytest.mark.slow
def test_dd_distill_takes_a_pipeline_folder_and_refuses_pixel_methods(tiny_t2i_teacher, tmp_path):
    import json

    from click.testing import CliRunner

    from optimizer.distill.cli import main

    (tmp_path / "p.txt").write_text("a red seven\nnine, cyan\n")
    base = [str(tiny_t2i_teacher), "-o", str(tmp_path / "student"), "--prompts", str(tmp_path / "p.txt")]
    fast = ["--steps", "1", "--iters", "2", "--data-free-samples", "4", "--batch-size", "4"]
    res = CliRunner().invoke(main, [*base, *fast, "--method", "lcm"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "student" / "distill.json").read_text())["method"] == "lcm"
    for bad, says in (
        (["--method", "progressive"], "is for pixel-space teachers"),
        (["--guidance", "8:2"], "--guidance '8:2': need 1 <= LO <= HI"),
        (["--method", "guided-progressive", "--teacher-steps", "12", "--steps", "4"], "not steps * 2^k"),
    ):
        res = CliRunner().invoke(main, [*base, *fast, *bad])
        assert res.exit_code == 2 and says in res.output, (bad, res.output)
