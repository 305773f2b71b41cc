"""How a dd-compile run publishes (see the publish contract in ARCHITECTURE.md).

Everything a run makes is written under `out/.staging-<run_id>/`, renamed to `out/runs/<run_id>/`
when complete, and published by one atomic replace of `out/manifest.json`: until that replace
readers see the previous complete run, after it the new one. Up-to-date artifacts of the previous
run are hard-linked (fallback: copied) into staging, so nothing of the previous run is modified
until the new manifest is committed.

- One run at a time per out/: `begin()` takes an exclusive flock on `out/.dd-compile.lock` (pid,
  host, start, run id written in it), held until `publish()`, `abandon()` or `close()`; the kernel
  drops it when the process dies, so a killed run never leaves a stale lock.
- A failed run (run["passed"] false) does not replace a passing one: its folder still becomes
  `runs/<id>/` (its report kept), and the previous manifest is re-committed with a `last_run`
  record naming it; `RunDir.kept_previous` is then the id of the run that stays served. With no
  passing run before it, a failed run is published (its artifacts' validation records say failed,
  so readers refuse them).
- Clean-up deletes only what this tool wrote: folders holding the `.dd-run.json` marker (written at
  begin) and, for outputs from before the marker, a `runs/<32 hex>` folder the previous manifest
  referenced (it is marked on the way, so the publish after the next deletes it). It never deletes
  the served run nor the run served just before this publish: a reader that read the old manifest
  may be opening its files now. That run goes at the next publish.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
import weakref
from pathlib import Path
from typing import IO, Any

from engines import manifest_check
from engines.errors import InputError
from engines.fileio import atomic_path, write_json_atomic
from engines.manifest import MANIFEST_NAME, Artifact, Manifest
from engines.outdir import claim

log = logging.getLogger(__name__)

RUNS = "runs"
STAGING_PREFIX = ".staging-"
LOCK_NAME = ".dd-compile.lock"
RUN_MARKER = ".dd-run.json"  # in every staging/run folder this tool creates: clean-up deletes only those
RUN_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
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


def _holder(text: str) -> str:
    """The lock file's record as words, for the refusal."""
    try:
        d = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(d["started"])))
        return f"pid {d['pid']} on {d['host']}, run {d['run_id']}, since {since}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "holder not yet recorded"


def _release(f: IO[str]) -> None:
    f.truncate(0)  # a later refusal never names a run that has finished
    f.close()  # closing the descriptor drops the flock


def _run_ids(m: Manifest) -> set[str]:
    """The run folders a manifest names (its run, its last_run, its artifacts' folders)."""
    ids = {r["id"] for r in (m.run, m.last_run) if r is not None}
    for a in m.artifacts.values():
        parts = a.path.split("/")
        if len(parts) > 2 and parts[0] == RUNS:
            ids.add(parts[1])
    return ids


def kept_note(out: Path, run_id: str) -> str | None:
    """One line for the CLI when run `run_id` failed and `out` still serves an earlier passing run
    (its manifest's last_run names `run_id`); None when `run_id` is the one served."""
    try:
        m = Manifest.load(out)
    except InputError:
        return None
    if m.run is None or m.last_run is None or m.last_run["id"] != run_id:
        return None
    report = Path(out) / Path(m.last_run["report"]).with_name("report.md")
    return f"not published: {out} still serves run {m.run['id']} (it passed); this run's report: {report}"


class RunDir:
    """One run's folders, its lock on `out` and its publication into `out`.

    Lifecycle: `begin()` (lock + staging) -> `reuse()`... -> `publish()` or `abandon()`; both
    release the lock (`close()` does too, and it is a context manager). After `publish()`,
    `kept_previous` is None when this run is the served one, else the id of the passing run that
    stays served because this one failed.
    """

    def __init__(self, out: Path, run_id: str | None = None):
        self.out = Path(out)
        self.run_id = run_id or uuid.uuid4().hex
        self.staging = self.out / f"{STAGING_PREFIX}{self.run_id}"
        self.final = self.out / RUNS / self.run_id
        self.previous: Manifest | None = None  # read by begin(), under the lock
        self.kept_previous: str | None = None
        self._lock: weakref.finalize | None = None  # releases the lock, also if this object is dropped

    def _load_previous(self) -> Manifest | None:
        if not (self.out / MANIFEST_NAME).exists():
            return None
        try:
            return Manifest.load(self.out)
        except InputError as e:  # unreadable old manifest: rebuild everything
            log.warning("previous manifest not reused: %s", e)
            return None

    # -- the lock ----------------------------------------------------------------------------
    def _acquire(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK_NAME
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")  # not truncated: holder's record
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f.read())
            f.close()
            raise InputError(
                f"-o {self.out}: another dd-compile run is writing this folder ({holder}; lock {path}); "
                "wait for it to finish or choose another folder"
            ) from None
        except BaseException:
            f.close()
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        f.truncate(0)
        f.write(json.dumps({**record, "run_id": self.run_id}) + "\n")
        f.flush()
        self._lock = weakref.finalize(self, _release, f)

    def close(self) -> None:
        """Release the lock on `out` (idempotent; the kernel releases it too if the process dies)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.abandon()
        self.close()

    # -- the run -----------------------------------------------------------------------------
    def begin(self) -> Path:
        """Lock `out` (InputError naming the holder if another run has it), then create staging."""
        self._acquire()
        try:
            self.previous = self._load_previous()  # under the lock: what this run reuses and replaces
            self.staging.mkdir(parents=True, exist_ok=False)
            write_json_atomic(self.staging / RUN_MARKER, {"run_id": self.run_id, "created_by": "dd-compile"})
        except BaseException:
            self.close()
            raise
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
        """Rename staging to runs/<id>/ and commit the manifest (the single commit point); returns
        the manifest now served: this run's, or (a failed run after a passing one) the previous one
        with `last_run` naming this run, and `kept_previous` set. Releases the lock."""
        try:
            return self._publish(manifest, run, fault)
        finally:
            self.close()

    def _publish(self, manifest: Manifest, run: dict[str, Any], fault) -> Manifest:
        (self.out / RUNS).mkdir(exist_ok=True)
        os.replace(self.staging, self.final)
        if fault:
            fault("publish")  # test hook: the run folder exists, the manifest is still the old one
        prefix = f"{RUNS}/{self.run_id}/"
        final = Manifest(self.out, manifest.io_spec, manifest.schedule, manifest.meta)
        final.run = {**run, "id": self.run_id, "finished": time.time()}
        for name, art in manifest.artifacts.items():
            final.artifacts[name] = dataclasses.replace(art, path=prefix + art.path)
        served = final
        keep = None if run.get("passed") else self._passing_previous()
        if keep is not None:
            keep.last_run = final.run
            served, self.kept_previous = keep, keep.run["id"]
            log.warning(
                "run %s failed: %s still serves run %s; this run's report is %sreport.md",
                self.run_id,
                self.out,
                self.kept_previous,
                prefix,
            )
        served.save()  # temp file + os.replace
        claim(self.out, "compile", served.run["id"])
        self._top_level_copies(served)
        self._clean(served.run["id"])
        return served

    def _passing_previous(self) -> Manifest | None:
        """The previous manifest if its run passed and its report is there and names it."""
        prev = self.previous
        if prev is None or prev.run is None or prev.run.get("passed") is not True:
            return None
        try:
            report = manifest_check.resolve_inside(self.out, prev.run["report"], f"{prev.path}: run.report")
            if json.loads(report.read_text()).get("run_id") != prev.run["id"]:
                return None
        except (InputError, OSError, ValueError, AttributeError):
            log.warning("the previous run %s lacks its report: not kept", prev.run["id"])
            return None
        return prev

    def _top_level_copies(self, served: Manifest) -> None:
        """The served run's report and plots at the top of out/; a copy the served run lacks (a
        pixel run's latency.png after a text-to-image run) is removed, not left stale."""
        assert served.run is not None
        folder = (self.out / served.run["report"]).parent
        for f in TOP_LEVEL:
            src = folder / f
            if src.exists():
                with atomic_path(self.out / f) as tmp:
                    shutil.copyfile(src, tmp)
            else:
                (self.out / f).unlink(missing_ok=True)

    def _clean(self, served_id: str) -> None:
        """Delete what earlier runs of this tool left: marked run folders other than the served
        one, this one and the one served until now; marked stale staging; version-1 files."""
        prev = self.previous
        keep = {self.run_id, served_id}
        referenced: set[str] = set()
        if prev is not None and prev.run is not None:
            keep.add(prev.run["id"])  # a reader may be opening it right now: it goes next time
            referenced = {i for i in _run_ids(prev) if RUN_ID.fullmatch(i)}
        foreign = []
        for d in sorted((self.out / RUNS).iterdir()):
            if not d.is_dir():
                continue
            marked = (d / RUN_MARKER).is_file()
            if d.name in keep:
                if not marked and d.name in referenced:  # written before the marker existed: adopt it
                    write_json_atomic(d / RUN_MARKER, {"run_id": d.name, "created_by": "dd-compile"})
                continue
            if marked or d.name in referenced:
                shutil.rmtree(d, ignore_errors=True)
            else:
                foreign.append(d)
        for d in sorted(self.out.glob(f"{STAGING_PREFIX}*")):  # the lock: no other run is live
            if (d / RUN_MARKER).is_file():
                shutil.rmtree(d, ignore_errors=True)
            elif d.is_dir():
                foreign.append(d)
        if foreign:
            log.warning(
                "%s: left alone (no %s: not written by this dd-compile): %s",
                self.out,
                RUN_MARKER,
                ", ".join(str(d.relative_to(self.out)) for d in foreign),
            )
        if prev is not None:  # version-1 layout: artifacts at the top of out/
            for art in prev.artifacts.values():
                if art.path.split("/")[0] != RUNS and art.path not in TOP_LEVEL:
                    p = prev.file(art)
                    if p.resolve().is_relative_to(self.out.resolve()) and p.is_file():
                        p.unlink()
            for sub in ("onnx", "engines"):
                d = self.out / sub
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()

    def abandon(self) -> None:
        """A run that raised: drop its staging folder and the lock; the previous publication stands."""
        try:
            shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self.close()
