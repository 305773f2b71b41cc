"""dd-bench on a text-to-image output (optimizer/bench/pipeline.py): a tiny SD pipeline compiled once
per module, benched once through the CLI; the bench JSON is the pixel bench's schema (merge reads
it), the teacher is timed in a fresh process, and a tampered output is refused before any timing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from optimizer.bench.cli import main as bench_main
from optimizer.bench.schema import load_bench, result
from tests.t2i_tiny import make_tiny_pipeline

# compiling the tiny pipeline (export, quantize, validate, teacher timing) takes ~75 s on 2 cores
pytestmark = pytest.mark.slow

BATCHES = (1, 2)
ENGINES = ("onnxruntime/fp32", "onnxruntime/fp16")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    from optimizer.cli import main as compile_main

    d = tmp_path_factory.mktemp("bench_t2i")
    src = make_tiny_pipeline(d / "sd")
    out = d / "out"
    args = [src, "--steps", "2", "-o", out, "--precision", "fp32,fp16", "--threads", "1"]
    args += ["--bench-seconds", "0.5", "--threads-grid", "0"]
    res = CliRunner().invoke(compile_main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def _bench(*args: object):
    return CliRunner().invoke(bench_main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def bench_dir(compiled, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("bench_t2i_out") / "bench"
    res = _bench(compiled, "--seconds", "2", "--batch-sizes", "1,2", "--no-progress", "-o", dest)
    assert res.exit_code == 0, res.output
    return dest


def _row(bench: dict, name: str) -> dict:
    return next(v for v in bench["variants"] if v["name"] == name)


def test_bench_json_has_every_mix_both_phases_and_the_fresh_teacher(bench_dir):
    bench = load_bench(bench_dir / "bench.json")
    assert bench["source"]["kind"] == "text-to-image"
    assert bench["source"]["schedule"]["steps"] == 2
    for name in ENGINES:
        row = _row(bench, name)
        assert row["skipped"] is None and row["role"] == "engine" and row["model"] == "student"
        assert row["artifact"] == "pipeline/" + name.split("/")[1]
        for b in BATCHES:
            e2e, call = result(row, "e2e", b), result(row, "call", b)
            assert e2e["p50_ms"] > 0 and e2e["steps"] == 2 and e2e["n"] >= 2
            # CFG (guidance 7.5 > 1): one UNet evaluation runs the negative and positive batch
            assert call["p50_ms"] > 0 and call["steps"] == 1 and call["unet_batch"] == 2 * b
            assert math.isclose(e2e["images_per_s"], b / (e2e["p50_ms"] / 1e3), rel_tol=1e-2)
            # a whole generation (2 steps x the UNet, text encoder, VAE) costs more than one UNet call
            assert e2e["p50_ms"] > call["p50_ms"]
            assert call["speedup_vs_teacher"] is None and "end to end only" in call["speedup_null_reason"]
    teacher = _row(bench, "teacher/torch-eager/fp32")
    assert teacher["role"] == "baseline" and teacher["skipped"] is None
    assert bench["teacher_baseline"]["fresh_process"] is True
    for b in BATCHES:
        t = result(teacher, "e2e", b)
        assert t["steps"] == 50 and t["p50_ms"] > 0
        assert t["baseline"]["source"] == "fresh process" and t["baseline"]["threads"] >= 1
    for name in ENGINES:
        for b in BATCHES:
            x = result(_row(bench, name), "e2e", b)
            sp = x["speedup_vs_teacher"]
            if sp is None:
                assert x["speedup_null_reason"], x
            else:  # a 2-step student against its 50-step CFG teacher
                t = result(teacher, "e2e", b)
                assert sp == pytest.approx(t["p50_ms"] / x["p50_ms"], rel=1e-2) and sp > 1
    assert set(bench["best"]) == {"call", "e2e"}
    assert bench["flops"]["student"] is None and bench["flops"]["method"]
    assert all(_row(bench, n)["memory"]["method"].startswith("not probed") for n in ENGINES)


def test_threads_grid_and_reports_written(bench_dir):
    bench = json.loads((bench_dir / "bench.json").read_text())
    s = bench["threads"]
    assert s["unit"] == "generation" and 1 in s["grid"]
    got = {(p["variant"], p["threads"], p["batch"]) for p in s["points"]}
    assert got == {(n, t, b) for n in ENGINES for t in s["grid"] for b in BATCHES}
    assert all(p["median_ms"] > 0 for p in s["points"])
    md = (bench_dir / "bench.md").read_text()
    assert "onnxruntime/fp16" in md and "teacher/torch-eager/fp32" in md
    for png in ("latency.png", "speedup.png"):
        assert (bench_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_merge_with_itself(bench_dir, tmp_path):
    j = bench_dir / "bench.json"
    for phase in ("e2e", "call"):
        md = tmp_path / f"{phase}.md"
        res = CliRunner().invoke(bench_main, ["merge", str(j), str(j), "-o", str(md), "--phase", phase])
        assert res.exit_code == 0, res.output
        text = md.read_text()
        assert "## batch 1" in text and "## batch 2" in text
        assert "onnxruntime/fp16" in text


def _copy(compiled: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(compiled, out, ignore=shutil.ignore_patterns("bench"))
    return out


@pytest.mark.parametrize("victim", ["tokenizer/tokenizer.json", "onnx/unet.fp16.onnx"])
def test_tampered_output_is_refused_before_any_timing(compiled, tmp_path, victim):
    out = _copy(compiled, tmp_path)
    f = next((out / "runs").glob(f"*/{victim}"))
    f.write_bytes(f.read_bytes() + b"\0")
    dest = tmp_path / "b"
    res = _bench(out, "--seconds", "1", "--batch-sizes", "1", "--no-teacher", "--no-progress", "-o", dest)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "sha256" in lines[0] and f.name in lines[0], res.output
    assert not dest.exists()


def test_unvalidated_pipeline_is_refused_and_tensorrt_is_not_a_pipeline_backend(compiled, tmp_path):
    out = _copy(compiled, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    art = next(a for a in m["artifacts"] if a["name"] == "pipeline/fp16")
    art["validation"]["passed"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    res = _bench(out, "--no-teacher", "--no-progress", "-o", tmp_path / "b")
    assert res.exit_code == 2 and "'pipeline/fp16' is not servable" in res.output, res.output
    res = _bench(compiled, "--backends", "tensorrt", "-o", tmp_path / "b")
    assert res.exit_code == 2 and "unknown ['tensorrt'] for text-to-image outputs" in res.output
    assert not (tmp_path / "b").exists()


def test_missing_teacher_folder_skips_its_row(compiled, tmp_path):
    dest = tmp_path / "b"
    res = _bench(
        compiled,
        "--teacher",
        tmp_path / "no-such-teacher",
        "--seconds",
        "1",
        "--batch-sizes",
        "1",
        "--threads-grid",
        "0",
        "--backends",
        "onnxruntime",
        "--no-progress",
        "-o",
        dest,
    )
    assert res.exit_code == 0, res.output
    bench = load_bench(dest / "bench.json")
    t = _row(bench, "teacher/torch-eager/fp32")
    assert "teacher folder not found" in t["skipped"] and t["results"] == []
    assert bench["teacher_baseline"] is None and bench["threads"] is None
    assert {v["name"] for v in bench["variants"]} == {*ENGINES, "teacher/torch-eager/fp32"}
    for name in ENGINES:
        x = result(_row(bench, name), "e2e", 1)
        assert x["p50_ms"] > 0 and x["speedup_vs_teacher"] is None and x["speedup_null_reason"]
