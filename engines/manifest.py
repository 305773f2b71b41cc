"""out/manifest.json: every artifact with its sha256, kind, precision, backend, target, library
versions and the config that made it, plus the IO spec and sampling schedule.

It replaces file-name caching (a stage is skipped only when input sha256 and config match) and is
all the runtime needs to load a student.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines.errors import InputError, IntegrityError
from engines.fileio import config_hash, sha256_file, write_json_atomic
from engines.iospec import IOSpec
from engines.schedule import SamplingSchedule

MANIFEST_FORMAT = "dd-compile-manifest"
MANIFEST_VERSION = 2  # 2: a top-level "run" record and a "validation" record per artifact
MANIFEST_NAME = "manifest.json"


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
        return self.root / art.path

    def verify(self, art: Artifact) -> Path:
        """The artifact's path, after checking that the file exists and its sha256 matches."""
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

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "run": self.run,
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
        p = Path(root_or_file)
        if p.is_dir():
            p = p / MANIFEST_NAME
        if not p.exists():
            raise InputError(f"{p}: no manifest (run dd-compile first)")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise InputError(f"{p}: not a dd-compile manifest")
        if d.get("version") not in (1, MANIFEST_VERSION):
            raise InputError(
                f"{p}: manifest version {d.get('version')!r} is not supported "
                f"(this dd-compile reads version {MANIFEST_VERSION})"
            )
        m = cls(
            p.parent,
            IOSpec.from_dict(d["io_spec"]) if d.get("io_spec") else None,
            SamplingSchedule.from_dict(d["schedule"]) if d.get("schedule") else None,
            d.get("meta") or {},
        )
        m.run = d.get("run")
        for a in d.get("artifacts", []):
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
