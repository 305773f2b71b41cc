"""Checks on a manifest.json as read: its structure and types, and that every path stays inside
its folder. Each failure is one InputError line naming the file and the field.

A manifest is input like any other: a hand-edited or planted entry (`/etc/passwd` with a matching
sha256, `../x.onnx`, a symlink out of the folder, a Windows path) must never be opened.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from engines.errors import InputError

# last_run: a failed run that did not replace the served one (optimizer/compile/publish.py)
TOP_LEVEL = ("format", "version", "run", "last_run", "meta", "io_spec", "schedule", "artifacts")
_NONE = type(None)
# field -> accepted JSON types; bool is excluded from numbers below (it is an int in Python)
ARTIFACT_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "path": (str,),
    "sha256": (str,),
    "kind": (str,),
    "precision": (str, _NONE),
    "backend": (str, _NONE),
    "target": (dict, _NONE),
    "input_sha256": (str, _NONE),
    "config": (dict,),
    "config_hash": (str,),
    "libraries": (dict,),
    "extra": (dict,),
    "created": (int, float),
    "validation": (dict, _NONE),
}
ARTIFACT_REQUIRED = ("name", "path", "sha256", "kind")
RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "student_sha256": (str, _NONE),
    "report": (str,),
    "passed": (bool,),
    "finished": (int, float),
    "allow_unvalidated": (bool,),
}
RUN_REQUIRED = ("id", "report", "passed")
VALIDATION_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "student_sha256": (str, _NONE),
    "passed": (bool,),
    "failures": (list,),
    # the backend the verdict was reached on (absent in runs before it was recorded)
    "backend": (str,),
}
VALIDATION_REQUIRED = ("run_id", "passed")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"[A-Za-z]:")  # C:, C:\x, C:x


def path_problem(value: Any) -> str | None:
    """Why `value` is not a plain relative POSIX path inside the folder, or None."""
    if not isinstance(value, str) or not value:
        return f"{value!r} is not a non-empty string"
    if "\\" in value:
        return f"{value!r} holds a backslash (a Windows path); manifest paths are relative, with '/'"
    if value.startswith("/") or _DRIVE.match(value):
        return f"{value!r} is absolute; manifest paths are relative to its folder"
    if "\x00" in value:
        return f"{value!r} holds a NUL byte"
    if ".." in value.split("/"):
        return f"{value!r} climbs out of the folder with '..'"
    return None


def resolve_inside(root: Path, value: str, where: str) -> Path:
    """root/value after checking the text and that it resolves (symlinks followed) inside root."""
    why = path_problem(value)
    if why:
        raise InputError(f"{where}: {why}")
    p = root / value
    real, base = p.resolve(), root.resolve()
    if real == base:
        raise InputError(f"{where}: {value!r} names the folder itself, not a file in it")
    if not real.is_relative_to(base):
        raise InputError(f"{where}: {value!r} resolves to {real}, outside {base} (a symlink pointing out?)")
    return p


def _check_fields(
    d: Any, types: dict[str, tuple[type, ...]], required: tuple[str, ...], where: str
) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(types)})")
    missing = [k for k in required if k not in d]
    if missing:
        raise InputError(f"{where}: missing field {missing[0]!r}")
    for k, v in d.items():
        ok = isinstance(v, types[k]) and not (isinstance(v, bool) and bool not in types[k])
        if not ok:
            want = " or ".join("null" if t is _NONE else t.__name__ for t in types[k])
            raise InputError(f"{where}: field {k!r} is {type(v).__name__}, expected {want}")
    return d


def check_run(path: Path, d: Any, field: str = "run") -> dict[str, Any]:
    """A run record ("run", or "last_run": the same fields) with its report path inside the folder."""
    where = f"{path}: {field}"
    run = _check_fields(d, RUN_FIELDS, RUN_REQUIRED, where)
    resolve_inside(path.parent, run["report"], f"{where}.report")
    return run


def check_artifacts(path: Path, items: Any) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise InputError(f"{path}: field 'artifacts' is {type(items).__name__}, expected a list")
    seen: set[str] = set()
    for i, a in enumerate(items):
        where = f"{path}: artifacts[{i}]"
        if isinstance(a, dict) and isinstance(a.get("name"), str):
            where += f" ({a['name']!r})"
        _check_fields(a, ARTIFACT_FIELDS, ARTIFACT_REQUIRED, where)
        if a["name"] in seen:
            raise InputError(f"{where}: duplicate artifact name")
        seen.add(a["name"])
        if not _SHA256.fullmatch(a["sha256"]):
            raise InputError(f"{where}: field 'sha256' is not 64 lowercase hex digits")
        resolve_inside(path.parent, a["path"], f"{where} field 'path'")
        if a.get("validation") is not None:
            v = _check_fields(a["validation"], VALIDATION_FIELDS, VALIDATION_REQUIRED, f"{where}.validation")
            if not all(isinstance(f, str) for f in v.get("failures", [])):
                raise InputError(f"{where}.validation: field 'failures' must list strings")
    return items


def check_io_spec(path: Path, d: Any) -> None:
    """Types of the IO spec, and 1 <= min <= opt <= max for every dynamic axis (batch included)."""
    where = f"{path}: io_spec"
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected an object, got {type(d).__name__}")
    for key in ("inputs", "outputs"):
        ts = d.get(key)
        if not isinstance(ts, list) or not ts:
            raise InputError(f"{where}.{key}: expected a non-empty list of tensors")
        for i, t in enumerate(ts):
            tw = f"{where}.{key}[{i}]"
            if not isinstance(t, dict) or set(t) != {"name", "dtype", "shape"}:
                raise InputError(f"{tw}: expected an object with exactly name, dtype, shape")
            if not isinstance(t["name"], str) or not isinstance(t["dtype"], str):
                raise InputError(f"{tw}: name and dtype must be strings")
            shape = t["shape"]
            if not isinstance(shape, list) or not all(
                (isinstance(s, int) and not isinstance(s, bool) and s >= 1) or isinstance(s, str)
                for s in shape
            ):
                raise InputError(f"{tw}.shape: expected a list of sizes >= 1 and axis names")
    dims = d.get("dims", {})
    if not isinstance(dims, dict):
        raise InputError(f"{where}.dims: expected an object")
    for axis, r in dims.items():
        ints = isinstance(r, list) and len(r) == 3 and all(type(x) is int for x in r)
        if not ints or not 1 <= r[0] <= r[1] <= r[2]:
            raise InputError(
                f"{where}.dims.{axis}: {r!r} is not a valid range [min, opt, max] with 1 <= min <= opt <= max"
            )


def check_top_level(path: Path, d: dict[str, Any], version: int) -> None:
    unknown = sorted(set(d) - set(TOP_LEVEL))
    if unknown:
        raise InputError(f"{path}: unknown top-level field {unknown[0]!r} (known: {', '.join(TOP_LEVEL)})")
    if "artifacts" not in d:
        raise InputError(f"{path}: missing field 'artifacts'")
    if not isinstance(d.get("meta", {}) or {}, dict):
        raise InputError(f"{path}: field 'meta' is {type(d['meta']).__name__}, expected an object")
    for key in ("io_spec", "schedule"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise InputError(f"{path}: field {key!r} is {type(d[key]).__name__}, expected an object or null")
    shape = (d.get("meta") or {}).get("sample_shape")
    if shape is not None and not (
        isinstance(shape, list) and shape and all(type(x) is int and x >= 1 for x in shape)
    ):
        raise InputError(f"{path}: meta.sample_shape: {shape!r} is not a list of sizes >= 1 ([C, H, W])")
    for key in ("run", "last_run"):
        if version < 2 and d.get(key) is not None:
            raise InputError(f"{path}: a version-{version} manifest has no {key!r} field")
