"""INT8 convolutions on AMX tiles: ``ai.m2fp::QConv`` of the custom-op library, in the optimised graph.

ONNX Runtime turns a static INT8 model's convolutions (``DequantizeLinear -> Conv -> QuantizeLinear``)
into ``com.microsoft::QLinearConv`` nodes on NHWC tensors (``channels_last``: its layout transformer
places the transposes around the backbone) and runs them with AVX-512 VNNI (MLAS's symmetric
convolution), also where the CPU has AMX. ``rewrite`` takes the graph ONNX Runtime saved after
optimising it (the engine's optimised-graph cache, ``engine._open_optimized``) and replaces each
qualifying node with ``ai.m2fp::QConv(x, x_zero_point, tiles, bias, scale, y_zero_point, geometry)``
(``native/m2fp_qconv.cc``): the same result, bit for bit, with the products on AMX tiles. The layout
stays ONNX Runtime's; only the kernel changes. The engine runs it with the other INT8 rewrites of the saved
graph in a child process (``int8graph.py``) and opens what it wrote.

A node qualifies when it is ``channels_last`` with group 1, strides and dilations 1 and explicit pads
smaller than the kernel, and no attribute this does not know; every input but x is an initialiser; the
weights are int8 (Cout, C, kh, kw) with zero points 0; x_scale and y_scale are float scalars and w_scale a
scalar or one per output channel, the scale they make finite; the zero points are uint8 scalars; the bias
is int32 (Cout) or absent; C is a multiple of 64 and Cout of 32 (the tiles) and kh x kw x C at most 65536
(the op's int32 sums). Here, once, the weights are packed for the tiles (``pack``) and the per-channel
constants computed as ONNX Runtime computes them: the bias minus the input zero point times each channel's
weight sum (int32), and x_scale x w_scale / y_scale (float32, in that order).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from m2fp_service.feedforward import DOMAIN, drop_unread, record
from m2fp_service.winograd import attributes

METADATA_KEY = "m2fp_qconv"  # how many convolutions were replaced (kept in the optimised graph)
DEPTH = 64  # C: a multiple of an AMX tile row's 64 bytes
COLUMNS = 32  # Cout: a multiple of two 16-column tiles
MAX_DEPTH = 65536  # kh x kw x C: the op's int32 sums
MAX_KERNEL = 15
KNOWN = {"auto_pad", "channels_last", "dilations", "group", "kernel_shape", "pads", "strides"}


def pack(w: np.ndarray) -> np.ndarray:
    """int8 weights (Cout, C, kh, kw) -> the op's tiles: the (kh x kw x C, Cout) matrix (depth tap-major), for
    each 16 output channels its rows 4 at a time, each channel's 4 bytes side by side (what ``tdpbusd`` reads)."""
    cout, c, kh, kw = w.shape
    depth = kh * kw * c
    matrix = w.transpose(2, 3, 1, 0).reshape(depth // 4, 4, cout // 16, 16)
    return np.ascontiguousarray(matrix.transpose(2, 0, 3, 1)).reshape(-1)


def _geometry(node: onnx.NodeProto, kh: int, kw: int) -> list[int] | None:
    """[kh, kw, 1, 1, pads top, left, bottom, right] of a stride-1 QLinearConv ``node`` the op computes, else None."""
    a = attributes(node)
    if not set(a) <= KNOWN or a.get("channels_last") != 1 or a.get("group", 1) != 1:
        return None
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if (a.get("auto_pad", b"NOTSET") != b"NOTSET" or list(a.get("kernel_shape", [kh, kw])) != [kh, kw]
            or list(a.get("strides", [1, 1])) != [1, 1] or list(a.get("dilations", [1, 1])) != [1, 1]
            or len(pads) != 4 or not all(0 <= p < k for p, k in zip(pads, [kh, kw, kh, kw], strict=True))):
        return None
    return [kh, kw, 1, 1, *pads]


def replacement(node: onnx.NodeProto, init: dict[str, onnx.TensorProto]) -> dict[str, np.ndarray] | None:
    """The op's constant inputs for a qualifying QLinearConv ``node`` (tiles, bias, scale, geometry), else None."""
    if node.op_type != "QLinearConv" or node.domain != "com.microsoft" or len(node.input) not in (8, 9):
        return None
    has_bias = len(node.input) == 9 and node.input[8] != ""
    names = list(node.input[1:9 if has_bias else 8])
    if not all(n in init for n in names):
        return None
    x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = (numpy_helper.to_array(init[n]) for n in names[:7])
    bias = numpy_helper.to_array(init[names[7]]) if has_bias else None
    if w.dtype != np.int8 or w.ndim != 4 or w_zp.dtype != np.int8 or np.any(w_zp != 0):
        return None
    cout, c, kh, kw = w.shape
    geometry = _geometry(node, kh, kw)
    if geometry is None or c % DEPTH or cout % COLUMNS or kh * kw * c > MAX_DEPTH or max(kh, kw) > MAX_KERNEL:
        return None
    scalars = [(x_scale, np.float32), (y_scale, np.float32), (x_zp, np.uint8), (y_zp, np.uint8)]
    if any(v.dtype != t or v.size != 1 or v.ndim > 1 for v, t in scalars):
        return None
    if w_scale.dtype != np.float32 or w_scale.ndim > 1 or w_scale.size not in (1, cout) or w_zp.size not in (1, cout):
        return None
    if bias is not None and (bias.dtype != np.int32 or bias.shape != (cout,)):
        return None
    sums = w.reshape(cout, -1).astype(np.int64).sum(1)
    adjusted = (np.zeros(cout, np.int64) if bias is None else bias.astype(np.int64)) - int(x_zp.reshape(-1)[0]) * sums
    # float32 products and quotient, in ONNX Runtime's order: x_scale * w_scale / y_scale.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = np.broadcast_to((x_scale.reshape(()) * w_scale.reshape(-1)) / y_scale.reshape(()), (cout,))
    if np.any(np.abs(adjusted) >= 2**31) or not np.all(np.isfinite(scale)):
        return None
    return {"tiles": pack(w), "bias": adjusted.astype(np.int32), "scale": np.ascontiguousarray(scale, np.float32),
            "geometry": np.array(geometry, np.int64)}


def rewrite(model: onnx.ModelProto) -> int:
    """Replaces ``model``'s qualifying ``com.microsoft::QLinearConv`` nodes in place (main graph); returns how
    many. Initialisers that only the old nodes read are dropped (the packed tiles take the weights' place)."""
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        constants = replacement(node, init)
        if constants is None:
            nodes.append(node)
            continue
        stem = f"{node.output[0]}_qconv"  # a node's output name is the graph's only one of that name
        for key, value in constants.items():
            graph.initializer.append(numpy_helper.from_array(value, f"{stem}_{key}"))
        nodes.append(helper.make_node("QConv", [node.input[0], node.input[2], f"{stem}_tiles", f"{stem}_bias",
                                                f"{stem}_scale", node.input[7], f"{stem}_geometry"],
                                      list(node.output), name=f"{node.name or node.output[0]}_qconv", domain=DOMAIN))
        count += 1
    if not count:
        return 0
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unread(graph)
    record(model, METADATA_KEY, count)
    return count
