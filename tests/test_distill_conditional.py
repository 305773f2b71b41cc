"""dd-distill on a text-conditioned UNet2DConditionModel teacher (--cond rows of
encoder_hidden_states), data-free, then dd-compile of the student it writes."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import optimizer  # noqa: F401  (sets OMP_WAIT_POLICY)
from optimizer.checkpoint import load_checkpoint
from optimizer.cli import main as compile_main
from optimizer.distill.cli import main as distill_main
from optimizer.distill.conditioning import bind, load_conditioning
from optimizer.models import Denoiser, load_teacher, teacher_reference_samples
from tests.conftest import TINY_COND_UNET
from tests.test_pipeline import FAST

DIM = TINY_COND_UNET["cross_attention_dim"]


@pytest.fixture(scope="module")
def cond_teacher(tmp_path_factory):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    path = tmp_path_factory.mktemp("cond_teacher")
    torch.manual_seed(0)
    UNet2DConditionModel(in_channels=1, out_channels=1, **TINY_COND_UNET).save_pretrained(path / "unet")
    DDPMScheduler(
        num_train_timesteps=1000, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"
    ).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def cond_npz(tmp_path_factory):
    p = tmp_path_factory.mktemp("cond") / "cond.npz"
    rng = np.random.default_rng(0)
    np.savez(p, encoder_hidden_states=rng.standard_normal((3, 5, DIM)).astype(np.float32))
    return p


ARGS = [
    "--steps",
    "2",
    "--teacher-steps",
    "4",
    "--iters",
    "4",
    "--batch-size",
    "4",
    "--data-free-samples",
    "6",
    "--eval-samples",
    "4",
    "--threads",
    "1",
]


def test_conditioning_reaches_the_teacher(cond_teacher, cond_npz):
    """Different rows give different teacher samples from the same noise: the rows are used."""
    teacher = load_teacher(cond_teacher)
    cond = load_conditioning(cond_npz, ["encoder_hidden_states"], dict(teacher.model.config))
    ehs = torch.from_numpy(cond["encoder_hidden_states"])
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(1, 1, 1, 1)
    a = teacher_reference_samples(teacher, noise, 4, {"encoder_hidden_states": ehs[[0, 0]]})
    b = teacher_reference_samples(teacher, noise, 4, {"encoder_hidden_states": ehs[[0, 1]]})
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1], atol=1e-4)
    net = Denoiser(teacher.model)
    z, t = torch.randn(2, 1, 8, 8), torch.full((2,), 500.0)
    c = {"encoder_hidden_states": ehs[:2]}
    assert torch.equal(bind(net, c)(z, t), net(z, t, **c))


@pytest.mark.slow
def test_distill_conditional_then_compile(cond_teacher, cond_npz, tmp_path):
    out = tmp_path / "student.ckpt"
    res = CliRunner().invoke(
        distill_main,
        [str(cond_teacher), "-o", str(out), "--cond", str(cond_npz), *ARGS],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out, weights=False)
    assert ckpt.model_class == "UNet2DConditionModel"
    assert ckpt.schedule.steps == 2
    rec = ckpt.distillation
    assert [r["student_steps"] for r in rec["rounds"]] == [2]
    assert np.isfinite(rec["rounds"][-1]["fid_student"])
    assert rec["config"]["cond"] == str(cond_npz)
    # The student compiles and passes parity like any other UNet2DConditionModel.
    res = CliRunner().invoke(
        compile_main,
        [str(out), "-o", str(tmp_path / "out"), "--precision", "fp32", *FAST],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    (v,) = rep["variants"]
    assert v["parity"]["call"]["rel_l2"] < 1e-5 and v["passed"]


def _err(res):
    return res.output.strip().splitlines()[-1]


def test_conditional_teacher_without_cond_is_one_line(cond_teacher, tmp_path):
    res = CliRunner().invoke(distill_main, [str(cond_teacher), "-o", str(tmp_path / "s.ckpt"), *ARGS])
    assert res.exit_code == 2
    assert "--cond" in _err(res) and "encoder_hidden_states" in _err(res)
    assert not (tmp_path / "s.ckpt").exists()


@pytest.mark.parametrize("case", ["wrong_dim", "missing_key", "not_npz"])
def test_bad_cond_files_are_one_line(cond_teacher, tmp_path, case):
    p = tmp_path / "c.npz"
    if case == "wrong_dim":
        np.savez(p, encoder_hidden_states=np.zeros((2, 5, DIM + 1), np.float32))
    elif case == "missing_key":
        np.savez(p, class_labels=np.zeros(2, np.int64))
    else:
        p.write_bytes(b"not a zip")
    res = CliRunner().invoke(
        distill_main, [str(cond_teacher), "-o", str(tmp_path / "s.ckpt"), "--cond", str(p), *ARGS]
    )
    assert res.exit_code == 2, res.output
    assert str(p) in _err(res)


@pytest.mark.slow
@pytest.mark.parametrize("method,width", [("consistency", 1.0), ("progressive", 0.5)])
def test_consistency_and_smaller_student_take_conditioning(cond_teacher, cond_npz, tmp_path, method, width):
    from optimizer.distill import DistillConfig, run_distillation

    cfg = DistillConfig(
        teacher=str(cond_teacher),
        out=str(tmp_path / "s.ckpt"),
        method=method,
        steps=2,
        teacher_steps=4,
        iters=3,
        batch_size=4,
        data_free_samples=6,
        eval_samples=4,
        cond=str(cond_npz),
        width=width,
        threads=1,
    )
    res = run_distillation(cfg)
    assert res.record["rounds"] and all(np.isfinite(r["fid_student"]) for r in res.record["rounds"])
    if width < 1:
        assert res.record["student_parameters"] < res.record["teacher_parameters"] / 2
    assert load_checkpoint(res.path, weights=False).model_class == "UNet2DConditionModel"
