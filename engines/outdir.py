"""Output folders: a tool writes into, and replaces, only a folder it created itself.

Every command that writes a folder (dd-compile -o, dd-triton --repo, dd-layout -o, dd-distill's
<stem>.distill/, dd-bench -o) calls `check_target` before any work and `claim` once the folder
exists. A folder is ours when it holds the marker file `.dd-compile.json` naming the kind of folder
and an id (the manifest's run id for a compiled output). Anything else that already holds files is the user's:
it is refused with one line, never emptied, moved or replaced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.fileio import write_json_atomic

MARKER = ".dd-compile.json"
KINDS = ("compile", "triton-repo", "distill", "bench", "t2i-student", "layout")


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker's contents, or None when the folder holds no (readable) marker."""
    path = Path(folder) / MARKER
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("kind") in KINDS else None


def is_ours(folder: str | Path, kind: str) -> bool:
    m = read_marker(folder)
    return m is not None and m.get("kind") == kind


def _overlaps(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def check_target(target: str | Path, kind: str, option: str, protect: Iterable[str | Path] = ()) -> Path:
    """Refuse, before any work, a target folder that is not safe to write or replace.

    `protect`: folders the command reads from (the compiled output, the checkpoint's folder); the
    target may not be, contain or lie inside any of them. Returns the resolved target.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    target = Path(target)
    resolved = target.resolve()
    for p in protect:
        rp = Path(p).resolve()
        how = _overlaps(resolved, rp)
        if how:
            raise InputError(f"{option} {target}: {how} {p}, which this command reads; choose another folder")
    # a regular file anywhere on the way (`-o file/sub`) or at the target itself
    for parent in [resolved, *resolved.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is" if parent == resolved else f"lies under {parent}, which is"
            raise InputError(f"{option} {target}: {what} an existing file, not a folder")
    if resolved.is_dir() and any(resolved.iterdir()):
        m = read_marker(resolved)
        if m is None:
            raise InputError(
                f"{option} {target}: folder exists, holds files and was not written by dd-compile "
                f"(no {MARKER}); choose an empty or new folder"
            )
        if m.get("kind") != kind:
            raise InputError(
                f"{option} {target}: folder was written by dd-compile as a {m.get('kind')} folder, "
                f"not a {kind} folder; choose another folder"
            )
    return resolved


def claim(folder: str | Path, kind: str, owner_id: str, **extra: Any) -> Path:
    """Create the folder if needed and (re)write its marker: from now on the tool may replace it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / MARKER, {"kind": kind, "id": owner_id, "pid": os.getpid(), **extra})
    return folder
