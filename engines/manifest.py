"""out/manifest.json: every artifact with its sha256, kind, precision, backend, target, library
versions and the config that made it, plus the IO spec and sampling schedule.

It replaces file-name caching (a stage is skipped only when input sha256 and config match) and is
all the runtime needs to load a student.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines import manifest_check as check
from engines.errors import InputError, IntegrityError
from engines.fileio import config_hash, sha256_file, write_json_atomic
from engines.iospec import IOSpec
from engines.schedule import SamplingSchedule

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "dd-compile-manifest"
MANIFEST_VERSION = 2  # 2: a top-level "run" record and a "validation" record per artifact
MANIFEST_NAME = "manifest.json"
SERVABLE_KINDS = ("onnx", "engine", "pipeline")  # pipeline: a text-to-image t2i.<mix>.json
REFUSAL_HINT = "recompile with this dd-compile or pass --allow-unvalidated"


@dataclass
class Artifact:
    name: str  # unique key, e.g. "onnx/fp16", "engine/tensorrt/fp16/sm90"
    path: str  # relative to the manifest's folder
    sha256: str
    kind: str  # "onnx", "engine", "timing_cache", "report", "triton_repo", ...
    precision: str | None = None
    backend: str | None = None
    target: dict[str, Any] | None = None  # hardware/library target (TensorRT: version, sm, ...)
    input_sha256: str | None = None  # what it was made from
    config: dict[str, Any] = field(default_factory=dict)  # the stage config that made it
    config_hash: str = ""
    libraries: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific facts (node lists, ...)
    created: float = field(default_factory=time.time)
    # {"run_id", "student_sha256", "passed", "failures"}: the run whose report validated it
    validation: dict[str, Any] | None = None


def backend_family(backend: str) -> str:
    """onnxruntime-cuda and -trt run the graph ONNX Runtime checked; openvino and tensorrt are
    runtimes of their own, whose verdicts do not carry over."""
    return "onnxruntime" if backend.startswith("onnxruntime") else backend


class Manifest:
    def __init__(
        self,
        root: str | Path,
        io_spec: IOSpec | None = None,
        schedule: SamplingSchedule | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.root = Path(root)
        self.io_spec, self.schedule = io_spec, schedule
        self.meta: dict[str, Any] = meta or {}  # student info, sample shape, conditioning...
        self.artifacts: dict[str, Artifact] = {}
        # the run that published this manifest: {"id", "student_sha256", "report", "passed", ...}
        self.run: dict[str, Any] | None = None
        # a later run that failed and so did not replace `run` (same fields; its report is kept)
        self.last_run: dict[str, Any] | None = None
        self.version = MANIFEST_VERSION  # as read from the file (1: nothing in it was validated)

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    # -- artifacts --------------------------------------------------------------------------
    def add(
        self, name: str, path: str | Path, kind: str, *, config: dict[str, Any] | None = None, **kw: Any
    ) -> Artifact:
        # `path` is a path as the caller sees it (absolute or relative to the cwd), not relative to
        # the root: with `-o out/` a relative path already starts with `out/`.
        p = Path(path).resolve()
        try:
            rel = p.relative_to(self.root.resolve())
        except ValueError:
            raise ValueError(f"{p}: artifact lies outside the output directory {self.root}") from None
        art = Artifact(
            name=name,
            path=rel.as_posix(),
            sha256=sha256_file(p),
            kind=kind,
            config=config or {},
            config_hash=config_hash(config or {}),
            **kw,
        )
        self.artifacts[name] = art
        return art

    def get(self, name: str) -> Artifact | None:
        return self.artifacts.get(name)

    def find(self, kind: str | None = None, **match: Any) -> list[Artifact]:
        out = []
        for a in self.artifacts.values():
            if kind and a.kind != kind:
                continue
            if all(getattr(a, k) == v for k, v in match.items()):
                out.append(a)
        return out

    def file(self, art: Artifact) -> Path:
        """The artifact's path; refused (InputError) unless it resolves inside the folder."""
        return check.resolve_inside(self.root, art.path, f"{self.path}: artifact {art.name!r} field 'path'")

    def inside(self, path: str | Path, what: str) -> Path:
        """`path` (root / ..., e.g. external ONNX data beside an artifact), refused unless it
        resolves inside the folder."""
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            raise InputError(f"{self.path}: {what}: {path} lies outside {self.root}") from None
        return check.resolve_inside(self.root, rel.as_posix(), f"{self.path}: {what}")

    def verify(self, art: Artifact) -> Path:
        """The artifact's path, after checking that it lies inside the folder, that the file exists
        and that its sha256 matches."""
        p = self.file(art)
        if not p.exists():
            raise IntegrityError(f"{self.path}: artifact {art.name!r} names {p}, which is missing")
        digest = sha256_file(p)
        if digest != art.sha256:
            raise IntegrityError(
                f"{p}: sha256 {digest[:12]}... does not match the manifest's "
                f"{art.sha256[:12]}... (file changed after it was built)"
            )
        return p

    def up_to_date(self, name: str, input_sha256: str, config: dict[str, Any]) -> Artifact | None:
        """The cached artifact if it was made from the same input with the same config."""
        art = self.artifacts.get(name)
        if art is None or art.input_sha256 != input_sha256 or art.config_hash != config_hash(config):
            return None
        try:
            self.verify(art)
        except IntegrityError:
            return None
        return art

    # -- what may be served ---------------------------------------------------------------
    def servable(self, art: Artifact, backend: str | None = None) -> str | None:
        """None when `art` may be served, else why not: it must be validated, and passed, by the
        run that published this manifest, whose report exists and names that run; with `backend`,
        on a runtime of the same family (ONNX Runtime, OpenVINO, TensorRT)."""
        if self.version < 2:
            return f"manifest version {self.version} records no validation"
        run = self.run
        if run is None:
            return "the manifest has no run record (no complete dd-compile run published it)"
        v = art.validation
        if v is None:
            return f"not validated by run {run['id']}"
        if v["run_id"] != run["id"]:
            return f"validated by run {v['run_id']}, not by the published run {run['id']}"
        if run.get("student_sha256") is not None and v.get("student_sha256") != run["student_sha256"]:
            return "validated for another student checkpoint (student_sha256 differs from the run's)"
        if not v["passed"]:
            failures = "; ".join(v.get("failures") or []) or "no reason recorded"
            return f"failed validation in run {run['id']} ({failures})"
        ran_on = v.get("backend")
        if backend is not None and ran_on is not None and backend_family(ran_on) != backend_family(backend):
            return f"validated on {ran_on}, not on {backend} (compile with --backend {backend})"
        report = check.resolve_inside(self.root, run["report"], f"{self.path}: run.report")
        try:
            report_run = json.loads(report.read_text()).get("run_id")
        except FileNotFoundError:
            return f"the run's report {run['report']} is missing"
        except (OSError, ValueError, AttributeError):
            return f"the run's report {run['report']} is unreadable"
        if report_run != run["id"]:
            return (
                f"the report {run['report']} is of run {report_run!r}, not of the published run {run['id']}"
            )
        return None

    def require_servable(
        self, art: Artifact, allow_unvalidated: bool = False, backend: str | None = None
    ) -> str | None:
        """Refuse an artifact that is not servable with one line; with `allow_unvalidated`, log a
        warning instead and return the reason (callers record `allow_unvalidated: true`)."""
        if art.kind not in SERVABLE_KINDS:
            raise ValueError(f"{art.name}: a {art.kind} artifact is not something to serve")
        why = self.servable(art, backend)
        if why is None:
            return None
        if not allow_unvalidated:
            raise InputError(f"{self.path}: artifact {art.name!r} is not servable: {why}; {REFUSAL_HINT}")
        log.warning(
            "serving %s from %s although it is not servable (%s): allow_unvalidated", art.name, self.path, why
        )
        return why

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "run": self.run}
        if self.last_run is not None:  # written only when set: most manifests read as before
            d["last_run"] = self.last_run
        return {
            **d,
            "meta": self.meta,
            "io_spec": self.io_spec.to_dict() if self.io_spec else None,
            "schedule": self.schedule.to_dict() if self.schedule else None,
            "artifacts": [asdict(a) for a in self.artifacts.values()],
        }

    def save(self) -> Path:
        write_json_atomic(self.path, self.to_dict())
        return self.path

    @classmethod
    def load(cls, root_or_file: str | Path) -> Manifest:
        """Read and check a manifest: structure, types and paths (each inside its folder)."""
        p = Path(root_or_file)
        if p.is_dir():
            p = p / MANIFEST_NAME
        if not p.exists():
            raise InputError(f"{p}: no manifest (run dd-compile first)")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: unreadable ({e})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise InputError(f"{p}: not a dd-compile manifest")
        version = d.get("version")
        if type(version) is not int or version not in (1, MANIFEST_VERSION):
            raise InputError(
                f"{p}: manifest version {version!r} is not supported "
                f"(this dd-compile reads versions 1 to {MANIFEST_VERSION})"
            )
        check.check_top_level(p, d, version)
        if d.get("io_spec") is not None:
            check.check_io_spec(p, d["io_spec"])
        arts = check.check_artifacts(p, d["artifacts"])
        run = check.check_run(p, d["run"]) if d.get("run") is not None else None
        last = check.check_run(p, d["last_run"], "last_run") if d.get("last_run") is not None else None
        try:
            spec = IOSpec.from_dict(d["io_spec"]) if d.get("io_spec") else None
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{p}: io_spec: {type(e).__name__}: {e}") from None
        try:
            schedule = SamplingSchedule.from_dict(d["schedule"]) if d.get("schedule") else None
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{p}: schedule: {type(e).__name__}: {e}") from None
        m = cls(p.parent, spec, schedule, d.get("meta") or {})
        m.version, m.run, m.last_run = version, run, last
        for a in arts:
            m.artifacts[a["name"]] = Artifact(**a)
        return m

    @classmethod
    def open_or_create(
        cls, root: str | Path, io_spec: IOSpec, schedule: SamplingSchedule, meta: dict[str, Any]
    ) -> Manifest:
        """Reuse the artifact records of an existing manifest (for caching), refresh the rest."""
        root = Path(root)
        m = cls(root, io_spec, schedule, meta)
        if (root / MANIFEST_NAME).exists():
            try:
                old = cls.load(root)
                m.artifacts = old.artifacts
            except InputError:
                pass  # unreadable old manifest: rebuild everything
        return m
