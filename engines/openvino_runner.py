"""OpenVINO runner (CPU): the same validated ONNX graphs, compiled static per input shape.

OpenVINO reads our fp32, fp16 and Q/DQ int8 ONNX graphs as they are. It runs them fastest with
static shapes (measured on the demo UNet, b16, 1 thread: dynamic shapes 0.55x ONNX Runtime fp32,
static 1.06x; optimum-intel and openvino.genai reshape pipelines the same way), so the runner
compiles one model per input-shape signature it meets: the full shapes of the feeds, so a UNet's
batch B and CFG batch 2B and every latent size of the profile each get their own compile. The
batch sizes given at construction are compiled at activation (the IO spec's opt dims), so timing
excludes compiling; other signatures compile on first use, a bounded number kept
(`max_compiled`, least recently used evicted). `static=False` keeps one dynamic-shape compile for
every call. `precision_hint="bf16"` sets INFERENCE_PRECISION_HINT to bf16 (AVX512-BF16 / AMX CPUs
only: refused elsewhere); `cache_dir` is OpenVINO's CACHE_DIR (compiled blobs reused across
sessions, one per shape).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.errors import BackendUnavailable, InputError
from engines.iospec import IOSpec
from engines.lora import STATIC_IDLE_RANK, graph_zero_feeds

log = logging.getLogger(__name__)
PRECISION_HINTS = ("f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# Compiled shapes kept besides the precompiled ones: each compile holds its own copy of the weights
# and its scratch memory (an SD 1.5 UNet is 3.4 GB in fp32), so a server meeting every batch size
# and latent size of its profile must not keep them all; 8 covers B and 2B at a few sizes.
MAX_COMPILED = 8
Signature = tuple[tuple[str, tuple[int, ...]], ...]  # (input name, shape) for every feed, sorted


@dataclass(frozen=True)
class Compiled:
    names: list[str]  # the graph's output names, in output order
    model: Any  # ov.CompiledModel (its properties say what it runs at)
    request: Any  # ov.InferRequest


def signature(shapes: dict[str, Any]) -> Signature:
    return tuple(sorted((n, tuple(int(d) for d in s)) for n, s in shapes.items()))


def import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable("openvino is not installed: pip install 'dd-compile[openvino]'") from None
    return ov


def cpu_capabilities() -> set[str]:
    """OpenVINO's CPU OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8, FP16)."""
    ov = import_openvino()
    return {str(c).upper() for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def check_precision_hint(hint: str) -> None:
    if hint not in PRECISION_HINTS:
        raise InputError(f"openvino precision hint {hint!r}: choose from {', '.join(PRECISION_HINTS)}")
    if hint == "bf16" and "BF16" not in cpu_capabilities():
        raise BackendUnavailable(
            "bf16 needs a CPU with AVX512-BF16 or AMX; this CPU's OpenVINO capabilities are "
            f"{sorted(cpu_capabilities())}"
        )


class OpenVINORunner(Runner):
    backend = "openvino"

    def __init__(
        self,
        model_path: str | Path,
        spec: IOSpec,
        *,
        batch_sizes: Iterable[int] = (),
        precision_hint: str = "f32",
        performance_hint: str = "LATENCY",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        name: str | None = None,
        static: bool = True,
        max_compiled: int = MAX_COMPILED,
    ):
        super().__init__(spec, name=name or f"openvino:{Path(model_path).name}:{precision_hint}")
        if performance_hint not in PERFORMANCE_HINTS:
            raise InputError(
                f"openvino performance hint {performance_hint!r}: choose from {', '.join(PERFORMANCE_HINTS)}"
            )
        if precision_hint not in PRECISION_HINTS:
            raise InputError(
                f"openvino precision hint {precision_hint!r}: choose from {', '.join(PRECISION_HINTS)}"
            )
        if max_compiled < 1:
            raise InputError(f"openvino max_compiled {max_compiled}: must be >= 1")
        self.model_path = Path(model_path)
        self.batch_sizes = sorted({int(b) for b in batch_sizes})
        self.precision_hint, self.performance_hint = precision_hint, performance_hint
        self.threads, self.cache_dir = threads, cache_dir
        self.static, self.max_compiled = static, max_compiled
        self._pinned: dict[Signature, Compiled] = {}  # the construction's batch sizes, never evicted
        self._lru: OrderedDict[Signature, Compiled] = OrderedDict()  # met on first use, bounded
        self._dynamic: Compiled | None = None
        self._core: Any = None
        self.compiles = 0  # models compiled since activation (static and dynamic)

    def config(self) -> dict[str, str]:
        cfg = {
            "INFERENCE_PRECISION_HINT": self.precision_hint,
            "PERFORMANCE_HINT": self.performance_hint,
        }
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = str(self.threads)
        if self.cache_dir is not None:
            cfg["CACHE_DIR"] = str(self.cache_dir)
        return cfg

    def _static_shapes(self, batch: int) -> dict[str, list[int]]:
        sizes = {k: r.opt for k, r in self.spec.dims.items()}
        sizes["batch"] = batch
        shapes = {t.name: list(t.concrete(sizes)) for t in self.spec.inputs}
        return {**shapes, **{k: list(v.shape) for k, v in self.lora_defaults.items()}}

    def _compile(self, shapes: dict[str, list[int]] | None) -> Compiled:
        """One compile: reshaped to exactly `shapes` (static), or as exported (dynamic axes)."""
        model = self._core.read_model(str(self.model_path))
        if shapes is not None:
            model.reshape(shapes)
        # the graph's output names, read before compiling: OpenVINO may rename a tensor it
        # folds (an output fed by an Identity takes its producer's name)
        names = [o.get_any_name() for o in model.outputs]
        compiled = self._core.compile_model(model, "CPU", self.config())
        self.compiles += 1
        return Compiled(names, compiled, compiled.create_infer_request())

    def _dynamic_compile(self) -> Compiled:
        if self._dynamic is None:
            self._dynamic = self._compile(None)
        return self._dynamic

    def activate_impl(self) -> None:
        ov = import_openvino()
        check_precision_hint(self.precision_hint)
        if self.cache_dir is not None:
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
        self._core = ov.Core()
        model = self._core.read_model(str(self.model_path))
        types = {"f32": np.float32, "f16": np.float16}
        # LoRA inputs at rank 1, not 0: a static rank 0 fails OpenVINO 2026.4's bf16 compile ("object
        # is not initialized"), and a dynamic rank ran the demo UNet 1.6-1.8x slower than its plain graph
        inputs = [
            (
                i.get_any_name(),
                [d.get_length() if d.is_static else None for d in i.get_partial_shape()],
                types.get(i.get_element_type().get_type_name(), np.float32),
            )
            for i in model.inputs
        ]
        self.lora_defaults = graph_zero_feeds(inputs, rank=STATIC_IDLE_RANK)
        del model
        if not self.static:
            if self.batch_sizes:  # asked to be ready: compile now, not in the first timed call
                self._dynamic_compile()
            return
        for b in self.batch_sizes:
            shapes = self._static_shapes(b)
            self._pinned[signature(shapes)] = self._compile(shapes)

    def _request(self, feeds: dict[str, np.ndarray]) -> Compiled:
        if not self.static:
            return self._dynamic_compile()
        sig = signature({k: v.shape for k, v in feeds.items()})
        hit = self._pinned.get(sig) or self._lru.get(sig)
        if hit is not None:
            if sig in self._lru:
                self._lru.move_to_end(sig)
            return hit
        try:
            hit = self._compile({n: list(s) for n, s in sig})
        except Exception as e:  # noqa: BLE001 (a graph OpenVINO cannot specialise still runs dynamic)
            log.warning("%s: static compile at %s failed (%s); dynamic shapes instead", self.name, sig, e)
            hit = self._dynamic_compile()
        self._lru[sig] = hit
        if len(self._lru) > self.max_compiled:
            old, _ = self._lru.popitem(last=False)
            log.debug("%s: evicted the compile at %s (%d kept)", self.name, old, self.max_compiled)
        return hit

    @property
    def compiled_signatures(self) -> list[Signature]:
        """The static shapes held now: the precompiled ones, then the others, oldest use first."""
        return [*self._pinned, *self._lru]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = self._request(feeds)
        # inputs shared, not copied (the call is synchronous); outputs copied once by infer (the
        # request's buffers are reused by the next call), not twice: 0.06 ms of a 2 ms demo UNet
        # call, within noise end to end (the demo teacher: 0.99x)
        res = c.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_inputs=True)
        return {n: res[i] for i, n in enumerate(c.names)}

    def deactivate_impl(self) -> None:
        self._pinned, self._lru, self._dynamic, self._core = {}, OrderedDict(), None, None
        self.compiles = 0
