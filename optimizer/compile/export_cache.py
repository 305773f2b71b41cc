"""A content-addressed cache of exported fp32 graphs, opt-in (`--export-cache DIR` or
DD_COMPILE_EXPORT_CACHE): the dynamo export is the slowest step of a compile that changes no
weights (34 s for a tiny SD UNet on 2 cores, minutes for SD 1.5), and re-running dd-compile with
other bars, precisions or a new output folder reproduces the same graph.

The key covers everything the graph depends on: every parameter and buffer (names, dtypes, shapes,
bytes), the module tree (`repr`), each module's plain attributes (diffusers' config among them),
the source files of every module class and of the exporter code, the example inputs' shapes and
dtypes, the IO spec, the dynamic shapes, the export config, the file name (external data is named
after it) and the torch / onnx / onnxscript / diffusers versions. An entry is a folder `<key>/`
holding the graph (and its `.data`) plus `entry.json` with their sha256, checked on every hit: a
damaged entry is exported again and replaced. Entries are published by renaming a finished temp
folder, so concurrent compiles never see half an entry; a failure writing the cache is a warning,
never a failed compile.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engines.fileio import sha256_file
from optimizer.versions import library_versions

log = logging.getLogger(__name__)
ENV = "DD_COMPILE_EXPORT_CACHE"
_dir: Path | None = None  # set by `using()`; otherwise the environment variable decides
_LIBS = ("torch", "onnx", "onnxscript", "diffusers", "transformers")
_PLAIN = (bool, int, float, str, type(None))
# bookkeeping that never reaches the graph: where a module was loaded from (diffusers' config
# `_name_or_path`, transformers' `name_or_path`: a copied folder, a test's tmp dir), and diffusers'
# `_use_default_values`, a list made from a set (its order follows PYTHONHASHSEED: every process
# had its own key for a UNet2DConditionModel, so a cached UNet never hit across runs)
NOT_IN_GRAPH = frozenset({"_name_or_path", "name_or_path", "_use_default_values"})


@contextlib.contextmanager
def using(directory: str | Path | None) -> Iterator[None]:
    """Cache exports under `directory` for the duration (None: whatever the environment says)."""
    global _dir
    old, _dir = _dir, (Path(directory) if directory is not None else None)
    try:
        yield
    finally:
        _dir = old


def cache_dir() -> Path | None:
    if _dir is not None:
        return _dir
    env = os.environ.get(ENV, "").strip()
    return Path(env) if env else None


def _plain(v: Any) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def _attrs(m: torch.nn.Module) -> list[tuple[str, str]]:
    """A module's plain attributes (flags, sizes, modes, diffusers' `_internal_dict` config): what
    changes forward() without changing a weight or the module tree."""
    out = []
    for k, v in sorted(vars(m).items()):
        if (k.startswith("_") and k != "_internal_dict") or k in NOT_IN_GRAPH:
            continue
        if k == "_internal_dict":
            v = {c: x for c, x in dict(v).items() if c not in NOT_IN_GRAPH}
        if _plain(v):
            out.append((k, repr(v)))
    return out


def _source_files(model: torch.nn.Module) -> list[Path]:
    files = {Path(__file__).with_name("export.py")}
    for cls in {type(m) for m in model.modules()}:
        with contextlib.suppress(TypeError, OSError):
            files.add(Path(inspect.getsourcefile(cls)))
    return sorted(files)


def _versions() -> dict[str, str]:
    return library_versions(_LIBS)


def key(model: torch.nn.Module, example: dict[str, torch.Tensor], describe: dict[str, Any]) -> str:
    """sha256 over what the exported graph depends on (see the module docstring)."""
    h = hashlib.sha256()

    def put(tag: str, data: bytes) -> None:
        h.update(tag.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        t = t.detach().contiguous().cpu()
        put("tensor", f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        put("bytes", t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    put("tree", repr(model).encode())
    for name, m in model.named_modules():
        put("attrs", f"{name}|{type(m).__qualname__}|{_attrs(m)}".encode())
    for f in _source_files(model):
        put("source", f.name.encode() + f.read_bytes())
    put("example", repr(sorted((k, v.dtype, tuple(v.shape)) for k, v in example.items())).encode())
    put("describe", json.dumps(describe, sort_keys=True, default=repr).encode())
    put("versions", json.dumps(_versions(), sort_keys=True).encode())
    return h.hexdigest()


def _files(entry: Path, name: str) -> list[Path]:
    return [p for p in (entry / name, entry / f"{name}.data") if p.exists()]


def _sound(entry: Path, name: str) -> bool:
    try:
        meta = json.loads((entry / "entry.json").read_text())
        files = _files(entry, name)
        return bool(files) and {p.name: sha256_file(p) for p in files} == meta.get("sha256")
    except (OSError, ValueError):
        return False


def fetch(k: str, name: str, dest: Path, data_dest: Path) -> bool:
    """Copy the cached graph `name` to `dest` (its .data to `data_dest`) when entry `k` is sound."""
    root = cache_dir()
    if root is None:
        return False
    entry = root / k
    if not (entry / "entry.json").exists():
        return False
    if not _sound(entry, name):
        log.warning("export cache: %s is damaged (sha256 differs): exporting again", entry)
        return False
    for p in _files(entry, name):
        shutil.copyfile(p, dest if p.name == name else data_dest)
    log.info("export: cached graph reused (%s)", entry)
    return True


def store(k: str, name: str, graph: Path) -> None:
    """Publish `graph` (and `<graph>.data`) as entry `k`, stored under `name`; a warning on failure."""
    root = cache_dir()
    if root is None:
        return
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir(parents=True)
        shas = {}
        for src, dst in ((graph, name), (graph.with_name(graph.name + ".data"), f"{name}.data")):
            if src.exists():
                shutil.copyfile(src, tmp / dst)
                shas[dst] = sha256_file(tmp / dst)
        (tmp / "entry.json").write_text(json.dumps({"sha256": shas, "versions": _versions()}, indent=1))
        final = root / k
        if final.exists():
            if _sound(final, name):  # a concurrent compile published the same graph first
                return
            if not (final / "entry.json").is_file():  # not an entry this cache wrote: never delete it
                log.warning("export cache: %s exists and is not a cache entry: not stored", final)
                return
            shutil.rmtree(final, ignore_errors=True)  # the damaged entry fetch refused
        os.rename(tmp, final)
        log.info("export cache: stored %s", final)
    except OSError as e:  # a concurrent rename won the race, or the disk is full
        log.warning("export cache: not stored in %s (%s)", root, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
