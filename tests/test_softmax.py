"""ai.m2fp::Softmax (``native/m2fp_softmax.cc``) and the rewrite that puts it after additive masks
(``m2fp_service/softmax.py``).

The op is checked against a float64 numpy softmax and against ONNX Runtime's own ``Softmax`` on the
same input (rows with -inf, NaN and infinities included); the rewrite against the graphs it must
change and those it must leave alone byte for byte, and in the engine on the tiny M2FP model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from m2fp_service import feedforward, softmax
from m2fp_service.engine import BUILT_MSDA_KERNEL, EngineOptions, ParsingEngine, session_options

# The built library: a failure in CI, a skip elsewhere when it is missing (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernel_library")

INF = np.float32(np.inf)
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid(feedforward.DOMAIN, 1)]


def softmax_model(rank: int, domain: str = "ai.m2fp") -> onnx.ModelProto:
    """One Softmax over the last axis of x (rank ``rank``): the library's (domain ai.m2fp) or ONNX's."""
    node = helper.make_node("Softmax", ["x"], ["y"], domain=domain, **({} if domain else {"axis": -1}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(feedforward.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], library: bool = True) -> np.ndarray:
    so = session_options(2)
    if library:
        so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]  # type: ignore[no-any-return]


def both(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the library's op, ONNX Runtime's Softmax) on x."""
    return run(softmax_model(x.ndim), {"x": x}), run(softmax_model(x.ndim, domain=""), {"x": x}, library=False)


def reference(x: np.ndarray) -> np.ndarray:
    d = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(d)
    return e / e.sum(axis=-1, keepdims=True)


def masked(shape: tuple[int, ...], blocked: float, seed: int) -> np.ndarray:
    """Scores (spread over ~±20) with about ``blocked`` of them -inf, as the masked attention's; no row all -inf."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 6).astype(np.float32)
    x[rng.random(shape) < blocked] = -INF
    x[..., rng.integers(0, shape[-1])] = np.float32(rng.standard_normal())  # every row keeps a value
    return x


@pytest.mark.parametrize("shape,blocked", [
    ((1, 1), 0.0), ((3, 5), 0.0), ((2, 16), 0.5), ((4, 17), 0.5), ((7, 33), 0.9), ((8, 100, 720), 0.5),
    ((2, 3, 5, 48), 0.3), ((64,), 0.2), ((5, 1000), 0.99), ((1, 4, 11520), 0.5), ((300, 16), 0.0),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_op_matches_numpy_and_onnx_runtime(shape: tuple[int, ...], blocked: float) -> None:
    """Rows of any length (1 to 11520: whole 16-value vectors, a tail of 1 to 15, only a tail) and
    rank, with none to 99% of their values -inf, give the float64 softmax and ONNX Runtime's within
    float rounding, and exactly 0 where x is -inf; each row sums to 1."""
    x = masked(shape, blocked, seed=sum(shape))
    got, theirs = both(x)
    want = reference(x)
    assert got.shape == x.shape and got.dtype == np.float32
    assert np.isfinite(got).all() and (got[x == -INF] == 0).all()
    assert float(np.abs(got - want).max()) <= 2e-6 * float(want.max())
    assert float(np.abs(got - theirs).max()) <= 2e-6 * float(want.max())
    positive = want > 1e-30
    assert float((np.abs(got - want)[positive] / want[positive]).max()) <= 1e-5  # relative, down to tiny weights
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-5)


def test_large_and_tiny_values() -> None:
    """Values far apart (exp of the difference under- or overflows) and ones in the range where
    exp(d) is no longer a normal float: the result is ONNX Runtime's (0 where the weight is below
    float's range, 1 where one value dominates), never NaN."""
    x = np.array([[1e30, -1e30, 0.0, 88.0], [0.0, -87.0, -88.0, -104.0], [-1e30, -1e30, -1e30, -1e30],
                  [3.0e38, 0.0, -3.0e38, 1.0]], np.float32)
    got, theirs = both(x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(x), atol=1e-7)
    np.testing.assert_allclose(got, theirs, atol=1e-7)
    assert got[0, 0] == 1.0 and got[2].tolist() == [0.25] * 4


def test_nan_and_infinity_rows_are_as_onnx_defines_them() -> None:
    """A row with a NaN, with a +inf, or with only -inf is NaN throughout, as ONNX Runtime's
    Softmax (and the definition, exp(x - max) / sum) gives; the other rows are unaffected."""
    x = np.full((5, 24), 0.5, np.float32)  # a 16-value body and a tail of 8
    x[0, 18] = np.nan
    x[1] = -INF
    x[2, 3] = INF
    x[3, :4] = [0.0, -INF, -INF, 5.0]
    got, theirs = both(x)
    assert np.isnan(got[:3]).all() and np.isnan(theirs[:3]).all()
    assert np.isfinite(got[3:]).all()
    np.testing.assert_allclose(got[3:], theirs[3:], atol=1e-7)
    np.testing.assert_allclose(got[3:], reference(x[3:]), atol=1e-7)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 7), (0,)])
def test_empty_input_gives_an_empty_output(shape: tuple[int, ...]) -> None:
    x = np.zeros(shape, np.float32)
    got = run(softmax_model(x.ndim), {"x": x})
    assert got.shape == shape and got.dtype == np.float32


def test_a_scalar_is_refused_with_a_clear_error() -> None:
    with pytest.raises(Exception, match=r"ai\.m2fp::Softmax: x must have a last axis"):
        run(softmax_model(0), {"x": np.array(1.0, np.float32)})


# ------------------------------------------------------------------------------------------------
# The rewrite
# ------------------------------------------------------------------------------------------------


def attention_model(axis: int | None = -1, add: bool = True, opset: int = 17,
                    dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """scores (B, Q, N) -> Add(mask) -> Softmax(axis) -> y, as the decoder's masked attention
    (``add=False``: the Softmax reads the scores directly; ``dtype``: the tensors' element type)."""
    nodes = [helper.make_node("Add", ["s", "mask"], ["z"], name="add")]
    attrs = {} if axis is None else {"axis": axis}
    nodes.append(helper.make_node("Softmax", ["z" if add else "s"], ["y"], name="attention_softmax", **attrs))
    inputs = [helper.make_tensor_value_info(name, dtype, [None, 4, 40]) for name in ("s", "mask")]
    output = helper.make_tensor_value_info("y", dtype, [None, 4, 40])
    graph = helper.make_graph(nodes, "g", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_rewrite_replaces_the_softmax_after_an_additive_mask() -> None:
    """Softmax(Add(scores, mask)) over the last axis (default or -1) becomes ai.m2fp::Softmax, its
    count in the metadata; the model checks and gives the same result with -inf in the mask."""
    for axis in (None, -1):
        model = attention_model(axis)
        assert softmax.rewrite(model) == 1
        onnx.checker.check_model(model)
        assert [(n.op_type, n.domain) for n in model.graph.node] == [("Add", ""), ("Softmax", "ai.m2fp")]
        assert {p.key: p.value for p in model.metadata_props} == {softmax.METADATA_KEY: "1"}
    rng = np.random.default_rng(5)
    feeds = {"s": rng.standard_normal((2, 4, 40)).astype(np.float32),
             "mask": np.where(rng.random((2, 4, 40)) < 0.6, -INF, 0).astype(np.float32)}
    feeds["mask"][..., 0] = 0
    np.testing.assert_allclose(run(model, feeds), run(attention_model(), feeds, library=False), atol=1e-7)
    assert softmax.rewrite(model) == 0  # nothing left to replace


@pytest.mark.parametrize("case", ["not-last-axis", "axis-2-of-3", "no-add", "opset-12", "double-input"])
def test_rewrite_leaves_other_softmaxes_alone(case: str) -> None:
    """Not rewritten, the model byte for byte as it was: another axis (1, or 2 written as such),
    a Softmax not after an Add (ONNX Runtime's own is as fast there), opset 12 (whose Softmax
    flattens from `axis` on), an input that type inference finds to be double."""
    model = {"not-last-axis": lambda: attention_model(axis=1), "axis-2-of-3": lambda: attention_model(axis=2),
             "no-add": lambda: attention_model(add=False), "opset-12": lambda: attention_model(opset=12),
             "double-input": lambda: attention_model(dtype=TensorProto.DOUBLE)}[case]()
    before = model.SerializeToString()
    assert softmax.rewrite(model) == 0
    assert model.SerializeToString() == before


def test_engine_runs_the_tiny_model_s_masked_attentions_on_the_op(tiny_model_path: Path, tmp_path: Path) -> None:
    """The tiny M2FP model's 3 masked cross-attentions run as the library's Softmax (also from the
    cache), and its raw outputs are those of the graph run without the library."""
    copy = tmp_path / "tiny.onnx"
    shutil.copyfile(tiny_model_path, copy)
    assert softmax.rewrite(onnx.load(str(copy))) == 3
    options = EngineOptions(intra_op_threads=1, cache_dir=tmp_path)
    first = ParsingEngine(copy, options=options, warmup=False)
    again = ParsingEngine(copy, options=options, warmup=False)
    assert (first.cache_status, first.softmax_nodes, again.cache_status, again.softmax_nodes) == (
        "cache written", 3, "cache hit", 3)
    plain = ParsingEngine(copy, options=EngineOptions(intra_op_threads=1, cache_dir=tmp_path, msda_kernel="off"),
                          warmup=False)
    assert plain.softmax_nodes == 0
    x = np.random.default_rng(17).uniform(0, 255, (1, 3, 128, 192)).astype(np.float32)
    want = plain.run(x)
    assert float(np.abs(want.mask_logits).max()) > 0.1
    got = first.run(x)
    np.testing.assert_allclose(got.class_logits, want.class_logits, rtol=1e-3, atol=1e-3)
    assert float(np.abs(got.mask_logits - want.mask_logits).max()) <= 1e-3 * float(np.abs(want.mask_logits).max())


def test_rewrite_on_a_graph_with_weights_keeps_them(tiny_model_path: Path) -> None:
    """The type inference runs on a copy without the weights' values: the model's own weights
    are untouched by the rewrite."""
    model = onnx.load(str(tiny_model_path))
    weights = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer[:20]}
    assert softmax.rewrite(model) == 3
    after = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer[:20]}
    assert after == weights


# ------------------------------------------------------------------------------------------------
# A mask repeated for the heads (softmax.fuse_masks, in the INT8 rewrite of the saved graph)
# ------------------------------------------------------------------------------------------------


def masked_softmax_model(heads: int | None = 8) -> onnx.ModelProto:
    """The library's Softmax of x (B x heads, Q, L) plus a mask (B, Q, L) it repeats for the heads itself."""
    inputs = ["x", "mask", "heads"] if heads is not None else ["x", "mask"]
    node = helper.make_node("Softmax", inputs, ["y"], domain=feedforward.DOMAIN)
    init = [] if heads is None else [numpy_helper.from_array(np.array(heads, np.int64), "heads")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * 3)
                                            for n in ("x", "mask")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    return helper.make_model(graph, opset_imports=OPSETS)


def mask_of(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """0 or -inf, about half each, never a whole row of -inf."""
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random(shape) < 0.5, -INF, 0).astype(np.float32)
    mask[..., 0] = 0
    return mask


@pytest.mark.parametrize("b,heads,q,length", [(1, 8, 5, 37), (2, 3, 4, 64), (1, 1, 3, 16), (3, 2, 1, 5)])
def test_the_op_adds_a_mask_repeated_for_its_heads(b: int, heads: int, q: int, length: int) -> None:
    """Softmax(x, mask, heads) is, bit for bit, the op on x + the mask repeated for every head (what
    Unsqueeze -> Tile -> Reshape -> Add computes): row (b x heads + h, q) takes the mask's row (b, q)."""
    x = (np.random.default_rng(b + heads).standard_normal((b * heads, q, length)) * 6).astype(np.float32)
    mask = mask_of((b, q, length), seed=q)
    repeated = np.repeat(mask, heads, axis=0).reshape(b * heads, q, length)
    want = run(softmax_model(3), {"x": x + repeated})
    got = run(masked_softmax_model(heads), {"x": x, "mask": mask})
    assert np.array_equal(got, want)
    assert np.isclose(got.sum(-1), 1, atol=1e-5).all() and (got == 0).mean() > 0.3  # the mask is there


@pytest.mark.parametrize("case,message", [
    ("no-heads", "a mask needs heads"),
    ("heads-0", r"x must be \(B x heads, Q, L\)"),
    ("heads-wrong", r"x must be \(B x heads, Q, L\)"),
    ("mask-longer", r"x must be \(B x heads, Q, L\)"),
    ("x-rank-2", r"x must be \(B x heads, Q, L\)"),
    ("heads-vector", "heads must be a scalar"),
])
def test_a_mask_that_does_not_fit_is_refused(case: str, message: str) -> None:
    """A mask without heads, heads that do not divide x's rows as the mask's, a mask of another length, x of
    another rank, heads that are not a scalar: a clear error, no result."""
    x, mask = np.zeros((8, 3, 10), np.float32), np.zeros((1, 3, 10), np.float32)
    model = masked_softmax_model(None if case == "no-heads" else {"heads-0": 0, "heads-wrong": 4}.get(case, 8))
    if case == "mask-longer":
        mask = np.zeros((1, 3, 11), np.float32)
    if case == "x-rank-2":
        x = np.zeros((8, 30), np.float32)
        model.graph.input[0].type.tensor_type.shape.dim.pop()
    if case == "heads-vector":
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([8, 8], np.int64), "heads"))
    with pytest.raises(Exception, match=r"ai\.m2fp::Softmax: " + message):
        run(model, {"x": x, "mask": mask})


def repeated_mask_graph(case: str = "fused", heads: int = 4) -> onnx.ModelProto:
    """What ONNX Runtime saves of the decoder's masked attention: scores (B x heads, Q, L) and a mask (B, Q, L);
    Unsqueeze(mask, 1) -> Tile(1, heads, 1, 1) -> Reshape to (-1, Q, L) (the shape measured from the Tile) ->
    Add(scores, .) -> the library's Softmax. ``case`` changes one thing the fusion must not take."""
    axis, repeats = ([0] if case == "axis-0" else [1]), [1, heads, 1, 2 if case == "repeats" else 1]
    nodes = [helper.make_node("Unsqueeze", ["mask", "axis"], ["u"]),
             helper.make_node("Tile", ["u", "repeats"], ["t"]),
             helper.make_node("Shape", ["t"], ["shape"]),
             helper.make_node("Slice", ["shape", "two", "four"], ["ql"]),
             helper.make_node("Concat", ["minus_one", "ql"], ["target"], axis=0),
             helper.make_node("Reshape", ["t", "target"], ["r"]),
             helper.make_node("Add", ["r", "s"] if case == "mask-first" else ["s", "r"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], domain="" if case == "onnx-softmax" else feedforward.DOMAIN,
                              name="attention")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if case in ("reshape-output", "add-output"):
        outputs.append(helper.make_tensor_value_info("r" if case == "reshape-output" else "z", TensorProto.FLOAT, None))
    init = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
            [("axis", axis), ("repeats", repeats), ("two", [2]), ("four", [4]), ("minus_one", [-1])]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * 3)
                                           for n in ("s", "mask")], outputs, init)
    return helper.make_model(graph, opset_imports=OPSETS)


@pytest.mark.parametrize("case", ["fused", "mask-first"])
def test_fuse_masks_gives_the_softmax_its_mask_with_the_same_result(case: str) -> None:
    """The Add, Reshape and Tile go (and the Shape, Slice, Concat that measured the Tile: nothing reads them
    any more); the Softmax reads scores, mask and heads; the result is the same bit for bit."""
    model = repeated_mask_graph(case)
    s = (np.random.default_rng(3).standard_normal((8, 5, 40)) * 6).astype(np.float32)
    feeds = {"s": s, "mask": mask_of((2, 5, 40), seed=4)}
    want = run(model, feeds)
    assert softmax.fuse_masks(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Softmax"]
    assert list(model.graph.node[0].input)[:2] == ["s", "mask"]
    assert {i.name for i in model.graph.initializer} == {model.graph.node[0].input[2]}
    assert {p.key: p.value for p in model.metadata_props} == {softmax.MASK_METADATA_KEY: "1"}
    got = run(model, feeds)
    assert np.array_equal(got, want) and (got == 0).mean() > 0.3


@pytest.mark.parametrize("case", ["axis-0", "repeats", "reshape-output", "add-output", "onnx-softmax"])
def test_fuse_masks_leaves_other_graphs_alone(case: str) -> None:
    """An Unsqueeze on another axis, a Tile of other repeats, a Reshape or Add that is also a graph output, ONNX's
    own Softmax: the graph byte for byte as it was."""
    model = repeated_mask_graph(case)
    before = model.SerializeToString()
    assert softmax.fuse_masks(model) == 0
    assert model.SerializeToString() == before
