"""The family table is read by the CLI before any work: every family is tested, every option or
backend a family cannot honour is refused in one line (exit 2), never dropped."""

import importlib.util
import time

import pytest
from click.testing import CliRunner

from engines.errors import InputError
from optimizer.cli import main, parse_bars
from optimizer.families import FAMILIES
from optimizer.families.detect import family_of
from tests.conftest import make_tiny_teacher
from tests.t2i_tiny import make_tiny_flux, make_tiny_pipeline, make_tiny_sd3, make_tiny_sdxl

# one tiny diffusers folder per family (diffusers' get_dummy_components habit): a family added to
# the table without one here fails test_every_family_has_a_tiny_fixture
TINY = {
    "denoiser": make_tiny_teacher,
    "sd": make_tiny_pipeline,
    "sdxl": make_tiny_sdxl,
    "sd3": make_tiny_sd3,
    "flux": make_tiny_flux,
}
# an accepted value per family-specific option (what a user would type)
OPTION_ARGS = {
    "threads_grid": ["--threads-grid", "1"],
    "int8_calibration": ["--int8-calibration", "entropy"],
    "int8_selection": ["--int8-selection", "graph-order"],
    "cond": ["--cond", "cond.npz"],
    "trt_opt_level": ["--trt-opt-level", "4"],
    "trt_hardware_compat": ["--trt-hardware-compat", "ampere_plus"],
    "trt_version_compatible": ["--trt-version-compatible"],
    "size": ["--size", "16x16"],
    "resolutions": ["--resolutions", "16,32"],
    "guidance_scale": ["--guidance-scale", "2"],
    "max_sequence_length": ["--max-sequence-length", "128"],
    "prompt_chunks": ["--prompt-chunks", "2"],
    "lora_rank": ["--lora-rank", "8"],
    "clip_model": ["--clip-model", "clip/"],
}


def test_every_family_has_a_tiny_fixture():
    assert set(TINY) == set(FAMILIES)
    specific = set().union(*(f.options for f in FAMILIES.values()))
    assert specific == set(OPTION_ARGS), "every family-specific option needs a refusal test value"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_detected_from_its_folder(name, tmp_path):
    src = TINY[name](tmp_path / name)
    assert family_of(src) is FAMILIES[name]


def _run(args, tmp_path):
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out")])
    return res, time.perf_counter() - t0


@pytest.mark.parametrize(
    "family,opt",
    [(f, o) for f in sorted(FAMILIES) for o in sorted(OPTION_ARGS) if not FAMILIES[f].honours(o)],
)
def test_options_a_family_does_not_honour_are_refused(family, opt, tmp_path):
    demos = {"sd": ["--demo", "t2i"], "denoiser": ["--demo", "pixel"]}
    source = demos.get(family) or [str(TINY[family](tmp_path / family))]  # no bundled demo: its tiny
    res, secs = _run([*source, *OPTION_ARGS[opt]], tmp_path)
    assert res.exit_code == 2, res.output
    flag = OPTION_ARGS[opt][0]
    assert f"{flag}: not for {FAMILIES[family].title}" in res.output
    assert secs < 20 and not (tmp_path / "out").exists()  # before any work, nothing written


@pytest.mark.parametrize("opt", ["trt_opt_level", "trt_hardware_compat", "trt_version_compatible"])
def test_trt_options_need_the_tensorrt_backend(opt, tmp_path):
    res, _ = _run(["--demo", "pixel", *OPTION_ARGS[opt]], tmp_path)
    assert res.exit_code == 2 and "only with --backend tensorrt (not onnxruntime)" in res.output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
@pytest.mark.parametrize("demo", ["t2i", "pixel"])
def test_tensorrt_without_tensorrt_exits_2_naming_it(demo, tmp_path):
    res, secs = _run(["--demo", demo, "--backend", "tensorrt"], tmp_path)
    assert res.exit_code == 2, res.output
    assert "TensorRT is not installed" in res.output and len(res.output.strip().splitlines()) == 1
    assert secs < 20 and not (tmp_path / "out").exists()


def test_unavailable_ort_provider_is_refused_up_front(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    res, _ = _run(["--demo", "--backend", "onnxruntime-cuda"], tmp_path)
    assert res.exit_code == 2 and "onnxruntime has no CUDAExecutionProvider" in res.output


def test_precisions_come_from_the_family(tmp_path):
    with pytest.raises(InputError, match="--precision fp8: text-to-image pipelines"):
        FAMILIES["sd"].check_precisions(("fp32", "fp8"), "openvino")
    res, _ = _run(["--demo", "--precision", "bf16"], tmp_path)  # pipelines too: OpenVINO's hint
    assert res.exit_code == 2 and "--precision bf16: needs --backend openvino" in res.output
    res, _ = _run(["--demo", "pixel", "--precision", "bf16"], tmp_path)
    assert res.exit_code == 2 and "needs --backend openvino" in res.output


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bars_start_from_the_family_and_the_user_wins(name):
    fam = FAMILIES[name]
    bars = parse_bars((), fam)
    assert {p: bars.sample_psnr_db[p] for p in fam.sample_psnr_db} == dict(fam.sample_psnr_db)
    for p in fam.precisions:
        # any value the user gives is the bar, the pixel default included (35 dB was replaced by 30)
        assert parse_bars((f"sample.{p}=35",), fam).sample_psnr_db[p] == 35.0
        assert p in bars.call_rel_l2 and all(k in fam.mixes[p].keys() for k in fam.components)


def test_schedulers_the_runtime_lacks_are_refused():
    sd = FAMILIES["sd"]
    assert sd.scheduler_kind("LCMScheduler", "x") == "lcm"
    assert sd.scheduler_kind("PNDMScheduler", "x") == "pndm"
    with pytest.raises(InputError, match=r"^s/sched.json: scheduler 'HeunDiscreteScheduler' is not"):
        sd.scheduler_kind("HeunDiscreteScheduler", "s/sched.json")
