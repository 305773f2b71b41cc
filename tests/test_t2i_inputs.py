"""Bad text-to-image sources and options: each is one InputError naming the file or option, raised
by source.resolve (dd-compile's prepare) before any export, and nothing is silently substituted.

Real tiny diffusers folders (tests/t2i_tiny.py), no export: every check must fire in seconds.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from engines.errors import InputError

FAST_S = 10.0  # an export of even the tiny pipeline takes longer: a check under this ran before it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.t2i_tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("inputs") / "pipe")


@pytest.fixture(scope="module")
def tiny_lcm(tmp_path_factory) -> Path:
    from tests.t2i_tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("inputs_lcm") / "pipe", lcm=True)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _resolve(source: Path, **kw):
    from optimizer.t2i.source import resolve

    args = dict(steps=2, guidance_scale=None, teacher=None, size=None, resolutions=None, batch_sizes=(1, 2))
    args.update(kw)
    return resolve(source, **args)


def _refused(source: Path, match: str, **kw) -> str:
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=match) as e:
        _resolve(source, **kw)
    assert time.perf_counter() - t0 < FAST_S
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


UNET_W = Path("unet/diffusion_pytorch_model.safetensors")


# -- 1. user errors that were reported as bugs ---------------------------------------------------
def test_fp16_variant_weights_load_upcast(tiny, tmp_path):
    """A hub layout with only <stem>.fp16.safetensors loads that variant, as float32."""
    import torch
    from safetensors.torch import load_file, save_file

    pipe = _copy(tiny, tmp_path / "fp16")
    for comp, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        f = pipe / comp / f"{stem}.safetensors"
        sd = load_file(str(f))
        f.unlink()
        save_file({k: v.half() for k, v in sd.items()}, str(pipe / comp / f"{stem}.fp16.safetensors"))
    src = _resolve(pipe)
    want = load_file(str(pipe / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    got = src.student.unet.state_dict()
    assert all(p.dtype == torch.float32 for p in src.student.unet.parameters())
    assert all(p.dtype == torch.float32 for p in src.student.text_encoder.parameters())
    assert all(torch.equal(got[k], v.float()) for k, v in want.items())


@pytest.mark.parametrize("case", ["truncated", "garbage", "lying_header", "symlink_out", "broken_symlink"])
def test_bad_safetensors_refused_by_name(tiny, tmp_path, case):
    pipe = _copy(tiny, tmp_path / case)
    f = pipe / UNET_W
    data = f.read_bytes()
    if case == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        f.write_bytes(b"not a safetensors file" * 20)
    elif case == "lying_header":  # a header length past the end of the file
        f.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    elif case == "symlink_out":  # a link out of the folder, to something that is not weights
        outside = tmp_path / "elsewhere.txt"
        outside.write_text("hello")
        f.unlink()
        f.symlink_to(outside)
    else:
        f.unlink()
        f.symlink_to(tmp_path / "gone.safetensors")
    msg = _refused(pipe, "diffusion_pytorch_model.safetensors")
    assert str(pipe / "unet") in msg
    if case == "symlink_out":
        assert "elsewhere.txt" in msg  # the link's target is named


@pytest.mark.parametrize(
    "comp,change,match",
    [
        ("unet", {"cross_attention_dim": 48}, "unet: config.json and weights do not load together"),
        ("text_encoder", {"num_hidden_layers": 3}, "text_encoder: config.json does not match the weights"),
        ("text_encoder", {"num_hidden_layers": 1}, "unexpected"),
        ("vae", {"latent_channels": 8}, "vae: config.json"),
        ("unet", {"block_out_channels": "wide"}, "block_out_channels 'wide'"),
    ],
)
def test_config_that_does_not_match_weights(tiny, tmp_path, comp, change, match):
    pipe = _copy(tiny, tmp_path / "p")
    _edit_json(pipe / comp / "config.json", **change)
    assert str(pipe / comp) in _refused(pipe, match)


def test_model_index_list_and_scheduler_typo(tiny, tmp_path):
    pipe = _copy(tiny, tmp_path / "list")
    (pipe / "model_index.json").write_text("[1, 2]")
    _refused(pipe, r"model_index.json: expected a JSON object, got a list")
    pipe = _copy(tiny, tmp_path / "typo")
    _edit_json(pipe / "scheduler" / "scheduler_config.json", _class_name="DDIMSchedulr")
    _refused(pipe, r"scheduler_config.json: _class_name 'DDIMSchedulr' is not supported")


@pytest.mark.parametrize("case", ["tokenizer_json", "vocab_json", "merges_txt"])
def test_corrupt_tokenizer(tiny, tmp_path, case):
    import tests.t2i_tiny as tt

    pipe = _copy(tiny, tmp_path / case)
    tok = pipe / "tokenizer"
    if case == "tokenizer_json":
        tok.joinpath("tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    else:  # a vocab.json + merges.txt folder (no tokenizer.json), one of them unreadable
        shutil.rmtree(tok)
        tt.write_clip_vocab(tok)
        (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
        bad = tok / ("vocab.json" if case == "vocab_json" else "merges.txt")
        bad.write_bytes(b"\xff\xfe garbage {")
    _refused(pipe, f"{tok}: the tokenizer does not load")


def test_steps_and_resolutions_out_of_range(tiny, tmp_path):
    _refused(tiny, r"--steps 2000: .*scheduler_config.json.*\[1, 1000\]", steps=2000)
    _refused(tiny, r"--resolutions -32: outside \[4, 4096\] pixels", resolutions=(-32, 0))
    _refused(tiny, r"--resolutions 0: outside", resolutions=(32, 0))


# -- 2. refused late before, refused in resolve now ------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_guidance_scale_must_be_finite(tiny, value):
    _refused(tiny, "--guidance-scale .*: must be a finite number", guidance_scale=value)


def test_cli_refuses_before_export(tiny, tmp_path):
    """Through dd-compile itself: exit 2, one line naming the option, nothing written."""
    from click.testing import CliRunner

    from optimizer.cli import main

    out = tmp_path / "out"
    for args, needle in (
        (["--guidance-scale", "nan"], "--guidance-scale nan"),
        (["--steps", "2000"], "--steps 2000"),
        (["--resolutions", "-32,0"], "--resolutions -32"),
    ):
        t0 = time.perf_counter()
        r = CliRunner().invoke(main, [str(tiny), "--steps", "2", *args, "-o", str(out)])
        assert time.perf_counter() - t0 < FAST_S
        assert r.exit_code == 2, r.output
        assert needle in r.output
        assert not out.exists()


def test_batch_size_one_is_the_profile_asked_for(tiny):
    """--batch-sizes 1 under CFG: the graphs take exactly that (the UNet both CFG halves at once);
    validation records at a batch the profile holds (tests/test_t2i_publish.py compiles it)."""
    spec = _resolve(tiny, batch_sizes=(1,)).student.spec
    assert spec.guidance == "cfg"
    te, unet = spec.component("text_encoder").io.dims["batch"], spec.component("unet").io.dims["batch"]
    assert (te.min, te.max) == (1, 1)
    assert (unet.min, unet.max) == (1, 2)
    _refused(tiny, "--batch-sizes 0", batch_sizes=(0,))


# -- 3. silent substitutions / wrong flow -----------------------------------------------------------
@pytest.mark.parametrize("content", ["not json {", "{}", "[]"])
def test_a_folder_with_model_index_is_a_pipeline(tiny, tmp_path, content):
    from optimizer.t2i.source import is_t2i_source

    pipe = _copy(tiny, tmp_path / "p")
    (pipe / "model_index.json").write_text(content)
    assert is_t2i_source(pipe)  # never handed to the pixel flow
    _refused(pipe, "model_index.json")


def test_pixel_pipeline_index_stays_pixel(tmp_path):
    from optimizer.t2i.source import is_t2i_source

    pipe = tmp_path / "ddpm"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(
        json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]})
    )
    assert not is_t2i_source(pipe)


@pytest.mark.parametrize(
    "cls", ["HeunDiscreteScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"]
)
def test_schedulers_the_runtime_does_not_sample_are_refused(tiny, tmp_path, cls):
    pipe = _copy(tiny, tmp_path / cls)
    _edit_json(pipe / "scheduler" / "scheduler_config.json", _class_name=cls)
    msg = _refused(pipe, f"scheduler_config.json: _class_name '{cls}' is not supported")
    assert "DDIMScheduler" in msg and "LCMScheduler" in msg


def test_sizes_bounded_and_sample_size_not_substituted(tiny, tmp_path):
    _refused(tiny, r"--resolutions 65536: outside \[4, 4096\] pixels", resolutions=(32, 65536))
    _refused(tiny, r"--size 8192x8192: height 8192 is over the maximum 4096", size=(8192, 8192))
    pipe = _copy(tiny, tmp_path / "s0")
    _edit_json(pipe / "unet" / "config.json", sample_size=0)
    _refused(pipe, r"unet/config.json: sample_size 0")
    pipe = _copy(tiny, tmp_path / "none")
    _edit_json(pipe / "unet" / "config.json", sample_size=None)
    _refused(pipe, r"unet/config.json: no sample_size .*--size")
    assert _resolve(pipe, size=(32, 32)).student.spec.default_size == (32, 32)


def _student_of(teacher: Path, student: Path, rel_path: str) -> Path:
    """A dd-distill-style student folder: the teacher's files and distill.json (teacher path, the
    sha256 of each reused component file, as optimizer/distill/t2i.py records them)."""
    from engines.fileio import sha256_file

    _copy(teacher, student)
    hashes = {
        f"{c}/{f.name}": sha256_file(f)
        for c in ("text_encoder", "vae", "tokenizer")
        for f in sorted((teacher / c).glob("*"))
    }
    record = {
        "format": "dd-compile.t2i-student/1",
        "method": "lcm",
        "steps": 2,
        "guidance_mode": "embedded",
        "guidance_scale": 2.0,
        "teacher": {"path": rel_path, "components_sha256": hashes},
    }
    (student / "distill.json").write_text(json.dumps(record))
    return student


def test_distill_student_whose_teacher_changed(tiny_lcm, tmp_path):
    teacher = _copy(tiny_lcm, tmp_path / "teacher")
    student = _student_of(teacher, tmp_path / "student", "../teacher")
    assert _resolve(student, steps=None).teacher.path.resolve() == teacher.resolve()
    _edit_json(teacher / "vae" / "config.json", scaling_factor=0.5)
    msg = _refused(student, r"teacher component 'vae' .* changed since distillation", steps=None)
    assert "vae/config.json changed" in msg and "distill.json" in msg
    _edit_json(
        teacher / "vae" / "config.json",
        scaling_factor=json.loads((tiny_lcm / "vae/config.json").read_text())["scaling_factor"],
    )
    (teacher / "tokenizer" / "extra.txt").write_text("x")
    _refused(student, r"'tokenizer' .* \(tokenizer/extra.txt added\)", steps=None)


# -- 4. the working directory ---------------------------------------------------------------------------
def test_relative_teacher_resolves_beside_distill_json(tiny_lcm, tmp_path, monkeypatch):
    teacher = _copy(tiny_lcm, tmp_path / "a" / "teacher")
    student = _student_of(teacher, tmp_path / "a" / "student", "../teacher")
    monkeypatch.chdir(tmp_path)  # "../teacher" from here is not it: relative to the student folder
    assert _resolve(student, steps=None).teacher.path.resolve() == teacher.resolve()
    absolute = _student_of(teacher, tmp_path / "b" / "student", str(teacher.resolve()))
    assert _resolve(absolute, steps=None).teacher.path == teacher.resolve()
    missing = _student_of(teacher, tmp_path / "c" / "student", "../nowhere")
    _refused(missing, r"distill.json: teacher '../nowhere' not found", steps=None)


def test_demo_resolves_from_any_cwd(tmp_path, monkeypatch):
    from optimizer.t2i.source import DEMO_T2I, demo_source

    monkeypatch.chdir(tmp_path)
    src = demo_source()
    assert src.is_absolute()
    r = _resolve(src, steps=None, batch_sizes=(1,))
    assert r.teacher.path.resolve() == (DEMO_T2I / "teacher").resolve()
    assert r.steps == 4


def test_an_lcm_pipeline_with_another_scheduler_is_refused(tiny_lcm, tmp_path):
    """diffusers' LatentConsistencyModelPipeline decodes LCM's x0: with another scheduler it would not
    sample what the runtime samples (or crash), so the folder is refused by name."""
    pipe = _copy(tiny_lcm, tmp_path / "lcm")
    _edit_json(pipe / "model_index.json", scheduler=["diffusers", "EulerDiscreteScheduler"])
    _refused(pipe, "model_index.json: a LatentConsistencyModelPipeline samples with LCMScheduler, not")
