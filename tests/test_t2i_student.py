"""Text-to-image student.ckpt (checkpoint format 2): save, load onto the teacher's components,
and one-line refusals of a changed teacher and of malformed pipeline records."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from engines.errors import InputError
from tests.t2i_tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    d = tmp_path_factory.mktemp("t2i_student")
    return make_tiny_pipeline(d / "sd"), make_tiny_pipeline(d / "lcm", lcm=True, seed=1)


def _save(path, teacher_dir, unet_dir):
    from diffusers import LCMScheduler, UNet2DConditionModel

    from engines.schedule import SamplingSchedule
    from optimizer.t2i.student import save_t2i_student

    unet = UNet2DConditionModel.from_pretrained(unet_dir / "unet", use_safetensors=True)
    sched = LCMScheduler.from_pretrained(unet_dir / "scheduler")
    schedule = SamplingSchedule.from_alphas(
        sched.alphas_cumprod.numpy(), [999, 759, 499, 259], "consistency", "epsilon"
    )
    return save_t2i_student(
        path,
        unet,
        teacher_dir,
        scheduler_class="LCMScheduler",
        scheduler_config=dict(sched.config),
        schedule=schedule,
        guidance="embedded",
        guidance_scale=2.0,
        distillation={"method": "lcm", "steps": 4},
    ), unet


def test_round_trip_onto_teacher_components(pipes, tmp_path):
    from optimizer.checkpoint import read_metadata
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.student import component_hashes, load_t2i_student

    sd, lcm = pipes
    path, unet = _save(tmp_path / "student.ckpt", sd, lcm)
    meta = read_metadata(path)
    assert meta["format_version"] == 2 and meta["pipeline"]["components"] == component_hashes(sd)
    assert meta["pipeline"]["guidance"] == "embedded" and meta["pipeline"]["guidance_scale"] == 2.0
    got = load_t2i_student(path)
    teacher = load_pipeline(sd)
    assert got.spec.guidance == "embedded" and got.spec.pipeline_class == "LatentConsistencyModelPipeline"
    assert [t.name for t in got.spec.component("unet").io.inputs][-1] == "timestep_cond"
    ids = torch.randint(0, 100, (1, 77))
    with torch.no_grad():
        assert torch.equal(got.text_encoder(ids)[0], teacher.text_encoder(ids)[0])  # the teacher's
        x, t, e, w = (
            torch.randn(1, 4, 8, 8),
            torch.tensor([500.0]),
            torch.randn(1, 77, 32),
            torch.randn(1, 16),
        )
        assert torch.equal(got.unet(x, t, e, timestep_cond=w).sample, unet(x, t, e, timestep_cond=w).sample)
    assert not list(tmp_path.glob("*.tmp"))


def test_changed_teacher_component_is_refused(pipes, tmp_path):
    from optimizer.t2i.student import load_t2i_student

    sd, lcm = pipes
    teacher = tmp_path / "teacher"
    shutil.copytree(sd, teacher)
    path, _ = _save(tmp_path / "student.ckpt", teacher, lcm)
    cfg = teacher / "vae" / "config.json"
    cfg.write_text(cfg.read_text() + " ")  # one byte more: another sha256
    with pytest.raises(InputError) as e:
        load_t2i_student(path)
    msg = str(e.value)
    assert str(path) in msg and "'vae'" in msg and "changed" in msg and "\n" not in msg
    shutil.rmtree(teacher / "tokenizer")
    with pytest.raises(InputError, match="tokenizer"):
        load_t2i_student(path)


def _rewrite_pipeline(src, dst, pipeline):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["dd_compile"])
    meta["pipeline"] = pipeline(meta["pipeline"])
    header["__metadata__"]["dd_compile"] = json.dumps(meta)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    return dst


@pytest.mark.parametrize(
    "edit,expect",
    [
        (lambda p: {**p, "guidance": "cfg2"}, "'pipeline.guidance'"),
        (lambda p: {**p, "guidance_scale": "2"}, "'pipeline.guidance_scale' must be a number"),
        (lambda p: {**p, "extra": 1}, "'extra' is unknown"),
        (lambda p: {k: v for k, v in p.items() if k != "path"}, "'path' is missing"),
        (lambda p: {**p, "components": {**p["components"], "vae": "abc"}}, "not a sha256"),
        (lambda p: {**p, "components": {"vae": p["components"]["vae"]}}, "must name exactly"),
        (lambda p: [p], "must be an object"),
    ],
    ids=["guidance", "scale", "unknown", "no-path", "bad-hash", "few-components", "not-object"],
)
def test_bad_pipeline_field(pipes, tmp_path, edit, expect):
    from optimizer.checkpoint import read_metadata

    sd, lcm = pipes
    good, _ = _save(tmp_path / "good.ckpt", sd, lcm)
    bad = _rewrite_pipeline(good, tmp_path / "bad.ckpt", edit)
    with pytest.raises(InputError) as e:
        read_metadata(bad)
    assert expect in str(e.value) and str(bad) in str(e.value)
