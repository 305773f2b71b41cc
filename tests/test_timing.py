"""The one timing loop and the honest teacher baseline (fresh process, checked against in-run)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import statistics
import time

import numpy as np
import pytest

from optimizer.timing import StopRule, comparable, is_stable, time_interleaved, time_until_stable

log = logging.getLogger(__name__)


def test_stable_means_last_half_median_near_whole_median():
    assert is_stable([10.0] * 6, min_samples=5, rel_tol=0.03)
    assert not is_stable([10.0] * 4, min_samples=5, rel_tol=0.03)  # too few repeats
    # drifting upwards by 10%: the last half's median is 5% off the whole one
    assert not is_stable([10.0] * 5 + [11.0] * 5, min_samples=5, rel_tol=0.03)
    assert is_stable([10.0] * 5 + [10.2] * 5, min_samples=5, rel_tol=0.03)


def test_loop_stops_once_stable_and_interleaves():
    order = []
    fns = {
        "a": lambda: (order.append("a"), time.sleep(0.002)),
        "b": lambda: (order.append("b"), time.sleep(0.004)),
    }
    run = time_until_stable(fns, StopRule(warmup=1, min_rounds=5, max_rounds=100, rel_tol=0.2))
    assert 5 <= run.rounds < 100 and all(run.stable.values())
    timed = order[2:]  # after one warm-up call each
    assert timed[: 2 * run.rounds] == ["a", "b"] * run.rounds
    assert run.timings["b"].median_ms > run.timings["a"].median_ms > 1.5


def _busy(seconds: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def test_budget_ends_an_unstable_run_and_no_speedup_is_stated():
    n = iter(range(10_000))
    # every call 30% slower than the last: the last half's median is several times the whole
    # one, which no preempted call can hide (at 10% a single 3.7 ms outlier once made it "stable")
    run = time_until_stable(
        {"drift": lambda: _busy(0.0005 * 1.3 ** next(n))},
        StopRule(warmup=0, min_rounds=3, max_seconds=0.15),
    )
    t = run.timings["drift"]
    assert t.stable is False and 3 <= run.rounds < 200
    base = {"median_ms": 1.0, "n": 20, "stable": True}
    why = comparable(base, t.to_dict(), min_samples=5)
    assert why is not None and "not stable" in why
    assert "repeats" in comparable(base, {"median_ms": 1.0, "n": 3, "stable": True}, min_samples=5)
    assert comparable(base, base, min_samples=5) is None


def test_fixed_count_wrapper():
    calls = []
    out = time_interleaved({"x": lambda: calls.append(1)}, warmup=2, repeats=7, max_seconds=60)
    assert len(out["x"].samples_ms) == 7 and len(calls) == 9


def _spinning_ort_variant(path, spec):
    """A real ONNX Runtime session with a spinning 2-thread pool, on a tiny graph with the teacher's
    inputs (a 3x3 conv of the sample): timed beside the teacher, as dd-compile's variants are."""
    from onnx import TensorProto, helper, save

    from engines.onnxruntime_runner import OnnxRuntimeRunner

    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], np.full(9, 0.1, np.float32))
    g = helper.make_graph(
        [helper.make_node("Conv", ["sample", "w"], ["out_sample"], pads=[1, 1, 1, 1])],
        "spin",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 1, 8, 8]),
            helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
        ],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [w],
    )
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return OnnxRuntimeRunner(path, spec, threads=2, name="spinning-ort")


def _median_ratio(a: list[dict], b: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in a) / statistics.median(x[key] for x in b)


@pytest.mark.slow
def test_teacher_baseline_does_not_move_under_interference(tiny_teacher_dir, tmp_path, monkeypatch):
    import torch

    from engines.torch_runner import TorchRunner
    from optimizer.compile.speed import SpeedConfig, measure
    from optimizer.model_io import io_spec_for, sample_shape
    from optimizer.models import Denoiser, load_teacher

    torch.set_num_threads(1)
    teacher = load_teacher(tiny_teacher_dir, reference_steps=8)
    cfg_m = dict(teacher.model.config)
    spec = io_spec_for(teacher.model_class, cfg_m, [1])
    shape = sample_shape(teacher.model_class, cfg_m)
    runner = TorchRunner(Denoiser(teacher.model), spec, name="torch-teacher")
    runner.activate()
    monkeypatch.setenv("DD_ORT_SPINNING", "1")  # the pool busy-waits between runs
    spin = _spinning_ort_variant(tmp_path / "spin.onnx", spec)
    spin.activate()
    cfg = SpeedConfig(batch_sizes=(1,), max_seconds=1.5, teacher_threads=(1,))
    tol = cfg.agree_tol
    sch = teacher.schedule(8)

    def baseline(variants: dict) -> dict:
        return measure((runner, sch), variants, shape, None, cfg, teacher_dir=tiny_teacher_dir)["teacher"]

    # The machine is shared: others' load moves even a lone process's timings by 10-20% from one
    # run to the next. So three alternating (alone, beside the spinning session) measurements are
    # made and their medians compared: a systematic effect of the session on the reported figure
    # shows in the medians, a burst of others' load in one run does not.
    quiet, noisy = [], []
    for _ in range(3):
        quiet.append(baseline({}))
        noisy.append(baseline({"spin": (spin, sch)}))
    moved: dict[str, tuple[float, float]] = {}
    for lvl in ("per_call", "end_to_end"):
        q = [x[lvl][1] for x in quiet]
        n = [x[lvl][1] for x in noisy]
        fig = lambda xs, k: [round(x[k], 3) for x in xs]  # noqa: E731
        log.warning(
            "%s: reported alone %s, beside the spinning session %s ms; in-run alone %s, beside %s ms; "
            "verdicts beside: %s",
            lvl,
            fig(q, "median_ms"),
            fig(n, "median_ms"),
            fig(q, "in_run_median_ms"),
            fig(n, "in_run_median_ms"),
            [x["verdict"] for x in n],
        )
        for x in q + n:
            assert x["source"] == "fresh process" and x["threads"] == 1 and x["n"] >= cfg.min_repeats
            assert x["tolerance"] == tol and x["verdict"] in ("agree", "disagree")
        mq = statistics.median(x["median_ms"] for x in q)
        mn = statistics.median(x["median_ms"] for x in n)
        # the machine's own run-to-run noise, seen in the three runs alone (0 on a quiet machine)
        noise = max(x["median_ms"] for x in q) / min(x["median_ms"] for x in q) - 1
        # one-sided: interference can only slow the teacher down; a baseline *faster* beside the
        # spinning session is others' load easing between runs (seen in CI: -16% with 1.5% noise)
        assert mn / mq - 1 <= tol + noise, (lvl, mq, mn, noise)
        moved[lvl] = (abs(mn / mq - 1), _median_ratio(n, q, "in_run_median_ms") - 1)
    # the planted session must disturb the teacher timed beside it for the comparison above to
    # mean anything; on an idle machine with a free core it may not (seen in CI's clean-clone run:
    # in-run +2.4% per call): then there is nothing to show, which is a skip, not a pass
    in_run_moved = max(m[1] for m in moved.values())
    if in_run_moved <= max(m[0] for m in moved.values()):
        pytest.skip(
            f"the spinning session did not slow the in-run teacher here ({moved}): no interference to show"
        )
