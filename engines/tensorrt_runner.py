"""TensorRT runner: a serialized engine behind the Runner interface, with an optional CUDA graph.

Lifecycle after TensorRT's demo/Diffusion engine.py: deserialize, create a context, allocate device
buffers once at the profile's max shapes (so tensor addresses never move), then per call
`set_input_shape` (only when shapes change), copy in, `execute_async_v3` on our stream, copy out.
With `cuda_graph=True` the enqueue is captured once per input shape and replayed; a new shape
re-captures. GPU time of each call is measured with CUDA events (`last_gpu_ms`).

Which TensorRT/GPU an engine was built for and whether it runs here: engines/trt_target.py.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner
from engines.cuda_utils import CudaEventTimer, call, check_cuda_device, import_cudart, import_tensorrt
from engines.errors import InputError, IntegrityError
from engines.iospec import IOSpec
from engines.lora import graph_zero_feeds

# engines/runtime.py checks an engine record before it builds this runner
from engines.trt_target import check_engine_compatible  # noqa: F401

log = logging.getLogger(__name__)


class _Buffer:
    """A device allocation plus a pinned host staging area of the same size."""

    def __init__(self, nbytes: int):
        cudart = import_cudart()
        self.nbytes = max(int(nbytes), 1)
        self.device = call(cudart.cudaMalloc(self.nbytes), "cudaMalloc")
        self.host = call(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost")

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A numpy view of the pinned host memory (valid until the buffer is freed)."""
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = (ctypes.c_byte * max(n, 1)).from_address(int(self.host))
        return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def free(self) -> None:
        cudart = import_cudart()
        cudart.cudaFree(self.device)
        cudart.cudaFreeHost(self.host)


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        spec: IOSpec,
        *,
        cuda_graph: bool = False,
        copy_outputs: bool = True,
        profile_index: int | None = 0,
        device: int = 0,
        name: str | None = None,
    ):
        """profile_index: the optimization profile to run; None picks, per input shape, the first
        profile that covers it (engines built with one exact profile per batch size)."""
        super().__init__(spec, name=name or f"tensorrt:{Path(engine_path).name}")
        self.engine_path = Path(engine_path)
        self.cuda_graph, self.copy_outputs = cuda_graph, copy_outputs
        self.auto_profile = profile_index is None
        self.profile_index, self.device = profile_index or 0, device
        self.last_gpu_ms: float | None = None  # CUDA-event time of the engine call (copies excluded)
        self.graph_captures = 0  # how many times a CUDA graph was (re)captured
        self._engine: Any = None

    # -- activation -------------------------------------------------------------------------
    def activate_impl(self) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        check_cuda_device()
        call(cudart.cudaSetDevice(self.device), "cudaSetDevice")
        self._trt, self._cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        # Version-compatible plans embed a lean runtime (host code); the manifest's sha256 check
        # has already vouched for this file, so allowing it is safe here.
        if hasattr(self._runtime, "engine_host_code_allowed"):
            self._runtime.engine_host_code_allowed = True
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise IntegrityError(
                f"{self.engine_path}: TensorRT could not deserialize the engine "
                "(built by another TensorRT version or for another GPU?)"
            )
        self._engine = engine
        n_prof = engine.num_optimization_profiles
        if not 0 <= self.profile_index < n_prof:
            raise InputError(
                f"{self.engine_path}: profile_index {self.profile_index} out of range "
                f"(engine has {n_prof} profile(s))"
            )
        self._context = engine.create_execution_context()
        self._stream = call(
            cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
            "cudaStreamCreateWithFlags",
        )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        missing = sorted(set(self.spec.input_names) - set(self._inputs))
        if missing:
            raise IntegrityError(f"{self.engine_path}: engine lacks input(s) {missing} of the IO spec")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        # a graph's LoRA inputs, not fed: zeros at the profile's min rank (engines/lora.py)
        self.lora_defaults = graph_zero_feeds(
            (n, list(engine.get_tensor_profile_shape(n, self.profile_index)[0]), self._dtypes[n])
            for n in self._inputs
        )
        # Allocate once at the largest shapes of the profiles we may use: addresses stay fixed, so
        # a captured graph stays valid until the shapes (not the buffers) change.
        start = self.profile_index
        usable = range(n_prof) if self.auto_profile else [start]
        nbytes: dict[str, int] = dict.fromkeys(names, 1)
        for p in usable:
            self._select_profile(p)
            for n in self._inputs:
                self._context.set_input_shape(n, tuple(engine.get_tensor_profile_shape(n, p)[2]))
            for n in names:
                shape = tuple(self._context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise IntegrityError(
                        f"{self.engine_path}: output {n} has a data-dependent shape "
                        f"{shape}; this runner needs shapes known from the inputs"
                    )
                nbytes[n] = max(nbytes[n], int(np.prod(shape, dtype=np.int64)) * self._dtypes[n].itemsize)
        self._select_profile(start)
        self._buffers: dict[str, _Buffer] = {n: _Buffer(nbytes[n]) for n in names}
        self._bind_addresses()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        self._graph: Any = None
        self._graph_exec: Any = None
        self._timer = CudaEventTimer()

    def deactivate_impl(self) -> None:
        self._drop_graph()
        for b in getattr(self, "_buffers", {}).values():
            b.free()
        self._buffers = {}
        if getattr(self, "_timer", None) is not None:
            self._timer.free()
            self._timer = None
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None
        self._engine = None
        self._runtime = None

    # -- inference --------------------------------------------------------------------------
    def _select_profile(self, index: int) -> None:
        if not self._context.set_optimization_profile_async(index, self._stream):
            raise RuntimeError(f"{self.engine_path}: cannot select optimization profile {index}")
        call(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self.profile_index = index

    def _bind_addresses(self) -> None:
        for n, buf in self._buffers.items():
            if not self._context.set_tensor_address(n, int(buf.device)):
                raise RuntimeError(f"{self.engine_path}: set_tensor_address failed for {n}")

    def _covers(self, index: int, shapes: dict[str, tuple[int, ...]]) -> bool:
        for n, s in shapes.items():
            lo, _, hi = (tuple(d) for d in self._engine.get_tensor_profile_shape(n, index))
            if len(s) != len(lo) or any(not a <= x <= b for a, x, b in zip(lo, s, hi, strict=True)):
                return False
        return True

    def _set_shapes(self, feeds: dict[str, np.ndarray]) -> None:
        shapes = {n: tuple(feeds[n].shape) for n in self._inputs}
        if shapes == self._shapes:
            return
        if self.auto_profile and not self._covers(self.profile_index, shapes):
            fits = [p for p in range(self._engine.num_optimization_profiles) if self._covers(p, shapes)]
            if fits:  # else set_input_shape below reports the current profile's range
                self._select_profile(fits[0])
                self._bind_addresses()
        for n, s in shapes.items():
            if not self._context.set_input_shape(n, s):
                lo, _, hi = self._engine.get_tensor_profile_shape(n, self.profile_index)
                raise InputError(
                    f"{self.engine_path}: input {n} shape {s} is outside optimization "
                    f"profile {self.profile_index} [{tuple(lo)} .. {tuple(hi)}]"
                )
        self._shapes = shapes
        self._out_shapes = {n: tuple(self._context.get_tensor_shape(n)) for n in self._outputs}
        self._drop_graph()  # a graph replays the old shapes' kernels: capture again

    def _drop_graph(self) -> None:
        if getattr(self, "_graph_exec", None) is not None:
            self._cudart.cudaGraphExecDestroy(self._graph_exec)
        if getattr(self, "_graph", None) is not None:
            self._cudart.cudaGraphDestroy(self._graph)
        self._graph = self._graph_exec = None

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError(f"{self.engine_path}: execute_async_v3 failed (see TensorRT log)")

    def _capture(self) -> None:
        """Capture one enqueue into a CUDA graph. The caller has already run one plain enqueue with
        these shapes, which TensorRT needs to finish its deferred shape-dependent setup."""
        cudart = self._cudart
        call(
            cudart.cudaStreamBeginCapture(
                self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            ),
            "cudaStreamBeginCapture",
        )
        try:
            self._enqueue()
        finally:
            graph = call(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        self._graph = graph
        self._graph_exec = call(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        self.graph_captures += 1

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d, d2h = (
            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        fresh_shapes = {n: tuple(feeds[n].shape) for n in self._inputs} != self._shapes
        self._set_shapes(feeds)
        for n in self._inputs:
            buf, dt = self._buffers[n], self._dtypes[n]
            staged = buf.host_array(self._shapes[n], dt)
            # The spec's dtype into the engine's (they differ when a graph has fp16 IO).
            np.copyto(staged, feeds[n], casting="unsafe")
            call(
                cudart.cudaMemcpyAsync(buf.device, buf.host, staged.nbytes, h2d, self._stream),
                "cudaMemcpyAsync",
            )
        self._timer.record_start(self._stream)
        if self.cuda_graph:
            if self._graph_exec is None:
                if fresh_shapes:
                    self._enqueue()  # first run at these shapes, outside the capture
                try:
                    self._capture()
                except RuntimeError as e:  # e.g. an engine with host-side work: run it plainly
                    log.warning(
                        "%s: CUDA graph capture failed (%s); running without graphs",
                        self.engine_path,
                        e,
                    )
                    self._drop_graph()
                    self.cuda_graph = False
            if self._graph_exec is not None:
                call(cudart.cudaGraphLaunch(self._graph_exec, self._stream), "cudaGraphLaunch")
            else:
                self._enqueue()
        else:
            self._enqueue()
        self._timer.record_end(self._stream)
        outs: dict[str, np.ndarray] = {}
        for n in self._outputs:
            buf, shape = self._buffers[n], self._out_shapes[n]
            view = buf.host_array(shape, self._dtypes[n])
            call(
                cudart.cudaMemcpyAsync(buf.host, buf.device, view.nbytes, d2h, self._stream),
                "cudaMemcpyAsync",
            )
            outs[n] = view
        call(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self.last_gpu_ms = self._timer.elapsed_ms()
        want = {t.name: np.dtype(t.dtype) for t in self.spec.outputs}
        result = {}
        for n, v in outs.items():
            dt = want.get(n, v.dtype)
            # Views point into pinned staging memory that the next call overwrites.
            result[n] = v.astype(dt, copy=True) if (self.copy_outputs or v.dtype != dt) else v
        return result
