"""INT8 group normalisation in one op: ``ai.m2fp::QGroupNorm`` of the custom-op library, in the optimised graph.

The pixel decoder's GroupNorm(32, 256) at a quarter of the input's size (the ``adapter_1`` and ``layer_1``
norms, 160 x 288 x 256 at 640x1152) is exported as ``Reshape -> InstanceNormalization -> Reshape -> Mul -> Add``.
In an INT8 model that ONNX Runtime optimised, between two NHWC convolutions, it becomes::

    Transpose(0,3,1,2) -> Reshape(0, G, -1) -> DequantizeLinear -> InstanceNormalization -> Reshape(back)
      -> Mul(gamma) -> Add(beta) [-> Add(residual)] -> QuantizeLinear -> Transpose(0,2,3,1)

(the back reshape's shape read by ``Shape`` of a DequantizeLinear of the NCHW bytes, which exists only for
that): ten passes over the tensor, four of them in float, ~45 ms per norm on this project's machines.
``rewrite`` replaces each such chain with ``ai.m2fp::QGroupNorm(x, x_scale, x_zero_point, gamma, beta,
epsilon, groups, y_scale, y_zero_point[, residual])`` on the NHWC bytes (``native/m2fp_qgroupnorm.cc``),
which reads x twice and writes y once. Its statistics are exact integer sums where ONNX Runtime sums floats,
so an output byte may differ from ONNX Runtime's by one next to a rounding half; the tests bound how often.
The engine runs it in its INT8 rewrite of the saved graph (``int8graph.py``, a child process), where the library
runs AMX or AVX-512 VNNI.

A chain qualifies when the Transposes' perms are those above; the first Reshape's shape is the initialiser
``[0, G, -1]`` with G the InstanceNormalization's channels, whose scale is all ones and bias all zeros; the
DequantizeLinear and QuantizeLinear have scalar float scales (positive, finite) and uint8 zero points; gamma
and beta are float initialisers of one value per channel ((C, 1, 1) or (1, C, 1, 1), C > 1); the back reshape's
shape is ``Shape`` (whole) of the NCHW bytes or of a DequantizeLinear of them; every intermediate tensor is
read only by the chain (``Shape`` readers of the norm's output excepted: they read the NHWC input's shape
instead, permuted) and is not a graph output. A residual is any float tensor added after beta; the op
broadcasts it as Add does and refuses one that would widen the result.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from m2fp_service.feedforward import DOMAIN, drop_unread, names_read, record
from m2fp_service.qfeedforward import QuantizedIndex
from m2fp_service.winograd import attributes

METADATA_KEY = "m2fp_qgroupnorm"  # how many group norms were fused (kept in the optimised graph)
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class Chain(NamedTuple):
    """A qualifying chain: the fused node's inputs, its nodes (the last one's output is the op's), the nodes
    that become unread with it (the Shape of the dequantized bytes), and Shape nodes to read x's shape."""

    inputs: list[str]
    constants: dict[str, np.ndarray]
    nodes: list[onnx.NodeProto]
    unread: list[onnx.NodeProto]
    shapes: list[onnx.NodeProto]


def _per_channel(g: QuantizedIndex, name: str) -> np.ndarray | None:
    """The float initialiser ``name`` of shape (C, 1, 1) or (1, C, 1, 1) as (C), else None. C is 2 or more: one
    value broadcast to every channel would not tell the op how many there are."""
    a = g.array(name)
    if a is None or a.dtype != np.float32 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[0] != 1) or a.size < 2:
        return None
    if a.shape[-2:] != (1, 1):
        return None
    return np.ascontiguousarray(a.reshape(-1))


def _affine(g: QuantizedIndex, node: onnx.NodeProto, operand: str) -> np.ndarray | None:
    """The per-channel constant a Mul or Add ``node`` reading ``operand`` applies, else None."""
    if len(node.input) != 2 or operand not in node.input:
        return None
    other = node.input[1] if node.input[0] == operand else node.input[0]
    return _per_channel(g, other)


def _quantization(g: QuantizedIndex, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) of a DequantizeLinear/QuantizeLinear of scalar float scale (positive, finite) and
    uint8 zero point, with no attribute but axis; else None."""
    if len(node.input) != 3 or not set(attributes(node)) <= {"axis"} or not g.quantized(node):
        return None
    return g.array(node.input[1]).reshape(()), g.array(node.input[2]).reshape(())  # type: ignore[union-attr]


def _whole_shape(node: onnx.NodeProto) -> bool:
    """``node`` is a Shape of the whole shape."""
    return node.op_type == "Shape" and attributes(node).get("start", 0) == 0 and "end" not in attributes(node)


def match(norm: onnx.NodeProto, g: QuantizedIndex) -> Chain | None:
    """The chain around InstanceNormalization ``norm`` (see the module's docstring), or None."""
    if norm.op_type != "InstanceNormalization" or len(norm.input) != 3 or not set(attributes(norm)) <= {"epsilon"}:
        return None
    scale, bias = g.array(norm.input[1]), g.array(norm.input[2])
    if scale is None or bias is None or scale.dtype != np.float32 or scale.ndim != 1 or scale.shape != bias.shape \
            or np.any(scale != 1) or np.any(bias != 0):
        return None
    groups = scale.size
    dq = g.producer.get(norm.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or not g.only_reader(dq):
        return None
    x_q = _quantization(g, dq)
    grouped = g.producer.get(dq.input[0])
    if x_q is None or grouped is None or grouped.op_type != "Reshape" or not g.only_reader(grouped):
        return None
    target = g.array(grouped.input[1])
    if target is None or target.tolist() != [0, groups, -1] or attributes(grouped).get("allowzero", 0) != 0:
        return None
    to_nchw = g.producer.get(grouped.input[0])
    if to_nchw is None or to_nchw.op_type != "Transpose" or attributes(to_nchw).get("perm") != TO_NCHW:
        return None
    back = g.sole_reader(norm.output[0], "Reshape")
    shape = g.producer.get(back.input[1]) if back is not None else None
    if back is None or shape is None or not _whole_shape(shape) or not g.only_reader(shape) \
            or attributes(back).get("allowzero", 0) != 0:
        return None
    # The back reshape's shape: of the NCHW bytes, or of a DequantizeLinear of them read only by that Shape.
    unread = [shape]
    if shape.input[0] != to_nchw.output[0]:
        measured = g.producer.get(shape.input[0])
        if measured is None or measured.op_type != "DequantizeLinear" or measured.input[0] != to_nchw.output[0] \
                or not g.only_reader(measured):
            return None
        unread.append(measured)
    mul = g.sole_reader(back.output[0], "Mul")
    add = g.sole_reader(mul.output[0], "Add") if mul is not None else None
    if mul is None or add is None:
        return None
    gamma, beta = _affine(g, mul, back.output[0]), _affine(g, add, mul.output[0])
    if gamma is None or beta is None or gamma.size != beta.size or gamma.size % groups:
        return None
    # After beta: QuantizeLinear, or Add(residual) then QuantizeLinear; Shape readers of beta's output read x's.
    after = [n for n in g.readers.get(add.output[0], []) if not _whole_shape(n)]
    shapes = [n for n in g.readers.get(add.output[0], []) if _whole_shape(n)]
    if add.output[0] in g.outputs or len(after) != 1:
        return None
    nodes = [to_nchw, grouped, dq, norm, back, mul, add]
    residual: list[str] = []
    q: onnx.NodeProto | None = after[0] if after[0].op_type == "QuantizeLinear" else None
    if after[0].op_type == "Add" and len(after[0].input) == 2:
        plus = after[0]
        residual = [plus.input[1] if plus.input[0] == add.output[0] else plus.input[0]]
        if residual[0] in (add.output[0], "") or not g.only_reader(plus):
            return None
        nodes.append(plus)
        q = g.sole_reader(plus.output[0], "QuantizeLinear")
    to_nhwc = g.sole_reader(q.output[0], "Transpose") if q is not None else None
    y_q = _quantization(g, q) if q is not None else None
    if q is None or to_nhwc is None or attributes(to_nhwc).get("perm") != TO_NHWC or y_q is None:
        return None
    # The NCHW bytes: read by the chain and the measuring Shape/DequantizeLinear only (then they go too).
    nchw_readers = {id(n) for n in g.readers.get(to_nchw.output[0], [])}
    if to_nchw.output[0] in g.outputs or not nchw_readers <= {id(grouped), id(unread[-1])}:
        return None
    constants = {"x_scale": x_q[0], "x_zero_point": x_q[1], "gamma": gamma, "beta": beta,
                 "epsilon": np.array(attributes(norm).get("epsilon", 1e-5), np.float32),
                 "groups": np.array(groups, np.int64), "y_scale": y_q[0], "y_zero_point": y_q[1]}
    return Chain([to_nchw.input[0], *residual], constants, [*nodes, q, to_nhwc], unread, shapes)


def chains(graph: onnx.GraphProto) -> list[Chain]:
    """The graph's qualifying chains in node order."""
    g = QuantizedIndex(graph)
    return [c for c in (match(n, g) for n in graph.node if n.op_type == "InstanceNormalization") if c is not None]


def rewrite(model: onnx.ModelProto) -> int:
    """Replaces ``model``'s qualifying group-norm chains with ``QGroupNorm`` nodes in place (main graph), each where
    its last node was; returns how many. Initialisers that only the old nodes read are dropped."""
    graph = model.graph
    found = chains(graph)
    if not found:
        return 0
    replaced: dict[int, list[onnx.NodeProto]] = {}
    gone: set[int] = set()
    for chain in found:
        last = chain.nodes[-1]
        stem = f"{last.output[0]}_qgroupnorm"  # a node's output name is the graph's only one of that name
        names = []
        for key in ("x_scale", "x_zero_point", "gamma", "beta", "epsilon", "groups", "y_scale", "y_zero_point"):
            graph.initializer.append(numpy_helper.from_array(np.asarray(chain.constants[key]), f"{stem}_{key}"))
            names.append(f"{stem}_{key}")
        x, residual = chain.inputs[0], chain.inputs[1:]
        replaced[id(last)] = [helper.make_node("QGroupNorm", [x, *names, *residual], [last.output[0]],
                                               name=f"{chain.nodes[3].name or stem}_qgroupnorm", domain=DOMAIN)]
        # A Shape of the norm's output: x's shape (NHWC) permuted to NCHW, where the Shape was.
        perm = f"{stem}_to_nchw"
        if chain.shapes:
            graph.initializer.append(numpy_helper.from_array(np.array(TO_NCHW, np.int64), perm))
        for shape in chain.shapes:
            replaced[id(shape)] = [
                helper.make_node("Shape", [x], [f"{shape.output[0]}_nhwc"], name=f"{shape.name}_nhwc"),
                helper.make_node("Gather", [f"{shape.output[0]}_nhwc", perm], [shape.output[0]], axis=0,
                                 name=f"{shape.name}_to_nchw")]
        gone |= {id(n) for n in [*chain.nodes[:-1], *chain.unread]}
    nodes = [new for n in graph.node if id(n) not in gone for new in replaced.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    known = {o for n in nodes for o in n.output} | {i.name for i in graph.input} | names_read(nodes)
    for value in [v for v in graph.value_info if v.name not in known]:  # the chains' intermediates
        graph.value_info.remove(value)
    drop_unread(graph)
    record(model, METADATA_KEY, len(found))
    return len(found)
