"""Publishing that readers can trust (optimizer/compile/publish.py): a failed re-run leaves the last
passing run served, one run at a time per out/ (an flock a killed run does not leave behind),
clean-up deletes only run folders this tool wrote and never the run served just before, a reader
re-loading through five re-publishes sees no error, and a text-to-image output's tokenizer and
scheduler config are verified like its graphs.

Runs are built directly with RunDir from the committed tiny runtime fixture (no compile)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import engines
from engines.errors import InputError, IntegrityError
from engines.fileio import write_json_atomic
from engines.manifest import Manifest
from optimizer.compile.publish import LOCK_NAME, RUN_MARKER, RunDir, kept_note

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "data" / "runtime_fixture"
GRAPH = FIXTURE / "onnx" / "student.fp32.onnx"
STUDENT_SHA = "ab" * 32


def _validation(rd: RunDir, passed: bool) -> dict:
    fails = [] if passed else ["sample-level PSNR 12.0 dB < 35 dB"]
    return {
        "run_id": rd.run_id,
        "student_sha256": STUDENT_SHA,
        "passed": passed,
        "failures": fails,
        "backend": "onnxruntime",
    }


def _reports(rd: RunDir, m: Manifest, passed: bool, plots: tuple[str, ...]) -> dict:
    root = rd.staging
    write_json_atomic(root / "report.json", {"run_id": rd.run_id, "passed": passed})
    (root / "report.md").write_text(f"# run {rd.run_id}: {'passed' if passed else 'FAILED'}\n")
    for p in plots:
        (root / p).write_bytes(f"png of {rd.run_id}".encode())
    for f in ("report.json", "report.md", *plots):
        m.add(f"report/{f}", root / f, "report")
    return {
        "student_sha256": STUDENT_SHA,
        "report": f"runs/{rd.run_id}/report.json",
        "passed": passed,
        "allow_unvalidated": False,
    }


def publish_pixel(out: Path, passed: bool = True, plots=("samples.png", "latency.png")) -> RunDir:
    """One pixel run, as dd-compile's stages publish it: the fixture's fp32 graph, validated."""
    rd = RunDir(out)
    root = rd.begin()
    src = Manifest.load(FIXTURE)
    m = Manifest(root, src.io_spec, src.schedule, {**src.meta, "student_sha256": STUDENT_SHA})
    (root / "onnx").mkdir()
    shutil.copyfile(GRAPH, root / "onnx" / GRAPH.name)
    art = m.add("onnx/fp32", root / "onnx" / GRAPH.name, "onnx", precision="fp32")
    art.validation = _validation(rd, passed)
    rd.publish(m, _reports(rd, m, passed, plots))
    return rd


def served(out: Path) -> Manifest:
    """The served run, whole: every artifact of that run, present and matching its sha256."""
    m = Manifest.load(out)
    for a in m.artifacts.values():
        assert a.path.startswith(f"runs/{m.run['id']}/"), a.path
        m.verify(a)
    assert json.loads((out / "report.json").read_text())["run_id"] == m.run["id"]
    return m


def sample(out: Path) -> np.ndarray:
    with engines.load(out, threads=1) as pipe:
        return pipe(seeds=[0, 1])


# -- a failed re-run ---------------------------------------------------------------------------
def test_a_failed_rerun_keeps_the_last_passing_run_served(tmp_path):
    out = tmp_path / "out"
    a = publish_pixel(out)
    assert a.kept_previous is None
    images = sample(out)

    b = publish_pixel(out, passed=False)
    assert b.kept_previous == a.run_id
    m = served(out)
    assert m.run["id"] == a.run_id and m.run["passed"] is True
    assert m.last_run["id"] == b.run_id and m.last_run["passed"] is False
    assert m.last_run["report"] == f"runs/{b.run_id}/report.json"
    assert (out / "runs" / b.run_id / "report.md").read_text().startswith(f"# run {b.run_id}: FAILED")
    assert m.servable(m.get("onnx/fp32")) is None
    assert kept_note(out, b.run_id) == (
        f"not published: {out} still serves run {a.run_id} (it passed); "
        f"this run's report: {out / 'runs' / b.run_id / 'report.md'}"
    )
    assert kept_note(out, a.run_id) is None
    np.testing.assert_array_equal(sample(out), images)  # the passing run still samples, unchanged
    assert (out / "samples.png").read_bytes() == f"png of {a.run_id}".encode()

    # a second failure replaces the record; a passing run then serves and clears it
    c = publish_pixel(out, passed=False)
    assert c.kept_previous == a.run_id and Manifest.load(out).last_run["id"] == c.run_id
    assert not (out / "runs" / b.run_id).exists()  # neither served nor recorded any more
    d = publish_pixel(out)
    m = served(out)
    assert d.kept_previous is None and m.run["id"] == d.run_id and m.last_run is None
    assert kept_note(out, d.run_id) is None and kept_note(out, c.run_id) is None


@pytest.mark.parametrize(
    "last_run, match",
    [
        ({"id": "x", "report": "../report.json", "passed": False}, r"last_run.report: .* climbs out"),
        ({"id": "x", "report": "runs/x/report.json", "passed": "no"}, r"last_run: field 'passed' is str"),
        ({"id": "x", "report": "runs/x/report.json", "passed": False, "why": 1}, r"last_run: unknown field"),
    ],
)
def test_a_malformed_last_run_record_is_refused(last_run, match, tmp_path):
    out = tmp_path / "out"
    publish_pixel(out)
    d = json.loads((out / "manifest.json").read_text())
    write_json_atomic(out / "manifest.json", {**d, "last_run": last_run})
    with pytest.raises(InputError, match=match):
        Manifest.load(out)


def test_a_failed_first_run_is_published_and_refused_by_readers(tmp_path):
    out = tmp_path / "out"
    b = publish_pixel(out, passed=False)
    assert b.kept_previous is None
    m = served(out)
    assert m.run["id"] == b.run_id and m.run["passed"] is False and m.last_run is None
    with pytest.raises(InputError, match="failed validation"):
        engines.load(out)


def test_top_level_copies_are_those_of_the_served_run(tmp_path):
    out = tmp_path / "out"
    publish_pixel(out)
    assert (out / "latency.png").exists()
    b = publish_pixel(out, plots=("samples.png",))  # a run kind that makes no latency.png
    assert not (out / "latency.png").exists()  # not a stale copy of the run before
    assert (out / "samples.png").read_bytes() == f"png of {b.run_id}".encode()
    assert json.loads((out / "report.json").read_text())["run_id"] == b.run_id


# -- one run at a time -------------------------------------------------------------------------
def test_a_second_run_is_refused_while_one_holds_the_folder(tmp_path):
    out = tmp_path / "out"
    first = RunDir(out)
    first.begin()
    second = RunDir(out)
    with pytest.raises(
        InputError, match=rf"another dd-compile run .*pid {os.getpid()} .*{first.run_id}.*since"
    ):
        second.begin()
    assert not second.staging.exists() and first.staging.is_dir()
    first.abandon()  # released after abandon
    with RunDir(out) as third:
        third.begin()
    RunDir(out).begin()  # ... and after the context; this one is dropped unreleased:
    publish_pixel(out)  # the garbage-collected RunDir's descriptor is closed, so its lock is gone
    publish_pixel(out)  # released after publish


def test_a_killed_run_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time\n"
        "from optimizer.compile.publish import RunDir\n"
        "rd = RunDir(sys.argv[1]); rd.begin(); print(rd.run_id, flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        killed_id = proc.stdout.readline().strip()
        assert len(killed_id) == 32, killed_id
        with pytest.raises(InputError, match=rf"pid {proc.pid} .*run {killed_id}, since"):
            RunDir(out).begin()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert (out / f".staging-{killed_id}" / RUN_MARKER).is_file()
    rd = publish_pixel(out)  # the lock went with the process; the killed run's staging is cleaned
    assert served(out).run["id"] == rd.run_id
    assert not (out / f".staging-{killed_id}").exists() and (out / LOCK_NAME).exists()


# -- what clean-up deletes ---------------------------------------------------------------------
def test_cleanup_keeps_user_folders_and_the_run_served_before(tmp_path, caplog):
    out = tmp_path / "out"
    a = publish_pixel(out)
    mine = out / "runs" / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    stray = out / ".staging-notes"
    stray.mkdir()
    with caplog.at_level(logging.WARNING, logger="optimizer.compile.publish"):
        b = publish_pixel(out)
    assert sum("left alone" in r.getMessage() for r in caplog.records) == 1  # one warning for both
    assert (out / "runs" / a.run_id).is_dir()  # served just before: a reader may be opening it
    c = publish_pixel(out)
    runs = {p.name for p in (out / "runs").iterdir()}
    assert runs == {b.run_id, c.run_id, "mine"}  # a went with the next publish
    assert (mine / "keep.txt").read_text() == "the user's" and stray.is_dir()


def test_run_folders_from_before_the_marker_are_cleaned_when_a_manifest_named_them(tmp_path):
    out = tmp_path / "out"
    a = publish_pixel(out)
    (out / "runs" / a.run_id / RUN_MARKER).unlink()  # as an older dd-compile left it
    unnamed = out / "runs" / ("f" * 32)  # a run id no manifest named: not known to be ours
    unnamed.mkdir()
    publish_pixel(out)
    assert (out / "runs" / a.run_id / RUN_MARKER).is_file()  # kept one publish, now known as ours
    publish_pixel(out)
    assert not (out / "runs" / a.run_id).exists() and unnamed.is_dir()


# -- readers while re-runs publish ---------------------------------------------------------------
READER = """
import json, sys, traceback
from pathlib import Path
import engines

out, progress = Path(sys.argv[1]), Path(sys.argv[2])
runs, errors = set(), []
for i in range(500):
    try:
        with engines.load(out, threads=1) as pipe:
            runs.add(pipe.manifest.run["id"])
    except BaseException as e:
        errors.append(f"{type(e).__name__}: {e}")
    progress.write_text(str(i + 1))
print(json.dumps({"errors": errors, "runs": sorted(runs)}))
"""


def test_a_reader_loading_through_republishes_sees_no_error(tmp_path):
    """500 engines.load in another process while re-runs publish after each of its loads (about
    500 publishes, a failed run every seventh). Before the previous run was kept one publish, the
    same loop lost loads to ONNX Runtime's NoSuchFile on the deleted run folder."""
    out = tmp_path / "out"
    first = publish_pixel(out).run_id
    progress = tmp_path / "progress"
    progress.write_text("0")
    proc = subprocess.Popen(
        [sys.executable, "-c", READER, str(out), str(progress)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    published, done = [], "0"
    while proc.poll() is None:
        now = progress.read_text()
        if now in ("", done):  # publish once per completed load: every load overlaps a publish
            time.sleep(0.002)
            continue
        done = now
        published.append(publish_pixel(out, passed=len(published) % 7 != 3).run_id)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    res = json.loads(stdout)
    assert len(published) >= 5
    assert len(res["errors"]) == 0, res["errors"][:3]
    assert len(res["runs"]) >= 5 and set(res["runs"]) <= {first, *published}


RETRY = """
import logging, shutil, sys
from pathlib import Path
import engines
from tests.test_publish_trust import publish_pixel

out, old = Path(sys.argv[1]), Path(sys.argv[2]) / sys.argv[3]
fired = []

def publish_when_opened(event, args):  # the moment load opens the old run's graph: a re-run lands
    if event == "open" and not fired and str(args[0]).startswith(str(old)):
        fired.append(publish_pixel(out).run_id)
        shutil.rmtree(old.parent)  # and the old run folder goes at once (as before runs were kept)

logging.basicConfig(level=logging.INFO)
sys.addaudithook(publish_when_opened)
with engines.load(out, threads=1) as pipe:
    print(pipe.manifest.run["id"], *fired)
"""


@pytest.mark.parametrize("opened, error", [("report.json", "InputError"), ("onnx", "FileNotFoundError")])
def test_load_rereads_the_manifest_when_a_publish_removed_a_file_under_it(opened, error, tmp_path):
    """The run's report (servable) or its graph (verify) vanishes as load opens it."""
    out = tmp_path / "out"
    old = publish_pixel(out).final
    proc = subprocess.run(
        [sys.executable, "-c", RETRY, str(out), str(old), opened],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, published = proc.stdout.split()
    assert loaded == published == served(out).run["id"]  # the second try loaded the new run
    assert f"a new run was published while loading ({error})" in proc.stderr

    # with no publish meanwhile, a missing file stays an error naming it
    gone = out / "runs" / loaded / "onnx" / GRAPH.name
    gone.unlink()
    with pytest.raises(IntegrityError, match=rf"names {gone}, which is missing"):
        engines.load(out)


# -- text-to-image: every file the manifest hashes is verified ---------------------------------
IO = {
    "family": "stand-in",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}],
    "dims": {"batch": [1, 1, 2]},
}


def publish_t2i(out: Path) -> RunDir:
    """A text-to-image output as optimizer/t2i/stages.py publishes it (stand-in graphs: loading is
    refused before any graph would be opened)."""
    rd = RunDir(out)
    root = rd.begin()
    m = Manifest(root, None, None, {"kind": "text-to-image", "recommended": "fp32"})
    components = {}
    for kind in ("text_encoder", "unet", "vae_decoder"):
        g = root / "onnx" / f"{kind}.fp32.onnx"
        g.parent.mkdir(exist_ok=True)
        g.write_bytes(f"stand-in {kind} graph".encode())
        art = m.add(f"onnx/{kind}/fp32", g, "onnx", precision="fp32")
        art.validation = _validation(rd, True)
        components[kind] = {"path": f"onnx/{kind}.fp32.onnx", "precision": "fp32", "io": IO}
    desc = {
        "format": "dd-compile-t2i",
        "version": 1,
        "pipeline_class": "StableDiffusionPipeline",
        "guidance": "cfg",
        "components": components,
        "tokenizer": {
            "path": "tokenizer/tokenizer.json",
            "model_max_length": 77,
            "pad_token": "<|endoftext|>",
        },
        "scheduler": {"kind": "ddim", "config": "scheduler/scheduler_config.json"},
        "vae": {"scaling_factor": 0.18215, "scale_factor": 8},
        "latent_channels": 4,
        "time_cond_proj_dim": None,
        "defaults": {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 7.5},
    }
    write_json_atomic(root / "t2i.fp32.json", desc)
    shutil.copyfile(root / "t2i.fp32.json", root / "t2i.json")
    write_json_atomic(root / "tokenizer" / "tokenizer.json", {"model": {"type": "BPE", "vocab": {"a": 0}}})
    write_json_atomic(
        root / "scheduler" / "scheduler_config.json",
        {"_class_name": "DDIMScheduler", "prediction_type": "epsilon"},
    )
    art = m.add("pipeline/fp32", root / "t2i.fp32.json", "pipeline", precision="fp32", backend="onnxruntime")
    art.validation = _validation(rd, True)
    for rel in ("tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "t2i.json"):
        m.add(f"asset/{rel}", root / rel, "asset")
    rd.publish(m, _reports(rd, m, True, ("samples.png",)))
    return rd


@pytest.mark.parametrize(
    "rel, edit",
    [
        ("tokenizer/tokenizer.json", lambda d: {**d, "model": {"type": "BPE", "vocab": {"b": 0}}}),
        ("scheduler/scheduler_config.json", lambda d: {**d, "prediction_type": "v_prediction"}),
        ("t2i.json", lambda d: {**d, "scheduler": {"kind": "lcm", "config": d["scheduler"]["config"]}}),
    ],
)
def test_an_edited_t2i_asset_is_refused_by_load(rel, edit, tmp_path):
    out = tmp_path / "out"
    rd = publish_t2i(out)
    m = served(out)
    path = out / "runs" / rd.run_id / rel
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(IntegrityError, match=rf"{path}: sha256 .* does not match the manifest"):
        engines.load(out)
    with pytest.raises(IntegrityError):
        m.verify(m.get(f"asset/{rel}"))


def test_dd_triton_refuses_an_edited_tokenizer_before_writing(tmp_path):
    from engines.triton import write_triton_repo

    out, repo = tmp_path / "out", tmp_path / "repo"
    rd = publish_t2i(out)
    tok = out / "runs" / rd.run_id / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"a"', '"b"'))
    with pytest.raises(IntegrityError, match=rf"{tok}: sha256"):
        write_triton_repo(out, repo)
    assert not repo.exists() and not list(tmp_path.glob(".repo*"))


def test_a_t2i_file_the_manifest_does_not_hash_is_refused(tmp_path):
    out = tmp_path / "out"
    publish_t2i(out)
    d = json.loads((out / "manifest.json").read_text())
    d["artifacts"] = [a for a in d["artifacts"] if a["name"] != "asset/tokenizer/tokenizer.json"]
    write_json_atomic(out / "manifest.json", d)
    with pytest.raises(InputError, match=r"tokenizer file 'tokenizer/tokenizer.json' is not in the manifest"):
        engines.load(out)


def test_an_untouched_t2i_output_passes_every_check_before_the_pipeline(tmp_path):
    """The control: with nothing edited, load gets past every sha256 and fails only when the
    pipeline parses the stand-in tokenizer (so the refusals above are the checks', not the stand-ins')."""
    out = tmp_path / "out"
    publish_t2i(out)
    with pytest.raises(InputError, match=r"tokenizer.json: not a valid tokenizer.json"):
        engines.load(out)
