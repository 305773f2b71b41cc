"""How dd-compile publishes (issue 11 §1-§2, §6): a run killed at any stage leaves the previous
complete result, a re-run lists only its own artifacts, unsafe targets and options are refused
before any work, and batches stay within the exported range."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from engines.manifest import Manifest
from optimizer.cli import main
from tests.conftest import make_tiny_teacher
from tests.test_pipeline import FAST

ROOT = Path(__file__).parents[1]
# quick INT8: graph-order selection (no per-node sensitivity pass)
QUICK_INT8 = ["--int8-selection", "graph-order"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def published(out: Path) -> Manifest:
    """The published run, checked whole: every artifact of that run, its sha256 verified,
    validated by it, and the run's report naming it."""
    m = Manifest.load(out)
    rid = m.run["id"]
    for a in m.artifacts.values():
        assert a.path.startswith(f"runs/{rid}/"), a.path
        m.verify(a)
        if a.kind == "onnx":
            assert a.validation["run_id"] == rid and a.validation["student_sha256"] == m.run["student_sha256"]
    assert json.loads((out / m.run["report"]).read_text())["run_id"] == rid
    return m


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return make_tiny_teacher(root / "a", seed=0), make_tiny_teacher(root / "b", seed=1)


@pytest.fixture(scope="module")
def finished(students, tmp_path_factory):
    """Student A compiled with every precision: the finished folder later runs go into."""
    out = tmp_path_factory.mktemp("finished") / "out"
    res = invoke(students[0], "--steps", 2, "-o", out, *QUICK_INT8, *FAST)
    assert res.exit_code in (0, 1), res.output  # random weights: int8 may fail its bars
    return out


STAGES = ["export", "quantize-fp16", "quantize-int8", "validate", "timing", "report", "publish"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_at_each_stage_of_a_rerun_leaves_the_old_result(stage, students, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    old = published(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DD_COMPILE_FAULT_AT": stage}
    args = [str(students[1]), "--steps", "2", "-o", str(out), *QUICK_INT8, *FAST]
    proc = subprocess.run(
        [sys.executable, "-m", "optimizer.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    now = published(out)  # the old complete result, never a mix
    assert now.run == old.run
    assert {n: a.sha256 for n, a in now.artifacts.items()} == {n: a.sha256 for n, a in old.artifacts.items()}
    assert json.loads((out / "report.json").read_text())["run_id"] == old.run["id"]
    assert any(out.glob(".staging-*")) or stage == "publish"  # the killed run's work, unpublished
    if stage not in ("export", "quantize-int8", "publish"):
        return  # the clean-up below is one code path: checked after the first, a middle, the last stage

    # the next complete run publishes the new result and removes what the killed one left
    res = invoke(students[1], "--steps", 2, "-o", out, "--precision", "fp32", *FAST)
    assert res.exit_code == 0, res.output
    new = published(out)
    assert new.run["id"] != old.run["id"] and new.run["student_sha256"] != old.run["student_sha256"]
    # the killed run's folder went; the run served before stays one publish (a reader may be opening it)
    assert {p.name for p in (out / "runs").iterdir()} == {new.run["id"], old.run["id"]}
    assert not any(out.glob(".staging-*"))


@pytest.mark.slow
def test_another_student_with_fewer_precisions_replaces_the_listing(students, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    old = published(out)
    assert {"onnx/fp32", "onnx/fp16", "onnx/int8"} <= set(old.artifacts)
    res = invoke(students[1], "--steps", 2, "-o", out, "--precision", "fp32", *FAST)
    assert res.exit_code == 0, res.output
    new = published(out)
    assert {a.name for a in new.artifacts.values() if a.kind == "onnx"} == {"onnx/fp32"}
    assert new.run["passed"] is True and new.artifacts["onnx/fp32"].validation["passed"] is True
    assert new.run["student_sha256"] != old.run["student_sha256"]
    assert (out / "runs" / old.run["id"]).is_dir()  # served just before: kept until the next publish
    assert json.loads((out / "report.json").read_text())["run_id"] == new.run["id"]


@pytest.mark.slow
def test_a_failed_parity_check_is_recorded_on_the_artifact(students, tmp_path):
    res = invoke(
        students[0], "--steps", 2, "-o", tmp_path, "--precision", "fp32", "--bar", "call.fp32=1e-12", *FAST
    )
    assert res.exit_code == 1
    m = published(tmp_path)
    v = m.artifacts["onnx/fp32"].validation
    assert m.run["passed"] is False and v["passed"] is False and "call-level rel. L2" in v["failures"][0]


@pytest.mark.slow
def test_single_batch_size_above_8_runs_within_the_exported_range(students, tmp_path):
    """--batch-sizes 16 alone: calibration, validation and timing all batch within [16, 16]."""
    res = invoke(
        students[0], "--steps", 2, "-o", tmp_path, "--precision", "fp32,fp16", *FAST[2:], "--batch-sizes", 16
    )
    assert res.exit_code == 0, res.output
    m = published(tmp_path)
    assert m.io_spec.dims["batch"].min == m.io_spec.dims["batch"].max == 16
    rep = json.loads((tmp_path / "report.json").read_text())
    by = {v["precision"]: v for v in rep["variants"]}
    assert by["fp32"]["parity"]["call"]["rel_l2"] < 1e-5 and by["fp32"]["parity"]["sample"]["n_samples"] == 8
    assert by["fp16"]["parity"]["sample"]["psnr_db"] > 35
    assert set(by["fp32"]["latency_ms"]["per_call"]) == {"16"}


def _folder_with(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "keep.txt").write_text("the user's")
    return d


@pytest.mark.parametrize(
    "case, match",
    [
        ("o_is_teacher", "is "),
        ("o_inside_teacher", "lies inside"),
        ("o_holds_checkpoint", "contains"),
        ("o_user_folder", "not written by dd-compile"),
        ("repo_is_out", "is "),
        ("repo_inside_out", "lies inside"),
        ("repo_contains_out", "contains"),
        ("bar_nan", "finite"),
        ("bar_inf", "finite"),
        ("fid_samples_0", "--fid-samples"),
        ("huge_batch", "fit"),
    ],
)
def test_refused_before_any_work(case, match, students, tmp_path):
    teacher, out = students[0], tmp_path / "out"
    src, extra = teacher, ["--steps", "2"]
    if case == "o_is_teacher":
        out = teacher
    elif case == "o_inside_teacher":
        out = teacher / "out"
    elif case == "o_holds_checkpoint":
        from optimizer.checkpoint import StudentCheckpoint, TeacherRef, save_checkpoint
        from optimizer.models import load_teacher

        t = load_teacher(teacher)
        ck = StudentCheckpoint(
            "UNet2DModel",
            dict(t.model.config),
            "DDPMScheduler",
            dict(t.scheduler.config),
            t.schedule(2),
            TeacherRef(str(teacher), "0" * 64),
        )
        src, extra = save_checkpoint(ck, t.model, tmp_path / "ck" / "student.ckpt"), []
        out = tmp_path / "ck"
    elif case == "o_user_folder":
        out = _folder_with(tmp_path, "mine")
    elif case == "repo_is_out":
        extra += ["--triton-repo", out]
    elif case == "repo_inside_out":
        extra += ["--triton-repo", out / "triton"]
    elif case == "repo_contains_out":
        out = tmp_path / "repo" / "out"
        extra += ["--triton-repo", tmp_path / "repo"]
    elif case == "bar_nan":
        extra += ["--bar", "sample.fp16=nan"]
    elif case == "bar_inf":
        extra += ["--bar", "call.fp32=inf"]
    elif case == "fid_samples_0":
        extra += ["--fid-samples", "0"]
    elif case == "huge_batch":
        extra += ["--batch-sizes", "1,10000000000"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    teacher_before = sorted(p.relative_to(teacher) for p in teacher.rglob("*"))
    res = CliRunner().invoke(main, [str(src), "-o", str(out), *map(str, extra)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert match in res.output and len(lines) <= 3, res.output  # one line (click adds usage lines)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert sorted(p.relative_to(teacher) for p in teacher.rglob("*")) == teacher_before


def test_memory_estimate_says_what_fits():
    from engines.errors import InputError
    from optimizer.compile.batching import ACTIVATION_FACTOR, bytes_per_sample, check_batch_memory
    from optimizer.model_io import io_spec_for

    spec = io_spec_for("UNet2DModel", {"sample_size": 8, "in_channels": 1})
    per = bytes_per_sample(spec)
    assert per == 256 + 4 + 256  # sample, timestep, output at batch 1 (float32)
    check_batch_memory(spec, (1, 10), available=per * ACTIVATION_FACTOR * 10)
    with pytest.raises(InputError, match=r"--batch-sizes 11: .* batch sizes up to 10 fit"):
        check_batch_memory(spec, (1, 11), available=per * ACTIVATION_FACTOR * 10)


def test_seed_counts_fit_the_batch_range():
    from optimizer.seeds import SeedPlan, fit_count

    for n in range(1, 40):
        for lo, hi in [(1, 16), (16, 16), (4, 6), (3, 8)]:
            m = fit_count(n, lo, hi)
            chunks = [min(hi, m - i) for i in range(0, m, hi)]
            assert m >= n and all(lo <= c <= hi for c in chunks), (n, lo, hi, m)
            assert fit_count(m, lo, hi) == m
    plan = SeedPlan(base=3, batch_range=(16, 16))
    cal, val, i8 = plan.calibration(), plan.validation(), plan.int8_samples()
    assert len(cal) == len(val) == len(i8) == 16
    assert not (set(cal) & set(val)) and not (set(val) & set(i8)) and not (set(plan.samples(256)) & set(cal))
