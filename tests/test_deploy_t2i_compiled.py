"""Deploying a text-to-image pipeline dd-compile published (out/manifest.json of kind
text-to-image): dd-compile --triton-repo and dd-triton write the repository without
--allow-unvalidated, dd_t2i's images equal engines.load(out)'s, and dd-serve OUT serves them.
One tiny compile (fp32, 2 steps) and one server for the module."""

import json
import sys

import numpy as np
import pytest

import engines
from engines.triton import write_triton_repo
from engines.triton_t2i import PIPELINE_MODEL
from tests.test_triton import parse
from tests.test_triton_t2i import fake_pb_utils

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from click.testing import CliRunner

    from optimizer.cli import main
    from tests.t2i_tiny import make_tiny_pipeline

    d = tmp_path_factory.mktemp("t2i_compiled")
    src = make_tiny_pipeline(d / "sd")
    out, repo = d / "out", d / "repo"
    args = [src, "--steps", "2", "-o", out, "--precision", "fp32", "--threads", "1", "--bench-seconds", "0.5"]
    res = CliRunner().invoke(main, [str(a) for a in [*args, "--triton-repo", repo]], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, repo


def test_published_pipeline_gets_a_validated_repository(compiled, tmp_path, monkeypatch):
    import importlib.util

    out, repo = compiled
    assert json.loads((repo / ".dd-compile.json").read_text())["allow_unvalidated"] is False
    assert "allow_unvalidated" not in (repo / "README.md").read_text()
    assert parse(repo / PIPELINE_MODEL / "config.pbtxt").backend == "python"
    again = write_triton_repo(out, tmp_path / "repo")  # dd-triton: no --allow-unvalidated needed
    assert (
        parse(again / "dd_unet" / "config.pbtxt").max_batch_size
        == parse(repo / "dd_unet" / "config.pbtxt").max_batch_size
    )
    # dd_t2i (BLS to the published graphs) gives engines.load's images
    monkeypatch.setattr(sys, "path", list(sys.path))
    with engines.load(out, threads=1) as pipe:
        want = pipe(["a red seven", ""], seeds=[4, 5])
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils(pipe.runners, []))
        spec = importlib.util.spec_from_file_location(
            "dd_t2i_compiled", repo / PIPELINE_MODEL / "1" / "model.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize({})
        request = {
            "prompt": np.array([[b"a red seven"], [b""]], object),
            "seed": np.array([[4], [5]], np.int64),
        }
        (response,) = model.execute([request])
    assert response.err is None and np.array_equal(response.output_tensors[0].as_numpy(), want)


def test_dd_serve_on_the_published_output(compiled, tmp_path):
    from tests.test_serve import http, require_serve_env, run_server
    from tests.test_serve_t2i import MODEL, infer

    out, _ = compiled
    py = require_serve_env("tokenizers")
    with run_server(tmp_path, out, MODEL, py=py) as s:  # validated: no --allow-unvalidated
        got = infer(http, s["http"], ["a red seven", "green seven"], [1, 2])
    with engines.load(out, threads=1) as pipe:
        want = pipe(["a red seven", "green seven"], seeds=[1, 2])
    assert np.abs(got.astype(int) - want).max() <= 1
