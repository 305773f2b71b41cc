"""LoRA inputs in a component graph: every targeted linear layer `y = x W (+ b)` gets the branch
`y + (x A) B` with A [in, r] and B [r, out] as graph inputs (engines/lora.py feeds them; r = 0 adds
exact zeros). Applied to each precision's graph after quantization, so the base weights keep their
fp16 types or int8 Q/DQ and the branch runs in the layer's own activation type, unquantized.

Layers are found by the dynamo exporter's module scopes (optimizer/quantize/onnx_graph.module_path):
the MatMul in the layer's scope whose second input is its weight (an initializer, or a
DequantizeLinear / Cast of one), then the bias Add in the same scope if there is one; the branch is
added after the layer's last node, so the base layer's nodes and their fusions are untouched.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from engines.fileio import atomic_path
from engines.lora import INPUT_A, INPUT_B, Slot, Slots
from optimizer.quantize.onnx_graph import module_path

log = logging.getLogger(__name__)

# the layers LoRA files adapt: attention projections and feed-forwards of the denoiser's transformer
# blocks (diffusers/peft training targets and kohya's), and CLIP's self-attention and MLP
DENOISER_TARGETS = re.compile(r"(^|\.)(attentions|transformer_blocks|single_transformer_blocks)\.")
TEXT_TARGETS = re.compile(r"\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
WRAPPER = "model."  # optimizer/t2i/components.wrap holds the diffusers/transformers module as .model


def target_layers(module: Any, text_encoder: bool) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) for every nn.Linear a LoRA file may adapt in this component."""
    import torch

    pattern = TEXT_TARGETS if text_encoder else DENOISER_TARGETS
    return {
        name: (m.in_features, m.out_features)
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and pattern.search(name)
    }


def _weight_dtype(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> int | None:
    """The ONNX element type of a MatMul's weight operand, if it is a (dequantized, cast) constant."""
    if name in inits:
        return inits[name].data_type
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "DequantizeLinear" and node.input[0] in inits:
        scale = inits.get(node.input[1])
        return scale.data_type if scale is not None else None
    if node.op_type == "Cast" and node.input[0] in inits:
        return next(a.i for a in node.attribute if a.name == "to")
    return None


def add_lora_inputs(model: Any, targets: dict[str, tuple[int, int]], max_rank: int) -> Slots:
    """Rewrite `model` (an onnx.ModelProto) in place; the Slots it now has. Every target must be
    found exactly once (a layer the exporter fused away is an error, not a silent omission)."""
    from onnx import TensorProto, helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    # the exporter's scopes may drop a wrapping module's name (CLIPTextModel's "text_model."): a
    # scope names the target it equals, or the one target it is a dotted suffix of
    suffixes: dict[str, list[str]] = {}
    for t in targets:
        parts = t.split(".")
        for i in range(len(parts)):
            suffixes.setdefault(".".join(parts[i:]), []).append(t)
    by_scope: dict[str, list[Any]] = {}
    for n in g.node:
        scope = module_path(n)
        if scope.startswith(WRAPPER):
            scope = scope[len(WRAPPER) :]
        found = [scope] if scope in targets else suffixes.get(scope, [])
        if len(found) == 1:
            by_scope.setdefault(found[0], []).append(n)
    # a target with no node in the graph was pruned as dead code (SDXL's and SD3's CLIP encoders
    # read the penultimate states: their last layer computes nothing the graph returns); adapter
    # keys for it are checked and ignored, as its output is in diffusers (the compile-time check
    # merges them in torch too, so a live layer missed here would fail it)
    inert = {t: targets[t] for t in sorted(set(targets) - set(by_scope))}
    slots: dict[str, Slot] = {}
    new_nodes: list[Any] = []
    unslotted: list[str] = []
    for k, (scope, nodes) in enumerate(sorted(by_scope.items())):
        fin, fout = targets[scope]
        # a linear on 3-D inputs is a MatMul (+ bias Add); on 2-D ones (AdaLN's norm.linear) a Gemm
        mm = [
            n
            for n in nodes
            if n.op_type in ("MatMul", "Gemm")
            and _weight_dtype(n.input[1], producers, inits)
            and not any(a.name == "transA" and a.i for a in n.attribute)
        ]
        if len(mm) > 1:  # the exporter split it (Flux's single-block proj_out over a concat)
            unslotted.append(scope)
            continue
        if not mm:
            raise ValueError(f"{scope}: no weight MatMul or Gemm in its scope")
        matmul = mm[0]
        elem = _weight_dtype(matmul.input[1], producers, inits)
        last = matmul.output[0]
        bias = [n for n in nodes if n.op_type == "Add" and last in n.input]
        if bias:
            last = bias[0].output[0]
        base = f"{last}__lora_base"
        for n in g.node:  # the layer's output is renamed; the branch's sum takes its name
            n.output[:] = [base if o == last else o for o in n.output]
        a, b, rank = f"{INPUT_A}{scope}", f"{INPUT_B}{scope}", f"lora_rank_{k}"
        g.input.extend(
            [
                helper.make_tensor_value_info(a, elem, [fin, rank]),
                helper.make_tensor_value_info(b, elem, [rank, fout]),
            ]
        )
        x = matmul.input[0]
        down, up = f"{last}__lora_down", f"{last}__lora_up"
        new_nodes += [
            helper.make_node("MatMul", [x, a], [down], name=f"lora_down_{k}"),
            helper.make_node("MatMul", [down, b], [up], name=f"lora_up_{k}"),
            helper.make_node("Add", [base, up], [last], name=f"lora_add_{k}"),
        ]
        dtype = "float16" if elem == TensorProto.FLOAT16 else "float32"
        slots[scope] = Slot(a, b, fin, fout, dtype)
    g.node.extend(new_nodes)
    from optimizer.quantize.onnx_graph import toposort

    toposort(model)
    if unslotted:
        log.warning(
            "lora: %d layer(s) split by the exporter take no adapter: %s", len(unslotted), unslotted[:3]
        )
    return Slots(dict(sorted(slots.items())), max_rank, inert, tuple(unslotted))


def slot_graph(path: Path, targets: dict[str, tuple[int, int]], max_rank: int) -> Slots:
    """add_lora_inputs on the graph file at `path`, replaced atomically. Only the proto is
    rewritten: a graph past 2 GB keeps its weights in the `<name>.data` file it points at."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    slots = add_lora_inputs(model, targets, max_rank)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))  # by path: external weights resolve beside the graph
    log.info("lora: %s: %d layers take adapters (rank <= %d)", path.name, len(slots.layers), max_rank)
    return slots
