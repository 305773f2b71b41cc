"""Stage `export`: student checkpoint -> onnx/student.fp32.onnx (dynamo exporter, dynamic batch)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.fileio import atomic_path
from engines.iospec import IOSpec

log = logging.getLogger(__name__)
TWO_GB = 2 << 30


class _Miss(Exception):
    """No sound export-cache entry: export."""


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 20  # >= 18 for GroupNormalization; the dynamo exporter's default
    dynamo: bool = True  # torch.onnx's dynamo exporter; the TorchScript one is deprecated
    check: bool = True  # onnx.checker full check (with shape inference)

    def to_dict(self) -> dict:
        return asdict(self)


def _example_inputs(spec: IOSpec, batch: int = 2) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(0)
    args = []
    for t in spec.inputs:
        shape = t.concrete({"batch": batch})
        if t.name == "timestep":
            args.append(torch.full(shape, 500.0))
        elif t.dtype.startswith("int"):
            args.append(torch.from_numpy(rng.integers(0, 2, size=shape).astype(t.dtype)))
        else:
            args.append(torch.from_numpy(rng.standard_normal(shape).astype(t.dtype)))
    return tuple(args)


def export_onnx(
    model: torch.nn.Module, spec: IOSpec, out_path: str | Path, config: ExportConfig = ExportConfig()
) -> Path:
    """Export `model` (a `Denoiser`) to ONNX at `out_path`, written atomically."""
    out_path = Path(out_path)
    model = model.eval().float()
    args = _example_inputs(spec)
    batch = torch.export.Dim("batch", min=1, max=max(4096, spec.dims["batch"].max))
    dynamic_shapes = {
        t.name: ({0: batch} if t.shape and t.shape[0] == "batch" else None) for t in spec.inputs
    }
    # The dynamo exporter binds inputs by the forward's parameter names: sample and timestep go
    # by position, the optional ones by name (a class-conditional UNet has class_labels but no
    # encoder_hidden_states, the third positional parameter).
    names = [t.name for t in spec.inputs]
    kwargs = dict(zip(names[2:], args[2:], strict=True))
    return write_onnx(model, args[:2], kwargs, spec, dynamic_shapes, out_path, config)


def write_onnx(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, torch.Tensor],
    spec: IOSpec,
    dynamic_shapes: dict[str, Any],
    out_path: Path,
    config: ExportConfig,
) -> Path:
    """torch.onnx.export (dynamo) of `model(*args, **kwargs)` to `out_path`, written atomically;
    weights over protobuf's 2 GB limit go to `<name>.data` beside it; onnx.checker if asked."""
    import onnx

    from optimizer.compile import export_cache

    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > TWO_GB - (64 << 20)  # protobuf's 2 GB limit, with headroom for the graph
    data_path = out_path.with_name(out_path.name + ".data")
    cache_key = None
    if export_cache.cache_dir() is not None:
        example = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
        describe = {
            "spec": spec.to_dict(),
            "dynamic_shapes": repr(dynamic_shapes),
            "config": config.to_dict(),
            "name": out_path.name,
            "external": external,
        }
        cache_key = export_cache.key(model, example, describe)
        try:
            with atomic_path(out_path, suffix=".onnx") as tmp:
                if not export_cache.fetch(cache_key, out_path.name, tmp, data_path):
                    raise _Miss  # leaves nothing at out_path
            return out_path
        except _Miss:
            pass
    with torch.no_grad(), atomic_path(out_path, suffix=".onnx") as tmp:
        prog = torch.onnx.export(
            model,
            args,
            kwargs=kwargs,
            dynamo=config.dynamo,
            opset_version=config.opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes,
            external_data=external,
            verbose=False,
            report=False,
            optimize=True,
        )
        prog.save(str(tmp), external_data=external)
        if external:
            log.info("model is %.1f GB: weights written as external data", n_bytes / 1e9)
        if config.check:
            onnx.checker.check_model(str(tmp), full_check=True)
        # weights written next to tmp, whether asked or decided by torch's save (it goes external
        # below our 2 GB line: a 2.07 GB T5 did): moved beside the final name, the graph pointed there
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():
            data.rename(data_path)
            _point_external_data(tmp, data_path.name)
    log.info("exported %s (%s params)", out_path, f"{sum(p.numel() for p in model.parameters()):,}")
    if cache_key is not None:
        export_cache.store(cache_key, out_path.name, out_path)
    return out_path


def _point_external_data(path: Path, location: str) -> None:
    """The graph names the file its weights were saved beside (the temp name): point every external
    tensor at `location`, the `<name>.data` they were moved to, or neither ORT nor onnx can load it.
    Rewrites the proto only; the weights stay where they are."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
    onnx.save(model, str(path))
