"""dd-distill on tiny random teachers: sampler parity with engines.schedule.Sampler, the PD target,
end-to-end progressive/consistency/smaller runs, resume after kill -9, NaN guard, DDP (gloo)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import optimizer  # noqa: F401  (sets OMP_WAIT_POLICY before anything heavy runs)
from engines.errors import InputError
from engines.schedule import Sampler, SamplingSchedule, trailing_timesteps
from engines.torch_runner import TorchRunner
from optimizer.checkpoint import load_checkpoint
from optimizer.distill import DistillConfig, consistency, progressive, run_distillation, smaller
from optimizer.distill.sampling import noise_for_seeds, sample
from optimizer.distill.trainer import FAULT_ENV, StopRequested, TrainingDiverged, load_state
from optimizer.model_io import io_spec_for
from optimizer.models import Denoiser, alphas_cumprod, load_teacher, teacher_reference_samples

REPO = Path(__file__).resolve().parent.parent


def make_teacher(
    path: Path,
    prediction_type: str = "v_prediction",
    seed: int = 0,
    beta_schedule: str = "squaredcos_cap_v2",
) -> Path:
    """A tiny random UNet2DModel (8x8x1) + cosine DDPMScheduler, save_pretrained layout."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    m = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )
    m.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
    ).save_pretrained(path / "scheduler")
    (path / "teacher.json").write_text(json.dumps({"reference_sampler": "ddim", "reference_steps": 8}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def data_npy(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(p, np.tanh(rng.standard_normal((64, 1, 8, 8))).astype(np.float32))
    return p


def cfg(tiny: Path, out: Path, data: Path, **kw) -> DistillConfig:
    base = dict(
        teacher=str(tiny),
        out=str(out / "student.ckpt"),
        steps=2,
        teacher_steps=8,
        iters=6,
        batch_size=8,
        data=str(data),
        eval_samples=0,
        checkpoint_every=3,
        threads=1,
    )
    return DistillConfig(**{**base, **kw})


# -- the student sampler is dd-compile's sampler ------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "consistency"])
def test_torch_sampler_matches_engines_sampler(tiny, kind):
    teacher = load_teacher(tiny)
    table = alphas_cumprod(teacher.scheduler)
    ts = (
        trailing_timesteps(1000, 3)
        if kind == "ddim"
        else consistency.lcm_timesteps(dict(teacher.scheduler.config), 3, 50)
    )
    sch = SamplingSchedule.from_alphas(table, ts, kind=kind, prediction_type="v_prediction")
    den = Denoiser(teacher.model)
    seeds = [3, 1, 4, 1, 5]
    noise, step_noise = noise_for_seeds(seeds, (1, 8, 8), sch.steps)
    ours = sample(den, sch, noise, step_noise).numpy()
    spec = io_spec_for("UNet2DModel", dict(teacher.model.config))
    with TorchRunner(den, spec) as runner:
        ref = Sampler(sch, runner).from_seeds(seeds, (1, 8, 8))
    assert np.abs(ours - ref).max() < 1e-5
    assert np.abs(ours[1] - ours[3]).max() == 0  # same seed, same sample, wherever in the batch


def test_teacher_ddim_matches_diffusers(tiny):
    teacher = load_teacher(tiny)
    noise, _ = noise_for_seeds([0, 1, 2], (1, 8, 8), 1)
    ours = sample(Denoiser(teacher.model), teacher.schedule(8), noise)
    ref = teacher_reference_samples(teacher, noise, steps=8)
    assert (ours - ref).abs().max() < 1e-4


# -- progressive distillation math ---------------------------------------------------------------


def test_pd_target_is_one_ddim_step_to_the_teachers_two(tiny):
    teacher = load_teacher(tiny)
    table = alphas_cumprod(teacher.scheduler)
    grid = progressive.RoundGrid(table, 1000, 4)
    assert grid.t.tolist() == trailing_timesteps(1000, 4)
    assert grid.a_next[-1] == 1.0
    den = Denoiser(teacher.model)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    i = torch.tensor([0, 1, 2, 3])
    x_tgt, z2 = progressive.pd_target(den, grid, z, i, "v_prediction")
    a, a2 = grid.a[i].reshape(-1, 1, 1, 1), grid.a_next[i].reshape(-1, 1, 1, 1)
    eps_tgt = (z - a.sqrt() * x_tgt) / (1 - a).sqrt()
    one_step = a2.sqrt() * x_tgt + (1 - a2).sqrt() * eps_tgt  # DDIM t -> t'' with x~
    assert (one_step - z2).abs().max() < 1e-4
    assert torch.equal(x_tgt[3], z2[3])  # last step: x~ is the teacher's x0 at t'


def test_round_plan():
    assert progressive.round_plan(64, 4) == [32, 16, 8, 4]
    assert progressive.default_teacher_steps(64, 4) == 64
    assert progressive.default_teacher_steps(50, 1) == 64
    with pytest.raises(InputError, match="not steps"):
        progressive.round_plan(48, 4)


# -- end to end ------------------------------------------------------------------------------------


def test_progressive_end_to_end(tiny, data_npy, tmp_path):
    res = run_distillation(cfg(tiny, tmp_path, data_npy, eval_samples=32, round_iters=(4, 6)))
    ck = load_checkpoint(res.path)
    assert ck.schedule.kind == "ddim" and ck.schedule.steps == 2
    assert ck.schedule.timesteps == tuple(trailing_timesteps(1000, 2))
    assert ck.schedule.final_alpha_cumprod == 1.0 and ck.schedule.prediction_type == "v_prediction"
    rounds = ck.distillation["rounds"]
    assert [r["student_steps"] for r in rounds] == [4, 2]
    assert [len(r["loss_curve"]) for r in rounds] == [4, 6]
    for r in rounds:
        assert np.isfinite(r["fid_student"]) and np.isfinite(r["psnr_student_vs_teacher_db"])
    work = tmp_path / "student.distill"
    assert (work / "losses.png").exists() and (work / "round1_samples.png").exists()
    assert not (work / "state.safetensors").exists()
    # the checkpoint, sampled by dd-compile's numpy Sampler, gives the training-time samples
    model = ck.build_model()
    spec = io_spec_for(ck.model_class, ck.model_config)
    seeds = list(range(6))
    with TorchRunner(Denoiser(model), spec) as runner:
        ref = Sampler(ck.schedule, runner).from_seeds(seeds, (1, 8, 8))
    noise, _ = noise_for_seeds(seeds, (1, 8, 8), 2)
    assert np.abs(sample(Denoiser(res.model.eval()), ck.schedule, noise).numpy() - ref).max() < 1e-5


def test_resume_after_stop_is_bit_identical(tiny, data_npy, tmp_path):
    full = run_distillation(cfg(tiny, tmp_path / "a", data_npy, round_iters=(6, 6))).model
    c = cfg(tiny, tmp_path / "b", data_npy, stop_after=7, round_iters=(6, 6))  # mid round 2
    with pytest.raises(StopRequested):
        run_distillation(c)
    _, meta = load_state(c.work_dir / "state.safetensors")
    assert (meta["phase"], meta["iteration"]) == (1, 0)
    c.stop_after, c.resume = None, True
    resumed = run_distillation(c).model
    for (k, v), w in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.slow
def test_resume_after_kill_9(tiny, data_npy, tmp_path):
    """A real SIGKILL mid-run, then --resume: the same weights as an uninterrupted run."""
    args = [
        "--steps",
        "2",
        "--teacher-steps",
        "8",
        "--iters",
        "16",
        "--batch-size",
        "8",
        "--data",
        str(data_npy),
        "--eval-samples",
        "0",
        "--checkpoint-every",
        "4",
        "--threads",
        "1",
    ]
    out = tmp_path / "k" / "student.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "optimizer.distill", str(tiny), "-o", str(out), *args]
    # killed by itself right after the checkpoint at iteration 8 (a known point, no race)
    killed = subprocess.run(cmd, env={**env, FAULT_ENV: "8"}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = out.with_name("student.distill") / "state.safetensors"
    assert load_state(state)[1]["iteration"] == 8
    assert not out.exists()
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    full = run_distillation(cfg(tiny, tmp_path / "u", data_npy, iters=16, checkpoint_every=4)).model
    resumed = load_checkpoint(out).state_dict
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed[k]), k


def test_resume_refuses_other_settings(tiny, data_npy, tmp_path):
    c = cfg(tiny, tmp_path, data_npy, stop_after=4)
    with pytest.raises(StopRequested):
        run_distillation(c)
    c2 = cfg(tiny, tmp_path, data_npy, lr=3e-4, resume=True)
    with pytest.raises(InputError, match="lr"):
        run_distillation(c2)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, data_npy, tmp_path):
    c = cfg(tiny, tmp_path, data_npy, lr=1e30, iters=50, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="state.safetensors"):
        run_distillation(c)
    tensors, meta = load_state(c.work_dir / "state.safetensors")
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())
    assert all(np.isfinite(x) for x in meta["losses"][str(meta["phase"])])


def test_consistency_end_to_end(tiny, data_npy, tmp_path):
    res = run_distillation(
        cfg(tiny, tmp_path, data_npy, method="consistency", steps=2, iters=4, eval_samples=16)
    )
    ck = load_checkpoint(res.path)
    assert ck.schedule.kind == "consistency"
    assert ck.schedule.timesteps == (999, 499)  # LCMScheduler's pick from the 50-step solver grid
    assert ck.distillation["rounds"][0]["fid_student"] > 0
    spec = io_spec_for(ck.model_class, ck.model_config)
    with TorchRunner(Denoiser(ck.build_model()), spec) as runner:
        ref = Sampler(ck.schedule, runner).from_seeds([0, 1], (1, 8, 8))
    noise, step_noise = noise_for_seeds([0, 1], (1, 8, 8), 2)
    assert (
        np.abs(sample(Denoiser(res.model.eval()), ck.schedule, noise, step_noise).numpy() - ref).max() < 1e-5
    )


def test_smaller_student(tiny, data_npy, tmp_path):
    teacher = load_teacher(tiny)
    s_cfg = smaller.smaller_config(dict(teacher.model.config), 0.5, None)
    assert s_cfg["block_out_channels"] == [8, 16] and s_cfg["attention_head_dim"] == 8
    res = run_distillation(cfg(tiny, tmp_path, data_npy, width=0.5, kd_iters=3, iters=3))
    ck = load_checkpoint(res.path)
    assert ck.model_config["block_out_channels"] == [8, 16]
    assert ck.distillation["student_parameters"] < ck.distillation["teacher_parameters"] / 2
    ck.build_model()
    with pytest.raises(InputError):
        smaller.smaller_config(dict(teacher.model.config), 1.5, None)


def test_init_from_teacher_slices():
    from diffusers import UNet2DModel

    kw = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    big, small = (
        UNet2DModel(block_out_channels=(16, 32), **kw),
        UNet2DModel(block_out_channels=(8, 16), **kw),
    )
    counts = smaller.init_from_teacher(small, big)
    assert counts["sliced"] > 0 and counts["fresh"] == 0
    assert torch.equal(small.conv_in.weight, big.conv_in.weight[:8])


# -- data ------------------------------------------------------------------------------------------


def test_load_images_npy_and_folder(tmp_path):
    from PIL import Image

    from optimizer.distill.data import load_images

    arr = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)  # NHWC uint8
    np.save(tmp_path / "a.npy", arr)
    x = load_images(tmp_path / "a.npy", (1, 8, 8))
    assert x.shape == (5, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(x[:, 0], arr[..., 0] / 127.5 - 1, atol=1e-6)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(arr[i, ..., 0]).resize((16, 16)).save(folder / f"{i}.png")
    assert load_images(folder, (1, 8, 8)).shape == (3, 1, 8, 8)
    with pytest.raises(InputError, match="not found"):
        load_images(tmp_path / "missing", (1, 8, 8))
    np.save(tmp_path / "bad.npy", np.full((4, 1, 8, 8), 5.0, np.float32))
    with pytest.raises(InputError, match="expected"):
        load_images(tmp_path / "bad.npy", (1, 8, 8))


def test_cli_bad_teacher_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimizer.distill",
            str(tmp_path / "nope"),
            "-o",
            str(tmp_path / "s.ckpt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("dd-distill: error:") and "not found" in r.stderr


# -- DDP ----------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, tiny: str, data: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    c = DistillConfig(
        teacher=tiny,
        out=out,
        steps=2,
        teacher_steps=4,
        iters=4,
        batch_size=8,
        data=data,
        eval_samples=0,
        checkpoint_every=2,
        threads=1,
    )
    model = run_distillation(c).model
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.rank{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_ranks_end_identical(tiny, data_npy, tmp_path):
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "student.ckpt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tiny), str(data_npy), out), nprocs=2)
    w0, w1 = load_file(out + ".rank0"), load_file(out + ".rank1")
    start = load_teacher(tiny).model.state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], start[k]) for k in w0)  # and they did train
    assert load_checkpoint(out).distillation["world_size"] == 2


@pytest.mark.parametrize("pred", ["v_prediction", "epsilon"])
def test_one_step_zero_terminal_snr(tmp_path, data_npy, pred):
    """Linear betas end at alpha_bar(T) ~ 4e-5: one step rescales a v teacher's schedule to zero
    terminal SNR (Lin et al. 2023); an epsilon teacher keeps its schedule (x0 is undefined at SNR 0)
    and its student predicts v."""
    t = make_teacher(tmp_path / "t", prediction_type=pred, beta_schedule="linear")
    res = run_distillation(cfg(t, tmp_path, data_npy, steps=1, teacher_steps=2, iters=2))
    ck = load_checkpoint(res.path)
    zsnr = pred == "v_prediction"
    assert ck.distillation["zero_terminal_snr"] is zsnr
    assert ck.schedule.prediction_type == "v_prediction" and ck.schedule.timesteps == (999,)
    assert (ck.schedule.alphas_cumprod[0] < 1e-12) is zsnr
    assert ck.scheduler_config.get("rescale_betas_zero_snr", False) is zsnr
    assert all(torch.isfinite(v).all() for v in ck.state_dict.values())
    if not zsnr:
        with pytest.raises(InputError, match="zero-snr"):
            run_distillation(cfg(t, tmp_path / "z", data_npy, steps=1, teacher_steps=2, zero_snr=True))
