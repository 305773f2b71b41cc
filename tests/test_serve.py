"""dd-serve for real: a PyTriton tritonserver on 127.0.0.1, clients via tritonclient HTTP and gRPC.

Needs the serve venv (bash .ci/setup-serve; found at $DD_SERVE_PYTHON, or
$DD_SERVE_VENV/bin/python, default ~/.cache/dd-compile/serve-venv) and tritonclient here.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import engines

http = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc] here")
grpc = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc] here")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "data" / "runtime_fixture"
MODEL = "dd_sampler"


def serve_python() -> Path | None:
    if os.environ.get("DD_SERVE_PYTHON"):
        return Path(os.environ["DD_SERVE_PYTHON"])
    venv = os.environ.get("DD_SERVE_VENV") or Path.home() / ".cache" / "dd-compile" / "serve-venv"
    return Path(venv) / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_serve_env(*modules: str) -> Path:
    """The serve venv's python, or skip naming what is missing."""
    py = serve_python()
    need = ", ".join(("pytriton", "onnxruntime", "click", *modules))
    if not py.exists() or subprocess.run([str(py), "-c", f"import {need}"], capture_output=True).returncode:
        pytest.skip(f"serve environment at {py} lacks one of {need} (run: bash .ci/setup-serve)")
    return py


@contextlib.contextmanager
def run_server(tmp: Path, out: Path, model: str, *args: str, py: Path | None = None):
    """dd-serve OUT on free 127.0.0.1 ports until `model` is ready; stopped with SIGINT after."""
    py = py or require_serve_env()
    ports = {"port": free_port(), "grpc": free_port(), "metrics": free_port()}
    log = open(tmp / "server.log", "w")
    # --exit-timeout 2: no request is in flight at teardown (Triton's 30 s default was 30 s a test)
    cmd = [str(py), "-m", "engines.serve", str(out), "--threads", "1", "--exit-timeout", "2", *args]
    for k, v in ports.items():
        cmd += [f"--{'port' if k == 'port' else k + '-port'}", str(v)]
    proc = subprocess.Popen(
        cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    url = f"127.0.0.1:{ports['port']}"
    client = http.InferenceServerClient(url)
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"dd-serve exited with {proc.returncode}:\n" + (tmp / "server.log").read_text()[-3000:]
                )
            try:
                if client.is_model_ready(model):
                    break
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail("dd-serve not ready after 180 s:\n" + (tmp / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield {
            "http": url,
            "grpc": f"127.0.0.1:{ports['grpc']}",
            "out": out,
            "proc": proc,
            "log": tmp / "server.log",
        }
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    py = require_serve_env()
    tmp = tmp_path_factory.mktemp("serve")
    out = tmp / "out"
    shutil.copytree(FIXTURE, out)
    with run_server(tmp, out, MODEL, py=py) as s:
        yield s


def infer(mod, url: str, seeds: list[int]) -> np.ndarray:
    c = mod.InferenceServerClient(url)
    x = mod.InferInput("seed", [len(seeds), 1], "INT64")
    x.set_data_from_numpy(np.array(seeds, np.int64)[:, None])
    return c.infer(MODEL, [x]).as_numpy("images")


@pytest.mark.slow
def test_concurrent_requests_match_the_runtime(server):
    jobs = [
        (http if i % 2 else grpc, server["http" if i % 2 else "grpc"], [2 * i, 2 * i + 1]) for i in range(8)
    ]
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: infer(*j), jobs))
    assert time.monotonic() - t0 < 60
    with engines.load(server["out"], precision="fp32") as pipe:
        want = pipe(seeds=list(range(16)))
    got = np.concatenate(results)
    assert got.shape == want.shape == (16, 1, 8, 8)
    assert np.abs(got - want).max() <= 1e-4


def malformed_requests():
    def seed(shape, dtype, arr):
        x = http.InferInput("seed", shape, dtype)
        x.set_data_from_numpy(arr)
        return [x]

    return {
        "wrong shape": (seed([3], "INT64", np.arange(3, dtype=np.int64)), "shape"),
        "wrong dtype": (seed([2, 1], "FP32", np.zeros((2, 1), np.float32)), "data-type"),
        "missing input": ([], "0 inputs"),
        "batch over max": (seed([9, 1], "INT64", np.zeros((9, 1), np.int64)), "batch-size"),
        "negative seed": (seed([1, 1], "INT64", np.array([[-1]], np.int64)), "seeds: -1 is not an integer"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", list(malformed_requests()))
def test_malformed_request_gets_an_error_and_server_stays_up(server, case):
    inputs, message = malformed_requests()[case]
    c = http.InferenceServerClient(server["http"])
    with pytest.raises(InferenceServerException, match=message):
        c.infer(MODEL, inputs)
    assert server["proc"].poll() is None
    assert c.is_server_live() and c.is_model_ready(MODEL)
    assert infer(grpc, server["grpc"], [5]).shape == (1, 1, 8, 8)
