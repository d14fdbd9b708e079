"""3x3 convolutions rewritten as Winograd F(4x4, 3x3): 36 products per channel pair and 4x4 block of
output instead of 144.

A graph rewrite, applied by the engine when the custom-op library (``make native``) is registered:
each qualifying ``Conv`` (3x3, stride 1, padding 1, no dilation or groups, float weights stored in
the file, at least ``MIN_CHANNELS`` channels in and out, multiples of 8, not inside a residual
block), and the ``Relu`` after it when it is its only reader, becomes, per band of tile rows,

    x -> ai.m2fp::Winograd4x3Input(x, band) -> MatMul(., U) -> ai.m2fp::Winograd4x3Output[Relu](., bias, x, band)

the bands' rows concatenated (one band for a small convolution). ``U = G g G^T`` is computed here
once (36 x in x out: 4x the filter). The transforms are the library's (``native/m2fp_winograd.cc``);
the product is ONNX Runtime's own batched GEMM. Same results within float rounding (~1e-5
relative). On M2FP this is the pixel decoder's 3x3 convolution at 1/4 size, its costliest single
node (~7-10% of the network), which runs 1.8-2.7x faster; the rest of the graph is as before.

The model file is not changed: the rewrite is done when a session is built (``rewrite.py``) and
kept in the optimised-graph cache. Quantised (QDQ) convolutions are left alone (their weights are not float
initialisers), so INT8 models run as before. Nothing here imports onnxruntime.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from m2fp_service.feedforward import DOMAIN, drop_unread, record

METADATA_KEY = "m2fp_winograd"  # how many convolutions were rewritten (kept in the optimised graph)
# Below this many channels the products are too thin for the transforms to pay: ResNet's stem (64
# channels at 1/2 size) was no faster rewritten, and its banded output's concatenation raised the
# network's peak memory by ~90 MB.
MIN_CHANNELS = 128
# Convolutions inside residual blocks (their result, through a Relu, is read by a convolution whose
# result is added to the block's input) are left to ONNX Runtime: its layout optimiser fuses each
# block's Add and Relu into the block's last convolution only while the whole chain of blocks stays
# in its own layout, and one rewritten block breaks the chain for every block after it. Measured on
# the M2FP graph: rewriting ResNet's blocks too was ~4% faster for ~250 MB more memory.
#
# A convolution whose transformed input (36 x tiles x channels floats) would be larger than this at
# the nominal input size runs in bands of tile rows, concatenated: its transformed tensors (9x its
# input, alive together around the product) stay this small. The pixel decoder's 3x3 convolution at
# 1/4 size is ~110 MB at 640x1344: in 4 bands the network's peak there was 1.08 GB (1.11 as
# exported), in one band 1.46 GB.
MAX_BAND_BYTES = 32 << 20
NOMINAL_SIZE = (640, 1344)  # the default input profile's largest input (short edge 640, long 1333 -> 1344)

# Lavin & Gray's F(4x4, 3x3) filter transform (points 0, +-1, +-2); the input and output transforms
# are written out in native/m2fp_winograd.cc.
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)


def transformed_filter(weight: np.ndarray) -> np.ndarray:
    """``U`` (36, in, out) float32 of a (out, in, 3, 3) filter: ``U[6i+j] = (G g G^T)[i, j]``."""
    u = np.einsum("ia,kcab,jb->ijck", G, weight.astype(np.float64), G)
    return np.ascontiguousarray(u.reshape(36, weight.shape[1], weight.shape[0]), dtype=np.float32)


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def qualifies(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``node`` is a convolution this rewrite computes exactly (up to float rounding)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    weight = weights.get(node.input[1])
    if weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 4:
        return False
    out_channels, in_channels, kh, kw = weight.dims
    if (kh, kw) != (3, 3) or min(out_channels, in_channels) < MIN_CHANNELS or out_channels % 8 or in_channels % 8:
        return False
    attrs = attributes(node)
    return (list(attrs.get("strides", [1, 1])) == [1, 1] and list(attrs.get("dilations", [1, 1])) == [1, 1]
            and attrs.get("group", 1) == 1 and list(attrs.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            and list(attrs.get("kernel_shape", [3, 3])) == [3, 3])


def _feeds_residual(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether ``node``'s result, through a Relu, is read by a convolution whose result is added."""
    result = node.output[0]
    after = readers.get(result, [])
    if len(after) == 1 and after[0].op_type == "Relu":
        after = readers.get(after[0].output[0], [])
    return any(r.op_type == "Conv" and any(a.op_type in ("Add", "Sum") for a in readers.get(r.output[0], []))
               for r in after)


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape and type inference, without the weights' values (inference
    reads their dims; small tensors, which shape computations may read, are kept): 1.8 s -> 0.3 s
    on M2FP."""
    probe = onnx.ModelProto(ir_version=model.ir_version)
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    for field in ("node", "input", "output", "value_info"):
        getattr(probe.graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and np.prod(tensor.dims) > 64:
            probe.graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
        else:
            probe.graph.initializer.append(tensor)
    return probe


def _input_shapes(model: onnx.ModelProto, size: tuple[int, int]) -> dict[str, list[int]]:
    """Every tensor's shape at input size ``size`` (ONNX shape inference on a copy); {} if it fails."""
    probe = weightless_copy(model)
    for value in probe.graph.input[:1]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4:
            fixed = [(dims[2], size[0]), (dims[3], size[1])]
            if not dims[0].HasField("dim_value"):
                fixed.append((dims[0], 1))
            for dim, n in fixed:
                dim.ClearField("dim_param")
                dim.dim_value = n
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # noqa: BLE001 - an unusual graph only loses the banding, never the rewrite
        return {}
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def bands_for(shape: list[int] | None) -> int:
    """How many bands of tile rows a convolution whose input has ``shape`` (N, C, H, W) runs in."""
    if not shape or len(shape) != 4:
        return 1
    n, c, h, w = shape
    tile_rows = -(-h // 4)
    size = 36 * n * tile_rows * -(-w // 4) * c * 4
    return max(1, min(tile_rows, 64, -(-size // MAX_BAND_BYTES)))


def _declare(graph: onnx.GraphProto, name: str, channels: int) -> None:
    """Declares ``name`` a float (N, channels, H, W) tensor, N, H and W named after it."""
    for value in graph.value_info:
        if value.name == name:
            graph.value_info.remove(value)
            break
    graph.value_info.append(helper.make_tensor_value_info(
        name, onnx.TensorProto.FLOAT, [f"{name}_n", channels, f"{name}_h", f"{name}_w"]))


def rewrite(model: onnx.ModelProto, nominal_size: tuple[int, int] = NOMINAL_SIZE) -> int:
    """Rewrites ``model``'s qualifying convolutions in place (main graph only); returns how many.

    ``nominal_size`` (H, W): the input size that decides which convolutions run in bands.
    The library's ops are resolved by the session that registers it; a model rewritten here does
    not load without it.
    """
    graph = model.graph
    nodes = list(graph.node)
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    used_names = {n.name for n in nodes} | {t.name for t in graph.initializer}

    def fresh(stem: str) -> str:
        name, k = stem, 0
        while name in used_names:
            k += 1
            name = f"{stem}_{k}"
        used_names.add(name)
        return name

    shapes: dict[str, list[int]] | None = None
    count = 0
    fused_relus: set[str] = set()  # output names of the Relus taken into a rewritten convolution
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(nodes):
        if not qualifies(node, weights) or _feeds_residual(node, readers):
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        out_channels = weight.shape[0]
        if len(node.input) > 2 and node.input[2]:
            bias_name = node.input[2]
        else:
            bias_name = fresh(f"{node.name or 'conv'}_winograd_bias")
            graph.initializer.append(numpy_helper.from_array(np.zeros(out_channels, np.float32), bias_name))
        result, op = node.output[0], "Winograd4x3Output"
        after = readers.get(result, [])
        if (len(after) == 1 and after[0].op_type == "Relu" and after[0].domain in ("", "ai.onnx")
                and result not in outputs):
            op, result = "Winograd4x3OutputRelu", after[0].output[0]
            fused_relus.add(result)
        stem = node.name or f"conv{i}"
        u_name = fresh(f"{stem}_winograd_U")
        graph.initializer.append(numpy_helper.from_array(transformed_filter(weight), u_name))
        x = node.input[0]
        if shapes is None:
            shapes = _input_shapes(model, nominal_size)
        bands = bands_for(shapes.get(x))
        replacement, parts = [], []
        for b in range(bands):
            band = fresh(f"{stem}_winograd_band{b}")
            graph.initializer.append(numpy_helper.from_array(np.array([b, bands], np.int64), band))
            v, m = fresh(f"{stem}_winograd_v{b}"), fresh(f"{stem}_winograd_m{b}")
            part = result if bands == 1 else fresh(f"{stem}_winograd_y{b}")
            replacement += [
                helper.make_node("Winograd4x3Input", [x, band], [v], name=fresh(f"{stem}_winograd_in"), domain=DOMAIN),
                helper.make_node("MatMul", [v, u_name], [m], name=fresh(f"{stem}_winograd_gemm")),
                helper.make_node(op, [m, bias_name, x, band], [part], name=fresh(f"{stem}_winograd_out"),
                                 domain=DOMAIN),
            ]
            parts.append(part)
        if bands > 1:
            replacement.append(helper.make_node("Concat", parts, [result], axis=2, name=fresh(f"{stem}_winograd_rows")))
        # The result's rank and channels (the library's ops declare no output shape): without them ONNX
        # Runtime's layout optimiser leaves a following MaxPool in NCHW, and every residual block
        # after it loses its fused Add and Relu.
        _declare(graph, result, out_channels)
        new_nodes[i] = replacement
        count += 1
    if not count:
        return 0
    rewritten = []
    for i, node in enumerate(nodes):
        if node.op_type == "Relu" and node.output[0] in fused_relus:
            continue
        rewritten.extend(new_nodes.get(i, [node]))
    del graph.node[:]
    graph.node.extend(rewritten)
    drop_unread(graph)  # filters no node reads any more (each was its convolution's alone)
    record(model, METADATA_KEY, count)
    return count
