"""INT8 feed-forward blocks as one op: ``ai.m2fp::QFeedForward`` of the custom-op library.

A static INT8 model (``m2fp export --int8``) computes a feed-forward block as quantize-dequantize pairs
around the float nodes::

    DequantizeLinear(x_q) -> MatMul(DequantizeLinear(W1_q)) -> Add(b1) -> Relu -> QuantizeLinear
      -> DequantizeLinear -> MatMul(DequantizeLinear(W2_q)) -> Add(b2)

which ONNX Runtime runs as two ``MatMulIntegerToFloat``, two float ``Add`` and a ``QuantizeLinear``,
writing the float hidden tensor (tokens x F: 62 MB per pixel-decoder encoder layer at 640x1152) and
reading it back. ``rewrite`` replaces each such chain with one
``QFeedForward(x_q, x_scale, x_zero_point, W1_q, w1_scale, b1, h_scale, h_zero_point, W2_q, w2_scale, b2)``
node (``native/m2fp_qffn.cc``): the same arithmetic, bit for bit, 32 rows at a time with the hidden rows
in cache as uint8, the products on AMX tiles or with AVX-512 VNNI. The engine applies it only where the
library runs them so (``m2fp_qffn_kernel()`` is not "generic"; elsewhere the op's plain loops would be far
slower than ONNX Runtime's own kernels).

A chain qualifies when the weights are int8 initialisers (D, F) and (F, E) with zero points 0 (per
column or per tensor), the scales, zero points and biases are initialisers of the right shapes (a bias
may also be a DequantizeLinear of initialisers, as in ``feedforward``), the
hidden layer's DequantizeLinear reads back exactly what its QuantizeLinear wrote (the same scale and
zero point), D and F are multiples of 64 (at most 65536) and E of 32 (the tiles), and every intermediate tensor has
exactly one reader and is not a graph output. The DequantizeLinear nodes of the input and the weights
go too where the chain was their only reader.

``rewrite_linear`` then does the same for the INT8 linear layers left (``DequantizeLinear(x_q) ->
MatMul(DequantizeLinear(W_q)) -> Add(b)``, float output: the encoder's value, sampling, attention-weight and
output projections, the decoder's cross-attention keys and values, those the export quantized) as
``ai.m2fp::QLinear(x_q, x_scale, x_zero_point, W_q, w_scale, b)``, on the same products.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from m2fp_service.feedforward import Block, GraphIndex, find, fuse

METADATA_KEY = "m2fp_qfeedforward"  # how many blocks were fused (kept in the optimised graph)
LINEAR_METADATA_KEY = "m2fp_qlinear"  # how many linear layers were fused
DEPTH = 64  # D and F: multiples of an AMX tile's 64 bytes of depth
MAX_DEPTH = 65536  # and at most this (the op's int32 sums)
COLUMNS = 32  # F and E: multiples of two 16-column tiles


class QuantizedIndex(GraphIndex):
    """``feedforward.GraphIndex`` and what INT8 chains need: initialisers' values and quantized operands."""

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.init[name]) if name in self.init else None

    def scalar(self, name: str, dtype: type) -> bool:
        a = self.array(name)
        return a is not None and a.dtype == dtype and a.size == 1 and a.ndim <= 1

    def quantized(self, dq: onnx.NodeProto) -> bool:
        """``dq`` dequantizes uint8 with a scalar float scale, positive and finite, and a uint8 zero point
        (initialisers)."""
        if not (len(dq.input) == 3 and self.scalar(dq.input[1], np.float32) and self.scalar(dq.input[2], np.uint8)):
            return False
        scale = float(self.array(dq.input[1]).reshape(-1)[0])  # type: ignore[union-attr]
        return bool(np.isfinite(scale) and scale > 0)

    def quantized_weight(self, name: str) -> tuple[str, str, onnx.NodeProto] | None:
        """(int8 weight, its scale, the node) of the DequantizeLinear producing ``name``: an int8 (D, N)
        initialiser, a float scale of shape () / (1) or (N) along axis 1, zero points 0; else None."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
            return None
        w, scale = self.init.get(dq.input[0]), self.array(dq.input[1])  # the weight's header only: not decoded
        if w is None or scale is None or w.data_type != onnx.TensorProto.INT8 or len(w.dims) != 2:
            return None
        n = w.dims[1]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale.dtype != np.float32 or not (scale.size == 1 and scale.ndim <= 1 or
                                             scale.shape == (n,) and axis in (1, -1)):
            return None
        zero = self.array(dq.input[2]) if len(dq.input) == 3 and dq.input[2] else np.zeros(1, np.int8)
        if zero is None or zero.dtype != np.int8 or zero.size not in (1, n) or zero.any():
            return None
        return dq.input[0], dq.input[1], dq


def match_linear(first: onnx.NodeProto, g: QuantizedIndex) -> Block | None:
    """The INT8 linear layer (DequantizeLinear of x_q -> MatMul with a quantized weight -> Add of a float bias)
    that MatMul ``first`` starts, or None."""
    if first.op_type != "MatMul" or len(first.input) != 2:
        return None
    dq_x, one = g.producer.get(first.input[0]), g.quantized_weight(first.input[1])
    if dq_x is None or dq_x.op_type != "DequantizeLinear" or not g.quantized(dq_x) or one is None:
        return None
    w = g.init[one[0]].dims
    add = g.sole_reader(first.output[0], "Add")
    b = add and g.bias(add, first.output[0], w[1])
    if not (add and b) or w[0] % DEPTH or w[0] > MAX_DEPTH or w[1] % COLUMNS:
        return None
    extra = [dq for dq in (dq_x, one[2]) if g.only_reader(dq)]
    return Block([*dq_x.input, one[0], one[1], b], [first, *extra, add])


def match(first: onnx.NodeProto, g: QuantizedIndex) -> Block | None:
    """The INT8 feed-forward block that MatMul ``first`` starts: a quantized linear layer (``match_linear``), a
    Relu, the hidden layer's QuantizeLinear and its DequantizeLinear (the same scale and zero point), and a
    second quantized linear layer whose D is the first's E, each node its predecessor's sole reader; or None."""
    one = match_linear(first, g)
    relu = g.sole_reader(one.nodes[-1].output[0], "Relu") if one else None
    q_h = g.sole_reader(relu.output[0], "QuantizeLinear") if relu else None
    dq_h = g.sole_reader(q_h.output[0], "DequantizeLinear") if q_h else None
    second = g.sole_reader(dq_h.output[0], "MatMul") if dq_h else None
    two = match_linear(second, g) if second is not None else None
    if not (one and relu and q_h and dq_h and two) or len(q_h.input) != 3 or q_h.input[1:] != dq_h.input[1:]:
        return None
    if g.init[two.inputs[3]].dims[0] != g.init[one.inputs[3]].dims[1]:
        return None
    # [x_q, x_scale, x_zero_point, W1_q, w1_scale, b1] + [h_scale, h_zero_point, W2_q, w2_scale, b2]; the
    # second layer's nodes (its input's DequantizeLinear among them) end with Add2, whose output the fused
    # node takes over.
    return Block([*one.inputs, *two.inputs[1:]], [*one.nodes, relu, q_h, *two.nodes])


def blocks(graph: onnx.GraphProto,
           matcher: Callable[[onnx.NodeProto, QuantizedIndex], Block | None] = match) -> list[Block]:
    """The graph's qualifying INT8 feed-forward blocks (linear layers with ``matcher=match_linear``) in node
    order."""
    return find(graph, matcher, QuantizedIndex(graph))


def rewrite(model: onnx.ModelProto) -> int:
    """Fuses ``model``'s qualifying INT8 feed-forward blocks in place (main graph only); returns how many."""
    return fuse(model, blocks(model.graph), "QFeedForward", METADATA_KEY)


def rewrite_linear(model: onnx.ModelProto) -> int:
    """Fuses ``model``'s qualifying INT8 linear layers in place (main graph only; after ``rewrite``, so the
    feed-forward blocks' layers are taken already); returns how many."""
    return fuse(model, blocks(model.graph, match_linear), "QLinear", LINEAR_METADATA_KEY)
