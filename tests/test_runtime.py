"""The torch-free runtime: engines.load(out/) -> images, on the committed tiny fixture
(tests/data/runtime_fixture, rebuilt by tests/data/make_runtime_fixture.py)."""

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import engines
from engines.errors import InputError, IntegrityError
from engines.manifest import Manifest
from engines.schedule import Sampler, draw_noise, to_images

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "runtime_fixture"
REFS = DATA / "runtime_refs.npz"
ROOT = Path(__file__).parents[1]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(FIXTURE, dest)
    return dest


def test_images_match_saved_references(out):
    refs = np.load(REFS)
    with engines.load(out, precision="fp32") as pipe:
        images = pipe(seeds=[int(s) for s in refs["seeds"]])
    assert images.shape == refs["images"].shape
    assert images.min() >= 0 and images.max() <= 1
    assert np.abs(images - refs["images"]).max() <= 1e-3


@pytest.mark.parametrize("kind", ["ddim", "consistency"])
def test_per_sample_parity_with_torch_student(out, kind):
    """ORT sampler vs the PyTorch student sampler, same noise: ARCHITECTURE.md's fp32 bar."""
    import torch

    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from engines.torch_runner import TorchRunner
    from optimizer.checkpoint import load_checkpoint
    from optimizer.metrics import psnr_db
    from optimizer.models import Denoiser

    torch.set_num_threads(1)
    m = Manifest.load(out)
    schedule = replace(m.schedule, kind=kind)
    ckpt = load_checkpoint(out / "student.ckpt")
    noise, step_noise = draw_noise([0, 1, 2, 3], tuple(m.meta["sample_shape"]), schedule.steps)
    results = []
    for runner in (
        OnnxRuntimeRunner(out / "onnx" / "student.fp32.onnx", m.io_spec),
        TorchRunner(Denoiser(ckpt.build_model()), m.io_spec),
    ):
        with runner:
            results.append(to_images(Sampler(schedule, runner)(noise, step_noise)))
    ort_images, torch_images = results
    assert torch_images.std() > 0.1  # the fixture's samples are not flat
    for i in range(len(noise)):
        # images in [0, 1]: data range 1
        assert psnr_db(ort_images[i : i + 1], torch_images[i : i + 1], 1.0) >= 60.0, f"sample {i}"


def test_samples_do_not_depend_on_batch_or_chunking(out):
    seeds = list(range(10))  # above the IO spec's max batch (8): the sampler chunks
    with engines.load(out, precision="fp32") as pipe:
        together = pipe(seeds=seeds)
        alone = np.concatenate([pipe(seeds=[s]) for s in (0, 9)])
        noise, _ = draw_noise([9], pipe.sample_shape, pipe.schedule.steps)
        from_noise = pipe(noise=noise)
    assert np.abs(together[[0, 9]] - alone).max() <= 1e-5
    assert np.abs(from_noise[0] - together[9]).max() <= 1e-5
    assert np.abs(together[0] - together[1]).max() > 0.05  # different seeds differ


def test_refuses_a_changed_file_before_loading(out):
    onnx = out / "onnx" / "student.fp32.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        engines.load(out, precision="fp32")


def test_refuses_a_changed_engine_before_importing_tensorrt(out):
    m = Manifest.load(out)
    plan = out / "engines" / "student.fp32.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"not really an engine")
    m.add(
        "engine/fp32",
        plan,
        "engine",
        precision="fp32",
        backend="tensorrt",
        target={"tensorrt": "11.0.0", "compute_capability": "9.0", "gpu": "x", "cuda": "12.8"},
    )
    m.save()
    plan.write_bytes(b"changed after the build")
    with pytest.raises(IntegrityError, match="sha256"):  # the planted engine is not validated
        engines.load(out, precision="fp32", backend="tensorrt", allow_unvalidated=True)


@pytest.mark.tensorrt
def test_refuses_an_engine_for_another_tensorrt_version(out):
    m = Manifest.load(out)
    plan = out / "engines" / "student.fp32.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"engine bytes")
    m.add(
        "engine/fp32",
        plan,
        "engine",
        precision="fp32",
        backend="tensorrt",
        target={"tensorrt": "1.0.0", "compute_capability": "1.0", "gpu": "old", "cuda": "1.0"},
    )
    m.save()
    with pytest.raises(IntegrityError):
        engines.load(out, precision="fp32", backend="tensorrt", allow_unvalidated=True)


def test_one_line_errors_for_bad_requests(out, tmp_path):
    with pytest.raises(InputError, match=r"no onnx for precision 'int8'.*have: onnxruntime/fp32"):
        engines.load(out, precision="int8")
    with pytest.raises(InputError, match="no manifest"):
        engines.load(tmp_path / "nowhere")
    with engines.load(out, precision="fp32") as pipe:
        with pytest.raises(InputError, match="exactly one of"):
            pipe(seeds=[0], noise=np.zeros((1, 1, 8, 8), np.float32))
        with pytest.raises(InputError, match="sample shape"):
            pipe(noise=np.zeros((1, 3, 8, 8), np.float32))


def test_runs_with_torch_absent(out):
    """`import engines` + load + sample with torch, diffusers and onnx made unimportable."""
    code = (
        "import sys\n"
        "for m in ('torch', 'diffusers', 'onnx', 'optimizer'): sys.modules[m] = None\n"
        "import numpy as np, engines\n"
        f"refs = np.load({str(REFS)!r})\n"
        f"with engines.load({str(out)!r}, precision='fp32') as pipe:\n"
        "    images = pipe(seeds=[int(s) for s in refs['seeds']])\n"
        "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}\n"
        "print(float(np.abs(images - refs['images']).max()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) <= 1e-3
