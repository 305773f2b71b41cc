"""The one error mapping of the five CLIs: exit codes, one line, traceback only in debug mode."""

import errno

import click
import pytest
from click.testing import CliRunner

from engines.cli_errors import GuardedCommand
from engines.errors import BackendUnavailable, InputError
from engines.fileio import write_text_atomic


def _cmd(exc):
    @click.command(cls=GuardedCommand, prog="dd-x")
    @click.option("--n", type=click.IntRange(0), default=0)
    def cli(n):
        if exc is not None:
            raise exc

    return cli


@pytest.mark.parametrize(
    "exc,code,text",
    [
        (None, 0, ""),
        (InputError("a.ckpt: bad"), 2, "dd-x: error: a.ckpt: bad"),
        (BackendUnavailable("no TensorRT:\n pip install x"), 2, "dd-x: error: no TensorRT: pip install x"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/a.onnx"), 2, "/out/a.onnx: No space left"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/x"), 2, "dd-x: error: /ro/x: Permission"),
        (KeyError("boom"), 4, "dd-x: internal error: KeyError: 'boom' — this is a bug in dd-x"),
        (OSError(errno.EIO, "I/O error"), 4, "internal error: OSError"),
    ],
)
def test_mapping(exc, code, text, monkeypatch):
    monkeypatch.delenv("DD_DEBUG", raising=False)
    res = CliRunner().invoke(_cmd(exc), [])
    assert res.exit_code == code, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == (1 if exc else 0) and "Traceback" not in res.output
    assert text in res.output


def test_debug_prints_the_traceback(monkeypatch):
    monkeypatch.delenv("DD_DEBUG", raising=False)
    res = CliRunner().invoke(_cmd(KeyError("boom")), ["--debug"])
    assert res.exit_code == 4 and "Traceback" in res.output and "internal error" in res.output
    monkeypatch.setenv("DD_DEBUG", "1")
    res = CliRunner().invoke(_cmd(KeyError("boom")), [])
    assert res.exit_code == 4 and "Traceback" in res.output


def test_usage_errors_stay_click_s():
    res = CliRunner().invoke(_cmd(None), ["--n", "-1"])
    assert res.exit_code == 2 and "-1 is not in the range" in res.output


def test_atomic_write_error_names_the_file(tmp_path):
    # a real ENOSPC: /dev/full refuses every write; inside atomic_path the error gains the artifact
    import engines.fileio as fileio

    with pytest.raises(OSError) as e, fileio.atomic_path(tmp_path / "r.json"), open("/dev/full", "w") as f:
        f.write("x")
        f.flush()
    assert e.value.filename == str(tmp_path / "r.json") and e.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())  # the temp file is gone
    write_text_atomic(tmp_path / "ok.txt", "fine")  # the normal path is unchanged
    assert (tmp_path / "ok.txt").read_text() == "fine"
