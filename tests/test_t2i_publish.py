"""Trust for pipelines, end to end: a re-run killed at a stage or failing a bar never replaces the
served pipeline; --batch-sizes 1 under CFG compiles exactly that profile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import engines
from engines.manifest import Manifest
from tests.t2i_tiny import make_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--threads", "1", "--bench-seconds", "0.3", "--samples", "4", "--fid-samples", "8"]
FAST += ["--threads-grid", "0", "--batch-sizes", "1"]


def _cli(args):
    from optimizer.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny CFG pipeline compiled at --batch-sizes 1: the output later runs go into."""
    d = tmp_path_factory.mktemp("t2i_publish")
    src = make_tiny_pipeline(d / "sd")
    out = d / "out"
    res = _cli([src, "--steps", "2", "-o", out, "--precision", "fp32", *FAST])
    assert res.exit_code == 0, res.output
    return src, out


@pytest.mark.slow
def test_batch_size_one_under_cfg_is_the_profile_built(served):
    _, out = served
    desc = json.loads(next((out / "runs").glob("*/t2i.fp32.json")).read_text())
    dims = {k: c["io"]["dims"]["batch"] for k, c in desc["components"].items()}  # [min, opt, max]
    assert dims["unet"][::2] == [1, 2] and dims["text_encoder"][::2] == [1, 1]
    with engines.load(out) as pipe:  # chunks of one image: any number of prompts
        assert pipe(["a", "b", "c"], seeds=[0, 1, 2]).shape[0] == 3


@pytest.mark.slow
def test_a_killed_then_failing_rerun_never_replaces_the_served_pipeline(served, tmp_path):
    src, out = served
    before = Manifest.load(out).run["id"]
    with engines.load(out) as pipe:
        want = pipe(["a red seven"], seeds=[3])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DD_COMPILE_FAULT_AT": "quantize"}
    args = [str(src), "--steps", "2", "-o", str(out), "--precision", "fp32,fp16", *FAST]
    proc = subprocess.run(
        [sys.executable, "-m", "optimizer.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert Manifest.load(out).run["id"] == before

    # a re-run that fails a bar (exit 1): its report is kept and named, the passing run serves on
    res = _cli([src, "--steps", "2", "-o", out, "--precision", "fp32", "--bar", "call.fp32=1e-12", *FAST])
    assert res.exit_code == 1, res.output
    m = Manifest.load(out)
    assert m.run["id"] == before and m.last_run["passed"] is False
    failed = m.last_run["id"]
    assert f"not published: {out} still serves run {before}" in res.stderr
    assert json.loads((out / "runs" / failed / "report.json").read_text())["passed"] is False
    with engines.load(out) as pipe:
        np.testing.assert_array_equal(pipe(["a red seven"], seeds=[3]), want)
    assert not any(out.glob(".staging-*"))  # the killed run's staging went with the next run
