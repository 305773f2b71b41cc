"""The peers' runtimes (optimum-onnx, openvino.genai) reading a dd-layout folder, from their own
venv (bash .ci/setup-peers; $DD_PEERS_VENV): benchmarks/layout_check.py's two halves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "layout_check.py"


def layout_check(tmp_path: Path, out: Path, layout: Path, runtime: str, precision: str, backend: str) -> dict:
    """Our images from `out` (this venv, `backend`), then `runtime`'s ("optimum" or "genai") on
    `layout` with the same prompts and seeds: its result JSON (psnr_db vs ours). Skips, naming the
    setup script, where the peers' venv is missing."""
    peers = Path(os.environ.get("DD_PEERS_VENV") or Path.home() / ".cache/dd-compile/peers-venv")
    if not (peers / "bin" / "python").exists():
        pytest.skip(f"no peers venv at {peers} (bash .ci/setup-peers): {runtime}'s load not checked")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    refs, result = tmp_path / f"refs-{runtime}.json", tmp_path / f"result-{runtime}.json"
    ours = [
        sys.executable,
        CHECK,
        "ours",
        out,
        "--precision",
        precision,
        "--backend",
        backend,
        "--json",
        refs,
    ]
    subprocess.run([str(a) for a in ours], check=True, env=env, capture_output=True)
    cmd = [peers / "bin" / "python", CHECK, runtime, layout, "--refs", refs, "--json", result]
    p = subprocess.run([str(a) for a in cmd], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(result.read_text())
