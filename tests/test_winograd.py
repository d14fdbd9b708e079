"""3x3 convolutions as Winograd F(4x4, 3x3) (``winograd.rewrite`` + ``native/m2fp_winograd.cc``).

Each comparison runs a small model twice in the real ONNX Runtime: as written (ONNX Runtime's own
convolution) and rewritten, with the kernel library registered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from m2fp_service import winograd
from m2fp_service.engine import BUILT_MSDA_KERNEL, EngineOptions, ParsingEngine, session_options

# The built library: a failure in CI, a skip elsewhere when it is missing (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernel_library")


def conv_model(c: int, k: int, *, relu: bool = True, bias: bool = True, seed: int = 0,
               **attrs: object) -> onnx.ModelProto:
    """x (N, c, H, W) -> Conv 3x3 (pads 1 unless given) [-> Relu] -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b"))
        inputs.append("b")
    attrs = {"pads": [1, 1, 1, 1], **attrs}
    nodes = [helper.make_node("Conv", inputs, ["c" if relu else "y"], name="conv", **attrs)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c, None, None])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray, library: bool) -> np.ndarray:
    so = session_options(2)
    if library:
        so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]  # type: ignore[no-any-return]


def rewritten(model: onnx.ModelProto, size: tuple[int, int] = winograd.NOMINAL_SIZE, count: int = 1) -> onnx.ModelProto:
    """A copy of ``model`` with its ``count`` qualifying convolutions rewritten."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert winograd.rewrite(copy, size) == count
    return copy


def assert_same(expected: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert float(np.abs(expected).max()) > 0.1  # the comparison means something
    # F(4x4, 3x3) in float32: ~1e-5 of the output's scale (Lavin & Gray's points 0, +-1, +-2)
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())


@pytest.mark.parametrize("relu,bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("n,c,k,h,w", [(1, 128, 128, 40, 72), (2, 136, 256, 13, 17), (1, 256, 128, 5, 3)])
def test_rewritten_convolution_matches(n: int, c: int, k: int, h: int, w: int, relu: bool, bias: bool) -> None:
    model = conv_model(c, k, relu=relu, bias=bias)
    fast = rewritten(model, (h, w))
    assert [node.op_type for node in fast.graph.node] == [
        "Winograd4x3Input", "MatMul", "Winograd4x3OutputRelu" if relu else "Winograd4x3Output"]
    x = np.random.default_rng(1).standard_normal((n, c, h, w)).astype(np.float32)
    expected = run(model, x, library=False)
    if relu:
        assert (expected == 0).mean() > 0.2  # the activation is there to be matched
    assert_same(expected, run(fast, x, library=True))


@pytest.mark.parametrize("band_bytes", [1 << 20, 1])
def test_bands_match_and_cover_every_size(band_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A convolution run in bands of tile rows: the same result at the nominal size, at sizes
    that are not multiples of 4, and at sizes with fewer tile rows than bands (empty bands)."""
    monkeypatch.setattr(winograd, "MAX_BAND_BYTES", band_bytes)
    model = conv_model(128, 128)
    fast = rewritten(model, (64, 40))
    bands = sum(node.op_type == "Winograd4x3Input" for node in fast.graph.node)
    assert bands == (3 if band_bytes == 1 << 20 else 16)  # 36*16*10*128*4 B = 2.9 MB; 1 B: one tile row each
    assert fast.graph.node[-1].op_type == "Concat"
    rng = np.random.default_rng(2)
    for h, w in [(64, 40), (61, 38), (9, 5), (2, 7), (1, 1)]:
        x = rng.standard_normal((1, 128, h, w)).astype(np.float32)
        assert_same(run(model, x, library=False), run(fast, x, library=True))


@pytest.mark.parametrize("attrs,c,k", [
    ({"strides": [2, 2]}, 128, 128),
    ({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, 128, 128),
    ({"group": 2}, 256, 128),
    ({"pads": [0, 0, 0, 0]}, 128, 128),
    ({"pads": [1, 1, 0, 0]}, 128, 128),
    ({}, 64, 128),    # too few channels in
    ({}, 128, 64),    # too few out
    ({}, 132, 128),   # not a multiple of 8
    ({}, 512, 256),   # too many in
    ({}, 256, 512),   # too many out
], ids=["stride", "dilation", "group", "no-pad", "uneven-pad", "thin-in", "thin-out", "odd-channels", "wide-in",
        "wide-out"])
def test_convolutions_that_do_not_qualify_are_left_alone(attrs: dict[str, object], c: int, k: int) -> None:
    if attrs.get("group") == 2:
        model = conv_model(c, k, relu=False)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((k, c // 2, 3, 3), np.float32), "w"))
        model.graph.node[0].attribute.append(helper.make_attribute("group", 2))
    else:
        model = conv_model(c, k, **attrs)
    before = model.SerializeToString()
    assert winograd.rewrite(model) == 0
    assert model.SerializeToString() == before


def test_quantised_and_1x1_convolutions_are_left_alone() -> None:
    """INT8 (QDQ) weights come from a DequantizeLinear, not a float initialiser."""
    model = conv_model(128, 128, relu=False)
    weight = model.graph.initializer[0]
    q = numpy_helper.from_array(np.zeros(numpy_helper.to_array(weight).shape, np.int8), "wq")
    model.graph.initializer.extend([q, numpy_helper.from_array(np.float32(0.01), "s"),
                                    numpy_helper.from_array(np.int8(0), "z")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]))
    del model.graph.initializer[0]
    assert winograd.rewrite(model) == 0
    one = conv_model(128, 128)
    one.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((128, 128, 1, 1), np.float32), "w"))
    assert winograd.rewrite(one) == 0


def residual_model(c: int = 128, batch: int | str = 1) -> onnx.ModelProto:
    """x (1, 3, h, w) -> stem conv -> three ResNet bottleneck blocks of ``c`` channels (the second halves the
    size: its 3x3 and its shortcut at stride 2) -> y: 3x3 convolutions at stride 1 in the first and third."""
    rng = np.random.default_rng(5)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, name: str, k: int, c_in: int, stride: int = 1) -> str:
        w = (rng.standard_normal((c, c_in, k, k)) / np.sqrt(k * k * c_in)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"),
                      numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
                                      pads=[k // 2] * 4, strides=[stride, stride]))
        return f"{name}.y"

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
        return f"{x}.relu"

    x = relu(conv("x", "stem", 3, 3))
    for block, stride in (("a", 1), ("b", 2), ("c", 1)):
        main = relu(conv(relu(conv(x, f"{block}.conv1", 1, c)), f"{block}.conv2", 3, c, stride))
        shortcut = conv(x, f"{block}.shortcut", 1, c, stride) if stride > 1 else x
        nodes.append(helper.make_node("Add", [conv(main, f"{block}.conv3", 1, c), shortcut], [f"{block}.sum"],
                                      name=f"{block}.add"))
        x = relu(f"{block}.sum")
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def optimised_ops(model: onnx.ModelProto, tmp_path: Path) -> list[tuple[str, str]]:
    """(domain, op type) of every node of ``model`` as ONNX Runtime optimises it (the engine's settings)."""
    so = session_options(2)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [(node.domain, node.op_type) for node in onnx.load(so.optimized_model_filepath).graph.node]


def test_residual_blocks_are_rewritten_and_keep_their_fused_add(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The 3x3 convolutions of ResNet blocks: rewritten, and ONNX Runtime still fuses each block's Add and Relu
    into its last convolution (its layout optimiser needs the declared sizes to see that the Add's inputs have
    the same shape, also after a stride of 2); the same result as the blocks as written, at odd sizes too."""
    model = residual_model()
    assert ("", "Add") not in optimised_ops(model, tmp_path)  # what ONNX Runtime does with the blocks as written
    fast = rewritten(model, (64, 64), count=2)  # blocks a and c (b's 3x3 has stride 2); one band each
    ops = optimised_ops(fast, tmp_path)
    assert ops.count((winograd.DOMAIN, "Winograd4x3OutputRelu")) == 2
    assert ("", "Add") not in ops and ("", "Relu") not in ops
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in fast.graph.value_info}
    assert shapes["a.conv3.y"] == shapes["stem.y.relu"] == [1, 128, "h", "w"]
    assert shapes["c.conv3.y"] == shapes["b.sum.relu"] == shapes["c.conv2.y.relu"] == [1, 128, "ceil(h/2)", "ceil(w/2)"]
    rng = np.random.default_rng(6)
    for h, w in [(32, 48), (29, 23), (5, 3)]:
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        assert_same(run(model, x, library=False), run(fast, x, library=True))

    # Without the declared sizes the rewritten blocks add and rectify in nodes of their own.
    monkeypatch.setattr(winograd, "declare_spatial_shapes", lambda model: 0)
    assert optimised_ops(rewritten(model, (64, 64), count=2), tmp_path).count(("", "Add")) == 2


STEM = ["stem.y", "stem.y.relu"]


def pool_after_stem(graph: onnx.GraphProto, **attrs: object) -> None:
    """A MaxPool ``attrs`` between ``residual_model``'s stem and its first block (output "pool.y")."""
    stem = next(i for i, n in enumerate(graph.node) if n.name == "stem.y.relu")
    for later in graph.node[stem + 1:]:
        later.input[:] = ["pool.y" if name == "stem.y.relu" else name for name in later.input]
    graph.node.insert(stem + 1, helper.make_node("MaxPool", ["stem.y.relu"], ["pool.y"], **attrs))


@pytest.mark.parametrize("change,declared", [
    ("fixed-size", []),                                   # shape inference knows every size: nothing to declare
    ("ceil-mode-pool", STEM),                             # a pooling rounding up: not ceil(h/2), nothing after it
    ("dilated", [*STEM, "a.conv1.y", "a.conv1.y.relu"]),  # block a's 3x3 dilated: its size is not traced
])
def test_declared_sizes_stop_where_they_are_not_exact(change: str, declared: list[str]) -> None:
    model = residual_model()
    graph = model.graph
    if change == "fixed-size":
        for dim in graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_value = 64
    elif change == "ceil-mode-pool":
        pool_after_stem(graph, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], ceil_mode=1)
    else:
        conv2 = next(n for n in graph.node if n.name == "a.conv2")
        del conv2.attribute[:]
        conv2.attribute.extend([helper.make_attribute("pads", [2] * 4), helper.make_attribute("dilations", [2, 2])])
    assert winograd.declare_spatial_shapes(model) == len(declared)
    assert [v.name for v in graph.value_info] == declared
    if change != "fixed-size":  # and as written, every block's tensors are declared
        assert winograd.declare_spatial_shapes(residual_model()) == 2 + 3 * 7 + 1  # 7 per block, b's shortcut


def declared_after(model: onnx.ModelProto) -> list[str]:
    winograd.declare_spatial_shapes(model)
    return [v.name for v in model.graph.value_info]


def input_op(op: str, constant: np.ndarray, first: bool = False) -> onnx.ModelProto:
    """``residual_model`` with ``x op constant`` (or ``constant op x``) in front of the stem, as an exported
    model normalises its input."""
    model = residual_model()
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(constant.astype(np.float32), "k"))
    graph.node[0].input[0] = "x.k"
    graph.node.insert(0, helper.make_node(op, ["k", "x"] if first else ["x", "k"], ["x.k"]))
    return model


@pytest.mark.parametrize("constant,first,traced", [
    (np.full((1, 3, 1, 1), 2), False, True),    # per channel, as the exporter's normalisation
    (np.float32(2), False, True),               # a scalar
    (np.full((1, 3, 4, 4), 2), False, False),   # would broadcast the size up
    (np.full((2, 1, 1, 1), 2), False, False),   # would double the batch
    (np.full((1, 3, 1, 1), 2), True, False),    # first: not followed (no gain worth the rule)
], ids=["per-channel", "scalar", "spatial", "batch", "first"])
def test_declared_sizes_follow_only_constants_that_keep_the_shape(constant: np.ndarray, first: bool,
                                                                  traced: bool) -> None:
    names = declared_after(input_op("Sub", constant, first))
    assert ("c.sum.relu" in names) == traced and ("x.k" in names) == traced
    if not traced:
        assert names == []


def test_a_constant_a_graph_input_can_override_is_not_followed() -> None:
    model = input_op("Div", np.full((1, 3, 1, 1), 2))
    model.graph.input.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 3, 1, 1]))
    assert declared_after(model) == []


@pytest.mark.parametrize("change", ["maxpool-k2-p0", "conv-p0", "stride-3", "same-upper", "unequal-add"])
def test_declared_sizes_stop_at_a_size_they_cannot_name(change: str) -> None:
    """A layer whose output is not ceil(size / stride) at a stride of 1 or 2 ends the trace, and an Add of two
    different sizes: nothing after them is declared."""
    model = residual_model()
    graph = model.graph
    node = next(n for n in graph.node if n.name == ("b.conv2" if change == "unequal-add" else "a.conv2"))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if change == "maxpool-k2-p0":
        pool_after_stem(graph, kernel_shape=[2, 2], strides=[2, 2])
    else:
        attrs |= {"conv-p0": {"pads": [0] * 4}, "stride-3": {"strides": [3, 3]},
                  "unequal-add": {"strides": [1, 1]}}.get(change, {})
        if change == "same-upper":
            del attrs["pads"]
            attrs["auto_pad"] = "SAME_UPPER"
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    names = declared_after(model)
    assert "stem.y.relu" in names and not any(n.startswith("c.") for n in names)
    if change == "unequal-add":  # b's main path keeps the size, its shortcut halves it
        assert {"b.conv3.y", "b.shortcut.y"} <= set(names) and "b.sum" not in names
    else:
        assert not any(n.startswith(("a.conv2", "b.")) for n in names) and "pool.y" not in names


def test_bands_are_declared_once_concatenated_and_the_blocks_stay_fused(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Convolutions run in bands of tile rows: their concatenation has the input's size, and only when it holds
    every band of one convolution in order."""
    monkeypatch.setattr(winograd, "MAX_BAND_BYTES", 1 << 20)
    model = residual_model()
    fast = rewritten(model, (64, 64), count=2)
    concats = [n for n in fast.graph.node if n.op_type == "Concat"]
    assert [len(n.input) for n in concats] == [5, 2]  # 36*16*16*128*4 B = 4.7 MB at 64x64, 1.2 MB at 32x32
    assert {"a.conv2.y.relu", "c.conv2.y.relu", "c.sum.relu"} <= {v.name for v in fast.graph.value_info}
    ops = optimised_ops(fast, tmp_path)
    assert ("", "Add") not in ops and ("", "Relu") not in ops
    rng = np.random.default_rng(7)
    for h, w in [(64, 64), (29, 23), (5, 3)]:
        x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        assert_same(run(model, x, library=False), run(fast, x, library=True))
    for spoil in ("reversed", "missing", "axis-3"):
        broken = onnx.ModelProto()
        broken.CopyFrom(fast)
        del broken.graph.value_info[:]
        concat = next(n for n in broken.graph.node if n.op_type == "Concat")
        if spoil == "reversed":
            concat.input[:] = list(concat.input)[::-1]
        elif spoil == "missing":
            del concat.input[-1]
        else:
            del concat.attribute[:]
            concat.attribute.append(helper.make_attribute("axis", 3))
        names = declared_after(broken)
        assert "a.conv1.y.relu" in names and concat.output[0] not in names and "c.sum.relu" not in names, spoil


def test_a_symbolic_batch_is_declared_as_it_is(tmp_path: Path) -> None:
    model = residual_model(batch="N")
    fast = rewritten(model, (64, 64), count=2)
    dims = next(v for v in fast.graph.value_info if v.name == "c.sum.relu").type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == ["N", 128, "ceil(h/2)", "ceil(w/2)"]
    assert ("", "Add") not in optimised_ops(fast, tmp_path)
    x = np.random.default_rng(8).standard_normal((2, 3, 29, 23)).astype(np.float32)
    assert_same(run(model, x, library=False), run(fast, x, library=True))


def test_relu_is_fused_only_when_it_is_the_sole_reader() -> None:
    model = conv_model(128, 128)
    model.graph.node.append(helper.make_node("Sigmoid", ["c"], ["s"]))
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
    fast = rewritten(model, (16, 16))
    ops = [node.op_type for node in fast.graph.node]
    assert "Winograd4x3Output" in ops and "Relu" in ops and "Winograd4x3OutputRelu" not in ops
    x = np.random.default_rng(3).standard_normal((1, 128, 16, 16)).astype(np.float32)
    so = session_options(1)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    got = ort.InferenceSession(fast.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = ort.InferenceSession(model.SerializeToString(), session_options(1),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        assert_same(a, b)


def test_the_filter_leaves_and_the_count_is_recorded() -> None:
    model = conv_model(128, 256)
    fast = rewritten(model, (16, 16))
    names = {t.name for t in fast.graph.initializer}
    assert "w" not in names  # read by nothing any more
    (u,) = [t for t in fast.graph.initializer if t.name.endswith("_winograd_U")]
    assert list(u.dims) == [36, 128, 256]
    assert {p.key: p.value for p in fast.metadata_props}[winograd.METADATA_KEY] == "1"


def one_op(op: str, inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    kinds = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    graph = helper.make_graph(
        [helper.make_node(op, list(inputs), ["out"], domain=winograd.DOMAIN)], "g",
        [helper.make_tensor_value_info(name, kinds[a.dtype], [None] * a.ndim) for name, a in inputs.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(winograd.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def band(index: int, count: int) -> np.ndarray:
    return np.array([index, count], np.int64)


X = np.ones((1, 16, 8, 8), np.float32)
M = np.ones((36, 4, 16), np.float32)  # 2x2 tiles of an 8x8 picture, 16 channels out


@pytest.mark.parametrize("op,inputs,message", [
    ("Winograd4x3Input", {"x": X, "band": band(2, 2)}, "band must be"),
    ("Winograd4x3Input", {"x": X, "band": band(-1, 2)}, "band must be"),
    ("Winograd4x3Input", {"x": X, "band": band(0, 0)}, "band must be"),
    ("Winograd4x3Input", {"x": X, "band": band(0, 65)}, "band must be"),
    ("Winograd4x3Input", {"x": X, "band": np.array([0, 1, 2], np.int64)}, "band must hold"),
    ("Winograd4x3Input", {"x": np.ones((1, 12, 8, 8), np.float32), "band": band(0, 1)}, "multiple of 8"),
    ("Winograd4x3Input", {"x": np.ones((16, 8, 8), np.float32), "band": band(0, 1)}, "must be \\(N, C, H, W\\)"),
    ("Winograd4x3Output", {"m": M[:, :3], "bias": np.zeros(16, np.float32), "like": X, "band": band(0, 1)},
     "has 3 tiles, the picture 4"),
    ("Winograd4x3Output", {"m": M[:35], "bias": np.zeros(16, np.float32), "like": X, "band": band(0, 1)},
     "m must be \\(36"),
    ("Winograd4x3Output", {"m": M, "bias": np.zeros(8, np.float32), "like": X, "band": band(0, 1)}, "bias must be"),
    ("Winograd4x3OutputRelu", {"m": M[:, :, :12], "bias": np.zeros(12, np.float32), "like": X,
                               "band": band(0, 1)}, "multiple of 8"),
    ("Winograd4x3OutputRelu", {"m": M, "bias": np.zeros(16, np.float32), "like": X, "band": band(1, 1)},
     "band must be"),
], ids=["index=count", "negative", "no-bands", "too-many", "three-values", "12-channels", "rank-3", "tiles",
        "35-planes", "bias", "out-12-channels", "out-band"])
def test_hostile_inputs_are_refused(op: str, inputs: dict[str, np.ndarray], message: str) -> None:
    so = session_options(1)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    session = ort.InferenceSession(one_op(op, inputs).SerializeToString(), so, providers=["CPUExecutionProvider"])
    with pytest.raises((ort_errors.InvalidArgument, ort_errors.Fail, ort_errors.RuntimeException), match=message):
        session.run(None, inputs)


def test_output_of_an_empty_band_is_empty() -> None:
    """A band with no tile rows (a picture shorter than its bands): empty tensors, no error."""
    so = session_options(1)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    x = np.ones((1, 16, 3, 8), np.float32)  # one tile row
    v = ort.InferenceSession(one_op("Winograd4x3Input", {"x": x, "band": band(0, 2)}).SerializeToString(), so,
                             providers=["CPUExecutionProvider"]).run(None, {"x": x, "band": band(0, 2)})[0]
    assert v.shape == (36, 0, 16)
    inputs = {"m": np.ones((36, 0, 16), np.float32), "bias": np.zeros(16, np.float32), "like": x, "band": band(0, 2)}
    y = ort.InferenceSession(one_op("Winograd4x3Output", inputs).SerializeToString(), so,
                             providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    assert y.shape == (1, 16, 0, 8)


@pytest.mark.slow
def test_engine_runs_the_full_model_s_convolutions_as_winograd(full_model_path: Path, tmp_path: Path) -> None:
    """The full-size M2FP: its pixel decoder's 3x3 convolution (256 channels at 1/4 size) and ResNet-101's
    stride-1 3x3 convolutions of 128 and 256 channels (3 at 1/8 size, 22 at 1/16) are rewritten, and said so
    also when the optimised graph comes from the cache; every residual block keeps its Add and Relu fused into
    its last convolution. (Its labels against ModelScope's pipeline: tests/test_reference.py, through this same
    engine.)"""
    options = EngineOptions(intra_op_threads=2, cache_dir=tmp_path)
    first = ParsingEngine(full_model_path, options=options, warmup=False)
    assert (first.cache_status, first.winograd_convolutions) == ("cache written", 26)
    again = ParsingEngine(full_model_path, options=options, warmup=False)
    assert (again.cache_status, again.winograd_convolutions) == ("cache hit", 26)
    (cached,) = tmp_path.glob("*.onnx")
    backbone = [n for n in onnx.load(cached, load_external_data=False).graph.node if "backbone" in n.name]
    assert not any(n.op_type in ("Add", "Relu") and n.domain == "" for n in backbone)
    # ResNet-101's 33 blocks, each its Add in its last convolution (the 4th input: the sum)
    assert sum(n.op_type == "Conv" and len(n.input) == 4 for n in backbone) == 33
    plain = ParsingEngine(full_model_path, options=EngineOptions(intra_op_threads=2, cache_dir=tmp_path,
                                                                 msda_kernel="off"), warmup=False)
    assert plain.winograd_convolutions == 0
    x = np.random.default_rng(4).uniform(0, 255, (1, 3, 128, 192)).astype(np.float32)
    want, got = plain.run(x), first.run(x)
    np.testing.assert_allclose(got.class_logits, want.class_logits, rtol=1e-3, atol=1e-3)
    assert float(np.abs(got.mask_logits - want.mask_logits).max()) <= 1e-3 * float(np.abs(want.mask_logits).max())


def test_a_rewrite_that_fails_leaves_the_graph_as_exported(tiny_model_path: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The rewrite runs in a child process; one that fails (here: the file is not a model) is logged
    and the graph runs as exported."""
    from m2fp_service.engine import rewritten_graph

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with caplog.at_level("WARNING", logger="m2fp.engine"):
        assert rewritten_graph(broken, BUILT_MSDA_KERNEL) is None
    assert "the graph rewrites failed" in caplog.text
    graph = rewritten_graph(tiny_model_path, BUILT_MSDA_KERNEL)  # only its feed-forward blocks qualify
    assert graph is not None and not any("winograd" in n.name for n in onnx.load_from_string(graph).graph.node)
    engine = ParsingEngine(tiny_model_path, options=EngineOptions(intra_op_threads=1, cache_dir=tmp_path))
    assert engine.winograd_convolutions == 0 and engine.deformable_attention == "fused"
