"""INT8 convolutions on AMX tiles (``qconv.rewrite`` + ``native/m2fp_qconv.cc``: ai.m2fp::QConv).

Graphs here are what ONNX Runtime saves after optimising an INT8 model: ``com.microsoft::QLinearConv`` nodes on
NHWC tensors. The op is checked bit for bit against ONNX Runtime running the node it replaces: on AMX tiles
here, with AVX-512 VNNI and with the plain loops in child processes (M2FP_QFFN_KERNEL=avx512-vnni, =generic).
Nodes the rewrite must leave alone are checked byte for byte; the engine on the tiny INT8 model against the
same engine without the rewrite.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from m2fp_export.quantize import quantize_file
from m2fp_service import engine as engine_module
from m2fp_service import int8graph, qconv, qdedupe, qgroupnorm, softmax
from m2fp_service.engine import BUILT_MSDA_KERNEL, EngineOptions, ParsingEngine, session_options
from tests.test_qfeedforward import TEST_CONFIG, passes_capped

pytestmark = pytest.mark.usefixtures("kernel_library")

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def conv(n: int = 1, h: int = 9, w: int = 13, c: int = 64, cout: int = 32, k: int | tuple[int, int] = 3, *,
         pads: list[int] | None = None, seed: int = 0, x_zp: int = 131, y_zp: int = 7, per_channel: bool = True,
         bias: bool = True, extreme: bool = False, small: bool = False,
         scales: tuple[float, float, float] | None = None, **attributes: Any) -> tuple[onnx.ModelProto, np.ndarray]:
    """One com.microsoft::QLinearConv node on an NHWC uint8 input as ONNX Runtime's optimiser leaves it
    (``channels_last``, every operand an initialiser), and an input for it. Scales that spread the outputs over
    the byte range (``scales``: x, w, y to choose them); weights of only -128 and 127 when ``extreme``; inputs
    below 4, weights -1 to 1 and biases within 8 when ``small`` (sums of a few units)."""
    rng = np.random.default_rng(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    pads = [kh // 2, kw // 2] * 2 if pads is None else pads
    x = rng.integers(0, 4 if small else 256, (n, h, w, c), dtype=np.uint8)
    weights = (rng.choice(np.array([-128, 127], np.int8), (cout, c, kh, kw)) if extreme
               else rng.integers(-1 if small else -127, 2 if small else 128, (cout, c, kh, kw), dtype=np.int8))
    xs, ws, ys = scales or (0.02, 2e-3, 0.02 * 2e-3 * 40 * np.sqrt(c * kh * kw))
    w_scale = (np.float32(ws) * rng.uniform(0.5, 1.5, cout if per_channel else 1)).astype(np.float32)
    operands = {"x_scale": np.float32(xs), "x_zero_point": np.uint8(x_zp), "w": weights, "w_scale": w_scale,
                "w_zero_point": np.zeros(w_scale.shape, np.int8), "y_scale": np.float32(ys),
                "y_zero_point": np.uint8(y_zp)}
    if bias:
        operands["bias"] = rng.integers(-8 if small else -20000, 8 if small else 20000, cout, dtype=np.int32)
    attributes = {"kernel_shape": [kh, kw], "pads": pads, "strides": [1, 1], "channels_last": 1, **attributes}
    node = helper.make_node("QLinearConv", ["x", *operands], ["y"], name="conv", domain="com.microsoft", **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None] * 4)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in operands.items()])
    return helper.make_model(graph, opset_imports=OPSETS), x


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = session_options(2)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the engine opens the cache
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]  # type: ignore[no-any-return]


def rewritten(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert qconv.rewrite(copy) == 1
    assert [n.op_type for n in copy.graph.node] == ["QConv"]
    return copy


CASES: dict[str, dict[str, Any]] = {
    "3x3": {},
    "3x3-two-images": {"n": 2, "h": 6, "w": 7, "c": 128, "cout": 64},
    "3x3-wide": {"h": 20, "w": 36, "c": 256, "cout": 256, "seed": 1},
    "3x3-no-pads": {"pads": [0, 0, 0, 0], "h": 12, "w": 40},
    "3x3-pads-2": {"h": 3, "w": 4, "pads": [2, 2, 2, 2]},
    "5x5-uneven-pads": {"k": 5, "pads": [2, 1, 0, 3]},
    "1x3": {"k": (1, 3), "pads": [0, 1, 0, 1], "c": 128},
    "3x1": {"k": (3, 1), "pads": [1, 0, 0, 0], "cout": 64},
    "1x1-tail": {"k": 1, "h": 5, "w": 70, "c": 128, "cout": 96},
    "1x1-three-images": {"k": 1, "n": 3, "h": 4, "w": 5},
    "1x1-one-pixel": {"k": 1, "h": 1, "w": 1},
    "1x1-no-bias-per-tensor": {"k": 1, "h": 7, "w": 9, "bias": False, "per_channel": False},
    "3x3-zero-points-0": {"x_zp": 0, "y_zp": 0},
    "3x3-zero-points-255": {"x_zp": 255, "y_zp": 255},
    "3x3-saturating": {"scales": (0.5, 0.05, 0.3)},
    "1x1-ties": {"k": 1, "scales": (1.0, 0.5, 1.0), "per_channel": False, "small": True, "x_zp": 2, "y_zp": 128},
    "3x3-extreme-weights": {"extreme": True, "x_zp": 0, "c": 256, "scales": (1.0, 1.0, 3e4)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_onnx_runtime_bit_for_bit(case: str) -> None:
    """Kernel sizes 1 to 5, pads of every side, short blocks, several images, per-channel and per-tensor scales, no
    bias, zero points at both ends, saturation both ways, exact halves (x_scale x w_scale / y_scale = 0.5 on
    integer sums: round half to even), sums of 2^26: the QConv node gives ONNX Runtime's bytes."""
    model, x = conv(**CASES[case])
    want, got = run(model, x), run(rewritten(model), x)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(want, got)
    if case == "3x3-saturating":
        assert (want == 0).mean() > 0.1 and (want == 255).mean() > 0.1
    elif case == "1x1-ties":  # odd sums times 0.5: a third of the outputs are exact halves
        init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        sums = (x.astype(np.int64) - 2) @ init["w"][:, :, 0, 0].T.astype(np.int64) + init["bias"]
        assert (sums % 2 == 1).mean() > 0.3 and np.unique(want).size > 10
    elif case == "3x3-extreme-weights":  # sums up to 2304 x 255 x 128 (2^26), most outputs saturated
        assert np.unique(want).size > 20
    else:
        assert np.unique(want).size > 100 or want.size < 2000


def test_the_scale_is_x_scale_times_w_scale_over_y_scale_in_that_order() -> None:
    """Each output channel gets a w_scale for which (x_scale x w_scale) / y_scale and x_scale x (w_scale / y_scale)
    differ in float32, and a bias whose products with the two round to different bytes; x is all its zero point,
    so each sum is the bias. ONNX Runtime's bytes are the first order's, and so are the op's."""
    rng = np.random.default_rng(5)
    xs, ys = np.float32(0.0123), np.float32(0.0771)
    candidates = np.arange(-60000, 60000, dtype=np.float32)
    scales: list[np.float32] = []
    biases: list[int] = []
    while len(scales) < 32:
        ws = np.float32(rng.uniform(1e-3, 3e-3))
        differ = np.flatnonzero(np.rint(candidates * ((xs * ws) / ys)) != np.rint(candidates * (xs * (ws / ys))))
        if differ.size:
            scales.append(ws)
            biases.append(int(candidates[differ[0]]))
    model, x = conv(k=1, h=2, w=3, x_zp=77, y_zp=128)
    init = {t.name: t for t in model.graph.initializer}
    init["x_scale"].CopyFrom(numpy_helper.from_array(xs, "x_scale"))
    init["y_scale"].CopyFrom(numpy_helper.from_array(ys, "y_scale"))
    init["w_scale"].CopyFrom(numpy_helper.from_array(np.array(scales, np.float32), "w_scale"))
    init["bias"].CopyFrom(numpy_helper.from_array(np.array(biases, np.int32), "bias"))
    x[:] = 77
    want, got = run(model, x), run(rewritten(model), x)
    ws_array, b_array = np.array(scales, np.float32), np.array(biases, np.float32)
    other = (np.rint(b_array * (xs * (ws_array / ys))) + 128).astype(np.uint8)
    assert np.all(want[0, 0, 0] != other)  # the other order would give other bytes on every channel
    assert np.array_equal(want, got)


@pytest.mark.parametrize("bias", [0, 10**9], ids=["no-bias", "bias-1e9-wraps"])
def test_sums_at_the_int32_limit(bias: int) -> None:
    """The deepest product the op takes (a 1x1 convolution of 65536 channels) with x all 255 and weights all -128
    or all 127: sums of -2139095040 and 2122383360 (within 2^31 of 0), -127.5 (an exact half) and 126.504 at the
    scale 2^-24; with a bias of 1e9 the second sum plus the bias leaves int32 and wraps, as ONNX Runtime's add
    does. ONNX Runtime's bytes either way."""
    model, x = conv(k=1, h=1, w=2, c=65536, x_zp=0, y_zp=128, scales=(1.0, 1.0, 2.0**24))
    init = {t.name: t for t in model.graph.initializer}
    w = np.full((32, 65536, 1, 1), 127, np.int8)
    w[:16] = -128
    init["w"].CopyFrom(numpy_helper.from_array(w, "w"))
    init["w_scale"].CopyFrom(numpy_helper.from_array(np.ones(32, np.float32), "w_scale"))
    init["bias"].CopyFrom(numpy_helper.from_array(np.full(32, bias, np.int32), "bias"))
    x[:] = 255
    want, got = run(model, x), run(rewritten(model), x)
    assert np.array_equal(want, got)
    # -127.5 -> -128 (half to even) + 128; 126.504 -> 127 + 128. With the bias: -1139095040 x 2^-24 = -67.9 -> 60;
    # the wrapped sum, 3122383360 - 2^32, x 2^-24 = -69.9 -> 58 (saturated, it would have been 255).
    assert list(np.unique(want)) == ([0, 255] if bias == 0 else [58, 60])


def test_a_nan_scale_gives_the_lowest_byte() -> None:
    """A NaN scale (the rewrite never makes one: it declines non-finite scales) clamps to the lowest value, as
    max_ps does with NaN: every build gives byte 0 (low = -zero point, plus the zero point)."""
    o = operands(scale=np.full(32, np.nan, np.float32), y_zero_point=np.uint8(9))
    so = session_options(1)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    session = ort.InferenceSession(qconv_model(o).SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = session.run(None, o)[0]
    assert y.shape == (1, 5, 6, 32) and not y.any()


def test_an_empty_batch_gives_an_empty_y() -> None:
    model, x = conv(h=5, w=6)
    assert run(rewritten(model), x[:0]).shape == (0, 5, 6, 32)


def qconv_model(operands: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("QConv", list(operands), ["y"], domain="ai.m2fp")], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
         for n, a in operands.items()], [helper.make_tensor_value_info("y", TensorProto.UINT8, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.m2fp", 1)])


def operands(**changes: Any) -> dict[str, np.ndarray]:
    """A 3x3 QConv's operands (x (1, 5, 6, 64), 32 output channels) with ``changes``."""
    o = {"x": np.ones((1, 5, 6, 64), np.uint8), "x_zero_point": np.uint8(3), "tiles": np.ones(9 * 64 * 32, np.int8),
         "bias": np.zeros(32, np.int32), "scale": np.ones(32, np.float32), "y_zero_point": np.uint8(0),
         "geometry": np.array([3, 3, 1, 1, 1, 1, 1, 1], np.int64)}
    return {k: np.asarray(v) for k, v in {**o, **changes}.items()}


def geometry(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


HOSTILE: dict[str, tuple[dict[str, np.ndarray], str]] = {
    "x-3-d": (operands(x=np.ones((5, 6, 64), np.uint8)), r"x must be \(N, H, W, C\), not \(5, 6, 64\)"),
    "C-32": (operands(x=np.ones((1, 5, 6, 32), np.uint8)), r"C must be a multiple of 64; x \(1, 5, 6, 32\)"),
    "geometry-7": (operands(geometry=geometry(3, 3, 1, 1, 1, 1, 1)), r"geometry must be 8 values"),
    "stride-2": (operands(geometry=geometry(3, 3, 2, 2, 1, 1, 1, 1)), r"strides must be 1"),
    "pad-3": (operands(geometry=geometry(3, 3, 1, 1, 3, 1, 1, 1)), r"pads must be 0 to the kernel size - 1"),
    "pad-negative": (operands(geometry=geometry(3, 3, 1, 1, 1, -1, 1, 1)), r"pads must be 0 to the kernel size - 1"),
    "kernel-0": (operands(geometry=geometry(0, 3, 1, 1, 0, 0, 0, 0)), r"kernel sizes must be 1 to 15"),
    "kernel-16": (operands(geometry=geometry(16, 1, 1, 1, 0, 0, 0, 0)), r"kernel sizes must be 1 to 15"),
    "Cout-48": (operands(bias=np.zeros(48, np.int32)), r"bias must be \(Cout\) with Cout a multiple of 32, not \(48\)"),
    "bias-2-d": (operands(bias=np.zeros((1, 32), np.int32)), r"bias must be \(Cout\)"),
    "scale-(64)": (operands(scale=np.ones(64, np.float32)), r"scale must be \(Cout\) = \(32\), not \(64\)"),
    "tiles-short": (operands(tiles=np.ones(100, np.int8)),
                    r"tiles must hold kh x kw x C x Cout = 18432 weights, not 100"),
    "depth-72000": (operands(x=np.ones((1, 15, 15, 320), np.uint8), tiles=np.ones(15 * 15 * 320 * 32, np.int8),
                             geometry=geometry(15, 15, 1, 1, 0, 0, 0, 0)), r"kh x kw x C must be at most 65536"),
    "x-zp-(2)": (operands(x_zero_point=np.zeros(2, np.uint8)), r"x_zero_point and y_zero_point must be scalars"),
    "y-zp-(1,1)": (operands(y_zero_point=np.zeros((1, 1), np.uint8)), r"x_zero_point and y_zero_point must be scalars"),
    "x-smaller-than-kernel": (operands(x=np.ones((1, 1, 6, 64), np.uint8), geometry=geometry(3, 3, 1, 1, 0, 1, 0, 1)),
                              r"x \(1, 1, 6, 64\) is smaller than the kernel"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_inputs_are_refused(case: str) -> None:
    """Wrong ranks, channel counts that are not multiples of the tiles, geometry that is not a stride-1 convolution
    with pads inside the kernel, constants of the wrong size, an input smaller than the kernel: refused with the
    op's own message, not run."""
    o, message = HOSTILE[case]
    so = session_options(1)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    session = ort.InferenceSession(qconv_model(o).SerializeToString(), so, providers=["CPUExecutionProvider"])
    with pytest.raises((ort_errors.InvalidArgument, ort_errors.Fail), match=r"ai\.m2fp::QConv: " + message):
        session.run(None, o)


@pytest.mark.parametrize("cap", ["avx512-vnni", "generic"])
def test_every_narrower_build_gives_the_same_bits(cap: str) -> None:
    """Under M2FP_QFFN_KERNEL=avx512-vnni or =generic (read once per process) the op's blocks run with AVX-512 VNNI
    or the plain loops: every op test of this module passes on them too, in a child process."""
    passes_capped(cap, __file__, "op_matches or order or int32 or nan_scale or empty_batch or hostile",
                  len(CASES) + 2 + 2 + 1 + len(HOSTILE))


def test_the_weights_are_packed_as_the_tiles_read_them() -> None:
    """Tile layout: for each 16 output channels, depth rows 4 at a time, each channel's 4 bytes side by side;
    depth is tap-major (ky, kx, then the input channel)."""
    rng = np.random.default_rng(2)
    w = rng.integers(-127, 128, (32, 64, 3, 3), dtype=np.int8)
    tiles = qconv.pack(w)
    depth = 9 * 64
    for n, ci, ky, kx in [(0, 0, 0, 0), (17, 5, 2, 1), (31, 63, 2, 2), (3, 60, 1, 0)]:
        k = (ky * 3 + kx) * 64 + ci
        assert tiles[(n // 16) * depth * 16 + (k // 4) * 64 + (n % 16) * 4 + k % 4] == w[n, ci, ky, kx]


DECLINED: dict[str, dict[str, Any]] = {
    "channels-first": {"channels_last": 0},
    "group-2": {"group": 2, "c": 128},
    "stride-2": {"strides": [2, 2]},
    "dilation-2": {"dilations": [2, 2], "h": 12, "w": 12},
    "C-32": {"c": 32},
    "Cout-48": {"cout": 48},
    "auto-pad": {"auto_pad": "SAME_UPPER", "pads": None},
    "pad-3": {"pads": [3, 1, 1, 1], "h": 12},
    "depth-over-65536": {"k": 15, "c": 320, "h": 15, "w": 15, "pads": [0, 0, 0, 0]},
    "kernel-shape-not-the-weights'": {"kernel_shape": [5, 5]},
    "kernel-16x1": {"k": (16, 1), "pads": [0, 0, 0, 0], "h": 20},
    "unknown-attribute": {"activation": "Relu"},
    "infinite-scale": {"scales": (0.02, 2e-3, 0.0)},
}


def declined(kind: str) -> onnx.ModelProto:
    options = dict(DECLINED.get(kind, {}))
    if options.get("pads", []) is None:
        del options["pads"]
        model, _ = conv(pads=[0, 0, 0, 0])
        node = model.graph.node[0]
        node.attribute.remove(next(a for a in node.attribute if a.name == "pads"))
        node.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
        return model
    model, _ = conv(**options)
    init = {t.name: t for t in model.graph.initializer}
    if kind == "weight-zero-point":
        init["w_zero_point"].CopyFrom(numpy_helper.from_array(np.ones(32, np.int8), "w_zero_point"))
    elif kind == "uint8-weights":
        w = numpy_helper.to_array(init["w"]).view(np.uint8)
        init["w"].CopyFrom(numpy_helper.from_array(w, "w"))
        init["w_zero_point"].CopyFrom(numpy_helper.from_array(np.zeros(32, np.uint8), "w_zero_point"))
    elif kind == "x-scale-computed":  # a graph input, not an initialiser
        model.graph.initializer.remove(init["x_scale"])
        model.graph.input.append(helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, []))
    elif kind == "x-scale-(2)":
        init["x_scale"].CopyFrom(numpy_helper.from_array(np.ones(2, np.float32), "x_scale"))
    elif kind == "bias-overflow":  # the bias minus the zero point x the weight sums leaves int32
        init["bias"].CopyFrom(numpy_helper.from_array(np.full(32, -2**31 + 5, np.int32), "bias"))
        w = np.full((32, 64, 3, 3), 127, np.int8)
        init["w"].CopyFrom(numpy_helper.from_array(w, "w"))
    return model


DECLINED_KINDS = [*DECLINED, "weight-zero-point", "uint8-weights", "x-scale-computed", "x-scale-(2)", "bias-overflow"]


@pytest.mark.parametrize("kind", DECLINED_KINDS)
def test_nodes_that_do_not_qualify_are_left_alone(kind: str) -> None:
    """NCHW, groups, strides, dilations, channel counts off the tiles, automatic or oversized pads, a depth past
    the int32 sums, weights with a zero point or unsigned, a scale that is not a constant scalar, a bias that would
    leave int32: the graph stays as it was, byte for byte."""
    model = declined(kind)
    before = model.SerializeToString()
    assert qconv.rewrite(model) == 0
    assert model.SerializeToString() == before


def test_the_rewrite_drops_only_what_the_old_node_alone_read() -> None:
    """The weights and bias go (the packed tiles take their place); an initialiser another node reads stays; the
    count is in the metadata and the library's domain is imported once."""
    model, x = conv(h=5, w=6)
    other = helper.make_node("DequantizeLinear", ["y", "x_scale", "x_zero_point"], ["z"], name="after")
    model.graph.node.append(other)
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert qconv.rewrite(model) == 1
    names = {t.name for t in model.graph.initializer}
    assert {"w", "bias", "w_scale", "w_zero_point", "y_scale"}.isdisjoint(names)
    assert {"x_scale", "x_zero_point", "y_zero_point", "y_qconv_tiles"} <= names
    assert {p.key: p.value for p in model.metadata_props}[qconv.METADATA_KEY] == "1"
    assert [o.domain for o in model.opset_import].count("ai.m2fp") == 1
    so = session_options(2)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


def two_convolutions() -> tuple[onnx.ModelProto, np.ndarray]:
    """Two QLinearConv nodes reading one set of weights, x_scale also read inside an If node's branch, the weights
    listed as graph inputs too (as old models list initialisers), and a 9-input node whose bias is the empty name
    (none)."""
    model, x = conv(h=5, w=6, cout=64)
    graph = model.graph
    first = graph.node[0]
    second = onnx.NodeProto()
    second.CopyFrom(first)
    del second.input[:]
    second.input.extend(["y", *first.input[1:8], ""])
    second.output[0], second.name = "y2", "conv2"
    graph.node.append(second)
    graph.input.append(helper.make_tensor_value_info("w", TensorProto.INT8, [64, 64, 3, 3]))
    branch = helper.make_graph([helper.make_node("Identity", ["x_scale"], ["s"])], "branch", [],
                               [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])])
    graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    graph.node.append(helper.make_node("If", ["flag"], ["picked"], then_branch=branch, else_branch=branch))
    graph.output.extend([helper.make_tensor_value_info("y2", TensorProto.UINT8, None),
                         helper.make_tensor_value_info("picked", TensorProto.FLOAT, None)])
    return model, x


def test_two_nodes_sharing_weights_get_their_own_constants() -> None:
    """Each node's constants are named after its output (unique in a graph); the weights go from the initialisers
    and the graph inputs once no node reads them; x_scale, read in a branch, stays."""
    model, x = two_convolutions()
    want = run(model, x)
    assert qconv.rewrite(model) == 2
    assert [n.op_type for n in model.graph.node] == ["QConv", "QConv", "If"]
    names = {t.name for t in model.graph.initializer}
    assert {"y_qconv_tiles", "y2_qconv_tiles", "x_scale"} <= names and "w" not in names
    assert [i.name for i in model.graph.input] == ["x"]
    so = session_options(2)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})
    reference = ort.InferenceSession(two_convolutions()[0].SerializeToString(), providers=["CPUExecutionProvider"])
    assert all(np.array_equal(a, b) for a, b in zip(reference.run(None, {"x": x}), got, strict=True))
    assert np.array_equal(want, got[0]) and np.unique(got[1]).size > 50


def test_the_command_writes_the_rewritten_graph_only_when_a_node_qualifies(tmp_path: Path) -> None:
    """``python -m m2fp_service.int8graph IN OUT``: the count on stdout; OUT written when it is not 0, IN untouched."""
    cases = {"qualifies": conv()[0], "declined": declined("stride-2")}
    for name, model in cases.items():
        source, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}-out.onnx"
        onnx.save(model, source)
        before = source.read_bytes()
        child = subprocess.run([sys.executable, "-m", "m2fp_service.int8graph", str(source), str(out)],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == ("1" if name == "qualifies" else "0")
        assert out.is_file() is (name == "qualifies") and source.read_bytes() == before
    assert [n.op_type for n in onnx.load(str(tmp_path / "qualifies-out.onnx")).graph.node] == ["QConv"]
    usage = subprocess.run([sys.executable, "-m", "m2fp_service.int8graph", str(tmp_path / "qualifies.onnx")],
                           capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_without_convolutions_the_command_runs_the_other_int8_rewrites_only(tmp_path: Path) -> None:
    """``--no-convolutions`` (a CPU with AVX-512 VNNI but no AMX, where ONNX Runtime's convolutions are faster): a
    graph with a convolution and nothing else to rewrite is not written (0), the convolution stays."""
    source, out = tmp_path / "conv.onnx", tmp_path / "out.onnx"
    onnx.save(conv()[0], source)
    child = subprocess.run([sys.executable, "-m", "m2fp_service.int8graph", str(source), str(out), "--no-convolutions"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "0" and not out.exists()
    assert "0 INT8 convolution(s)" in child.stderr


def test_a_rewrite_that_fails_is_left_out_and_the_others_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``int8graph.main``: should one rewrite raise (here the group norms'), it is reported and the graph stays as
    it was before it; the convolution is still replaced and OUT written."""
    source, out = tmp_path / "conv.onnx", tmp_path / "out.onnx"
    onnx.save(conv()[0], source)

    def broken(model: onnx.ModelProto) -> int:
        del model.graph.node[:]  # half done, then fails
        raise ValueError("broken rewrite")

    monkeypatch.setattr(qgroupnorm, "rewrite", broken)
    assert int8graph.main([str(source), str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == "1" and "INT8 group norm rewrite failed" in printed.err and "broken" in printed.err
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["QConv"]


def test_a_file_the_rewrite_cannot_read_is_left_as_it_was(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The engine's child process fails on a damaged file: a failure (None, not 0), the file untouched, a warning."""
    damaged = tmp_path / "optimised.onnx"
    damaged.write_bytes(b"not a protobuf")
    with caplog.at_level(logging.WARNING, logger="m2fp.engine"):
        assert engine_module.int8_graph_rewritten(damaged, tmp_path / "out.onnx", convolutions=True) is None
    assert damaged.read_bytes() == b"not a protobuf" and not (tmp_path / "out.onnx").exists()
    assert "INT8 rewrite of the saved graph failed" in caplog.text


@pytest.fixture(scope="module")
def int8_path(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    quantize_file(tiny_model_path, out, TEST_CONFIG, [], report=lambda _: None)
    return out


def cached_ops(folder: Path) -> set[str]:
    (cached,) = folder.glob("*.onnx")
    return {n.op_type for n in onnx.load(str(cached), load_external_data=False).graph.node}


def test_the_engine_runs_the_tiny_int8_model_s_convolutions_as_the_library_s_with_the_same_outputs(
        int8_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the library runs AMX (here, or said so: its VNNI build and plain loops give the same bytes), the
    optimised graph the engine caches has the tiny INT8 model's 64-channel convolutions as QConv nodes (counted;
    again on a cache hit); the raw outputs are, bit for bit, those of the same engine where the library says
    "avx512-vnni" (ONNX Runtime's convolutions, in its own cache file, where the same child process runs the other
    INT8 rewrites only: the group norms, which are not ONNX Runtime's bit for bit (test_qgroupnorm), the
    DequantizeLinear copies and the softmaxes' masks, which change no bit)."""
    tiles_dir, plain_dir = tmp_path / "amx", tmp_path / "vnni"
    monkeypatch.setattr(engine_module, "int8_products", lambda kernel: "amx")
    tiles = ParsingEngine(int8_path, options=EngineOptions(intra_op_threads=2, cache_dir=tiles_dir), warmup=False)
    again = ParsingEngine(int8_path, options=EngineOptions(intra_op_threads=2, cache_dir=tiles_dir), warmup=False)
    assert (tiles.cache_status, again.cache_status) == ("cache written", "cache hit")
    assert tiles.int8_convolutions == again.int8_convolutions > 10
    assert "QConv" in cached_ops(tiles_dir) and len(list(tiles_dir.iterdir())) == 1  # no leftover file
    # The same child fuses the group norms, drops DequantizeLinear copies and gives the 3 masked softmaxes their mask.
    meta = tiles.session.get_modelmeta().custom_metadata_map
    assert (meta[qgroupnorm.METADATA_KEY], meta[softmax.MASK_METADATA_KEY], int(meta[qdedupe.METADATA_KEY]) > 10) == (
        "2", "3", True)
    monkeypatch.setattr(engine_module, "int8_products", lambda kernel: "avx512-vnni")
    plain = ParsingEngine(int8_path, options=EngineOptions(intra_op_threads=2, cache_dir=plain_dir), warmup=False)
    assert (plain.cache_status, plain.int8_convolutions, plain.int8_group_norms) == ("cache written", 0, 2)
    assert "QConv" not in cached_ops(plain_dir) and "QGroupNorm" in cached_ops(plain_dir)
    x = np.random.default_rng(13).uniform(0, 255, (1, 3, 128, 192)).astype(np.float32)
    want, got, hit = plain.run(x), tiles.run(x), again.run(x)
    assert np.unique(want.mask_logits).size > 100
    for out in (got, hit):
        assert np.array_equal(want.class_logits, out.class_logits) and np.array_equal(want.mask_logits, out.mask_logits)


def test_a_rewritten_graph_that_does_not_load_leaves_onnx_runtime_s(
        int8_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Should the graph with QConv nodes fail to open, the engine keeps ONNX Runtime's session and caches its graph
    (a warning), and no file is left beside the cache."""
    monkeypatch.setattr(engine_module, "int8_products", lambda kernel: "amx")
    opened = engine_module._open_saved

    def refuse(path: Path, options: EngineOptions, kernel: Path | None) -> Any:
        if path.name.endswith(".int8"):
            raise RuntimeError("cannot load this graph")
        return opened(path, options, kernel)

    monkeypatch.setattr(engine_module, "_open_saved", refuse)
    with caplog.at_level(logging.WARNING, logger="m2fp.engine"):
        engine = ParsingEngine(int8_path, options=EngineOptions(intra_op_threads=2, cache_dir=tmp_path), warmup=False)
    assert (engine.cache_status, engine.int8_convolutions) == ("cache written", 0)
    assert "does not load or run (cannot load this graph)" in caplog.text
    assert "QConv" not in cached_ops(tmp_path) and len(list(tmp_path.iterdir())) == 1
    assert engine.run(np.zeros((1, 3, 64, 64), np.float32)).mask_logits.size > 0


def test_a_rewritten_graph_that_fails_to_run_leaves_onnx_runtime_s(
        int8_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Should a rewrite take a graph its op refuses at run time (here the real rewrite's output with a group norm
    given 7 groups, which do not divide its channels), the engine's warm-up run finds it before the
    file is replaced: ONNX Runtime's session and graph stay and are cached (a warning), and requests run."""
    monkeypatch.setattr(engine_module, "int8_products", lambda kernel: "amx")
    rewritten = engine_module.int8_graph_rewritten

    def refused_at_run(optimised: Path, out: Path, convolutions: bool) -> int | None:
        count = rewritten(optimised, out, convolutions)
        model = onnx.load(str(out))
        norm = next(n for n in model.graph.node if n.op_type == "QGroupNorm")
        groups = next(t for t in model.graph.initializer if t.name == norm.input[6])
        groups.CopyFrom(numpy_helper.from_array(np.array(7, np.int64), groups.name))
        onnx.save(model, str(out))
        return count

    monkeypatch.setattr(engine_module, "int8_graph_rewritten", refused_at_run)
    with caplog.at_level(logging.WARNING, logger="m2fp.engine"):
        engine = ParsingEngine(int8_path, options=EngineOptions(intra_op_threads=2, cache_dir=tmp_path), warmup=False)
    assert (engine.cache_status, engine.int8_convolutions, engine.int8_group_norms) == ("cache written", 0, 0)
    assert "does not load or run" in caplog.text and "groups must divide C" in caplog.text
    assert "QGroupNorm" not in cached_ops(tmp_path) and len(list(tmp_path.iterdir())) == 1
    assert engine.run(np.zeros((1, 3, 64, 64), np.float32)).mask_logits.size > 0


def test_a_failed_rewrite_is_not_cached(int8_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite that fails (a timeout, a killed child) leaves ONNX Runtime's session for this start and no cache
    file, so the next start tries again, and then caches the graph with the library's convolutions."""
    monkeypatch.setattr(engine_module, "int8_products", lambda kernel: "amx")
    options = EngineOptions(intra_op_threads=2, cache_dir=tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "int8_graph_rewritten", lambda optimised, out, convolutions: None)
        failed = ParsingEngine(int8_path, options=options, warmup=False)
    assert (failed.cache_status, failed.int8_convolutions) == (
        "cache not written: the INT8 rewrite of the saved graph failed", 0)
    assert list(tmp_path.iterdir()) == []
    again = ParsingEngine(int8_path, options=options, warmup=False)
    assert again.cache_status == "cache written" and again.int8_convolutions > 10


def test_an_fp32_model_is_not_given_to_the_rewrite(tiny_model_path: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An FP32 model has no integer convolution: the engine does not parse its saved graph again."""
    monkeypatch.setattr(engine_module, "int8_products", lambda kernel: "amx")

    def unexpected(optimised: Path, out: Path, convolutions: bool) -> int:
        raise AssertionError("the rewrite ran on an FP32 model")

    monkeypatch.setattr(engine_module, "int8_graph_rewritten", unexpected)
    engine = ParsingEngine(tiny_model_path, options=EngineOptions(intra_op_threads=2, cache_dir=tmp_path), warmup=False)
    assert (engine.cache_status, engine.int8_convolutions) == ("cache written", 0)
