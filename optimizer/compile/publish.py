"""How a dd-compile run publishes (see the publish contract in ARCHITECTURE.md).

Everything a run makes is written under `out/.staging-<run_id>/`, renamed to `out/runs/<run_id>/`
when complete, and published by one atomic replace of `out/manifest.json`: until that rename
readers see the previous complete run, after it the new one. Up-to-date artifacts of the previous
run are hard-linked (fallback: copied) into staging, so nothing of the previous run is modified
until the new manifest is committed; then the previous run's folder and stale staging folders
(all created by this tool) are deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.fileio import atomic_path
from engines.manifest import MANIFEST_NAME, Artifact, Manifest
from engines.outdir import claim

log = logging.getLogger(__name__)

RUNS = "runs"
STAGING_PREFIX = ".staging-"
# convenience copies at the top of out/ (each written atomically after the commit)
TOP_LEVEL = ("report.json", "report.md", "samples.png", "latency.png")


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dest)


def _run_relative(path: str) -> str:
    """An artifact path relative to its run folder ("runs/<id>/onnx/x" and v1's "onnx/x" -> "onnx/x")."""
    parts = path.split("/")
    return "/".join(parts[2:]) if len(parts) > 2 and parts[0] == RUNS else path


class RunDir:
    """One run's folders and its publication into `out`."""

    def __init__(self, out: Path, run_id: str | None = None):
        self.out = Path(out)
        self.run_id = run_id or uuid.uuid4().hex
        self.staging = self.out / f"{STAGING_PREFIX}{self.run_id}"
        self.final = self.out / RUNS / self.run_id
        self.previous = self._load_previous()

    def _load_previous(self) -> Manifest | None:
        if not (self.out / MANIFEST_NAME).exists():
            return None
        try:
            return Manifest.load(self.out)
        except InputError as e:  # unreadable old manifest: rebuild everything
            log.warning("previous manifest not reused: %s", e)
            return None

    def begin(self) -> Path:
        self.staging.mkdir(parents=True, exist_ok=False)
        return self.staging

    def reuse(
        self, manifest: Manifest, name: str, input_sha256: str, config: dict[str, Any]
    ) -> Artifact | None:
        """The previous run's artifact, linked into staging, when made from the same input and config."""
        if self.previous is None:
            return None
        old = self.previous.up_to_date(name, input_sha256, config)
        if old is None:
            return None
        rel = _run_relative(old.path)
        src = self.previous.file(old)
        _link_or_copy(src, self.staging / rel)
        data = src.with_name(src.name + ".data")  # weights stored as ONNX external data
        if data.exists():
            _link_or_copy(data, (self.staging / rel).with_name(data.name))
        art = dataclasses.replace(old, path=rel, validation=None)
        manifest.artifacts[name] = art
        return art

    def publish(self, manifest: Manifest, run: dict[str, Any], fault=None) -> Manifest:
        """Rename staging to runs/<id>/ and commit the manifest (the single commit point)."""
        (self.out / RUNS).mkdir(exist_ok=True)
        os.replace(self.staging, self.final)
        if fault:
            fault("publish")  # test hook: the run folder exists, the manifest is still the old one
        prefix = f"{RUNS}/{self.run_id}/"
        final = Manifest(self.out, manifest.io_spec, manifest.schedule, manifest.meta)
        final.run = {**run, "id": self.run_id, "finished": time.time()}
        for name, art in manifest.artifacts.items():
            final.artifacts[name] = dataclasses.replace(art, path=prefix + art.path)
        final.save()  # temp file + os.replace
        claim(self.out, "compile", self.run_id)
        self._top_level_copies()
        self._clean()
        return final

    def _top_level_copies(self) -> None:
        for f in TOP_LEVEL:
            src = self.final / f
            if src.exists():
                with atomic_path(self.out / f) as tmp:
                    shutil.copyfile(src, tmp)

    def _clean(self) -> None:
        """Delete what earlier runs of this tool left: other run folders, stale staging, v1 files."""
        for d in (self.out / RUNS).iterdir():
            if d.is_dir() and d.name != self.run_id:
                shutil.rmtree(d, ignore_errors=True)
        for d in self.out.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(d, ignore_errors=True)
        if self.previous is not None:  # version-1 layout: artifacts at the top of out/
            for art in self.previous.artifacts.values():
                if art.path.split("/")[0] != RUNS and art.path not in TOP_LEVEL:
                    p = self.previous.file(art)
                    if p.resolve().is_relative_to(self.out.resolve()) and p.is_file():
                        p.unlink()
            for sub in ("onnx", "engines"):
                d = self.out / sub
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()

    def abandon(self) -> None:
        """A run that raised: drop its staging folder; the previous publication stands."""
        shutil.rmtree(self.staging, ignore_errors=True)
