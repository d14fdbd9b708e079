"""ONNX ``Softmax`` over the last axis as ``ai.m2fp::Softmax`` of the custom-op library.

The decoder's masked attention adds 0 or -inf to its scores (every pixel outside a query's mask)
before its ``Softmax``, and ONNX Runtime's ``Softmax`` is ~6-9x slower on such rows than on plain
ones (its exp takes a slow path for arguments far below zero): 20-33 ms per layer at the 1/8-scale
level at 640x1152, where the library's op (``native/m2fp_softmax.cc``) takes ~3 (the 9 of M2FP at
640x1152, ``make bench``: 0.083 -> 0.018 s). Same results within float rounding (measured up to
~4e-6 relative), the same NaN for rows with a NaN, a +inf or only -inf.

``rewrite`` replaces each ``Softmax`` of the main graph that works on the last axis of its input
(opset 13 or newer: ``axis`` -1, the default) when that input is the result of an ``Add`` (an
additive mask: the rows that hold -inf) and ONNX type inference does not find it to be of another
type than float, with the library's op: on M2FP the decoder's 9 masked cross-attentions, also in
INT8 models, whose softmaxes stay float. The others are left to ONNX Runtime, as fast there on rows
without -inf (and faster on the encoder's rows of 12 values, where a row's fixed costs dominate).
Only ``onnx`` is used here; the engine applies it with the other rewrites (``rewrite.py``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from m2fp_service import feedforward, winograd

METADATA_KEY = "m2fp_softmax"  # how many Softmax nodes were replaced (kept in the optimised graph)
MASK_METADATA_KEY = "m2fp_softmax_masks"  # how many of the library's Softmax nodes add their mask themselves


def _last_axis(node: onnx.NodeProto) -> bool:
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
    return axis == -1


def _other_types(model: onnx.ModelProto) -> set[str]:
    """The names ONNX type inference finds to be tensors of another type than float. (Inference
    stops at the library's own nodes, MSDeformAttn among them, so most of M2FP's tensors are of no
    known type: a graph the exporter wrote computes in float throughout.)"""
    try:
        inferred = onnx.shape_inference.infer_shapes(winograd.weightless_copy(model))
    except Exception:  # noqa: BLE001 - then nothing is known
        return set()
    return {v.name for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
            if v.type.tensor_type.elem_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.FLOAT)}


def rewrite(model: onnx.ModelProto) -> int:
    """Replaces ``model``'s qualifying Softmax nodes in place (main graph only); returns how many."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # before 13, Softmax flattens from `axis` on (default 1): another operation
        return 0
    sums = {o for n in model.graph.node if n.op_type == "Add" and n.domain in ("", "ai.onnx") for o in n.output}
    candidates = [n for n in model.graph.node if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")
                  and len(n.input) == 1 and n.input[0] in sums and _last_axis(n)]
    if not candidates:
        return 0
    others = _other_types(model)
    found = [feedforward.Block([n.input[0]], [n]) for n in candidates if n.input[0] not in others]
    return feedforward.fuse(model, found, "Softmax", METADATA_KEY)



def _constant(g: feedforward.GraphIndex, name: str) -> list[int] | None:
    """The int64 initialiser ``name`` as a list, else None."""
    t = g.init.get(name)
    if t is None or t.data_type != onnx.TensorProto.INT64:
        return None
    return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]


def _repeated_mask(g: feedforward.GraphIndex, name: str) -> tuple[str, int, onnx.NodeProto] | None:
    """(mask, heads, the Reshape) when ``name`` is Reshape(Tile(Unsqueeze(mask, axis 1), (1, heads, 1, 1))), the
    Reshape read only there; else None."""
    reshape = g.producer.get(name)
    if reshape is None or reshape.op_type != "Reshape" or not g.only_reader(reshape):
        return None
    tile = g.producer.get(reshape.input[0])
    repeats = _constant(g, tile.input[1]) if tile is not None and tile.op_type == "Tile" else None
    if tile is None or repeats is None or len(repeats) != 4 or repeats[:1] + repeats[2:] != [1, 1, 1] \
            or repeats[1] < 1:
        return None
    unsqueeze = g.producer.get(tile.input[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) != 2 or \
            _constant(g, unsqueeze.input[1]) != [1]:
        return None
    return unsqueeze.input[0], repeats[1], reshape


def fuse_masks(model: onnx.ModelProto) -> int:
    """In a graph ONNX Runtime optimised and saved, each of the library's Softmax nodes (``rewrite``) reading
    ``Add(scores, Reshape(Tile(Unsqueeze(mask, 1), (1, heads, 1, 1))))`` (the masked attention's mask repeated
    for its heads) takes the mask itself: ``Softmax(scores, mask, heads)``, which adds each head's rows without
    the repeated copy (the same sums: the same results bit for bit). The Add and Reshape go, and the Tile with
    what measured it if nothing else reads them. Returns how many."""
    graph = model.graph
    g = feedforward.GraphIndex(graph)
    fused: dict[int, onnx.NodeProto] = {}
    gone: set[int] = set()
    heads_of: dict[int, str] = {}
    for node in graph.node:
        if not (node.op_type == "Softmax" and node.domain == feedforward.DOMAIN and len(node.input) == 1):
            continue
        add = g.producer.get(node.input[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or not g.only_reader(add):
            continue
        for scores, other in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            found = _repeated_mask(g, other)
            if found is None:
                continue
            mask, heads, reshape = found
            name = heads_of.setdefault(heads, f"m2fp_softmax_heads_{heads}")
            fused[id(node)] = helper.make_node("Softmax", [scores, mask, name], list(node.output), name=node.name,
                                               domain=feedforward.DOMAIN)
            gone |= {id(add), id(reshape)}
            break
    if not fused:
        return 0
    for heads, name in heads_of.items():
        if name not in g.init:
            graph.initializer.append(numpy_helper.from_array(np.array(heads, np.int64), name))
    outputs = {o for n in graph.node if id(n) in gone for o in n.output}
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in gone]
    del graph.node[:]
    graph.node.extend(nodes)
    feedforward.drop_value_info(graph, outputs)
    feedforward.drop_dead_nodes(graph)
    feedforward.drop_unread(graph)
    feedforward.record(model, MASK_METADATA_KEY, len(fused))
    return len(fused)
