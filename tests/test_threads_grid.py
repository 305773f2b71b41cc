"""The threads grid: recommendation and verdicts on given timings, and one tiny real measurement."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from optimizer import threads_grid as tg
from optimizer.timing import StopRule


def _p(prec: str, t: int, ms: float, b: int = 16, stable: bool = True, passed: bool = True):
    return tg.GridPoint(f"onnxruntime {prec}", "onnxruntime", prec, t, b, ms, stable, 10, passed)


# 2 cores; int8 is 1.43x fp32 at one thread, 1.02x at two (the shape of result)
POINTS = [_p("fp32", 1, 20.0), _p("fp32", 2, 12.0), _p("int8", 1, 14.0), _p("int8", 2, 11.8)]


def test_arithmetic():
    p = POINTS[0]
    assert p.images_per_s == pytest.approx(800.0)
    assert p.images_per_s_per_core == pytest.approx(800.0)
    assert p.serving_images_per_s(2) == pytest.approx(1600.0)  # two 1-thread replicas
    assert POINTS[1].serving_images_per_s(2) == pytest.approx(16 / 0.012)  # one 2-thread replica


def test_recommendation_names_variant_threads_and_batch():
    rec = tg.recommend(POINTS, cores=2)
    assert (rec["variant"], rec["threads"], rec["batch"], rec["replicas"]) == ("onnxruntime int8", 1, 16, 2)
    assert rec["serving_images_per_s"] == pytest.approx(2 * 16 / 0.014, rel=1e-3)
    assert "1 thread x 2 replicas, batch 16" in rec["summary"]
    # on one core only single-thread points fit: same pick, one replica
    assert tg.recommend(POINTS, cores=1)["replicas"] == 1


def test_failing_or_unstable_points_are_never_recommended():
    pts = [_p("fp32", 1, 20.0), _p("int8", 1, 5.0, passed=False), _p("fp16", 1, 6.0, stable=False)]
    assert tg.recommend(pts, cores=2)["variant"] == "onnxruntime fp32"
    assert tg.recommend([_p("int8", 1, 5.0, passed=False)], cores=2) is None


def test_verdict_per_precision_and_thread_count():
    v = tg.precision_verdicts(POINTS)["onnxruntime int8"]
    assert v["vs_fp32"][1][16] == pytest.approx(20 / 14, abs=1e-3)
    assert v["vs_fp32"][2][16] == pytest.approx(12 / 11.8, abs=1e-3)
    assert (
        v["verdict"]
        == "int8 vs onnxruntime fp32 at batch 16: pays at 1 (1.43x) threads; not at 2 (1.02x) threads"
    )
    unstable = tg.precision_verdicts([_p("fp32", 1, 20.0), _p("int8", 1, 14.0, stable=False)])
    assert unstable["onnxruntime int8"]["vs_fp32"][1][16] is None
    assert "unjudged at 1" in unstable["onnxruntime int8"]["verdict"]


def test_summary_and_table_rows():
    s = tg.summary(POINTS, 2, (1, 2))
    rows = tg.table_rows(s)
    assert len(rows) == 1 + len(POINTS)
    int8_1 = next(r for r in rows if r[0] == "onnxruntime int8" and r[1] == "1")
    assert int8_1[-1] == "1.43x" and int8_1[6].endswith("(2x)")


def test_report_markdown_has_the_grid():
    from optimizer.compile.compile_report import CompileReport

    rep = CompileReport(student={}, teacher={}, threads=tg.summary(POINTS, 2, (1, 2)))
    md = rep.to_markdown()
    assert "| onnxruntime int8 | 1 | 16 |" in md and "serves best: onnxruntime int8 at 1 thread" in md


@pytest.mark.parametrize("text", ["", "a,b", "0,1", "-2"])
def test_parse_grid_refuses(text):
    with pytest.raises(ValueError, match="--threads-grid"):
        tg.parse_grid(text)


def test_parse_grid():
    assert tg.parse_grid("2,1,2") == (1, 2)


def test_cli_grid_option():
    import click

    from optimizer.cli import _threads_grid

    assert _threads_grid(None) is None and _threads_grid("0") == () and _threads_grid("1,2") == (1, 2)
    with pytest.raises(click.BadParameter, match="--threads-grid"):
        _threads_grid("1,x")


@pytest.mark.slow  # imports diffusers: ~10 s on the shared 2-core machine
def test_cli_bad_grid_exits_2(tmp_path):
    from optimizer.cli import main

    for demo in ("pixel", "t2i"):  # both families take a grid (tests/test_families.py): a bad one is refused
        r = CliRunner().invoke(main, ["--demo", demo, "-o", str(tmp_path / "o"), "--threads-grid", "x"])
        assert r.exit_code == 2 and "--threads-grid" in r.output, r.output
        assert not (tmp_path / "o").exists()


class _MatMul:
    """A real workload whose cost grows with the batch: batch x (64x64 @ 64x64)."""

    def __init__(self, threads: int):
        self.threads, self.open = threads, True
        self.w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)

    def infer(self, feeds, check=False):
        return feeds["sample"].reshape(-1, 64, 64) @ self.w

    def deactivate(self):
        self.open = False


def test_tiny_real_measurement():
    opened: list[_MatMul] = []

    def open_runner(name, t):
        opened.append(_MatMul(t))
        return opened[-1]

    rule = StopRule(warmup=1, min_rounds=3, max_rounds=50, min_samples=5, max_seconds=2.0, slice_s=0.01)
    meta = {"numpy fp32": {"backend": "numpy", "precision": "fp32", "passed": True}}
    pts = tg.time_grid(
        open_runner,
        meta,
        (1, 2),
        (1, 64),
        lambda b: {"sample": np.ones((b, 64, 64), np.float32)},
        rule,
    )
    assert len(pts) == 4 and len(opened) == 2 and not any(r.open for r in opened)  # one session each
    assert all(p.n >= 5 and p.median_ms > 0 for p in pts)
    med = {(p.threads, p.batch): p.median_ms for p in pts}
    assert med[(1, 64)] > 5 * med[(1, 1)]  # 64x the work costs clearly more than 1x
    assert tg.recommend(pts, cores=2) is not None or not any(p.stable for p in pts)
