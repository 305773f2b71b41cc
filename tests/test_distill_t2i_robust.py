"""What dd-distill promises for pixel teachers, for the text-to-image methods too, on a tiny random
pipeline: resumable checkpoints (bit-identical after kill -9), the NaN guard naming the last good
checkpoint, progress with loss and ETA, the loss plot and per-phase sample grids, `-o x.ckpt` in
the student.ckpt format dd-compile reads, DDP (gloo) and one-line errors for bad input."""

from __future__ import annotations

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
from click.testing import CliRunner

from engines.errors import InputError
from optimizer.distill import t2i
from optimizer.distill.cli import main
from optimizer.distill.t2i import T2IDistillConfig, T2IDistiller, TextToImageTeacher, demo_batches
from optimizer.distill.trainer import FAULT_ENV, StopRequested, TrainingDiverged, load_state
from tests.test_distill_t2i import tiny_t2i_teacher  # noqa: F401  (registers the fixture here)

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def teacher_dir(tiny_t2i_teacher):  # noqa: F811  (test_distill_t2i's tiny random demo-shaped pipeline)
    return tiny_t2i_teacher


def _distiller(teacher_dir, work, **kw) -> T2IDistiller:
    base = dict(batch=4, checkpoint_every=2, threads=1)
    return T2IDistiller(
        TextToImageTeacher.load(teacher_dir), demo_batches(), T2IDistillConfig(**{**base, **kw}), work=work
    )


def _same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "p.txt"
    p.write_text("a red seven\nnine, cyan\n")
    return p


def _cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def _error_line(output: str) -> str:
    """The one error line; nothing else of the run may say 'error' or print a traceback."""
    lines = [ln for ln in output.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert len(lines) == 1, output
    return lines[0]


# -- resume ------------------------------------------------------------------------------------

GP = dict(method="guided-progressive", steps=2, start_steps=8, stage1_iters=3, round_iters=3)
LCM = dict(method="lcm", steps=2, lcm_iters=5)
LORA = dict(method="lcm", steps=2, lcm_iters=5, lora_rank=2)


@pytest.mark.parametrize(
    "kw,stop,at",
    [(GP, 5, (1, 2)), (LCM, 3, (0, 2)), (LORA, 3, (0, 2))],
    ids=["guided-progressive", "lcm", "lcm-lora"],
)
def test_resume_after_stop_is_bit_identical(teacher_dir, tmp_path, kw, stop, at):
    full = _distiller(teacher_dir, tmp_path / "a", **kw).run()
    with pytest.raises(StopRequested):
        _distiller(teacher_dir, tmp_path / "b", stop_after=stop, **kw).run()
    _, meta = load_state(tmp_path / "b" / "state.safetensors")
    assert (meta["phase"], meta["iteration"]) == at  # mid-phase: weights, Adam and EMA restored
    d = _distiller(teacher_dir, tmp_path / "b", resume=True, **kw)
    resumed = d.run()
    _same_weights(full, resumed)
    assert [r.iters for r in d.records] == ([3, 3, 3] if kw is GP else [5])
    assert all(np.isfinite(r.loss_last) for r in d.records)


def test_resume_refuses_other_settings(teacher_dir, tmp_path):
    with pytest.raises(StopRequested):
        _distiller(teacher_dir, tmp_path, stop_after=2, **LCM).run()
    with pytest.raises(InputError, match=r"different settings \(lr\)"):
        _distiller(teacher_dir, tmp_path, resume=True, **{**LCM, "lr": 3e-4})


@pytest.mark.slow
def test_resume_after_kill_9_is_bit_identical(teacher_dir, tmp_path):
    """A real SIGKILL in round 1 of guided-progressive (after stage 1 finished), then --resume:
    the student.ckpt holds the weights an uninterrupted run ends with."""
    from optimizer.t2i.student import load_t2i_student

    args = [
        *("--method", "guided-progressive", "--steps", "2", "--teacher-steps", "4"),
        *("--iters", "4,4", "--batch-size", "4", "--checkpoint-every", "3", "--threads", "1"),
        *("--prompts", _prompts(tmp_path), "--data-free-samples", "4"),
    ]
    out = tmp_path / "k" / "student.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "optimizer.distill", str(teacher_dir), "-o", str(out), *map(str, args)]
    # killed by itself right after the checkpoint at global iteration 7 (round 1, iteration 3)
    killed = subprocess.run(cmd, env={**env, FAULT_ENV: "7"}, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _, meta = load_state(tmp_path / "k" / "student.distill" / "state.safetensors")
    assert (meta["phase"], meta["iteration"]) == (1, 3) and not out.exists()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming at phase 1 iteration 3" in done.stderr
    code, output = _cli(teacher_dir, "-o", tmp_path / "u" / "student.ckpt", *args)
    assert code == 0, output
    _same_weights(load_t2i_student(out).unet, load_t2i_student(tmp_path / "u" / "student.ckpt").unet)
    assert not (tmp_path / "k" / "student.distill" / "state.safetensors").exists()  # finished


# -- NaN guard -----------------------------------------------------------------------------------


def test_huge_lr_stops_and_keeps_the_last_good_checkpoint(teacher_dir, tmp_path):
    d = _distiller(teacher_dir, tmp_path, method="lcm", steps=2, lcm_iters=30, lr=1e30, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*state.safetensors") as e:
        d.run()
    assert "\n" not in str(e.value)
    tensors, meta = load_state(tmp_path / "state.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert meta["iteration"] >= 1 and all(np.isfinite(meta["losses"]["0"]))


@pytest.mark.parametrize("nan_at,named", [(3, True), (1, False)], ids=["after-checkpoints", "before-any"])
def test_nan_loss_exits_1_with_one_line(teacher_dir, tmp_path, monkeypatch, nan_at, named):
    """Exit 1 (TrainingDiverged, as for pixel teachers: 3 is a requested stop); the line names the
    last good state, or says there is none yet."""
    real, calls = t2i.cd_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == nan_at else loss

    monkeypatch.setattr(t2i, "cd_loss", poisoned)
    out = tmp_path / "s.ckpt"
    code, output = _cli(
        *(teacher_dir, "-o", out, "--method", "lcm", "--steps", "1", "--iters", "6"),
        *("--batch-size", "4", "--checkpoint-every", "1", "--prompts", _prompts(tmp_path)),
        *("--data-free-samples", "4"),
    )
    assert code == 1, output
    line = _error_line(output)
    assert line.startswith("dd-distill: error: loss is nan at lcm (1 steps), iteration") and "\n" not in line
    state = tmp_path / "s.distill" / "state.safetensors"
    if named:
        assert f"last good checkpoint is {state}" in line
        assert load_state(state)[1]["iteration"] == nan_at - 1
    else:
        assert "no checkpoint was written yet" in line and not state.exists()
    assert not out.exists()


# -- progress, loss plot, sample grids ------------------------------------------------------------


def test_progress_bar_and_loss_plot(teacher_dir, tmp_path):
    out = tmp_path / "student"
    code, output = _cli(
        *(teacher_dir, "-o", out, "--method", "lcm", "--steps", "1", "--iters", "3"),
        *("--batch-size", "4", "--prompts", _prompts(tmp_path), "--data-free-samples", "4"),
    )
    assert code == 0, output
    # tqdm: "lcm (1 steps): 100%|...| 3/3 [00:01<00:00, ..., loss=0.0123]" (elapsed<ETA, loss)
    bar = [ln for ln in output.replace("\r", "\n").splitlines() if "3/3" in ln and "loss=" in ln]
    assert bar and "<" in bar[-1], output
    work = tmp_path / "student.distill"
    assert (work / "losses.png").read_bytes()[:8] == PNG
    rec = json.loads((out / "distill.json").read_text())
    assert rec["plots"]["losses"] == "losses.png" and rec["plots"]["work_dir"] == str(work.resolve())
    assert json.loads((work / "report.json").read_text())["rounds"] == rec["rounds"]
    assert len(rec["rounds"][0]["loss_curve"]) == 3 and not (work / "state.safetensors").exists()


def test_sample_grid_per_phase(teacher_dir, tmp_path):
    from PIL import Image

    from optimizer.distill.t2i_cli import _grid_hook

    teacher = TextToImageTeacher.load(teacher_dir)
    cfg = T2IDistillConfig(batch=4, **{**GP, "start_steps": 4, "stage1_iters": 2, "round_iters": 2})
    d = T2IDistiller(
        teacher,
        demo_batches(),
        cfg,
        work=tmp_path,
        on_phase=_grid_hook(teacher, cfg, tmp_path, 3, 4, reference_steps=4, phase_prompts=12),
    )
    d.run()
    # each phase judged like the final student: at its own steps, on the same 12 prompts
    for r in d.records:
        q = r.quality
        assert q["n"] == 12 and q["steps"] == r.steps and q["guidance_scale"] == cfg.eval_guidance
        assert 0 <= q["adherence"]["digit"] <= 1 and 0 <= q["adherence"]["colour"] <= 1
        assert np.isfinite(q["fid"]) and q["fid"] > 0
    assert [(r.phase, r.steps, r.samples) for r in d.records] == [
        ("stage1-guided", 4, "phase0_samples.png"),
        ("progressive", 2, "phase1_samples.png"),
    ]
    for name in ("teacher_samples.png", "phase0_samples.png", "phase1_samples.png"):
        with Image.open(tmp_path / name) as im:  # one row per prompt, one column per seed (save_grid)
            assert im.size == (round((4 * 0.6 + 1.6) * 100), round((3 * 0.7 + 0.2) * 100))
    rec = d.record({}, None)
    assert rec["plots"]["samples"] == {"0": "phase0_samples.png", "1": "phase1_samples.png"}
    assert rec["plots"]["teacher_samples"] == "teacher_samples.png"
    # the cells hold decoded samples, not a blank or constant figure (measured std: 73 grey levels)
    for name in ("teacher_samples.png", "phase1_samples.png"):
        assert np.asarray(Image.open(tmp_path / name).convert("L"), np.float32).std() > 20


# -- -o student.ckpt ------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [LCM, GP, LORA], ids=["lcm", "guided-progressive", "lcm-lora"])
def test_ckpt_output_loads_in_dd_compile_and_predicts_as_trained(teacher_dir, tmp_path, kw):
    from optimizer.checkpoint import read_metadata
    from optimizer.distill.guided import guidance_embedding
    from optimizer.t2i.student import component_hashes, is_t2i_checkpoint, load_t2i_student

    d = _distiller(teacher_dir, tmp_path / "x.distill", **{**kw, "stage1_iters": 2, "round_iters": 2})
    student = d.run()
    out = tmp_path / "x.ckpt"
    d.finish(student, out)
    assert is_t2i_checkpoint(out)
    meta = read_metadata(out)
    pipe = meta["pipeline"]
    assert pipe["path"] == str(Path(teacher_dir).resolve())
    assert pipe["components"] == component_hashes(teacher_dir)
    lora = bool(kw.get("lora_rank"))
    assert pipe["guidance"] == ("none" if lora else "embedded")
    assert pipe["guidance_scale"] == (None if lora else d.cfg.eval_guidance)
    assert meta["distillation"]["method"] == kw["method"]
    got = load_t2i_student(out)
    sched = got.spec.scheduler_config["_class_name"]
    assert sched == ("DDIMScheduler" if kw is GP else "LCMScheduler")
    g = torch.Generator().manual_seed(4)
    z, t, text = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([999, 259]),
        torch.randn(2, 77, 32, generator=g),
    )
    with torch.no_grad():
        if lora:  # fused into a plain UNet: the same prediction as the adapters
            assert not any("lora" in k for k in got.unet.state_dict())
            ours = student(z, t, encoder_hidden_states=text).sample
            theirs = got.unet(z, t, encoder_hidden_states=text).sample
            assert (ours - theirs).abs().max() < 1e-5
            assert (d.work / "lora" / "pytorch_lora_weights.safetensors").is_file()
        else:
            emb = guidance_embedding(torch.full((2,), 3.0), student.config.time_cond_proj_dim)
            ours = student(z, t, encoder_hidden_states=text, timestep_cond=emb).sample
            assert torch.equal(got.unet(z, t, encoder_hidden_states=text, timestep_cond=emb).sample, ours)
            _same_weights(student, got.unet)


def test_ckpt_output_bad_combos_are_one_line_exit_2(teacher_dir, tmp_path):
    (tmp_path / "dir.ckpt").mkdir()
    (tmp_path / "afile").write_text("x")
    fast = ["--method", "lcm", "--steps", "1", "--iters", "2", "--batch-size", "4"]
    fast += ["--prompts", _prompts(tmp_path), "--data-free-samples", "4"]
    for out, says in (
        (tmp_path / "dir.ckpt", "is an existing folder; a .ckpt output is a student.ckpt file"),
        (tmp_path / "afile" / "s.ckpt", "which is an existing file"),
        (Path(teacher_dir) / "s.ckpt", "which this command reads"),
        (tmp_path / "afile", "is an existing file, not a folder"),
    ):
        code, output = _cli(teacher_dir, "-o", out, *fast)
        assert code == 2, (out, output)
        assert says in _error_line(output), (out, output)
    assert not list(Path(teacher_dir).glob("s.*"))  # nothing written into the teacher


# -- DDP --------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, teacher: str, out: str) -> None:
    from optimizer.distill.t2i_cli import T2IRun, run_t2i

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    seen: dict[str, torch.Tensor] = {}
    real_run = T2IDistiller.run

    def keep(self):
        student = real_run(self)
        seen.update(student.state_dict())
        return student

    T2IDistiller.run = keep
    cfg = T2IDistillConfig(
        batch=4,
        threads=1,
        checkpoint_every=2,
        **{**GP, "start_steps": 4, "stage1_iters": 2, "round_iters": 2},
    )
    rec = run_t2i(T2IRun(Path(teacher), Path(out), cfg, demo=True, evaluate=0))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in seen.items()}, f"{out}.rank{rank}")
    if rank == 0:
        Path(f"{out}.record.json").write_text(json.dumps(rec))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_ranks_end_identical(teacher_dir, tmp_path):
    from safetensors.torch import load_file

    from optimizer.distill.guided import make_w_student

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "student.ckpt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(teacher_dir), out), nprocs=2)
    w0, w1 = load_file(out + ".rank0"), load_file(out + ".rank1")
    _same_weights(w0, w1)
    start = make_w_student(TextToImageTeacher.load(teacher_dir).unet).state_dict()
    assert any(not torch.equal(w0[k], start[k]) for k in w0)  # and they did train
    rec = json.loads(Path(out + ".record.json").read_text())
    assert rec["world_size"] == 2 and [r["iters"] for r in rec["rounds"]] == [2, 2]
    from optimizer.t2i.student import load_t2i_student

    _same_weights(load_t2i_student(out).unet.state_dict(), w0)


# -- one-line errors --------------------------------------------------------------------------------


def test_bad_input_is_one_line_exit_2(teacher_dir, tmp_path):
    from PIL import Image

    prompts = _prompts(tmp_path)
    (tmp_path / "empty.txt").write_text("\n \n")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 90 * i, np.uint8)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a red seven"}) + "\n")
    base = [teacher_dir, "-o", tmp_path / "s.ckpt", "--steps", "1", "--iters", "2"]
    for extra, says in (
        (["--guidance", "abc", "--prompts", prompts], "--guidance 'abc': not a number or a LO:HI range"),
        (["--guidance", "2:", "--prompts", prompts], "--guidance '2:': not a number or a LO:HI range"),
        (["--guidance", "2:4:8", "--prompts", prompts], "--guidance '2:4:8': expected LO:HI"),
        (["--guidance", "8:2", "--prompts", prompts], "--guidance '8:2': need 1 <= LO <= HI"),
        (["--guidance", "nan", "--prompts", prompts], "--guidance 'nan': expected LO:HI"),
        (["--prompts", tmp_path / "empty.txt"], "no prompts (one per line)"),
        (["--prompts", tmp_path / "missing.txt"], "missing.txt: cannot read"),
        (["--data", data], "1 image(s) have no caption in metadata.jsonl (first: '1.png')"),
        (
            ["--lora-rank", "4", "--method", "guided-progressive", "--prompts", prompts],
            "--lora-rank 4: must be > 0, with --method lcm",
        ),
    ):
        code, output = _cli(*base, *extra)
        assert code == 2, (extra, output)
        line = _error_line(output)
        assert line.startswith("dd-distill: error:") and says in line, (extra, line)
    assert not (tmp_path / "s.distill").exists()  # refused before any training
    for rank in ("0", "-1"):  # click's own range check (its usage error keeps exit 2)
        code, output = _cli(*base, "--method", "lcm", "--lora-rank", rank, "--prompts", prompts)
        assert code == 2 and "Invalid value for '--lora-rank'" in output and "x>=1" in output, output
    with pytest.raises(InputError, match="--lora-rank -2"):
        T2IDistillConfig(method="lcm", lora_rank=-2)
    with pytest.raises(InputError, match="--guidance"):
        T2IDistillConfig(guidance=(8.0, 2.0))
    with pytest.raises(InputError, match="--checkpoint-every"):
        T2IDistillConfig(checkpoint_every=0)
