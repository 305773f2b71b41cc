"""Build the committed runtime fixture: a tiny student out/ folder and its reference images.

    PYTHONPATH=. python tests/data/make_runtime_fixture.py

Writes tests/data/runtime_fixture/{student.ckpt, onnx/student.fp32.onnx, report.json,
manifest.json} (a seeded, random-weight ~40k-parameter UNet2DModel with a 4-step DDIM
v-prediction schedule) and tests/data/runtime_refs.npz (ONNX Runtime fp32 images for fixed seeds).
The runtime tests, the Triton repository tests and .ci/runtime-venv-check read them; rerun this
only when a format changes, and commit the result.

The manifest (version 2) records the graph as servable only after the parity check dd-compile
runs on it, done here for real: ONNX Runtime vs the torch student per call (rel. L2 <= 1e-5 at
every timestep) and per sample (PSNR >= 60 dB from the same noise), ARCHITECTURE.md's fp32 bars.
report.json holds the numbers and the run id the manifest's run record names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "runtime_fixture"
REFS = HERE / "runtime_refs.npz"
REF_SEEDS = [0, 1, 2, 3, 4]
STEPS = 4

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "norm_num_groups": 4,
    "attention_head_dim": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}


def build(out: Path) -> Path:
    """Write a complete out/ folder (checkpoint, fp32 ONNX, manifest) for the tiny student."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from engines.fileio import write_json_atomic
    from engines.manifest import Manifest
    from engines.schedule import SamplingSchedule, trailing_timesteps
    from optimizer.checkpoint import StudentCheckpoint, TeacherRef, save_checkpoint
    from optimizer.compile.export import export_onnx
    from optimizer.model_io import io_spec_for, sample_shape
    from optimizer.models import Denoiser, alphas_cumprod

    torch.manual_seed(0)
    model = UNet2DModel(**UNET_CONFIG).eval()
    with torch.no_grad():  # random init makes near-zero outputs; widen them so errors show
        for p in model.parameters():
            p.mul_(1.5)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    schedule = SamplingSchedule.from_alphas(
        alphas_cumprod(sched), trailing_timesteps(1000, STEPS), kind="ddim", prediction_type="v_prediction"
    )
    cfg = dict(model.config)
    ckpt = StudentCheckpoint(
        "UNet2DModel",
        cfg,
        "DDPMScheduler",
        dict(sched.config),
        schedule,
        TeacherRef(path=None, sha256=None),
        distillation={"method": "none (random-weight test fixture)"},
    )
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, model, out / "student.ckpt")
    spec = io_spec_for("UNet2DModel", cfg, batch_sizes=[1, 8])
    onnx_path = export_onnx(Denoiser(model), spec, out / "onnx" / "student.fp32.onnx")
    m = Manifest(
        out,
        spec,
        schedule,
        {
            "sample_shape": list(sample_shape("UNet2DModel", cfg)),
            "model_class": "UNet2DModel",
            "batch_sizes": [1, 8],
        },
    )
    m.add("student", out / "student.ckpt", "checkpoint")
    m.add(
        "onnx/fp32",
        onnx_path,
        "onnx",
        precision="fp32",
        backend="onnxruntime",
        input_sha256=m.get("student").sha256,
        libraries={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
    )
    parity = check_parity(model, m, onnx_path)
    run_id = uuid.uuid4().hex
    student_sha = m.get("student").sha256
    failures = [f"{k}: {v}" for k, v in parity["failures"].items()]
    write_json_atomic(
        out / "report.json",
        {"run_id": run_id, "passed": not failures, "source": "tests/data/make_runtime_fixture.py", **parity},
    )
    m.add("report/report.json", out / "report.json", "report", input_sha256=student_sha)
    m.get("onnx/fp32").validation = {
        "run_id": run_id,
        "student_sha256": student_sha,
        "passed": not failures,
        "failures": failures,
    }
    m.run = {
        "id": run_id,
        "student_sha256": student_sha,
        "report": "report.json",
        "passed": not failures,
        "finished": time.time(),
        "allow_unvalidated": False,
    }
    m.save()
    if failures:
        raise SystemExit(f"fixture failed its parity check: {failures}")
    return out


def check_parity(model, m, onnx_path: Path) -> dict:
    """dd-compile's fp32 call and sample parity of the exported graph against the torch student."""
    import numpy as np

    from engines.onnxruntime_runner import OnnxRuntimeRunner
    from engines.schedule import Sampler, draw_noise
    from engines.torch_runner import TorchRunner
    from optimizer.compile.validate import call_parity, sample_parity
    from optimizer.models import Denoiser

    noise, step_noise = draw_noise(list(range(8)), tuple(m.meta["sample_shape"]), m.schedule.steps)
    with TorchRunner(Denoiser(model), m.io_spec) as ref, OnnxRuntimeRunner(onnx_path, m.io_spec) as ort:
        ref_samples = Sampler(m.schedule, ref)(noise, step_noise)
        # one call per timestep, on the student's own samples noised to that timestep
        feeds = []
        for t, a in zip(m.schedule.timesteps, m.schedule.alphas_cumprod, strict=True):
            x = np.sqrt(a) * ref_samples + np.sqrt(1 - a) * noise
            feeds.append({"sample": x.astype(np.float32), "timestep": np.full(len(x), t, np.float32)})
        call = call_parity(ref, ort, feeds, "fp32")
        sample, _ = sample_parity(ref_samples, m.schedule, ort, noise, step_noise, "fp32")
    failures = {}
    if not call.passed:
        failures["call"] = f"rel. L2 {call.rel_l2:.2e} > {call.bar_rel_l2:g}"
    if not sample.passed:
        failures["sample"] = f"PSNR {sample.psnr_db:.1f} dB < {sample.bar_psnr_db:g}"
    return {"call": call.to_dict(), "sample": sample.to_dict(), "failures": failures}


def write_refs(out: Path, refs: Path) -> None:
    import numpy as np

    import engines

    with engines.load(out, precision="fp32", backend="onnxruntime") as pipe:
        images = pipe(seeds=REF_SEEDS)
    np.savez(
        refs,
        seeds=np.array(REF_SEEDS, np.int64),
        images=images.astype(np.float32),
        precision=np.array("fp32"),
        backend=np.array("onnxruntime"),
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = build(Path(tmp) / "runtime_fixture")
        if FIXTURE.exists():
            shutil.rmtree(FIXTURE)
        shutil.copytree(built, FIXTURE)
    write_refs(FIXTURE, REFS)


if __name__ == "__main__":
    main()
