"""dd-compile end to end on a tiny real diffusers model, and its exit codes for bad input."""

import json
import os
import pickle

import pytest
from click.testing import CliRunner

from optimizer.checkpoint import StudentCheckpoint, TeacherRef, save_checkpoint
from optimizer.cli import main
from optimizer.models import load_teacher

# Random-weight models: the student-vs-teacher quality bars mean nothing here (the distilled demo
# is held to them in test_demo), parity and speed bars stay as they are.
FAST = [
    "--batch-sizes",
    "1,2",
    "--samples",
    "8",
    "--fid-samples",
    "16",
    "--bench-seconds",
    "0.2",
    "--threads",
    "1",
    "--bar",
    "paired_psnr=-100",
    "--bar",
    "fid_margin=1e9",
]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def compiled(tiny_teacher_dir, tmp_path_factory):
    # A relative -o, as users type it (CI's `-o .ci-out/demo` once broke on this); later tests
    # reopen the same directory by its absolute path.
    parent = tmp_path_factory.mktemp("cwd")
    cwd = os.getcwd()
    os.chdir(parent)
    try:
        res = invoke(tiny_teacher_dir, "--steps", 2, "-o", "rel/out", "--precision", "fp32", *FAST)
    finally:
        os.chdir(cwd)
    return res, parent / "rel" / "out"


@pytest.mark.slow
def test_compile_fp32_passes_and_writes_everything(compiled):
    res, out = compiled
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] is True
    (v,) = rep["variants"]
    assert v["backend"] == "onnxruntime" and v["precision"] == "fp32"
    assert v["parity"]["call"]["rel_l2"] < 1e-5 and v["parity"]["call"]["cosine"] > 0.999999
    assert v["parity"]["sample"]["psnr_db"] > 60
    assert set(v["latency_ms"]["per_call"]) == {"1", "2"}
    # the speedup is the ratio of the two medians the report shows, and the 2-step student beats
    # its teacher's reference sampler end to end (it runs fewer UNet calls, on ORT); end to end is
    # measured at the smallest batch only (SpeedConfig.e2e_batches)
    assert set(v["latency_ms"]["end_to_end"]) == {"1"}
    t_e2e, s_e2e = rep["teacher"]["latency_ms"]["end_to_end"]["1"], v["latency_ms"]["end_to_end"]["1"]
    assert t_e2e / s_e2e > 1.0
    # stated exactly when both medians are stable (optimizer.timing), and then it is that ratio
    sp = v["speedup_vs_teacher"]["end_to_end"]["1"]
    assert (sp is None) == (v["timings"]["end_to_end"]["1"]["speedup_null_reason"] is not None)
    assert sp is None or sp == pytest.approx(t_e2e / s_e2e, rel=1e-6)
    assert rep["teacher"]["available"] and rep["teacher"]["reference_steps"] == 64
    man = json.loads((out / "manifest.json").read_text())
    kinds = {a["name"]: a for a in man["artifacts"]}
    assert kinds["onnx/fp32"]["sha256"] and man["io_spec"]["dims"]["batch"] == [1, 2, 2]
    assert man["schedule"]["timesteps"] == [999, 499]
    run_id = man["run"]["id"]
    assert man["version"] == 2 and man["run"]["passed"] is True and rep["run_id"] == run_id
    assert kinds["onnx/fp32"]["path"] == f"runs/{run_id}/onnx/student.fp32.onnx"
    assert kinds["onnx/fp32"]["validation"] == {
        "run_id": run_id,
        "student_sha256": rep["student"]["sha256"],
        "passed": True,
        "failures": [],
        "backend": "onnxruntime",
    }
    for f in ("report.md", "samples.png", "latency.png"):
        assert (out / f).stat().st_size > 0
        assert (out / "runs" / run_id / f).read_bytes() == (out / f).read_bytes()
    assert "onnxruntime fp32" in res.output  # the terminal table
    # the threads grid: every variant at 1 and all cores, the pick names variant, threads and batch
    th = rep["threads"]
    assert {(p["threads"], p["batch"]) for p in th["points"]} == {(t, b) for t in th["grid"] for b in (1, 2)}
    rec = th["recommendation"]
    assert rec is None or (rec["variant"] == "onnxruntime fp32" and rec["threads"] in th["grid"])
    assert "threads grid" in res.output


@pytest.mark.slow
def test_second_run_reuses_the_export(compiled, tiny_teacher_dir):
    """A re-run publishes a new run folder; the unchanged export is hard-linked into it, not redone."""
    from engines.manifest import Manifest

    _, out = compiled
    before = Manifest.load(out)
    old = before.verify(before.get("onnx/fp32"))
    stat = old.stat()
    res = invoke(tiny_teacher_dir, "--steps", 2, "-o", out, "--precision", "fp32", *FAST)
    assert res.exit_code == 0
    after = Manifest.load(out)
    new = after.verify(after.get("onnx/fp32"))
    assert after.run["id"] != before.run["id"] and new.parent.parent.name == after.run["id"]
    assert new.stat().st_ino == stat.st_ino and new.stat().st_mtime_ns == stat.st_mtime_ns
    assert old.exists()  # the run served before stays until the next publish (a reader may be opening it)


@pytest.mark.slow
def test_failed_bar_exits_1_with_report(tiny_teacher_dir, tmp_path):
    res = invoke(
        tiny_teacher_dir,
        "--steps",
        2,
        "-o",
        tmp_path,
        "--precision",
        "fp32",
        "--bar",
        "call.fp32=1e-12",
        *FAST,
    )
    assert res.exit_code == 1
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["passed"] is False and "call-level rel. L2" in rep["failures"][0]


@pytest.mark.slow
def test_failed_bar_with_triton_repo_exits_1_and_writes_no_repo(tiny_teacher_dir, tmp_path):
    repo = tmp_path / "repo"
    out = tmp_path / "out"
    res = invoke(
        tiny_teacher_dir, "--steps", 2, "-o", out, "--precision", "fp32", "--bar", "call.fp32=1e-12",
        "--triton-repo", repo, *FAST,
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert json.loads((out / "report.json").read_text())["passed"] is False
    assert not repo.exists()


@pytest.fixture(scope="module")
def orphan_ckpt(tiny_teacher_dir, tmp_path_factory):
    """A student whose teacher folder no longer exists."""
    t = load_teacher(tiny_teacher_dir)
    ck = StudentCheckpoint(
        "UNet2DModel",
        dict(t.model.config),
        "DDPMScheduler",
        dict(t.scheduler.config),
        t.schedule(2),
        TeacherRef("/nonexistent/teacher", "0" * 64),
    )
    return save_checkpoint(ck, t.model, tmp_path_factory.mktemp("orphan") / "student.ckpt")


@pytest.mark.slow
def test_missing_teacher_is_skipped_with_reason(orphan_ckpt, tmp_path):
    res = invoke(orphan_ckpt, "-o", tmp_path, "--precision", "fp32", *FAST)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["teacher"]["available"] is False and "not found" in rep["teacher"]["reason"]
    assert any("teacher checks" in s for s in rep["skipped"])


def test_require_teacher_exits_2(orphan_ckpt, tmp_path):
    res = invoke(orphan_ckpt, "-o", tmp_path / "o", "--precision", "fp32", "--require-teacher", *FAST)
    assert res.exit_code == 2
    assert "/nonexistent/teacher" in res.output and "not found" in res.output


@pytest.mark.parametrize(
    "case", ["missing", "pickle", "precision", "batch", "unwritable", "folder_no_steps", "bar"]
)
def test_bad_input_exits_2_without_artifacts(case, tmp_path, tiny_teacher_dir):
    src, out, extra = tmp_path / "student.ckpt", tmp_path / "out", []
    if case == "pickle":
        src.write_bytes(pickle.dumps({"state_dict": {}}))
    elif case == "precision":
        src, extra = tiny_teacher_dir, ["--steps", "2", "--precision", "fp32,fp64"]
    elif case == "batch":
        src, extra = tiny_teacher_dir, ["--steps", "2", "--batch-sizes", "1,x"]
    elif case == "bar":
        src, extra = tiny_teacher_dir, ["--steps", "2", "--bar", "call.fp99=1"]
    elif case == "unwritable":
        src, extra = tiny_teacher_dir, ["--steps", "2"]
        (tmp_path / "a_file").write_text("x")  # chmod would not stop root; a file as parent does
        out = tmp_path / "a_file" / "out"
    elif case == "folder_no_steps":
        src = tiny_teacher_dir
    res = CliRunner().invoke(main, [str(src), "-o", str(out), *extra])
    assert res.exit_code == 2, res.output
    # one line, from dd-compile's error mapping or click's usage check, naming what is wrong
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith(("dd-compile: error:", "Error:"))]
    names = {"missing": "student.ckpt", "pickle": "student.ckpt", "precision": "fp64", "batch": "1,x"}
    names |= {"unwritable": "a_file", "folder_no_steps": "--steps", "bar": "call.fp99"}
    assert names[case] in line, line
    assert "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())


def test_tensorrt_backend_without_tensorrt_exits_2_before_any_work(tiny_teacher_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: this checks the machine without it")
    res = invoke(
        tiny_teacher_dir, "--steps", 2, "-o", tmp_path, "--precision", "fp32", "--backend", "tensorrt", *FAST
    )
    assert res.exit_code == 2
    (line,) = [ln for ln in res.output.splitlines() if "error" in ln]
    assert "TensorRT" in line and "dd-compile[tensorrt]" in line
    assert not any(tmp_path.iterdir())  # refused before the export: nothing written
