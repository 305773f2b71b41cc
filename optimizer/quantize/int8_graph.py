"""INT8 graph rewrites and analysis: Q/DQ isolation, per-node work (MACs), the symmetry check.

Why `isolate_qdq` (measured, benchmarks/int8_speed.py): on x86 without AVX-VNNI-INT8, MLAS has no
fast S8S8 GEMM (MlasGemmQuantGetDispatch falls back to the generic C++ kernel: 7x slower convs when
forced with session.qdqisint8allowed=1), so ORT's QDQS8ToU8Transformer rewrites each signed Q->DQ
pair to uint8 (zero point 128) before its QDQ fusions and runs U8S8 kernels. It only rewrites a Q
with exactly one DQ consumer (onnxruntime/core/optimizer/qdq_transformer/qdq_s8_to_u8.cc), and
EnsureUniqueDQForNodeUnit gives every consumer of a shared DQ its own copy first, so a Q whose DQ
also feeds Shape/Concat/GroupNorm stays int8 and its Conv is never fused (9 of 35 convs of the
demo UNet: 1x1 shortcuts on concatenated skips, the stride-2 downsample's consumer, ...).
quantize_static puts one shared Q/DQ on a tensor for all its consumers, so we rewrite the graph:
float consumers read the float tensor (also more accurate: skips and norms see unquantized values)
and each quantized consumer gets its own Q->DQ pair, with its own scale copy so that ORT's common
subexpression elimination does not merge the pairs again (that kept all 24 attention MatMuls in
float). The graph stays what TensorRT wants (Q/DQ on Conv/MatMul/Gemm inputs, same scales).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def isolate_qdq(model: Any, quantized: set[str]) -> int:
    """Rewrite `model` (in place) so activation Q/DQ feed only the quantized nodes, one pair each.

    - a Q/DQ on an activation: consumers not in `quantized` read the float tensor again; every
      quantized consumer but the first gets its own copy of the Q->DQ pair;
    - the output Q/DQ of a quantized node is kept when its DQ feeds one consumer (ORT fuses
      DQ->Conv->Q into QLinearConv); with several consumers it is treated like any activation
      (that node then has no integer kernel on x86 and `require_int8_kernel` drops it).
    Returns the number of rewired inputs plus new pairs. Q/DQ left without consumers are removed.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    new_inits: list[Any] = []
    extra: dict[str, list[Any]] = {}  # Q name -> new nodes placed right after it (keeps topological order)
    changes = 0
    for q in list(g.node):
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.output[0] in graph_outputs:
            continue
        if any(d.output[0] in graph_outputs for d in dqs):
            continue
        users = [(dq, c) for dq in dqs for c in consumers.get(dq.output[0], [])]
        src = producer.get(q.input[0])
        if src is not None and src.name in quantized and len(users) == 1:
            continue  # output quantization of a fusable node
        quantized_users = []
        for dq, c in users:
            if c.name in quantized:
                quantized_users.append((dq, c))
                continue
            for j, x in enumerate(c.input):
                if x == dq.output[0]:
                    c.input[j] = q.input[0]
                    changes += 1
        for dq, c in quantized_users[1:]:
            q2, dq2 = type(q)(), type(dq)()
            q2.CopyFrom(q)
            dq2.CopyFrom(dq)
            q2.name, q2.output[0] = f"{q.name}_for_{c.name}", f"{q.output[0]}_for_{c.name}"
            dq2.name, dq2.output[0] = f"{dq.name}_for_{c.name}", f"{dq.output[0]}_for_{c.name}"
            dq2.input[0] = q2.output[0]
            # Own scale/zero-point copies: ORT's common-subexpression elimination would otherwise
            # merge the identical Q nodes back into one shared Q.
            for j in (1, 2):
                if j < len(q.input) and q.input[j] in inits:
                    t = type(inits[q.input[j]])()
                    t.CopyFrom(inits[q.input[j]])
                    t.name = f"{q.input[j]}_for_{c.name}"
                    new_inits.append(t)
                    q2.input[j] = dq2.input[j] = t.name
            for j, x in enumerate(c.input):
                if x == dq.output[0]:
                    c.input[j] = dq2.output[0]
            extra.setdefault(q.name, []).extend([q2, dq2])
            changes += 1
    nodes = []
    for n in g.node:
        nodes.append(n)
        nodes.extend(extra.get(n.name, []))
    orphans: set[str] = set()  # scales/zero points of removed Q/DQ nodes
    while True:  # drop Q/DQ whose outputs nobody reads any more
        used = {i for n in nodes for i in n.input} | graph_outputs
        kept = [
            n
            for n in nodes
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in used for o in n.output)
        ]
        if len(kept) == len(nodes):
            break
        kept_ids = {id(n) for n in kept}
        orphans |= {i for n in nodes if id(n) not in kept_ids for i in n.input[1:]}
        nodes = kept
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    used = {i for n in nodes for i in n.input}
    for name in orphans - used:
        if name in inits:
            g.initializer.remove(inits[name])
    return changes


def node_macs(model: Any) -> dict[str, float]:
    """Multiply-accumulates per sample of each Conv/MatMul/Gemm with a weight, from inferred shapes
    (unknown dims count as 1): what moving that node to int8 can save."""
    import onnx

    m = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
        for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)
    }
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    out: dict[str, float] = {}
    for n in m.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w, y = inits[n.input[1]], shapes.get(n.output[0])
        if not y:
            out[n.name] = float(np.prod(w))
            continue
        if (
            n.op_type == "Conv"
        ):  # each output element: C_in/groups * kH * kW MACs (W is [C_out, C_in/g, kH, kW])
            out[n.name] = float(np.prod(y[1:]) * np.prod(w[1:]))
        else:  # [..., M, N] outputs, K = the weight's contracted dim
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            k = w[-1] if trans_b else w[0]
            out[n.name] = float(np.prod(y[1:]) * k)
    return out


def check_symmetric(model: Any) -> None:
    """TensorRT rejects non-zero zero points: fail loudly if the quantizer produced one."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            if np.any(numpy_helper.to_array(inits[n.input[2]]) != 0):
                raise ValueError(f"{n.name}: non-zero zero point (asymmetric quantization)")
