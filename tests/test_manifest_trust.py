"""Readers of manifest.json (issue 11 §2, §3): structure and types checked before use, every path
inside the folder, and only what the published run validated is served (engines.load,
dd-triton, dd-bench's gate), unless allow_unvalidated, which is then recorded.

Runs on the committed fixture (tests/data/runtime_fixture: a v2 manifest whose run record follows
a real fp32 parity check), edited per case."""

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import engines
from engines.errors import InputError
from engines.fileio import sha256_file
from engines.manifest import Manifest
from engines.outdir import read_marker
from engines.triton import main as triton_main
from engines.triton import write_triton_repo

FIXTURE = Path(__file__).parent / "data" / "runtime_fixture"
ONNX = "onnx/student.fp32.onnx"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(FIXTURE, dest)
    return dest


def edit(out: Path, change: Callable[[dict], None]) -> None:
    p = out / "manifest.json"
    d = json.loads(p.read_text())
    change(d)
    p.write_text(json.dumps(d))


def onnx_entry(d: dict) -> dict:
    return next(a for a in d["artifacts"] if a["name"] == "onnx/fp32")


def test_fixture_is_servable(out):
    m = Manifest.load(out)
    assert m.version == 2 and m.run is not None and m.run["passed"] is True
    assert m.servable(m.get("onnx/fp32")) is None
    report = json.loads((out / m.run["report"]).read_text())
    assert report["run_id"] == m.run["id"] and report["call"]["rel_l2"] <= 1e-5


# -- §3 paths stay inside the folder ---------------------------------------------------------------
def _outside_copy(out: Path) -> Path:
    """The fixture's graph copied outside the folder: sha256 matches, so only the path check stops it."""
    dest = out.parent / "elsewhere" / "x.onnx"
    dest.parent.mkdir(exist_ok=True)
    shutil.copyfile(out / ONNX, dest)
    return dest


BAD_PATHS = {
    "absolute": lambda out: str(_outside_copy(out)),
    "dotdot": lambda out: "../elsewhere/x.onnx" if _outside_copy(out) else "",
    "dotdot_inner": lambda out: "onnx/../../elsewhere/x.onnx" if _outside_copy(out) else "",
    "windows_drive": lambda out: "C:\\elsewhere\\x.onnx",
    "drive_relative": lambda out: "C:x.onnx",
    "unc": lambda out: "\\\\server\\share\\x.onnx",
    "backslashes": lambda out: "onnx\\student.fp32.onnx",
    "empty": lambda out: "",
    "folder_itself": lambda out: ".",
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_paths_outside_the_folder_are_refused_by_every_reader(out, tmp_path, case, capsys):
    bad = BAD_PATHS[case](out)
    edit(out, lambda d: onnx_entry(d).update(path=bad))
    with pytest.raises(InputError) as e:
        Manifest.load(out)
    msg = str(e.value)
    assert "manifest.json" in msg and "'onnx/fp32'" in msg and "path" in msg and "\n" not in msg
    with pytest.raises(InputError, match="manifest.json"):
        engines.load(out, precision="fp32", allow_unvalidated=True)
    with pytest.raises(SystemExit) as e:
        triton_main(
            [str(out), "--repo", str(tmp_path / "repo"), "--precision", "fp32", "--allow-unvalidated"]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "manifest.json" in err
    assert not (tmp_path / "repo").exists()


def test_symlinks_pointing_out_are_refused(out, tmp_path):
    outside = _outside_copy(out)
    (out / ONNX).unlink()
    (out / ONNX).symlink_to(outside)  # same bytes, same sha256: only the resolve stops it
    with pytest.raises(InputError, match=r"manifest\.json: artifacts\[\d\] \('onnx/fp32'\).*outside"):
        Manifest.load(out)
    # a symlinked folder on the way
    (out / ONNX).unlink()
    shutil.move(out / "onnx", outside.parent / "onnx")
    (out / "onnx").symlink_to(outside.parent / "onnx")
    with pytest.raises(InputError, match="outside"):
        engines.load(out, precision="fp32")


def test_symlink_inside_the_folder_is_fine(out):
    (out / "graphs").mkdir()
    shutil.move(out / ONNX, out / "graphs" / "g.onnx")
    (out / ONNX).symlink_to(Path("..") / "graphs" / "g.onnx")
    with engines.load(out, precision="fp32") as pipe:
        assert pipe(seeds=[0]).shape == (1, 1, 8, 8)


def test_path_swapped_for_a_symlink_after_loading_is_refused_at_use(out):
    m = Manifest.load(out)
    outside = _outside_copy(out)
    (out / ONNX).unlink()
    (out / ONNX).symlink_to(outside)
    with pytest.raises(InputError, match="outside"):
        m.verify(m.get("onnx/fp32"))


def test_external_data_symlinked_out_is_not_copied(out, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    (out / (ONNX + ".data")).symlink_to(secret)
    with pytest.raises(InputError, match="external data of 'onnx/fp32'.*outside"):
        write_triton_repo(out, tmp_path / "repo", precision="fp32")
    assert not (tmp_path / "repo").exists()


# -- structure and types -------------------------------------------------------------------------
def _set(path: list, value) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        node = d
        for k in path[:-1]:
            node = onnx_entry(node) if k == "ONNX" else node[k]
        node[path[-1]] = value

    return change


def _delete(path: list) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        node = d
        for k in path[:-1]:
            node = onnx_entry(node) if k == "ONNX" else node[k]
        del node[path[-1]]

    return change


def _duplicate(d: dict) -> None:
    d["artifacts"].append(dict(onnx_entry(d)))


STRUCTURE = {
    # case: (edit, words the one line must hold besides "manifest.json")
    "unknown_top_level_key": (_set(["extra"], 1), ["'extra'"]),
    "artifacts_not_a_list": (_set(["artifacts"], {"a": 1}), ["artifacts"]),
    "artifact_not_an_object": (lambda d: d["artifacts"].append(3), ["artifacts[", "object"]),
    "artifact_unknown_field": (_set(["ONNX", "colour"], "red"), ["'onnx/fp32'", "'colour'"]),
    "artifact_missing_path": (_delete(["ONNX", "path"]), ["'onnx/fp32'", "'path'"]),
    "artifact_name_int": (_set(["ONNX", "name"], 3), ["'name'", "str"]),
    "precision_list": (_set(["ONNX", "precision"], ["fp32"]), ["'precision'"]),
    "created_bool": (_set(["ONNX", "created"], True), ["'created'", "bool"]),
    "sha256_not_hex": (_set(["ONNX", "sha256"], "xyz"), ["'sha256'"]),
    "duplicate_name": (_duplicate, ["duplicate"]),
    "meta_list": (_set(["meta"], [1]), ["'meta'"]),
    "batch_range_reversed": (_set(["io_spec", "dims", "batch"], [8, 1, 4]), ["dims.batch", "min <= opt"]),
    "batch_range_zero": (_set(["io_spec", "dims", "batch"], [0, 1, 1]), ["dims.batch"]),
    "batch_range_short": (_set(["io_spec", "dims", "batch"], [1, 8]), ["dims.batch"]),
    "batch_range_floats": (_set(["io_spec", "dims", "batch"], [1.0, 2.0, 8.0]), ["dims.batch"]),
    "io_inputs_not_list": (_set(["io_spec", "inputs"], "sample"), ["io_spec.inputs"]),
    "io_tensor_extra_key": (lambda d: d["io_spec"]["inputs"][0].update(x=1), ["io_spec.inputs[0]"]),
    "io_shape_negative": (lambda d: d["io_spec"]["inputs"][0].update(shape=["batch", -1]), ["shape"]),
    "schedule_unknown_key": (_set(["schedule", "eta"], 0.0), ["schedule"]),
    "schedule_bad_kind": (_set(["schedule", "kind"], "euler"), ["schedule", "euler"]),
    "schedule_missing_timesteps": (_delete(["schedule", "timesteps"]), ["schedule", "timesteps"]),
    "version_3": (_set(["version"], 3), ["version 3"]),
    "version_string": (_set(["version"], "2"), ["version '2'"]),
    "run_not_object": (_set(["run"], "yes"), ["run"]),
    "run_missing_id": (_delete(["run", "id"]), ["run", "'id'"]),
    "run_passed_string": (_set(["run", "passed"], "true"), ["run", "'passed'"]),
    "run_unknown_field": (_set(["run", "who"], "me"), ["run", "'who'"]),
    "run_report_absolute": (_set(["run", "report"], "/etc/passwd"), ["run.report", "absolute"]),
    "run_report_dotdot": (_set(["run", "report"], "../report.json"), ["run.report", ".."]),
    "validation_passed_string": (_set(["ONNX", "validation", "passed"], "yes"), ["validation", "'passed'"]),
    "validation_failures_ints": (_set(["ONNX", "validation", "failures"], [1]), ["validation", "failures"]),
    "validation_unknown": (_set(["ONNX", "validation", "score"], 1), ["validation", "'score'"]),
    "v1_with_run": (_set(["version"], 1), ["version-1", "'run'"]),
    "sample_shape_string": (_set(["meta", "sample_shape"], "1x8x8"), ["meta.sample_shape"]),
    "sample_shape_zero": (_set(["meta", "sample_shape"], [1, 0, 8]), ["meta.sample_shape"]),
}


@pytest.mark.parametrize("case", sorted(STRUCTURE))
def test_malformed_manifest_is_one_line_naming_file_and_field(out, case):
    change, words = STRUCTURE[case]
    edit(out, change)
    with pytest.raises(InputError) as e:
        Manifest.load(out)
    msg = str(e.value)
    assert "manifest.json" in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


# -- §2 only what the published run validated is served ------------------------------------------
def _to_v1(d: dict) -> None:
    d["version"] = 1
    del d["run"]
    for a in d["artifacts"]:
        a.pop("validation", None)


NOT_SERVABLE = {
    # case: (edit of manifest.json, or of the folder, and the reason the line must give)
    "version_1": (_to_v1, "manifest version 1 records no validation"),
    "no_run_record": (_delete(["run"]), "no run record"),
    "no_validation": (_set(["ONNX", "validation"], None), "not validated by run"),
    "other_run": (_set(["ONNX", "validation", "run_id"], "f" * 32), "not by the published run"),
    "other_student": (_set(["ONNX", "validation", "student_sha256"], "0" * 64), "another student"),
    "failed": (
        lambda d: onnx_entry(d)["validation"].update(passed=False, failures=["call rel. L2 3e-2 > 1e-5"]),
        "failed validation in run .* \\(call rel. L2 3e-2 > 1e-5\\)",
    ),
    "report_missing": (_set(["run", "report"], "runs/gone/report.json"), "report .* is missing"),
    "report_of_other_run": (None, "is of run 'someone-else'"),
}


@pytest.mark.parametrize("case", sorted(NOT_SERVABLE))
def test_unvalidated_artifacts_are_refused_unless_allowed(out, tmp_path, case, caplog, capsys):
    change, reason = NOT_SERVABLE[case]
    if change is None:
        (out / "report.json").write_text(json.dumps({"run_id": "someone-else", "passed": True}))
    else:
        edit(out, change)
    m = Manifest.load(out)
    assert m.servable(m.get("onnx/fp32")) is not None
    with pytest.raises(InputError, match=reason) as e:
        engines.load(out, precision="fp32")
    msg = str(e.value)
    assert "\n" not in msg and "'onnx/fp32' is not servable" in msg
    assert "recompile with this dd-compile or pass --allow-unvalidated" in msg
    with caplog.at_level(logging.WARNING, logger="engines.manifest"):
        with engines.load(out, precision="fp32", allow_unvalidated=True) as pipe:
            assert pipe(seeds=[0]).shape == (1, 1, 8, 8)
    assert any("allow_unvalidated" in r.getMessage() for r in caplog.records)
    # dd-triton: refused with one line and nothing written; with the flag, recorded
    repo = tmp_path / "repo"
    with pytest.raises(SystemExit) as e:
        triton_main([str(out), "--repo", str(repo), "--precision", "fp32"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "not servable" in err
    assert not repo.exists()
    with pytest.raises(SystemExit) as e:
        triton_main([str(out), "--repo", str(repo), "--precision", "fp32", "--allow-unvalidated"])
    assert e.value.code == 0
    assert "**allow_unvalidated: true**" in (repo / "README.md").read_text()
    assert 'key: "dd_allow_unvalidated"' in (repo / "dd_unet" / "config.pbtxt").read_text()
    assert read_marker(repo)["allow_unvalidated"] is True


def test_validated_repo_records_nothing_unusual(out, tmp_path):
    repo = write_triton_repo(out, tmp_path / "repo", precision="fp32")
    assert "allow_unvalidated" not in (repo / "README.md").read_text()
    assert "dd_allow_unvalidated" not in (repo / "dd_unet" / "config.pbtxt").read_text()
    marker = read_marker(repo)
    assert marker["kind"] == "triton-repo" and marker["id"] == Manifest.load(out).run["id"]
    assert sha256_file(repo / "dd_unet" / "1" / "model.onnx") == sha256_file(out / ONNX)


def test_bench_gate_refuses_unvalidated(out, tmp_path):
    """dd-bench refuses before any work (its -o is not created); the rest of dd-bench is in test_bench."""
    from click.testing import CliRunner

    from optimizer.bench.cli import main as bench_main

    edit(out, _set(["ONNX", "validation", "passed"], False))
    r = CliRunner().invoke(bench_main, [str(out), "--no-teacher", "--no-progress", "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "'onnx/fp32' is not servable: failed validation" in r.output
    assert not (tmp_path / "b").exists()
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.slow
def test_a_real_compile_is_served_and_a_failed_one_refused(tmp_path, capsys):
    """The writer (the pipeline's publish) and the readers agree: a passed fp32 run loads and
    exports with no flag; a run whose parity check failed is refused with the failure named."""
    from click.testing import CliRunner

    from optimizer.cli import main as compile_main
    from tests.conftest import make_tiny_teacher
    from tests.test_pipeline import FAST

    teacher = make_tiny_teacher(tmp_path / "teacher", seed=0)
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    args = [str(teacher), "--steps", "2", "--precision", "fp32", *map(str, FAST)]
    assert CliRunner().invoke(compile_main, [*args, "-o", str(ok)]).exit_code == 0
    with engines.load(ok, precision="fp32") as pipe:
        assert pipe(seeds=[0, 1]).shape[0] == 2
    assert write_triton_repo(ok, tmp_path / "repo", precision="fp32").is_dir()
    res = CliRunner().invoke(compile_main, [*args, "-o", str(bad), "--bar", "call.fp32=1e-12"])
    assert res.exit_code == 1, res.output
    with pytest.raises(InputError, match="'onnx/fp32' is not servable: failed validation in run .*rel. L2"):
        engines.load(bad, precision="fp32")
    with engines.load(bad, precision="fp32", allow_unvalidated=True) as pipe:
        assert pipe(seeds=[0]).shape[0] == 1


def test_runtime_needs_what_it_samples_with(out):
    edit(out, _delete(["meta", "sample_shape"]))
    with pytest.raises(InputError, match=r"manifest\.json: lacks meta\.sample_shape"):
        engines.load(out, precision="fp32")
    edit(out, _set(["schedule"], None))
    with pytest.raises(InputError, match=r"lacks schedule, meta\.sample_shape"):
        engines.load(out, precision="fp32")


def test_checked_fields_are_the_artifact_fields():
    """A field added to Artifact must be added to the reader's type table (or every load fails)."""
    from dataclasses import fields

    from engines.manifest import Artifact
    from engines.manifest_check import ARTIFACT_FIELDS

    assert {f.name for f in fields(Artifact)} == set(ARTIFACT_FIELDS)
