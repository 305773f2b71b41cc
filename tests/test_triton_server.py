"""The generated dd_sampler model (Python backend, BLS) loaded by a real Triton server.

PyTriton's tritonserver (2.51) ships only the Python backend, so here the repository's dd_unet is
replaced by the same ONNX model bound through PyTriton (onnxruntime computes it); dd_sampler,
its config.pbtxt, model.py and dd_schedule.py are used exactly as dd-triton wrote them.
Needs the serve venv (bash .ci/setup-serve); skips without it.
"""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.test_serve import serve_python

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "data" / "runtime_fixture"

SCRIPT = r"""
import sys, shutil, numpy as np
from pathlib import Path
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
import tritonclient.http as http
from tritonclient.utils import InferenceServerException
from engines.manifest import Manifest
from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.schedule import draw_noise
from engines.triton import write_triton_repo

out, tmp, refs, port, gport, mport = sys.argv[1:7]
out, tmp = Path(out), Path(tmp)
repo = write_triton_repo(out, tmp / "repo", precision="fp32")
shutil.rmtree(repo / "dd_unet")  # no onnxruntime backend in PyTriton's server: bound below
m = Manifest.load(out)
runner = OnnxRuntimeRunner(out / m.get("onnx/fp32").path, m.io_spec, threads=1)
runner.activate()

@batch
def unet(sample, timestep):
    return runner.infer({"sample": sample, "timestep": timestep.reshape(-1)})

cfg = TritonConfig(http_address="127.0.0.1", http_port=int(port), grpc_address="127.0.0.1",
                   grpc_port=int(gport), metrics_port=int(mport), model_repository=repo)
with Triton(config=cfg) as t:
    t.bind("dd_unet", unet, inputs=[Tensor(name="sample", dtype=np.float32, shape=(1, 8, 8)),
                                    Tensor(name="timestep", dtype=np.float32, shape=(1,))],
           outputs=[Tensor(name="out_sample", dtype=np.float32, shape=(1, 8, 8))],
           config=ModelConfig(max_batch_size=8))
    t.run()
    c = http.InferenceServerClient(f"127.0.0.1:{port}")
    assert c.is_model_ready("dd_sampler")
    ref = np.load(refs)
    seeds = ref["seeds"].astype(np.int64)
    x = http.InferInput("seed", [len(seeds), 1], "INT64")
    x.set_data_from_numpy(seeds[:, None])
    seed_in = x
    got = c.infer("dd_sampler", [x]).as_numpy("images")
    print("SEED_DIFF", float(np.abs(got - ref["images"]).max()))
    noise, _ = draw_noise([int(s) for s in seeds], (1, 8, 8), m.schedule.steps)
    x = http.InferInput("noise", list(noise.shape), "FP32")
    x.set_data_from_numpy(noise)
    got = c.infer("dd_sampler", [x]).as_numpy("images")
    print("NOISE_DIFF", float(np.abs(got - ref["images"]).max()))
    try:  # both seed and noise: model.py refuses this request
        c.infer("dd_sampler", [seed_in, x])
        print("BOTH_ACCEPTED")
    except InferenceServerException as e:
        print("BOTH_ERROR", str(e).splitlines()[0])
    print("READY_AFTER", c.is_model_ready("dd_sampler"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_generated_sampler_model_serves_in_triton(tmp_path):
    py = serve_python()
    if (
        not py.exists()
        or subprocess.run([str(py), "-c", "import pytriton, onnxruntime"], capture_output=True).returncode
        != 0
    ):
        pytest.skip(f"serve environment not installed at {py} (run: bash .ci/setup-serve)")
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    refs = ROOT / "tests" / "data" / "runtime_refs.npz"
    args = [str(py), str(script), str(out), str(tmp_path), str(refs), *(str(free_port()) for _ in range(3))]
    r = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert float(lines["SEED_DIFF"]) <= 1e-4
    assert float(lines["NOISE_DIFF"]) <= 1e-4
    assert "exactly one of 'seed'" in lines["BOTH_ERROR"]
    assert lines["READY_AFTER"] == "True"
