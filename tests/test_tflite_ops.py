"""The TFLite -> ONNX converter, one op kind at a time, against the TFLite interpreter itself.

Each case is a tiny TFLite model written here with the TFLite schema's object API (as shipped in
mediapipe's wheel), run by Google's TFLite interpreter (``ai-edge-litert``) and, converted by our
converter, by ONNX Runtime on the same random input. Options the real selfie models do not use
(fused activations, dilation, depth multiplier, non-global pools, constant operands, the other
resize conventions, SAME padding that is not symmetric) are covered here. MediaPipe's custom op
``Convolution2DTransposeBias`` is compared with TFLite's builtin TRANSPOSE_CONV plus the bias.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import flatbuffers
import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from mediapipe.tasks.metadata import schema_py_generated as S

from m2fp_export.light.tflite_to_onnx import UnsupportedModel, convert

OP = S.BuiltinOperator
ACT = S.ActivationFunctionType
SAME, VALID = S.Padding.SAME, S.Padding.VALID
_TYPES = {np.float32: S.TensorType.FLOAT32, np.float16: S.TensorType.FLOAT16, np.int32: S.TensorType.INT32}


class Tiny:
    """A one-subgraph TFLite model under construction: tensors, constant buffers and operators."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [S.BufferT()]  # buffer 0: empty, for activations
        self.codes: list[Any] = []
        self.ops: list[Any] = []
        self.input = self.tensor(input_shape)

    def tensor(self, shape: tuple[int, ...], data: np.ndarray | None = None, dtype: type = np.float32) -> int:
        t = S.TensorT()
        t.shape, t.type, t.name = list(shape), _TYPES[dtype], f"t{len(self.tensors)}".encode()
        if data is not None:
            buf = S.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data, dtype=dtype).tobytes(), np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, value: np.ndarray, dtype: type = np.float32) -> int:
        return self.tensor(value.shape, value, dtype)

    def op(self, code: int, inputs: list[int], out_shape: tuple[int, ...], options_type: int = 0,
           options: Any = None, custom: str | None = None, custom_options: bytes = b"") -> int:
        key = (code, custom)
        known = [(c.builtinCode, c.customCode.decode() if c.customCode else None) for c in self.codes]
        if key not in known:
            c = S.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 1
            c.customCode = custom.encode() if custom else None
            self.codes.append(c)
            known.append(key)
        o = S.OperatorT()
        o.opcodeIndex, o.inputs = known.index(key), inputs
        o.outputs = [self.tensor(out_shape)]
        o.builtinOptionsType, o.builtinOptions = options_type, options
        if custom:
            o.customOptions = list(custom_options)
        self.ops.append(o)
        return int(o.outputs[0])

    def build(self, output: int) -> bytes:
        sg = S.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators = self.tensors, [self.input], [output], self.ops
        m = S.ModelT()
        m.version, m.operatorCodes, m.subgraphs, m.buffers = 3, self.codes, [sg], self.buffers
        m.description = b"tiny test model"
        builder = flatbuffers.Builder(1024)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _opts(cls: type, **fields: Any) -> Any:
    o = cls()
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def _run_tflite(data: bytes, x: np.ndarray) -> np.ndarray:
    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"]))


def _run_ours(data: bytes, x: np.ndarray) -> np.ndarray:
    converted = convert(data)
    session = ort.InferenceSession(converted.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {converted.input.name: x})[0])


def _rng(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- cases: (input shape, builder) -> output tensor ------------------------------------------------

def conv(kernel: int, cout: int, stride: int, padding: int, act: int = ACT.NONE, dilation: int = 1,
         fp16: bool = False) -> Callable[[Tiny, tuple[int, ...]], tuple[int, ...]]:
    def build(m: Tiny, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        _, h, w, c = shape
        wt, b = _rng((cout, kernel, kernel, c), 1), _rng((cout,), 2)
        if fp16:  # weights stored fp16 behind DEQUANTIZE, as in the selfie models
            w_i = m.op(OP.DEQUANTIZE, [m.const(wt, np.float16)], wt.shape)
            b_i = m.op(OP.DEQUANTIZE, [m.const(b, np.float16)], b.shape)
        else:
            w_i, b_i = m.const(wt), m.const(b)
        span = (kernel - 1) * dilation + 1
        oh, ow = ((-(-h // stride), -(-w // stride)) if padding == SAME
                  else ((h - span) // stride + 1, (w - span) // stride + 1))
        opts = _opts(S.Conv2DOptionsT, padding=padding, strideW=stride, strideH=stride, fusedActivationFunction=act,
                     dilationWFactor=dilation, dilationHFactor=dilation)
        out = (1, oh, ow, cout)
        return m.op(OP.CONV_2D, [m.input, w_i, b_i], out, S.BuiltinOptions.Conv2DOptions, opts), out
    return build


def depthwise(kernel: int, mult: int, stride: int, padding: int, act: int = ACT.NONE):  # type: ignore[no-untyped-def]
    def build(m: Tiny, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        _, h, w, c = shape
        oh, ow = ((-(-h // stride), -(-w // stride)) if padding == SAME
                  else ((h - kernel) // stride + 1, (w - kernel) // stride + 1))
        opts = _opts(S.DepthwiseConv2DOptionsT, padding=padding, strideW=stride, strideH=stride, depthMultiplier=mult,
                     fusedActivationFunction=act, dilationWFactor=1, dilationHFactor=1)
        out = (1, oh, ow, c * mult)
        inputs = [m.input, m.const(_rng((1, kernel, kernel, c * mult), 3)), m.const(_rng((c * mult,), 4))]
        return m.op(OP.DEPTHWISE_CONV_2D, inputs, out, S.BuiltinOptions.DepthwiseConv2DOptions, opts), out
    return build


def binary(code: int, other: str, act: int = ACT.NONE):  # type: ignore[no-untyped-def]
    def build(m: Tiny, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        c = shape[3]
        if other == "pooled":  # the squeeze-excite pattern of the selfie models: x * f(mean(x))
            pool = _opts(S.Pool2DOptionsT, padding=VALID, strideW=1, strideH=1, filterWidth=shape[2],
                         filterHeight=shape[1])
            b = m.op(OP.AVERAGE_POOL_2D, [m.input], (1, 1, 1, c), S.BuiltinOptions.Pool2DOptions, pool)
        elif other == "vector":
            b = m.const(_rng((c,), 5))
        elif other == "const4d":
            b = m.const(_rng(shape, 6))
        else:
            b = m.input
        cls, kind = ((S.AddOptionsT, S.BuiltinOptions.AddOptions) if code == OP.ADD
                     else (S.MulOptionsT, S.BuiltinOptions.MulOptions))
        return m.op(code, [m.input, b], shape, kind, _opts(cls, fusedActivationFunction=act)), shape
    return build


def unary(code: int):  # type: ignore[no-untyped-def]
    def build(m: Tiny, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        return m.op(code, [m.input], shape), shape
    return build


def avg_pool(kernel: int, stride: int, padding: int, act: int = ACT.NONE):  # type: ignore[no-untyped-def]
    def build(m: Tiny, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        _, h, w, c = shape
        oh, ow = ((-(-h // stride), -(-w // stride)) if padding == SAME
                  else ((h - kernel) // stride + 1, (w - kernel) // stride + 1))
        opts = _opts(S.Pool2DOptionsT, padding=padding, strideW=stride, strideH=stride, filterWidth=kernel,
                     filterHeight=kernel, fusedActivationFunction=act)
        out = (1, oh, ow, c)
        return m.op(OP.AVERAGE_POOL_2D, [m.input], out, S.BuiltinOptions.Pool2DOptions, opts), out
    return build


def mean(axes: tuple[int, ...]):  # type: ignore[no-untyped-def]
    def build(m: Tiny, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        out = tuple(1 if i in axes else d for i, d in enumerate(shape))
        axes_i = m.const(np.array(axes, np.int32), np.int32)
        return m.op(OP.MEAN, [m.input, axes_i], out, S.BuiltinOptions.ReducerOptions,
                    _opts(S.ReducerOptionsT, keepDims=True)), out
    return build


def resize(size: tuple[int, int], align_corners: bool = False, half_pixel: bool = False):  # type: ignore[no-untyped-def]
    def build(m: Tiny, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        out = (1, *size, shape[3])
        opts = _opts(S.ResizeBilinearOptionsT, alignCorners=align_corners, halfPixelCenters=half_pixel)
        size_i = m.const(np.array(size, np.int32), np.int32)
        return m.op(OP.RESIZE_BILINEAR, [m.input, size_i], out, S.BuiltinOptions.ResizeBilinearOptions, opts), out
    return build


CASES = {
    "conv 3x3 SAME s1": ((1, 8, 8, 3), conv(3, 4, 1, SAME)),
    "conv 3x3 SAME s2 odd size (pads 0/1) + RELU": ((1, 9, 11, 3), conv(3, 5, 2, SAME, ACT.RELU)),
    "conv 5x5 SAME s2 (pads 1/2) + RELU6": ((1, 12, 10, 2), conv(5, 3, 2, SAME, ACT.RELU6)),
    "conv 3x3 VALID s2 dilation 2": ((1, 13, 13, 3), conv(3, 4, 2, VALID, dilation=2)),
    "conv 1x1 VALID fp16 weights (DEQUANTIZE)": ((1, 6, 7, 8), conv(1, 5, 1, VALID, fp16=True)),
    "conv 3x3 SAME fp16 weights + RELU_N1_TO_1": ((1, 6, 6, 3), conv(3, 4, 1, SAME, ACT.RELU_N1_TO_1, fp16=True)),
    "depthwise 3x3 SAME s1": ((1, 8, 8, 4), depthwise(3, 1, 1, SAME)),
    "depthwise 5x5 SAME s2 odd size": ((1, 9, 7, 4), depthwise(5, 1, 2, SAME)),
    "depthwise 3x3 VALID multiplier 2 + RELU": ((1, 8, 8, 3), depthwise(3, 2, 1, VALID, ACT.RELU)),
    "add x + x + RELU": ((1, 5, 6, 4), binary(OP.ADD, "self", ACT.RELU)),
    "add per-channel constant": ((1, 5, 6, 4), binary(OP.ADD, "vector")),
    "mul x * avgpool(x) (broadcast)": ((1, 5, 6, 4), binary(OP.MUL, "pooled")),
    "mul 4-D constant + RELU6": ((1, 5, 6, 4), binary(OP.MUL, "const4d", ACT.RELU6)),
    "relu": ((1, 5, 6, 4), unary(OP.RELU)),
    "hard swish": ((1, 5, 6, 4), unary(OP.HARD_SWISH)),
    "logistic": ((1, 5, 6, 4), unary(OP.LOGISTIC)),
    "average pool global": ((1, 6, 6, 4), avg_pool(6, 6, VALID)),
    "average pool 3x3 SAME s2 (padding not counted) + RELU": ((1, 7, 9, 3), avg_pool(3, 2, SAME, ACT.RELU)),
    "average pool 2x2 VALID s2": ((1, 8, 8, 3), avg_pool(2, 2, VALID)),
    "mean over H, W": ((1, 6, 10, 4), mean((1, 2))),
    "mean over W": ((1, 6, 10, 4), mean((2,))),
    "resize x2 half-pixel centers": ((1, 4, 5, 3), resize((8, 10), half_pixel=True)),
    "resize to 9x4 half-pixel centers": ((1, 5, 7, 2), resize((9, 4), half_pixel=True)),
    "resize x2 align corners": ((1, 4, 5, 3), resize((8, 10), align_corners=True)),
    "resize to 9x13 asymmetric (TF1 default)": ((1, 4, 5, 3), resize((9, 13))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_against_tflite(case: str) -> None:
    shape, builder = CASES[case]
    m = Tiny(shape)
    out, out_shape = builder(m, shape)
    data = m.build(out)
    x = _rng(shape, 7)
    want = _run_tflite(data, x)
    got = _run_ours(data, x)
    assert want.shape == got.shape == out_shape
    assert np.abs(want).max() > 0.1  # the case computes something
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("hw", "kernel", "stride", "padding"), [
    ((4, 5), 2, 2, SAME),   # the selfie models' case: no padding
    ((5, 5), 3, 2, SAME),   # SAME with one pixel cropped after
    ((4, 6), 3, 1, SAME),
    ((3, 4), 3, 2, VALID),
    ((4, 4), 4, 2, SAME),
    ((5, 5), 5, 2, SAME),   # 3 pixels cropped: 1 before, 2 after
])
def test_transpose_conv_bias_against_tflite(hw: tuple[int, int], kernel: int, stride: int, padding: int) -> None:
    """MediaPipe's Convolution2DTransposeBias == TFLite's TRANSPOSE_CONV followed by the bias."""
    h, w = hw
    cin, cout = 3, 2
    shape = (1, h, w, cin)
    out_hw = (h * stride, w * stride) if padding == SAME else ((h - 1) * stride + kernel, (w - 1) * stride + kernel)
    out_shape = (1, *out_hw, cout)
    weights, bias = _rng((cout, kernel, kernel, cin), 8), _rng((cout,), 9)

    ref = Tiny(shape)  # TFLite builtin: inputs (output_shape, weights, input, bias)
    tc = ref.op(OP.TRANSPOSE_CONV, [ref.const(np.array(out_shape, np.int32), np.int32), ref.const(weights), ref.input,
                                   ref.const(bias)], out_shape, S.BuiltinOptions.TransposeConvOptions,
                _opts(S.TransposeConvOptionsT, padding=padding, strideW=stride, strideH=stride))
    ours = Tiny(shape)  # MediaPipe's custom op: inputs (input, weights, bias), raw TfLiteTransposeConvParams
    params = struct.pack("<3i", 1 if padding == SAME else 2, stride, stride)
    custom = ours.op(OP.CUSTOM, [ours.input, ours.const(weights), ours.const(bias)], out_shape,
                     custom="Convolution2DTransposeBias", custom_options=params)
    x = _rng(shape, 10)
    want = _run_tflite(ref.build(tc), x)
    got = _run_ours(ours.build(custom), x)
    assert want.shape == got.shape == out_shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_truncated_custom_options_are_read_as_zero_padded() -> None:
    """The general selfie model stores the 12-byte params cut to 10 bytes; the missing bytes are 0."""
    m = Tiny((1, 4, 4, 2))
    params = struct.pack("<3i", 1, 2, 2)[:10]
    out = m.op(OP.CUSTOM, [m.input, m.const(_rng((1, 2, 2, 2), 1)), m.const(_rng((1,), 2))], (1, 8, 8, 1),
               custom="Convolution2DTransposeBias", custom_options=params)
    x = _rng((1, 4, 4, 2), 3)
    assert _run_ours(m.build(out), x).shape == (1, 8, 8, 1)


@pytest.mark.parametrize(("what", "builder", "message"), [
    ("softmax", lambda m: m.op(OP.SOFTMAX, [m.input], (1, 4, 4, 2)), "operator SOFTMAX"),
    ("custom", lambda m: m.op(OP.CUSTOM, [m.input], (1, 4, 4, 2), custom="SomethingElse"), "custom SomethingElse"),
    ("rank-2 output", lambda m: m.op(OP.MEAN, [m.input, m.const(np.array([1, 2], np.int32), np.int32)], (1, 2),
                                     S.BuiltinOptions.ReducerOptions, _opts(S.ReducerOptionsT, keepDims=False)),
     "expected NHWC batch-1"),
    ("fused TANH", lambda m: m.op(OP.ADD, [m.input, m.input], (1, 4, 4, 2), S.BuiltinOptions.AddOptions,
                                  _opts(S.AddOptionsT, fusedActivationFunction=ACT.TANH)), "fused activation"),
    ("bad custom options", lambda m: m.op(OP.CUSTOM, [m.input, m.const(_rng((1, 2, 2, 2))), m.const(_rng((1,)))],
                                          (1, 8, 8, 1), custom="Convolution2DTransposeBias",
                                          custom_options=b"\x01\x00"), "2-byte options"),
])
def test_unsupported_is_refused_by_name(what: str, builder: Callable[[Tiny], int], message: str) -> None:
    m = Tiny((1, 4, 4, 2))
    with pytest.raises(UnsupportedModel, match=message):
        convert(m.build(builder(m)))
