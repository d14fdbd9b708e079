"""3x3 convolutions rewritten as Winograd F(4x4, 3x3): 36 products per channel pair and 4x4 block of
output instead of 144.

A graph rewrite, applied by the engine when the custom-op library (``make native``) is registered:
each qualifying ``Conv`` (3x3, stride 1, padding 1, no dilation or groups, float weights stored in
the file, ``MIN_CHANNELS`` to ``MAX_CHANNELS`` channels in and out, multiples of 8), and the ``Relu``
after it when it is its only reader, becomes, per band of tile rows,

    x -> ai.m2fp::Winograd4x3Input(x, band) -> MatMul(., U) -> ai.m2fp::Winograd4x3Output[Relu](., bias, x, band)

the bands' rows concatenated (one band for a small convolution). ``U = G g G^T`` is computed here
once (36 x in x out: 4x the filter). The transforms are the library's (``native/m2fp_winograd.cc``);
the product is ONNX Runtime's own batched GEMM. Same results within float rounding (~1e-5
relative). On M2FP these are ResNet-101's 3x3 convolutions at 1/8 and 1/16 size (25, in its residual
blocks) and the pixel decoder's at 1/4 size (its costliest single node); each runs ~1.7-2x faster.

The library's ops are outside ONNX Runtime's own (NCHWc) layout, which fuses each residual block's
Add and Relu into the block's last convolution only where it can show that the Add's two inputs have
the same shape; ``declare_spatial_shapes`` declares the sizes that show it (see there).

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
# Above this many, the transformed filter (4x the filter: 38 MB for ResNet's 512-channel ones) is read
# for too few tiles: its stage 5 (1/32 size) was no faster rewritten and took 57 MB more memory.
MAX_CHANNELS = 256
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
    if ((kh, kw) != (3, 3) or min(out_channels, in_channels) < MIN_CHANNELS
            or max(out_channels, in_channels) > MAX_CHANNELS or out_channels % 8 or in_channels % 8):
        return False
    attrs = attributes(node)
    return (list(attrs.get("strides", [1, 1])) == [1, 1] and list(attrs.get("dilations", [1, 1])) == [1, 1]
            and attrs.get("group", 1) == 1 and list(attrs.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            and list(attrs.get("kernel_shape", [3, 3])) == [3, 3])


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


def _constant_dims(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """The dims of every initialiser (but those a graph input can override) and ``Constant`` node's value."""
    inputs = {i.name for i in graph.input}
    dims = {t.name: list(t.dims) for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute[:1]:
            value = node.attribute[0]
            if value.name == "value":
                dims[node.output[0]] = list(value.t.dims)
    return dims


def _spatial(node: onnx.NodeProto, kernel: list[int], size: tuple[tuple[str, int], ...]
             ) -> tuple[tuple[str, int], ...] | None:
    """A convolution's or pooling's output height and width from its input's (symbolic name, halvings), or None
    where it is not ``ceil(input / stride)`` with a stride of 1 or 2 (padding that keeps the size, no dilation,
    no ceil mode)."""
    attrs = attributes(node)
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    strides = list(attrs.get("strides", [1, 1]))
    if (len(kernel) != 2 or len(pads) != 4 or len(strides) != 2 or attrs.get("ceil_mode", 0)
            or list(attrs.get("dilations", [1, 1])) != [1, 1]
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    if any(s not in (1, 2) or pads[i] + pads[i + 2] + 1 != kernel[i] for i, s in enumerate(strides)):
        return None
    return tuple((name, halvings + strides[i] - 1) for i, (name, halvings) in enumerate(size))


def _broadcasts_per_channel(dims: list[int], channels: int) -> bool:
    """Whether a constant of ``dims`` combines with an (N, ``channels``, H, W) tensor without changing its shape."""
    if len(dims) > 4:
        return False
    dims = [1] * (4 - len(dims)) + dims
    return dims[0] == 1 and dims[1] in (1, channels) and dims[2:] == [1, 1]


def declare_spatial_shapes(model: onnx.ModelProto) -> int:
    """Declares the height and width of the tensors on the convolutions' path from a picture input of
    symbolic size (value_info); returns how many.

    ONNX Runtime's NCHWc layout optimiser fuses a residual block's Add (and the Relu after it) into the
    block's last convolution only when it can show that the Add's inputs have the same shape: by tracing
    each dimension to the tensor it came from through its own layout's nodes, else by the dims ONNX shape
    inference gave (equal values or equal names). A rewritten convolution ends the trace (the library's
    ops are outside that layout), and shape inference gives a convolution's output no size where its
    input's is symbolic; so, without this, every rewritten block would add and rectify in two more passes.
    Each declared size is exact: ``ceil(height / 2**k)`` after k stride-2 convolutions or poolings that
    keep the size at stride 1 (what the optimiser itself assumes), carried through Relu, the library's
    Winograd outputs (a convolution's bands once concatenated), element-wise ops whose second input is a
    scalar or per-channel constant, and Adds of two equal sizes. Nothing else is touched; a picture input
    of fixed size needs none of this (shape inference knows every size).
    """
    graph = model.graph
    if not graph.input or len(graph.input[0].type.tensor_type.shape.dim) != 4:
        return 0
    batch, channels, height, width = graph.input[0].type.tensor_type.shape.dim
    if not (height.dim_param and width.dim_param and channels.HasField("dim_value")):
        return 0
    weights = {t.name: list(t.dims) for t in graph.initializer}
    constants = _constant_dims(graph)
    bands = {t.name: tuple(int(v) for v in numpy_helper.to_array(t)) for t in graph.initializer
             if t.data_type == onnx.TensorProto.INT64 and list(t.dims) == [2]}
    parts: dict[str, tuple[str, int, int, int]] = {}  # a band's output -> (x, channels, band, bands)
    products = {n.output[0]: weights.get(n.input[1], []) for n in graph.node if n.op_type == "MatMul"}  # -> U's dims
    # tensor -> (channels, ((height name, halvings), (width name, halvings)))
    known: dict[str, tuple[int, tuple[tuple[str, int], ...]]] = {
        graph.input[0].name: (channels.dim_value, ((height.dim_param, 0), (width.dim_param, 0)))}
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ("Conv", "MaxPool", "AveragePool"):
            if node.input[0] not in known or len(node.output) != 1:
                continue
            c, size = known[node.input[0]]
            if node.op_type == "Conv":
                weight = weights.get(node.input[1], [])
                if len(weight) != 4:
                    continue
                c, kernel = weight[0], weight[2:]
            else:
                kernel = list(attributes(node).get("kernel_shape", []))
            out = _spatial(node, kernel, size)
            if out is not None:
                known[node.output[0]] = (c, out)
        elif node.domain == DOMAIN and node.op_type in ("Winograd4x3Output", "Winograd4x3OutputRelu"):
            # (m, bias, x, band): x's size, U's channels out; a band of several, rows of it (see Concat)
            u, band = products.get(node.input[0], []), bands.get(node.input[3])
            if node.input[2] in known and len(u) == 3 and band is not None:
                if band == (0, 1):
                    known[node.output[0]] = (u[2], known[node.input[2]][1])
                else:
                    parts[node.output[0]] = (node.input[2], u[2], *band)
        elif node.domain in ("", "ai.onnx") and node.op_type == "Concat" and attributes(node).get("axis") == 2:
            # every band of one convolution, in order: x's size
            first = parts.get(node.input[0])
            if first is not None and [parts.get(name) for name in node.input] == [
                    (*first[:2], i, len(node.input)) for i in range(len(node.input))]:
                known[node.output[0]] = (first[1], known[first[0]][1])
        elif node.domain in ("", "ai.onnx") and node.op_type == "Relu" and node.input[0] in known:
            known[node.output[0]] = known[node.input[0]]
        elif node.domain in ("", "ai.onnx") and node.op_type in ("Add", "Sub", "Mul", "Div", "Sum") \
                and len(node.input) == 2 and node.input[0] in known:
            a, b = node.input
            same = node.op_type in ("Add", "Sum") and known.get(b) == known[a]  # a residual block's sum
            if same or (b in constants and _broadcasts_per_channel(constants[b], known[a][0])):
                known[node.output[0]] = known[a]
    outside = {v.name for v in (*graph.input, *graph.output)} | set(weights)
    declared = {v.name: v for v in graph.value_info}
    count = 0
    batch_dim: int | str | None = batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or None)
    elem_type = graph.input[0].type.tensor_type.elem_type
    for name, (c, size) in known.items():
        if name in outside:
            continue
        if name in declared:
            graph.value_info.remove(declared[name])
        dims = [symbol if halvings == 0 else f"ceil({symbol}/{2 ** halvings})" for symbol, halvings in size]
        graph.value_info.append(helper.make_tensor_value_info(name, elem_type, [batch_dim, c, *dims]))
        count += 1
    return count


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
        if not qualifies(node, weights):
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
        # Runtime's layout optimiser leaves a following MaxPool in NCHW (declare_spatial_shapes below
        # then gives its height and width where it can).
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
    declare_spatial_shapes(model)
    record(model, METADATA_KEY, count)
    return count
