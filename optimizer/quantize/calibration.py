"""Calibration inputs captured along the student's own sampling trajectory, and per-tensor ranges.

INT8 scales and FP16 islands are only as good as the inputs they were measured on: a few-step
student sees a handful of timesteps and the intermediate samples its own sampler produces there,
so we record exactly those feeds (the Sampler, wrapped by a recording runner) for several seeds.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.iospec import IOSpec
from engines.schedule import InferFn, Sampler, SamplingSchedule

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest fp16 subnormal: smaller magnitudes flush to zero


class RecordingRunner:
    """Wraps any runner; keeps a copy of every feed the sampler sends through it."""

    def __init__(self, runner: InferFn):
        self.runner = runner
        self.feeds: list[dict[str, np.ndarray]] = []

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.runner.infer(feeds)


def calibration_feeds(
    runner: InferFn,
    spec: IOSpec,
    schedule: SamplingSchedule,
    sample_shape: tuple[int, ...],
    seeds: list[int],
    batch: int,
    cond_fn: Callable[[int, np.random.Generator], dict[str, np.ndarray]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Feeds seen by `runner` (the FP32 student) while sampling from `seeds`, `batch` seeds a call.

    One feed per (batch of seeds, timestep): len = ceil(len(seeds) / batch) * schedule.steps.
    `cond_fn(batch, rng)` supplies conditioning inputs (text embeddings, labels) when the IO spec
    has them; default: optimizer.model_io.conditioning_feeds.
    """
    if not seeds:
        raise ValueError("calibration needs at least one seed")
    rec = RecordingRunner(runner)
    sampler = Sampler(schedule, rec, output_name=spec.output_names[0])
    for i in range(0, len(seeds), batch):
        chunk = seeds[i : i + batch]
        cond: dict[str, np.ndarray] = {}
        if len(spec.inputs) > 2:
            rng = np.random.default_rng(chunk[0])
            if cond_fn is None:
                from optimizer.model_io import conditioning_feeds

                cond = conditioning_feeds(spec, len(chunk), rng)
            else:
                cond = cond_fn(len(chunk), rng)
        sampler.from_seeds(chunk, tuple(sample_shape), cond)
    for f in rec.feeds:
        spec.check_feeds(f)
    log.info(
        "calibration: %d feeds (%d seeds, timesteps %s)", len(rec.feeds), len(seeds), list(schedule.timesteps)
    )
    return rec.feeds


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def ort_reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(FeedReader, CalibrationDataReader):
        pass

    return _Reader(feeds)


@dataclass
class TensorStats:
    """What a tensor did on the calibration set."""

    absmax: float = 0.0
    nonfinite: bool = False
    flush_fraction: float = 0.0  # share of nonzero values below fp16's smallest subnormal

    def update(self, a: np.ndarray, n_seen: int) -> None:
        finite = np.isfinite(a)
        self.nonfinite |= not bool(finite.all())
        a = np.abs(a[finite]) if not finite.all() else np.abs(a)
        if a.size == 0:
            return
        self.absmax = max(self.absmax, float(a.max()))
        nz = a[a > 0]
        frac = float((nz < FP16_TINY).mean()) if nz.size else 0.0
        self.flush_fraction = (self.flush_fraction * n_seen + frac) / (n_seen + 1)


def run_with_intermediates(
    model: Any,
    feeds: list[dict[str, np.ndarray]],
    tensors: list[str] | None = None,
    visit: Callable[[str, np.ndarray], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run `model` (onnx.ModelProto) with intermediate float tensors exposed as outputs.

    With `visit`, intermediates are handed to it one by one and only graph outputs are returned
    (keeps memory flat on big models); otherwise every exposed tensor is returned per feed.
    """
    import onnx
    import onnxruntime as ort

    from engines.onnxruntime_runner import session_options

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]  # converters leave stale types behind; infer them afresh
    m = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in m.graph.value_info}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    existing = {o.name for o in m.graph.output}
    want = (
        tensors
        if tensors is not None
        else [o for n in m.graph.node for o in n.output if o and types.get(o) in floats]
    )
    for name in want:
        if name not in existing and name in types:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    so = session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    with tempfile.TemporaryDirectory(prefix="ddq.") as d:
        path = Path(d) / "m.onnx"
        onnx.save(m, str(path), save_as_external_data=m.ByteSize() > (1 << 30))
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    graph_outs = [o.name for o in model.graph.output]
    results = []
    for f in feeds:
        vals = dict(zip(names, sess.run(names, f), strict=True))
        if visit is not None:
            for k, v in vals.items():
                if k not in graph_outs:
                    visit(k, v)
            vals = {k: vals[k] for k in graph_outs}
        results.append(vals)
    return results


def tensor_stats(model: Any, feeds: list[dict[str, np.ndarray]]) -> dict[str, TensorStats]:
    """Per-tensor |max|, non-finite values and fp16 flush-to-zero share, over the calibration set."""
    stats: dict[str, TensorStats] = {}
    seen: dict[str, int] = {}

    def visit(name: str, a: np.ndarray) -> None:
        if not np.issubdtype(a.dtype, np.floating):
            return
        s = stats.setdefault(name, TensorStats())
        s.update(a, seen.get(name, 0))
        seen[name] = seen.get(name, 0) + 1

    for f in feeds:  # graph inputs count too: a huge input overflows its first fp16 consumer
        for k, v in f.items():
            visit(k, v)
    outs = run_with_intermediates(model, feeds, visit=visit)
    for o in outs:
        for k, v in o.items():
            visit(k, v)
    return stats
