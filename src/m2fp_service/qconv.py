"""INT8 convolutions on AMX tiles: ``ai.m2fp::QConv`` of the custom-op library, in the optimised graph.

ONNX Runtime turns a static INT8 model's convolutions (``DequantizeLinear -> Conv -> QuantizeLinear``)
into ``com.microsoft::QLinearConv`` nodes on NHWC tensors (``channels_last``: its layout transformer
places the transposes around the backbone) and runs them with AVX-512 VNNI (MLAS's symmetric
convolution), also where the CPU has AMX. ``rewrite`` takes the graph ONNX Runtime saved after
optimising it (the engine's optimised-graph cache, ``engine._open_optimized``) and replaces each
qualifying node with ``ai.m2fp::QConv(x, x_zero_point, tiles, bias, scale, y_zero_point, geometry)``
(``native/m2fp_qconv.cc``): the same result, bit for bit, with the products on AMX tiles. The layout
stays ONNX Runtime's; only the kernel changes.

A node qualifies when it is ``channels_last`` with group 1, strides and dilations 1 and explicit pads
smaller than the kernel; every input but x is an initialiser; the weights are int8 (Cout, C, kh, kw) with
zero points 0; x_scale and y_scale are float scalars and w_scale a scalar or one per output channel; the
zero points are uint8 scalars; the bias is int32 (Cout) or absent; C is a multiple of 64 and Cout of 32
(the tiles) and kh x kw x C at most 65536 (the op's int32 sums). Here, once, the weights are packed for the
tiles (``pack``) and the per-channel constants computed as ONNX Runtime computes them: the bias minus the
input zero point times each channel's weight sum (int32), and x_scale x w_scale / y_scale (float32, in
that order).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

DOMAIN = "ai.m2fp"
METADATA_KEY = "m2fp_qconv"  # how many convolutions were replaced (kept in the optimised graph)
DEPTH = 64  # C: a multiple of an AMX tile row's 64 bytes
COLUMNS = 32  # Cout: a multiple of two 16-column tiles
MAX_DEPTH = 65536  # kh x kw x C: the op's int32 sums
MAX_KERNEL = 15


def pack(w: np.ndarray) -> np.ndarray:
    """int8 weights (Cout, C, kh, kw) -> the op's tiles: the (kh x kw x C, Cout) matrix (depth tap-major), for
    each 16 output channels its rows 4 at a time, each channel's 4 bytes side by side (what ``tdpbusd`` reads)."""
    cout, c, kh, kw = w.shape
    depth = kh * kw * c
    matrix = w.transpose(2, 3, 1, 0).reshape(depth // 4, 4, cout // 16, 16)
    return np.ascontiguousarray(matrix.transpose(2, 0, 3, 1)).reshape(-1)


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def replacement(node: onnx.NodeProto, init: dict[str, onnx.TensorProto]) -> dict[str, np.ndarray] | None:
    """The op's constant inputs for a qualifying QLinearConv ``node`` (tiles, bias, scale, geometry), else None."""
    if node.op_type != "QLinearConv" or node.domain != "com.microsoft" or len(node.input) not in (8, 9):
        return None
    a = _attributes(node)
    if a.get("channels_last") != 1 or a.get("group", 1) != 1 or a.get("auto_pad", b"NOTSET") != b"NOTSET":
        return None
    names = [n for n in node.input[1:] if n]
    if len(names) != len(node.input) - 1 or not all(n in init for n in names):
        return None
    x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = (numpy_helper.to_array(init[n]) for n in node.input[1:8])
    bias = numpy_helper.to_array(init[node.input[8]]) if len(node.input) == 9 else None
    if w.dtype != np.int8 or w.ndim != 4 or np.any(w_zp != 0) or w_zp.dtype != np.int8:
        return None
    cout, c, kh, kw = w.shape
    kernel = list(a.get("kernel_shape", [kh, kw]))  # type: ignore[call-overload]
    pads = list(a.get("pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
    if (kernel != [kh, kw] or list(a.get("strides", [1, 1])) != [1, 1]  # type: ignore[call-overload]
            or list(a.get("dilations", [1, 1])) != [1, 1] or len(pads) != 4  # type: ignore[call-overload]
            or not all(0 <= p < k for p, k in zip(pads, [kh, kw, kh, kw], strict=True))):
        return None
    if c % DEPTH or cout % COLUMNS or kh * kw * c > MAX_DEPTH or max(kh, kw) > MAX_KERNEL:
        return None
    scalar = {"x_scale": (x_scale, np.float32), "y_scale": (y_scale, np.float32), "x_zero_point": (x_zp, np.uint8),
              "y_zero_point": (y_zp, np.uint8)}
    if any(v.dtype != t or v.size != 1 or v.ndim > 1 for v, t in scalar.values()):
        return None
    if w_scale.dtype != np.float32 or w_scale.ndim > 1 or w_scale.size not in (1, cout) or w_zp.size not in (1, cout):
        return None
    if bias is not None and (bias.dtype != np.int32 or bias.shape != (cout,)):
        return None
    sums = w.reshape(cout, -1).astype(np.int64).sum(1)
    adjusted = (np.zeros(cout, np.int64) if bias is None else bias.astype(np.int64)) - int(x_zp.reshape(-1)[0]) * sums
    if np.any(np.abs(adjusted) >= 2**31):
        return None
    # float32 products and quotient, in ONNX Runtime's order: x_scale * w_scale / y_scale.
    scale = np.broadcast_to((x_scale.reshape(()) * w_scale.reshape(-1)) / y_scale.reshape(()), (cout,))
    return {"tiles": pack(w), "bias": adjusted.astype(np.int32), "scale": np.ascontiguousarray(scale, np.float32),
            "geometry": np.array([kh, kw, 1, 1, *pads], np.int64)}


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
        stem = f"{node.name or node.output[0]}_qconv"
        for key, value in constants.items():
            graph.initializer.append(numpy_helper.from_array(value, f"{stem}_{key}"))
        nodes.append(helper.make_node("QConv", [node.input[0], node.input[2], f"{stem}_tiles", f"{stem}_bias",
                                                f"{stem}_scale", node.input[7], f"{stem}_geometry"],
                                      list(node.output), name=stem, domain=DOMAIN))
        count += 1
    if not count:
        return 0
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: str(count)})
    return count


def main(argv: list[str] | None = None) -> int:
    """``python -m m2fp_service.qconv OPTIMISED.onnx``: the file rewritten in place (untouched when no node
    qualifies); how many nodes were replaced on stdout, in words on stderr."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m m2fp_service.qconv OPTIMISED.onnx", file=sys.stderr)
        return 2
    path = Path(args[0])
    model = onnx.load(path)
    count = rewrite(model)
    if count:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            onnx.save(model, tmp)
            Path(tmp).replace(path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    print(count)
    print(f"graph rewrites: {count} INT8 convolution(s) on AMX tiles", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
