"""A small TFLite -> ONNX converter for MediaPipe's selfie segmentation models.

Stock converters (tf2onnx, tflite2onnx) do not know MediaPipe's custom op
``Convolution2DTransposeBias`` and are heavy dependencies for a 250 KB model. This one reads the
flatbuffer with the ``tflite`` package and emits each operator's ONNX counterpart:

- the public input stays NHWC (as the TFLite model's), transposed to NCHW once at the start; the
  output is transposed back once at the end; everything in between is NCHW, so no op carries a
  layout transpose of its own;
- ``DEQUANTIZE`` of an fp16 constant is folded: the weight becomes an fp32 initializer;
- the fused activation of CONV_2D / DEPTHWISE_CONV_2D / ADD / MUL / AVERAGE_POOL_2D is applied
  after the op; SAME padding becomes explicit pads, computed as TFLite computes them;
- ``Convolution2DTransposeBias`` (a transposed convolution plus bias; its custom options are the
  raw bytes of ``TfLiteTransposeConvParams``: padding, stride_width, stride_height) becomes
  ``ConvTranspose`` with the bias as its third input.

Only what these models use is supported; anything else raises ``UnsupportedModel`` naming it.
Shapes are static (the model's fixed input size, batch 1).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import tflite
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError

CONVERTER_VERSION = "1.0.0"
OPSET = 17  # HardSwish needs 14; the M2FP export uses 17 too

_BUILTIN_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
_TFL_DTYPES = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.FLOAT16: np.float16,
               tflite.TensorType.INT32: np.int32, tflite.TensorType.INT64: np.int64,
               tflite.TensorType.UINT8: np.uint8, tflite.TensorType.INT8: np.int8}
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)
_AXIS_NHWC_TO_NCHW = {0: 0, 1: 2, 2: 3, 3: 1}


class UnsupportedModel(ExportError):
    """The TFLite file uses something this converter does not translate, or is not a TFLite model."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]


@dataclass
class ConvertedModel:
    """The converter's result: the ONNX model and what it found in the TFLite file."""

    model: onnx.ModelProto
    input: TensorInfo
    output: TensorInfo
    op_counts: dict[str, int] = field(default_factory=dict)
    description: str = ""


class _Graph:
    """Builds the ONNX graph while walking the TFLite operators (internal layout NCHW)."""

    def __init__(self, model: Any, subgraph: Any) -> None:
        self.model = model
        self.sg = subgraph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.consts: dict[int, np.ndarray] = {}  # tensor index -> value (NHWC/TFLite layout)
        self.names: dict[int, str] = {}  # tensor index -> ONNX value name (NCHW activations)
        self._used: set[str] = set()

    # --- tensors -----------------------------------------------------------------------------
    def tensor(self, index: int) -> Any:
        return self.sg.Tensors(index)

    def shape(self, index: int) -> tuple[int, ...]:
        t = self.tensor(index)
        return tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self._used:
            name, k = f"{base}_{k}", k + 1
        self._used.add(name)
        return name

    def const(self, index: int) -> np.ndarray | None:
        """The value of a constant tensor (from its buffer, or a folded DEQUANTIZE), else None."""
        if index in self.consts:
            return self.consts[index]
        t = self.tensor(index)
        buf = self.model.Buffers(t.Buffer())
        if buf is None or buf.DataLength() == 0:
            return None
        dtype = _TFL_DTYPES.get(t.Type())
        if dtype is None:
            raise UnsupportedModel(f"tensor {t.Name().decode()}: type {t.Type()} is not supported")
        data = buf.DataAsNumpy().tobytes()
        value = np.frombuffer(data, dtype=dtype).reshape(self.shape(index)).copy()
        self.consts[index] = value
        return value

    def need_const(self, index: int, what: str) -> np.ndarray:
        value = self.const(index)
        if value is None:
            raise UnsupportedModel(f"{what}: expected a constant tensor, got activation "
                                   f"{self.tensor(index).Name().decode()}")
        return value

    def activation(self, index: int) -> str:
        if index not in self.names:
            raise UnsupportedModel(f"tensor {self.tensor(index).Name().decode()} is used before it is computed")
        return self.names[index]

    def add_init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def set_output(self, index: int, value: str, fused: int = tflite.ActivationFunctionType.NONE) -> None:
        base = self.tensor(index).Name().decode()
        self.names[index] = _fused_activation(self, value, fused, base)


def _fused_activation(g: _Graph, value: str, fused: int, base: str) -> str:
    act = tflite.ActivationFunctionType
    if fused == act.NONE:
        return value
    if fused == act.RELU:
        return g.node("Relu", [value], base + "/relu")
    if fused == act.RELU6:
        return g.node("Clip", [value, g.add_init("zero", np.float32(0)), g.add_init("six", np.float32(6))],
                      base + "/relu6")
    if fused == act.RELU_N1_TO_1:
        return g.node("Clip", [value, g.add_init("minus_one", np.float32(-1)), g.add_init("one", np.float32(1))],
                      base + "/relu_n1_to_1")
    # TFLite's float kernels clamp for the activations above and silently skip the others (TANH,
    # SIGN_BIT), so no translation would be faithful to what the file means.
    raise UnsupportedModel(f"fused activation {fused} is not supported")


def _same_pads(in_size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite's SAME padding for one spatial axis: (before, after); the extra pixel goes after."""
    out = -(-in_size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - in_size, 0)
    return total // 2, total - total // 2


def _pads(padding: int, hw: tuple[int, int], khw: tuple[int, int], strides: tuple[int, int],
          dilations: tuple[int, int] = (1, 1)) -> list[int]:
    """ONNX pads [top, left, bottom, right] for TFLite padding SAME (0) or VALID (1)."""
    if padding == tflite.Padding.VALID:
        return [0, 0, 0, 0]
    if padding != tflite.Padding.SAME:
        raise UnsupportedModel(f"padding mode {padding} is not supported")
    (t, b), (left, r) = (_same_pads(hw[i], khw[i], strides[i], dilations[i]) for i in range(2))
    return [t, left, b, r]


def _options(op: Any, cls: type) -> Any:
    table = op.BuiltinOptions()
    opts = cls()
    if table is not None:
        opts.Init(table.Bytes, table.Pos)
    return opts


def _conv(g: _Graph, op: Any, depthwise: bool) -> None:
    x_i, w_i, b_i = (int(i) for i in op.InputsAsNumpy()[:3])
    out_i = int(op.OutputsAsNumpy()[0])
    opts = _options(op, tflite.DepthwiseConv2DOptions if depthwise else tflite.Conv2DOptions)
    w = g.need_const(w_i, "convolution weights").astype(np.float32)  # OHWI (depthwise: 1, H, W, C*mult)
    _, h, wd, _ = g.shape(x_i)
    strides = (opts.StrideH(), opts.StrideW())
    dil = (opts.DilationHFactor(), opts.DilationWFactor())
    kh, kw = w.shape[1], w.shape[2]
    if depthwise:
        cin = g.shape(x_i)[3]
        weight = w.transpose(3, 0, 1, 2)  # (C*mult, 1, kH, kW), group = C
        group = cin
    else:
        weight = w.transpose(0, 3, 1, 2)  # OIHW
        group = 1
    base = g.tensor(out_i).Name().decode()
    inputs = [g.activation(x_i), g.add_init(base + "/W", weight)]
    if b_i >= 0:
        inputs.append(g.add_init(base + "/B", g.need_const(b_i, "convolution bias").astype(np.float32)))
    y = g.node("Conv", inputs, base, kernel_shape=[kh, kw], strides=list(strides), dilations=list(dil),
               pads=_pads(opts.Padding(), (h, wd), (kh, kw), strides, dil), group=group)
    g.set_output(out_i, y, opts.FusedActivationFunction())


def _transpose_conv_bias(g: _Graph, op: Any) -> None:
    """MediaPipe's Convolution2DTransposeBias: inputs (x, weights OHWI, bias), options raw params."""
    x_i, w_i, b_i = (int(i) for i in op.InputsAsNumpy()[:3])
    out_i = int(op.OutputsAsNumpy()[0])
    raw = op.CustomOptionsAsNumpy().tobytes() if op.CustomOptionsLength() else b""
    # TfLiteTransposeConvParams {TfLitePadding padding; int stride_width; int stride_height;}: 3 int32,
    # little-endian; the general model stores it cut to 10 bytes (the missing high bytes are zero).
    if not 8 <= len(raw) <= 12:
        raise UnsupportedModel(f"Convolution2DTransposeBias: unexpected {len(raw)}-byte options")
    padding, stride_w, stride_h = struct.unpack("<3i", raw.ljust(12, b"\0"))
    # TfLitePadding: 0 unknown, 1 SAME, 2 VALID (the C enum, not the schema's)
    if padding not in (1, 2) or stride_w < 1 or stride_h < 1:
        raise UnsupportedModel(f"Convolution2DTransposeBias: options padding={padding} strides={stride_w},{stride_h}")
    w = g.need_const(w_i, "transposed convolution weights").astype(np.float32)  # (O, kH, kW, I)
    kh, kw = w.shape[1], w.shape[2]
    _, h, wd, _ = g.shape(x_i)
    _, oh, ow, _ = g.shape(out_i)
    pads_hw = []
    for size, out, k, s in ((h, oh, kh, stride_h), (wd, ow, kw, stride_w)):
        total = max((size - 1) * s + k - out, 0) if padding == 1 else 0
        pads_hw.append((total // 2, total - total // 2))
    base = g.tensor(out_i).Name().decode()
    y = g.node("ConvTranspose",
               [g.activation(x_i), g.add_init(base + "/W", w.transpose(3, 0, 1, 2)),  # (I, O, kH, kW)
                g.add_init(base + "/B", g.need_const(b_i, "transposed convolution bias").astype(np.float32))],
               base, kernel_shape=[kh, kw], strides=[stride_h, stride_w],
               # explicit pads only: with output_shape ONNX Runtime places an odd pad before, TFLite after
               pads=[pads_hw[0][0], pads_hw[1][0], pads_hw[0][1], pads_hw[1][1]])
    g.set_output(out_i, y)


def _binary(g: _Graph, op: Any, onnx_op: str, options_cls: type) -> None:
    a_i, b_i = (int(i) for i in op.InputsAsNumpy()[:2])
    out_i = int(op.OutputsAsNumpy()[0])
    base = g.tensor(out_i).Name().decode()
    operands = []
    for i in (a_i, b_i):
        value = g.const(i)
        if value is None:
            operands.append(g.activation(i))
        elif value.ndim == 4:
            operands.append(g.add_init(base + "/c", value.astype(np.float32).transpose(_NHWC_TO_NCHW)))
        elif value.ndim <= 1:  # a scalar or per-channel vector broadcasts over the last (channel) axis
            operands.append(g.add_init(base + "/c", value.astype(np.float32).reshape(-1, 1, 1)))
        else:
            raise UnsupportedModel(f"{onnx_op}: constant operand of shape {value.shape} is not supported")
    y = g.node(onnx_op, operands, base)
    g.set_output(out_i, y, _options(op, options_cls).FusedActivationFunction())


def _unary(onnx_op: str, **attrs: Any) -> Callable[[_Graph, Any], None]:
    def convert(g: _Graph, op: Any) -> None:
        x_i, out_i = int(op.InputsAsNumpy()[0]), int(op.OutputsAsNumpy()[0])
        g.set_output(out_i, g.node(onnx_op, [g.activation(x_i)], g.tensor(out_i).Name().decode(), **attrs))
    return convert


def _average_pool(g: _Graph, op: Any) -> None:
    x_i, out_i = int(op.InputsAsNumpy()[0]), int(op.OutputsAsNumpy()[0])
    opts = _options(op, tflite.Pool2DOptions)
    _, h, w, _ = g.shape(x_i)
    khw, strides = (opts.FilterHeight(), opts.FilterWidth()), (opts.StrideH(), opts.StrideW())
    base = g.tensor(out_i).Name().decode()
    pads = _pads(opts.Padding(), (h, w), khw, strides)
    if khw == (h, w) and pads == [0, 0, 0, 0]:
        y = g.node("GlobalAveragePool", [g.activation(x_i)], base)
    else:  # TFLite averages over the valid (unpadded) pixels only
        y = g.node("AveragePool", [g.activation(x_i)], base, kernel_shape=list(khw), strides=list(strides),
                   pads=pads, count_include_pad=0)
    g.set_output(out_i, y, opts.FusedActivationFunction())


def _mean(g: _Graph, op: Any) -> None:
    x_i, axes_i = (int(i) for i in op.InputsAsNumpy()[:2])
    out_i = int(op.OutputsAsNumpy()[0])
    if not _options(op, tflite.ReducerOptions).KeepDims():
        raise UnsupportedModel("MEAN without keep_dims is not supported")
    rank = len(g.shape(x_i))
    axes = sorted(_AXIS_NHWC_TO_NCHW[int(a) % rank] for a in g.need_const(axes_i, "MEAN axes").reshape(-1))
    base = g.tensor(out_i).Name().decode()
    g.set_output(out_i, g.node("ReduceMean", [g.activation(x_i)], base, axes=axes, keepdims=1))


def _resize_bilinear(g: _Graph, op: Any) -> None:
    x_i, size_i = (int(i) for i in op.InputsAsNumpy()[:2])
    out_i = int(op.OutputsAsNumpy()[0])
    opts = _options(op, tflite.ResizeBilinearOptions)
    if opts.AlignCorners() and opts.HalfPixelCenters():
        raise UnsupportedModel("RESIZE_BILINEAR with both align_corners and half_pixel_centers")
    # TensorFlow's three conventions and their ONNX names
    mode = "align_corners" if opts.AlignCorners() else "half_pixel" if opts.HalfPixelCenters() else "asymmetric"
    out_h, out_w = (int(v) for v in g.need_const(size_i, "RESIZE_BILINEAR size").reshape(-1))
    n, _, _, c = g.shape(x_i)
    base = g.tensor(out_i).Name().decode()
    sizes = g.add_init(base + "/sizes", np.array([n, c, out_h, out_w], np.int64))
    y = g.node("Resize", [g.activation(x_i), "", "", sizes], base, mode="linear",
               coordinate_transformation_mode=mode)
    g.set_output(out_i, y)


def _dequantize(g: _Graph, op: Any) -> None:
    x_i, out_i = int(op.InputsAsNumpy()[0]), int(op.OutputsAsNumpy()[0])
    value = g.const(x_i)
    if value is None or value.dtype != np.float16:
        raise UnsupportedModel("DEQUANTIZE is supported only on fp16 constants (folded to fp32 weights)")
    g.consts[out_i] = value.astype(np.float32)


_BUILTINS: dict[str, Callable[[_Graph, Any], None]] = {
    "CONV_2D": lambda g, op: _conv(g, op, depthwise=False),
    "DEPTHWISE_CONV_2D": lambda g, op: _conv(g, op, depthwise=True),
    "ADD": lambda g, op: _binary(g, op, "Add", tflite.AddOptions),
    "MUL": lambda g, op: _binary(g, op, "Mul", tflite.MulOptions),
    "RELU": _unary("Relu"),
    "HARD_SWISH": _unary("HardSwish"),
    "LOGISTIC": _unary("Sigmoid"),
    "AVERAGE_POOL_2D": _average_pool,
    "MEAN": _mean,
    "RESIZE_BILINEAR": _resize_bilinear,
    "DEQUANTIZE": _dequantize,
}
_CUSTOM: dict[str, Callable[[_Graph, Any], None]] = {
    "Convolution2DTransposeBias": _transpose_conv_bias,
}


def _op_name(model: Any, op: Any) -> tuple[str, bool]:
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # schema v3a keeps small codes in both
    if builtin == tflite.BuiltinOperator.CUSTOM:
        return code.CustomCode().decode(), True
    return _BUILTIN_NAMES.get(builtin, f"builtin #{builtin}"), False


def load_tflite(data: bytes) -> Any:
    """Parses a TFLite flatbuffer; raises UnsupportedModel on anything that is not one."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise UnsupportedModel("not a TFLite model (no TFL3 file identifier)")
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        if model.SubgraphsLength() != 1:
            raise UnsupportedModel(f"expected one subgraph, found {model.SubgraphsLength()}")
        model.Subgraphs(0).OperatorsLength()
    except UnsupportedModel:
        raise
    except Exception as exc:  # flatbuffers raises struct/index errors on corrupt data
        raise UnsupportedModel(f"corrupt TFLite flatbuffer: {exc}") from exc
    return model


def convert(data: bytes, graph_name: str = "light") -> ConvertedModel:
    """Converts a TFLite flatbuffer (bytes) to an ONNX model with the same NHWC input and output."""
    model = load_tflite(data)
    sg = model.Subgraphs(0)
    g = _Graph(model, sg)
    if sg.InputsLength() != 1 or sg.OutputsLength() != 1:
        raise UnsupportedModel(f"expected 1 input and 1 output, found {sg.InputsLength()} and {sg.OutputsLength()}")
    in_i, out_i = int(sg.Inputs(0)), int(sg.Outputs(0))
    in_shape, out_shape = g.shape(in_i), g.shape(out_i)
    if len(in_shape) != 4 or len(out_shape) != 4 or in_shape[0] != 1:
        raise UnsupportedModel(f"expected NHWC batch-1 input/output, got {in_shape} -> {out_shape}")
    in_name, out_name = g.tensor(in_i).Name().decode(), g.tensor(out_i).Name().decode()
    g._used.update({in_name, out_name})
    g.names[in_i] = g.node("Transpose", [in_name], in_name + "/nchw", perm=list(_NHWC_TO_NCHW))

    counts: dict[str, int] = {}
    try:
        for k in range(sg.OperatorsLength()):
            op = sg.Operators(k)
            name, custom = _op_name(model, op)
            counts[name] = counts.get(name, 0) + 1
            handler = (_CUSTOM if custom else _BUILTINS).get(name)
            if handler is None:
                raise UnsupportedModel(f"operator {'custom ' if custom else ''}{name} (#{k}) is not supported")
            handler(g, op)
        last = g.activation(out_i)
    except UnsupportedModel:
        raise
    except Exception as exc:  # a corrupt file can point anywhere
        raise UnsupportedModel(f"corrupt or unexpected TFLite graph: {exc}") from exc
    g.nodes.append(helper.make_node("Transpose", [last], [out_name], name=out_name, perm=list(_NCHW_TO_NHWC)))

    graph = helper.make_graph(
        g.nodes, graph_name,
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(out_shape))],
        initializer=g.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="m2fp-export tflite_to_onnx", producer_version=CONVERTER_VERSION)
    proto.ir_version = 8  # what onnxruntime >= 1.14 reads; opset 17 needs IR >= 8
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise UnsupportedModel(f"the converted graph does not pass the ONNX checker: {exc}") from exc
    description = model.Description().decode(errors="replace") if model.Description() else ""
    return ConvertedModel(proto, TensorInfo(in_name, in_shape), TensorInfo(out_name, out_shape), counts, description)
