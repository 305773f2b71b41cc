"""dd-bench on a tiny real dd-compile output: timing, schema, memory, FLOPs, merge, errors."""

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engines.errors import InputError
from optimizer.bench.cli import main
from optimizer.bench.flops import count_flops, matmul_peak_gflops
from optimizer.bench.measure import BenchConfig, run_bench, time_until_stable
from optimizer.bench.merge import merge
from optimizer.bench.schema import BENCH_VERSION, load_bench, result

REF_STEPS = 6


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    from diffusers import DDPMScheduler, UNet2DModel

    from optimizer.bench.minimal_out import build_minimal_out

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    out = tmp_path_factory.mktemp("bench") / "out"
    build_minimal_out(
        model,
        DDPMScheduler(num_train_timesteps=1000),
        out,
        student_steps=2,
        reference_steps=REF_STEPS,
        batch_sizes=[1, 4],
    )
    return out


@pytest.fixture(scope="module")
def benches(out_dir, tmp_path_factory):
    """Two real bench files of the same output: 2 threads measured, 1 thread with no e2e budget."""
    d = tmp_path_factory.mktemp("benches")
    runner = CliRunner()
    r2 = runner.invoke(
        main,
        [
            str(out_dir),
            "--batch-sizes",
            "1,2",
            "--seconds",
            "4",
            "--threads",
            "2",
            "--no-progress",
            "--allow-unvalidated",  # the minimal output is timed, never validated
            "-o",
            str(d / "t2"),
        ],
    )
    assert r2.exit_code == 0, r2.output
    r1 = runner.invoke(
        main,
        [
            str(out_dir),
            "--batch-sizes",
            "1,2",
            "--seconds",
            "0",
            "--threads",
            "1",
            "--no-memory",
            "--no-progress",
            "--allow-unvalidated",
            "-o",
            str(d / "t1"),
        ],
    )
    assert r1.exit_code == 0, r1.output
    return load_bench(d / "t2" / "bench.json"), load_bench(d / "t1" / "bench.json"), d


@pytest.mark.slow
def test_bench_refuses_unvalidated_and_records_the_override(benches, out_dir, tmp_path):
    """The minimal output was never validated: refused by default, benched with the flag, recorded."""
    r = CliRunner().invoke(main, [str(out_dir), "--seconds", "0", "--no-progress", "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "'onnx/fp32' is not servable: manifest version" not in r.output  # minimal out is v2
    assert "'onnx/fp32' is not servable" in r.output and "--allow-unvalidated" in r.output
    assert not (tmp_path / "b").exists()  # refused before any work
    b2, b1, _ = benches
    assert b2["allow_unvalidated"] is True and "onnx/fp32" in b2["unvalidated"]


@pytest.mark.parametrize("where", ["out", "onnx", "user_dir", "file"])
def test_bench_output_folder_rule(out_dir, tmp_path, where):
    """-o may not be the compiled output, hold or lie inside its artifacts, or be a user's folder."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    (tmp_path / "f.txt").write_text("keep")
    target = {"out": out_dir, "onnx": out_dir / "onnx", "user_dir": user, "file": tmp_path / "f.txt"}[where]
    before = sorted((p, p.stat().st_mtime_ns) for p in [*out_dir.rglob("*"), *tmp_path.rglob("*")])
    r = CliRunner().invoke(
        main, [str(out_dir), "--seconds", "0", "--no-progress", "--allow-unvalidated", "-o", str(target)]
    )
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "-o" in r.output
    after = sorted((p, p.stat().st_mtime_ns) for p in [*out_dir.rglob("*"), *tmp_path.rglob("*")])
    assert after == before


def _variant(bench, name):
    return next(v for v in bench["variants"] if v["name"] == name)


@pytest.mark.slow
def test_bench_measures_engine_and_teacher(benches):
    b2, _, d = benches
    assert b2["version"] == BENCH_VERSION and b2["config"]["threads"] == 2
    names = {v["name"] for v in b2["variants"] if not v["skipped"]}
    assert {"onnxruntime/fp32", "teacher/torch-eager/fp32"} <= names
    student, teacher = _variant(b2, "onnxruntime/fp32"), _variant(b2, "teacher/torch-eager/fp32")
    for v, steps in ((student, 2), (teacher, REF_STEPS)):
        for phase in ("call", "e2e"):
            for batch in (1, 2):
                r = result(v, phase, batch)
                assert r["method"] == "measured" and r["n"] >= 2
                assert 0 < r["p10_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
                assert r["steps"] == (1 if phase == "call" else steps)
                assert r["images_per_s"] == pytest.approx(batch / (r["p50_ms"] / 1e3), rel=1e-3)
    # the teacher's e2e runs REF_STEPS model calls, the student's 2: several times the cost
    assert result(teacher, "e2e", 1)["p50_ms"] > 1.5 * result(student, "e2e", 1)["p50_ms"]
    # the teacher row holds the fresh-process baseline, the in-run figure beside it
    assert b2["teacher_baseline"]["fresh_process"] is True
    tb = result(teacher, "call", 1)["baseline"]
    assert tb["source"] == "fresh process" and tb["in_run_threads"] == 2 and tb["threads"] in (1, 2)
    assert tb["verdict"] == ("agree" if abs(tb["in_run_over_fresh"] - 1) <= 0.10 else "disagree")
    # a speedup is stated exactly when both medians are stable, and is then the ratio of the p50s
    for v, phase, batch in ((teacher, "call", 1), (student, "e2e", 2), (student, "call", 2)):
        x, t = result(v, phase, batch), result(teacher, phase, batch)
        want = t["p50_ms"] / x["p50_ms"] if x["stable"] and t["stable"] else None
        assert x["speedup_vs_teacher"] == (None if want is None else pytest.approx(want, rel=1e-3))
        assert (x["speedup_null_reason"] is None) == (want is not None)
    best = b2["best"]["e2e"]["1"]
    assert (
        best == min((result(v, "e2e", 1)["p50_ms"], v["name"]) for v in b2["variants"] if not v["skipped"])[1]
    )
    for f in ("bench.json", "bench.md", "latency.png", "speedup.png"):
        assert (d / "t2" / f).stat().st_size > 500
    assert (d / "t2" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (d / "t2" / "bench.md").read_text()
    assert "| onnxruntime/fp32" in md and "torch.compile on CPU is off" in md
    # the threads grid: the student at 1 and all cores, per batch, one session per count
    th = b2["threads"]
    assert {(p["variant"], p["threads"], p["batch"]) for p in th["points"]} == {
        ("onnxruntime/fp32", t, b) for t in th["grid"] for b in (1, 2)
    }
    for p in th["points"]:
        assert p["images_per_s"] == pytest.approx(p["batch"] / (p["median_ms"] / 1e3), rel=1e-3)
        assert p["images_per_s_per_core"] == pytest.approx(p["images_per_s"] / p["threads"], rel=1e-3)
    assert th["recommendation"] is None or th["recommendation"]["variant"] == "onnxruntime/fp32"
    assert "Per call at threads" in md


@pytest.mark.slow
def test_flops_memory_and_fingerprint(benches):
    b2, b1, _ = benches
    # student.ckpt holds the teacher's weights here: one architecture, one FLOP count
    assert b2["flops"]["student"] == b2["flops"]["teacher"] > 0
    r = result(_variant(b2, "onnxruntime/fp32"), "call", 2)
    assert r["achieved_gflops"] == pytest.approx(
        b2["flops"]["student"] * 2 / (r["p50_ms"] / 1e3) / 1e9, rel=1e-2
    )
    assert (
        0 < r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / b2["peak"]["fp32_gflops"], rel=1e-2)
    )
    for name in ("onnxruntime/fp32", "teacher/torch-eager/fp32"):
        mem = _variant(b2, name)["memory"]
        assert mem["peak_rss_mb"].keys() == {"1", "2"}, mem
        for b in ("1", "2"):
            assert mem["peak_rss_mb"][b] >= mem["after_import_rss_mb"] > 10
    # the ORT process never imports torch: far smaller than the torch teacher's
    assert (
        _variant(b2, "onnxruntime/fp32")["memory"]["after_import_rss_mb"]
        < _variant(b2, "teacher/torch-eager/fp32")["memory"]["after_import_rss_mb"]
    )
    fp = b2["target"]["fingerprint"]
    flags = open("/proc/cpuinfo").read().split()
    assert fp["cpu"]["isa"]["avx2"] == ("avx2" in flags)
    assert fp["libraries"]["onnxruntime"] and fp["cpu"]["threads_used"] == 2
    assert b1["target"]["name"] != b2["target"]["name"]  # "x1t" vs "x2t"


@pytest.mark.slow
def test_no_budget_estimates_e2e(benches):
    _, b1, _ = benches
    for v in b1["variants"]:
        if v["skipped"]:
            continue
        e2e, call = result(v, "e2e", 1), result(v, "call", 1)
        assert e2e["method"] == "estimated" and e2e["p90_ms"] is None
        assert e2e["p50_ms"] == pytest.approx(e2e["steps"] * call["p50_ms"], rel=1e-3)
    assert "e2e" not in b1["best"]  # estimates never win


@pytest.mark.slow
def test_merge_two_targets(benches, tmp_path):
    b2, b1, d = benches
    out = tmp_path / "targets.md"
    r = CliRunner().invoke(
        main,
        [
            "merge",
            str(d / "t2" / "bench.json"),
            str(d / "t1" / "bench.json"),
            "--phase",
            "call",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    md = out.read_text()
    assert b1["target"]["name"] in md and b2["target"]["name"] in md
    for batch in (1, 2):
        assert f"## batch {batch}" in md
        best_row = [line for line in md.splitlines() if line.startswith("| **best**")][batch - 1]
        assert f"**{b2['best']['call'][str(batch)]}**" in best_row.split("|")[2]
        assert f"**{b1['best']['call'][str(batch)]}**" in best_row.split("|")[3]
    e2e = merge([d / "t2" / "bench.json", d / "t1" / "bench.json"])
    assert "(est.)" in e2e  # the 1-thread file's e2e figures are estimates and say so
    with pytest.raises(InputError, match="not measured"):
        merge([d / "t2" / "bench.json"], batch_sizes=[64])


def test_time_until_stable_interleaves_and_ranks():
    order = []
    fns = {
        "fast": lambda: order.append("fast"),
        "slow": lambda: (order.append("slow"), time.sleep(0.004)),
    }
    cfg = BenchConfig(slice_s=0.01, min_rounds=3, max_rounds=6, progress=False)
    g = time_until_stable(fns, 0.5, cfg, warmup=1)
    assert g.rounds >= 3
    # A B A B: every round visits both, so "slow" calls sit between runs of "fast" calls
    switches = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)
    assert switches >= 2 * g.rounds - 1
    assert g.timings["slow"].median_ms > 3.5 > g.timings["fast"].median_ms


def test_speedups_only_between_stable_timings():
    from optimizer.bench.measure import _derive

    def row(name, model, p50, stable, n=20):
        x = {"phase": "call", "batch": 1, "p50_ms": p50, "n": n, "stable": stable, "method": "measured"}
        return {"name": name, "model": model, "precision": "fp32", "skipped": None, "results": [x]}

    rows = [
        row("teacher/torch-eager/fp32", "teacher", 10.0, True),
        row("a", "student", 2.0, True),
        row("b", "student", 2.0, False),
        row("c", "student", 2.0, True, n=3),
    ]
    _derive(rows, {}, {"fp32_gflops": 1.0}, min_samples=5)
    got = {r["name"]: r["results"][0] for r in rows}
    assert got["a"]["speedup_vs_teacher"] == 5.0 and got["a"]["speedup_null_reason"] is None
    assert got["b"]["speedup_vs_teacher"] is None and "not stable" in got["b"]["speedup_null_reason"]
    assert got["c"]["speedup_vs_teacher"] is None and "3 repeats" in got["c"]["speedup_null_reason"]


def test_count_flops_matches_formula():
    lin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = lin

        def forward(self, sample):
            return self.m(sample)

    x = np.zeros((4, 16), np.float32)
    assert count_flops(Wrap(), {"sample": x}) == 2 * (16 * 32 + 32 * 8)  # per image, 2 per MAC
    assert matmul_peak_gflops("cpu", "float32", seconds=0.2, n=256) > 0.1


def test_bad_inputs_give_one_line_errors(tmp_path, out_dir):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match=r"x\.json: not a dd-bench file"):
        load_bench(bad)
    bad.write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        load_bench(bad)
    r = CliRunner().invoke(main, [str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no manifest" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(
        main,
        [str(out_dir), "--teacher", str(tmp_path / "missing"), "--no-progress", "--allow-unvalidated"],
    )
    assert r.exit_code == 2 and "teacher folder not found" in r.output
    with pytest.raises(InputError, match="batch sizes"):
        run_bench(out_dir, BenchConfig(batch_sizes=(0,)))
