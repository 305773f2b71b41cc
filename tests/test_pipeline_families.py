"""Every precision through dd-compile, and a UNet2DConditionModel (text-conditioned) end to end."""

import json

import pytest
from click.testing import CliRunner

from optimizer.cli import main
from tests.conftest import TINY_COND_UNET
from tests.test_pipeline import FAST


@pytest.fixture(scope="module")
def cond_teacher_dir(tmp_path_factory):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    path = tmp_path_factory.mktemp("cond_teacher")
    torch.manual_seed(0)
    UNet2DConditionModel(in_channels=4, out_channels=4, **TINY_COND_UNET).save_pretrained(path / "unet")
    # Stable Diffusion's schedule (epsilon, scaled_linear): the text-to-image family this stands for.
    DDPMScheduler(
        num_train_timesteps=1000,
        prediction_type="epsilon",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
    ).save_pretrained(path / "scheduler")
    return path


@pytest.mark.slow
def test_unet2d_condition_fp32_fp16(cond_teacher_dir, tmp_path):
    res = CliRunner().invoke(
        main,
        [str(cond_teacher_dir), "--steps", "2", "-o", str(tmp_path), "--precision", "fp32,fp16", *FAST],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "report.json").read_text())
    man = json.loads((tmp_path / "manifest.json").read_text())
    names = [t["name"] for t in man["io_spec"]["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states"]
    by = {v["precision"]: v for v in rep["variants"]}
    assert by["fp32"]["parity"]["call"]["rel_l2"] < 1e-5
    assert by["fp16"]["parity"]["call"]["rel_l2"] < 1e-2
    assert by["fp16"]["parity"]["sample"]["psnr_db"] > 35


@pytest.mark.slow
def test_all_precisions_on_the_tiny_unet(tiny_teacher_dir, tmp_path):
    res = CliRunner().invoke(
        main, [str(tiny_teacher_dir), "--steps", "2", "-o", str(tmp_path), *FAST], catch_exceptions=False
    )
    rep = json.loads((tmp_path / "report.json").read_text())
    by = {v["precision"]: v for v in rep["variants"]}
    assert set(by) == {"fp32", "fp16", "int8"}
    assert by["fp32"]["passed"] and by["fp16"]["passed"], res.output
    i8 = by["int8"]
    assert i8["parity"]["call"]["rel_l2"] <= 5e-2
    assert i8["parity"]["sample"]["psnr_db"] >= 25
    # seeded: the sensitivity pass finds 26 int8 nodes within the bars here (measured 3.8e-2 call
    # rel. L2, 44.6 dB); a variant with none would fail as "the fp32 one" (the next test file pins that)
    assert i8["precision_info"]["counts"]["int8"] >= 10 and i8["passed"], res.output
    assert res.exit_code == 0, res.output
    assert sum(v["recommended"] for v in rep["variants"]) == 1
    md = (tmp_path / "report.md").read_text()
    assert "nodes by precision" in md


@pytest.mark.slow
def test_int8_calibration_and_selection_options_reach_the_graph(tiny_teacher_dir, tmp_path):
    args = [
        str(tiny_teacher_dir),
        "--steps",
        "2",
        "-o",
        str(tmp_path),
        "--precision",
        "int8",
        "--int8-calibration",
        "percentile",
        "--int8-selection",
        "graph-order",
        *FAST,
    ]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "report.json").read_text())
    (v,) = [v for v in rep["variants"] if v["precision"] == "int8"]
    info = v["precision_info"]
    assert info["config"]["calibration"] == "percentile" and info["config"]["sensitivity"] == "none"
    assert info["calibration"]["method"] == "percentile"
    assert v["parity"]["call"]["rel_l2"] <= 5e-2


@pytest.mark.slow
def test_int8_with_no_quantizable_node_fails_instead_of_passing_as_fp32(tiny_teacher_dir, tmp_path):
    """A selection that keeps every node float gives the fp32 graph: that is no INT8 variant."""
    from optimizer.compile.speed import SpeedConfig
    from optimizer.compile.stages import CompileConfig, run
    from optimizer.quantize import Int8Config

    cfg = CompileConfig(
        out=tmp_path,
        precisions=("fp32", "int8"),
        batch_sizes=(1, 2),
        steps=2,
        threads=1,
        n_samples=8,
        n_fid_samples=16,
        speed=SpeedConfig(max_seconds=0.2),
        int8=Int8Config(target_call_rel_l2=1e-12, sensitivity="none"),
    )
    rep = run(tiny_teacher_dir, cfg)
    (v,) = [v for v in rep.variants if v.precision == "int8"]
    assert v.precision_info["counts"]["int8"] == 0
    assert not v.passed and any("is the fp32 one" in f for f in v.failures)
    assert v.parity["call"]["rel_l2"] < 1e-5  # identical to fp32: why parity alone must not pass it


@pytest.mark.slow
def test_cond_file_feeds_calibration_and_samples(cond_teacher_dir, tmp_path):
    """--cond: the file's embeddings (here 3 tokens, not the default 77) shape the exported graph and
    are what calibration and the samples see; bad files are one-line errors (exit 2)."""
    import numpy as np

    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((5, 3, 16)) * 0.5).astype(np.float32)
    np.savez(tmp_path / "cond.npz", encoder_hidden_states=emb)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main,
        [
            str(cond_teacher_dir),
            "--steps",
            "2",
            "-o",
            str(out),
            "--precision",
            "fp32",
            "--cond",
            str(tmp_path / "cond.npz"),
            *FAST,
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    ehs = next(t for t in man["io_spec"]["inputs"] if t["name"] == "encoder_hidden_states")
    assert ehs["shape"][1:] == [3, 16]
    rep = json.loads((out / "report.json").read_text())
    assert any("cond.npz (5 rows" in n for n in rep["notes"])
    assert rep["passed"]

    # Wrong width, and --cond for a model without conditioning inputs: exit 2, the file named.
    np.savez(tmp_path / "bad.npz", encoder_hidden_states=emb[..., :8])
    bad = CliRunner().invoke(
        main,
        [
            str(cond_teacher_dir),
            "--steps",
            "2",
            "-o",
            str(tmp_path / "b"),
            "--cond",
            str(tmp_path / "bad.npz"),
            *FAST,
        ],
    )
    assert bad.exit_code == 2 and "bad.npz" in bad.output and "cross_attention_dim" in bad.output
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_cond_file_rejected_for_unconditional_models(tiny_teacher_dir, tmp_path):
    import numpy as np

    np.savez(tmp_path / "c.npz", class_labels=np.arange(4))
    res = CliRunner().invoke(
        main,
        [
            str(tiny_teacher_dir),
            "--steps",
            "2",
            "-o",
            str(tmp_path / "o"),
            "--cond",
            str(tmp_path / "c.npz"),
            *FAST,
        ],
    )
    assert res.exit_code == 2 and "c.npz" in res.output and "no conditioning input" in res.output


def test_cond_rows_in_order_for_samples_and_drawn_per_calibration_seed():
    import numpy as np

    from optimizer.compile.stages import _cond_fn
    from optimizer.model_io import io_spec_for

    spec = io_spec_for(
        "UNet2DConditionModel", {"sample_size": 8, "in_channels": 4, "cross_attention_dim": 16}, seq_len=3
    )
    emb = np.arange(5 * 3 * 16, dtype=np.float32).reshape(5, 3, 16)
    fn = _cond_fn(spec, 0, {"encoder_hidden_states": emb})
    np.testing.assert_array_equal(fn(7)["encoder_hidden_states"], emb[[0, 1, 2, 3, 4, 0, 1]])
    drawn = fn(6, np.random.default_rng(1))["encoder_hidden_states"]
    assert all(any(np.array_equal(r, e) for e in emb) for r in drawn)  # file rows, not noise
    assert _cond_fn(spec, 0)(2)["encoder_hidden_states"].shape == (2, 3, 16)  # random without a file


def test_relative_diffusers_folder_is_its_own_teacher(tiny_teacher_dir, monkeypatch):
    """`dd-compile runs/x/teacher --steps 4`: the teacher checks find the folder itself (they once
    looked for runs/x/runs/x/teacher and were skipped)."""
    from pathlib import Path

    from optimizer.compile.compile_report import CompileReport
    from optimizer.compile.stages import CompileConfig, _as_student, _load_teacher

    monkeypatch.chdir(tiny_teacher_dir.parent.parent)
    rel = Path(tiny_teacher_dir.parent.name) / tiny_teacher_dir.name
    ckpt, _ = _as_student(rel, 2)
    rep = CompileReport(student={}, teacher={})
    assert _load_teacher(ckpt, CompileConfig(out=Path("o")), rep) is not None, rep.skipped
    assert rep.teacher["available"]


@pytest.mark.slow
def test_cond_file_with_class_labels(tmp_path):
    """A class-conditional UNet2DModel: --cond with class_labels [N] (int), validated against
    num_class_embeds; the samples of label k come from the model asked for k."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from tests.conftest import TINY_UNET

    torch.manual_seed(0)
    UNet2DModel(**TINY_UNET, num_class_embeds=3).save_pretrained(tmp_path / "t" / "unet")
    DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(
        tmp_path / "t" / "scheduler"
    )
    np.savez(tmp_path / "labels.npz", class_labels=np.array([2, 0, 1]))
    res = CliRunner().invoke(
        main,
        [
            str(tmp_path / "t"),
            "--steps",
            "2",
            "-o",
            str(tmp_path / "o"),
            "--precision",
            "fp32",
            "--cond",
            str(tmp_path / "labels.npz"),
            *FAST,
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [t["name"] for t in man["io_spec"]["inputs"]][-1] == "class_labels"
    np.savez(tmp_path / "bad.npz", class_labels=np.array([0, 3]))  # 3 classes: 0..2
    bad = CliRunner().invoke(
        main,
        [
            str(tmp_path / "t"),
            "--steps",
            "2",
            "-o",
            str(tmp_path / "b"),
            "--cond",
            str(tmp_path / "bad.npz"),
            *FAST,
        ],
    )
    assert bad.exit_code == 2 and "bad.npz" in bad.output and "outside [0, 3)" in bad.output


@pytest.mark.slow
def test_dit_through_dd_compile(tmp_path):
    """DiTTransformer2DModel (class_labels, a sliced output): exports, and fp32 parity holds; random
    class labels stay within its classes without --cond."""
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=3,
        norm_num_groups=8,
    ).save_pretrained(tmp_path / "t" / "transformer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "t" / "scheduler")
    res = CliRunner().invoke(
        main,
        [str(tmp_path / "t"), "--steps", "2", "-o", str(tmp_path / "o"), "--precision", "fp32", *FAST],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    (v,) = rep["variants"]
    assert v["parity"]["call"]["rel_l2"] < 1e-5 and v["parity"]["call"]["polygraphy"]["passed"]
    assert any("no --cond" in n for n in rep["notes"])
