"""ONNX Runtime's quantize_static behind one object: one calibration (cached) for many node sets,
and subsets cut out of one fully quantized graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from optimizer.process import working_dir
from optimizer.quantize.calibration import ort_reader
from optimizer.quantize.int8_config import Int8Config
from optimizer.quantize.int8_graph import isolate_qdq
from optimizer.quantize.onnx_graph import copy_metadata


class QdqQuantizer:
    """quantize_static with one calibration (cached) and changing node sets."""

    def __init__(self, src: Path, work: Path, calib: list[dict[str, np.ndarray]], cfg: Int8Config):
        import onnx
        from onnxruntime.quantization import CalibrationMethod

        src = Path(src).resolve()  # pre-processing runs inside `work` (working_dir): no relative paths
        self.work, self.calib, self.cfg = work, calib, cfg
        self.orig = onnx.load(str(src))
        self.model_path = src
        if cfg.preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = work / "pre.onnx"
            with working_dir(work):  # symbolic shape inference fails on dynamo graphs: skip it
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            m = onnx.load(str(pre))
            copy_metadata(self.orig, m)  # pre-processing drops the module-path metadata
            onnx.save(m, str(pre))
            self.model_path = pre
        self.model = onnx.load(str(self.model_path))
        self.method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[cfg.calibration]
        self.cache = work / f"calib.{cfg.calibration}.json"
        self._n = 0
        self._full: Any = None  # quantize_static graph of every candidate (see subset)
        self._full_key: tuple[str, ...] | None = None

    def candidates(self) -> tuple[list[Any], list[Any]]:
        """(weight ops, activation x activation ops) among op_types."""
        inits = {i.name for i in self.model.graph.initializer}
        consts = {o for n in self.model.graph.node if n.op_type == "Constant" for o in n.output}
        w, aa = [], []
        for n in self.model.graph.node:
            if n.op_type in self.cfg.op_types:
                (w if len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts) else aa).append(n)
        return w, aa

    def quantize(self, nodes: list[str], isolate: bool | None = None) -> Path:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        self._n += 1
        out = self.work / f"q{self._n}.onnx"
        if not nodes:  # ORT reads an empty list as "every node": write the float graph instead
            import shutil

            shutil.copy(self.model_path, out)
            return out
        extra = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,  # zero point 0 (TensorRT)
            "CalibTensorRangeSymmetric": True,
        }
        if self.cfg.calibration == "percentile":
            extra["CalibPercentile"] = self.cfg.percentile
        with working_dir(self.work):
            quantize_static(
                str(self.model_path),
                str(out),
                ort_reader(self.calib),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(self.cfg.op_types),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=list(nodes),
                calibrate_method=self.method,
                extra_options=extra,
                calibration_cache_path=str(self.cache),
            )
        if self.cfg.isolate_qdq if isolate is None else isolate:
            import onnx

            m = onnx.load(str(out))
            isolate_qdq(m, set(nodes))
            onnx.save(m, str(out))
        return out

    def subset(self, nodes: list[str], universe: list[str]) -> Path:
        """The isolated-placement graph of `nodes` (a subset of `universe`), cut out of one
        quantize_static graph of the whole universe instead of a quantize_static run of its own.

        Same result as quantize(nodes) with isolate_qdq (tested): every tensor has one calibrated
        range, so a scale does not depend on which other nodes are quantized. quantize_static runs
        calibration-free passes over the whole graph each time (~20 s on a 36M-parameter UNet); a
        cut is a graph rewrite, which makes the per-node sensitivity pass affordable on big graphs.
        """
        import onnx

        key = tuple(universe)
        if self._full_key != key:
            self._full = onnx.load(str(self.quantize(list(universe), isolate=False)))
            self._full_key = key
        if not nodes:
            return self.quantize([])
        m = type(self._full)()
        m.CopyFrom(self._full)
        keep, cut = set(nodes), set(universe) - set(nodes)
        float_nodes = {n.name: n for n in self.model.graph.node}
        float_inits = {i.name: i for i in self.model.graph.initializer}
        have = {i.name for i in m.graph.initializer}
        # quantize_static's bias DQ outputs the float bias's own name: restore it under another one
        produced = {o for n in m.graph.node for o in n.output}
        restored: set[str] = set()
        for n in m.graph.node:
            if n.name not in cut or n.name not in float_nodes:
                continue
            orig = float_nodes[n.name]  # back to its float inputs (weights, bias, activation)
            del n.input[:]
            for i in orig.input:
                if i in float_inits:
                    name = f"{i}_float" if i in produced else i
                    if name not in have:
                        t = type(float_inits[i])()
                        t.CopyFrom(float_inits[i])
                        t.name = name
                        m.graph.initializer.append(t)
                        have.add(name)
                    i = name
                n.input.append(i)
            if list(n.output) != list(orig.output):  # quantize_static renamed a graph output
                restored |= set(orig.output)  # to put Q/DQ after it: drop that Q/DQ again
                del n.output[:]
                n.output.extend(orig.output)
        if restored:
            drop = [n for n in m.graph.node if n.name not in float_nodes and restored & set(n.output)]
            for n in drop:
                m.graph.node.remove(n)
        isolate_qdq(m, keep)
        used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
        dead = [i for i in m.graph.initializer if i.name not in used]  # int8 weights, int32 biases
        for i in dead:
            m.graph.initializer.remove(i)
        self._n += 1
        out = self.work / f"q{self._n}.onnx"
        onnx.save(m, str(out))
        return out
