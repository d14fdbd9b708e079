"""Feed-forward blocks and linear layers as one op each (``feedforward.rewrite`` and
``feedforward.rewrite_linear`` + ``native/m2fp_ffn.cc``).

Each op is checked against a float64 numpy reference and against ONNX Runtime running the nodes it
replaces with the same weights (FeedForward: MatMul, Add, Relu, MatMul, Add; Linear: MatMul, Add);
the rewrites against the graph as exported, and against the graphs they must leave alone byte for byte.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from m2fp_export.quantize import cpu_flags
from m2fp_service import feedforward, rewrite
from m2fp_service.engine import BUILT_MSDA_KERNEL, EngineOptions, ParsingEngine, session_options

# The built library: a failure in CI, a skip elsewhere when it is missing (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernel_library")

Weights = dict[str, np.ndarray]


def weights(d: int, f: int, e: int, seed: int = 0) -> Weights:
    """w1 (d, f), b1 (f), w2 (f, e), b2 (e): scaled so that about half the hidden units are > 0."""
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((d, f)) / np.sqrt(max(d, 1))).astype(np.float32),
            "b1": (0.5 * rng.standard_normal(f)).astype(np.float32),
            "w2": (rng.standard_normal((f, e)) / np.sqrt(f)).astype(np.float32),
            "b2": rng.standard_normal(e).astype(np.float32)}


def layer(d: int, e: int, seed: int = 0) -> Weights:
    """A linear layer's w1 (d, e) and b1 (e), drawn as ``weights`` draws a block's first layer."""
    w = weights(d, e, feedforward.COLUMNS, seed)
    return {"w1": w["w1"], "b1": w["b1"]}


def reference(x: np.ndarray, w: Weights) -> tuple[np.ndarray, float]:
    """y in float64, and the fraction of hidden units the Relu zeroes (a linear layer: x w1 + b1, and 0)."""
    product = x.astype(np.float64) @ w["w1"].astype(np.float64) + w["b1"]
    if "w2" not in w:
        return product, 0.0
    hidden = np.maximum(product, 0.0)
    return hidden @ w["w2"].astype(np.float64) + w["b2"], float((hidden == 0).mean()) if hidden.size else 0.0


def chain_model(w: Weights, rank: int = 3, *, act: str = "Relu", bias_first: bool = False, identity: bool = False,
                as_inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x (..., D) -> MatMul(w1) -> Add(b1) -> act -> MatMul(w2) -> Add(b2) -> y, as an exporter writes it:
    weights are initialisers (graph inputs for the names in ``as_inputs``), optionally read through
    Identity nodes, each bias on the right of its Add (on the left with ``bias_first``). A linear
    layer (``w`` without w2 and b2, as ``layer`` draws it): x -> MatMul(w1) -> Add(b1) -> y."""
    nodes: list[onnx.NodeProto] = []

    def operand(name: str) -> str:
        if not identity or name in as_inputs:
            return name
        nodes.append(helper.make_node("Identity", [name], [f"{name}_id"], name=f"{name}_identity"))
        return f"{name}_id"

    def add(product: str, bias: str, out: str) -> onnx.NodeProto:
        return helper.make_node("Add", [bias, product] if bias_first else [product, bias], [out], name=f"add_{out}")

    if "w2" not in w:
        w1, b1 = operand("w1"), operand("b1")
        nodes += [helper.make_node("MatMul", ["x", w1], ["p1"], name="mm1"), add("p1", b1, "y")]
    else:
        w1, b1, w2, b2 = (operand(n) for n in ("w1", "b1", "w2", "b2"))
        nodes += [helper.make_node("MatMul", ["x", w1], ["p1"], name="mm1"), add("p1", b1, "a1"),
                  helper.make_node(act, ["a1"], ["h"], name="act"),
                  helper.make_node("MatMul", ["h", w2], ["p2"], name="mm2"), add("p2", b2, "y")]
    d = w["w1"].shape[-2]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * (rank - 1) + [d])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(w[n].shape)) for n in as_inputs]
    inits = [numpy_helper.from_array(a, n) for n, a in w.items() if n not in as_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def op_of(operands: dict[str, np.ndarray]) -> str:
    """The op these operands are for: FeedForward (x, w1, b1, w2, b2), Linear (x, w1, b1: a layer)."""
    return "FeedForward" if "w2" in operands else "Linear"


def op_model(inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One ai.m2fp::FeedForward node (Linear for a layer's operands, ``op_of``) whose operands are
    graph inputs of the given ranks."""
    graph = helper.make_graph(
        [helper.make_node(op_of(inputs), list(inputs), ["y"], domain=feedforward.DOMAIN)], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * a.ndim) for n, a in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(feedforward.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def session(model: onnx.ModelProto, library: bool = True) -> ort.InferenceSession:
    so = session_options(2)
    if library:
        so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], library: bool = True) -> np.ndarray:
    return session(model, library).run(None, feeds)[0]  # type: ignore[no-any-return]


def copied(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def rewritten(model: onnx.ModelProto, count: int = 1, fuse: Callable[[onnx.ModelProto], int] = feedforward.rewrite
              ) -> onnx.ModelProto:
    """A copy of ``model`` that ``fuse`` rewrote, replacing ``count`` chains."""
    copy = copied(model)
    assert fuse(copy) == count
    return copy


def assert_close(expected: np.ndarray, got: np.ndarray, rtol: float = 1e-5) -> None:
    """Equal within ``rtol`` of the output's scale, which is large enough to mean something."""
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0.5
    assert float(np.abs(got.astype(np.float64) - expected).max()) <= rtol * scale


def shape_id(v: object) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def check_op(x: np.ndarray, w: Weights) -> None:
    """The op for ``w`` (a block's weights, or a layer's) on ``x`` gives the float64 result and ONNX
    Runtime's own for the nodes it replaces; no rows: an empty y."""
    got = run(op_model({"x": x, **w}), {"x": x, **w})
    unfused = run(chain_model(w, rank=x.ndim), {"x": x}, library=False)
    e = w["b2" if "b2" in w else "b1"].shape[0]
    assert got.shape == unfused.shape == (*x.shape[:-1], e) and got.dtype == np.float32
    if got.size == 0:
        return
    assert_close(reference(x, w)[0], got)
    assert_close(unfused.astype(np.float64), got)


FFN_SHAPES = [  # x's shape (D last), F, E
    ((1, 16), 16, 16), ((5, 24), 64, 32), ((6, 256), 1024, 256), ((7, 24), 16, 16), ((48, 256), 1024, 256),
    ((49, 24), 64, 32), ((100, 16), 64, 256), ((301, 256), 1024, 256),
    ((24,), 64, 32), ((3, 100, 16), 1024, 32), ((2, 3, 5, 24), 16, 32), ((4, 13, 256), 64, 16),
    ((2, 400, 24), 64, 32), ((0, 24), 64, 32), ((2, 0, 16), 16, 16),
    ((13, 40), 272, 48), ((23, 16), 80, 112), ((383, 24), 48, 16), ((385, 40), 48, 80), ((2, 300, 37), 112, 48),
    ((8, 16), 0, 16), ((400, 16), 0, 16), ((8, 16), 16, 0), ((400, 16), 16, 0),
]


@pytest.mark.parametrize("shape,f,e", FFN_SHAPES, ids=shape_id)
def test_op_matches_numpy_and_the_unfused_graph(shape: tuple[int, ...], f: int, e: int) -> None:
    """Every row of x, whatever its rank and however its rows fall into tiles (6 or 12 rows), column
    chunks (fewer than 384 rows: 1, 5, 6, 7, 13, 23, 48, 49, 100, 301, 383) and row blocks (from 384 on:
    385, 600, 800; full 48-row blocks and a remainder), and its columns into 16- and 32-column tiles
    (F, E of 16 to 1024: 48, 80, 112, 272 end in a 16-column one; 272 in a short last chunk), gets
    relu(x w1 + b1) w2 + b2: the float64 result, and ONNX Runtime's own for the five nodes. No rows:
    an empty y. F = 0: y = b2 (by columns and by rows); E = 0: an empty y."""
    w = weights(shape[-1], f, e, seed=sum(shape) + f + e)
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    check_op(x, w)
    if x.size and f and e:
        assert 0.2 < reference(x, w)[1] < 0.8  # the Relu does something, and not everything


LINEAR_SHAPES = [  # x's shape (D last; 37 is not a multiple of 16), E
    ((0, 37), 16), ((2, 0, 24), 96), ((37,), 16), ((1, 16), 256), ((5, 37), 96), ((6, 37), 16), ((7, 24), 256),
    ((47, 37), 96), ((48, 37), 256), ((49, 37), 16), ((383, 37), 96), ((384, 37), 96), ((384, 256), 256),
    ((800, 37), 256), ((2, 400, 24), 16), ((3, 127, 37), 256), ((2, 3, 64, 37), 96), ((2, 2, 2, 16), 16),
    ((4, 1), 16), ((3, 0), 16), ((400, 0), 32),
    ((13, 37), 272), ((23, 16), 48), ((385, 40), 80), ((12, 24), 112), ((8, 16), 0), ((400, 16), 0),
]


@pytest.mark.parametrize("shape,e", LINEAR_SHAPES, ids=shape_id)
def test_linear_op_matches_numpy_and_the_unfused_graph(shape: tuple[int, ...], e: int) -> None:
    """ai.m2fp::Linear: every row of x, whatever its rank (1-4) and however its rows fall into tiles
    (6 or 12 rows), column chunks (below 384 rows) and 48-row blocks (from 384 on), and E into 16- and
    32-column tiles (48, 80, 112, 272 end in a 16-column one), gets x w + b: the float64 result, and
    ONNX Runtime's own for MatMul and Add. D of any size (37, 1; 0: y = b); no rows: an empty y."""
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    check_op(x, layer(shape[-1], e, seed=sum(shape) + e))


@pytest.mark.parametrize("op,rows", [("FeedForward", 8), ("FeedForward", 400), ("Linear", 8), ("Linear", 400)])
def test_a_nan_row_stays_nan(op: str, rows: int) -> None:
    """A NaN in x reaches y as it does through ONNX's Relu (kept, not turned into 0), and through a
    linear layer; other rows are finite. By column chunks (8 rows) and by row blocks (400)."""
    w = weights(16, 32, 16, seed=3) if op == "FeedForward" else layer(16, 32, seed=3)
    x = np.random.default_rng(4).standard_normal((rows, 16)).astype(np.float32)
    x[5, 3] = np.nan
    got = run(op_model({"x": x, **w}), {"x": x, **w})
    unfused = run(chain_model(w, rank=2), {"x": x}, library=False)
    assert np.isnan(unfused[5]).all() and np.isnan(got[5]).all()
    assert np.isfinite(np.delete(got, 5, axis=0)).all()


def test_the_widest_build_this_cpu_runs_is_the_one_chosen() -> None:
    """The library picks the AVX-512 build of the product on a CPU with AVX-512, else the AVX2 + FMA
    one, else the generic one (each built on x86-64; native/build.py)."""
    library = ctypes.CDLL(str(BUILT_MSDA_KERNEL))
    library.m2fp_ffn_kernel.restype = ctypes.c_char_p
    flags, x86 = cpu_flags(), platform.machine() == "x86_64"
    widest = ("avx512" if x86 and "avx512f" in flags else "avx2-fma" if x86 and {"avx2", "fma"} <= flags
              else "generic")
    assert library.m2fp_ffn_kernel().decode() == widest


@pytest.mark.parametrize("cap", ["generic", "avx2-fma"])
def test_every_narrower_build_gives_the_same_results(cap: str) -> None:
    """M2FP_FFN_KERNEL=generic or =avx2-fma (read once per process) caps the build of the product at
    that one, for FeedForward and Linear alike: their op tests pass on it too, in a child process that
    says which build ran. (avx2-fma: on a CPU with AVX2 and FMA; elsewhere the generic build runs.)"""
    if cap == "avx2-fma" and not (platform.machine() == "x86_64" and {"avx2", "fma"} <= cpu_flags()):
        cap_runs = "generic"
    else:
        cap_runs = cap
    probe = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.m2fp_ffn_kernel.restype = ctypes.c_char_p; "
             "print(lib.m2fp_ffn_kernel().decode())")
    env = {**os.environ, "M2FP_FFN_KERNEL": cap}
    which = subprocess.run([sys.executable, "-c", probe, str(BUILT_MSDA_KERNEL)], env=env, capture_output=True,
                           text=True, check=True)
    assert which.stdout.strip() == cap_runs
    child = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                            "-k", "op_matches or nan_row"], env=env, capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stdout[-3000:]
    # the block shapes, the layer shapes, the NaN rows (2 ops x 2 row counts)
    assert f"{len(FFN_SHAPES) + len(LINEAR_SHAPES) + 4} passed" in child.stdout


def operands(d: int = 16, f: int = 16, e: int = 16, rows: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.ones((rows, d), np.float32), **weights(d, f, e)}


def layer_operands(d: int = 16, e: int = 16, rows: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.ones((rows, d), np.float32), **layer(d, e)}


def changed(base: dict[str, np.ndarray], **arrays: np.ndarray) -> dict[str, np.ndarray]:
    return {**base, **arrays}


@pytest.mark.parametrize("inputs,message", [
    (operands(f=24), r"F and E must be multiples of 16; w1 \(16, 24\), w2 \(24, 16\)"),
    (operands(e=8), r"F and E must be multiples of 16; w1 \(16, 16\), w2 \(16, 8\)"),
    (changed(operands(), w1=np.ones((1, 16, 16), np.float32)), r"w1 must be \(D, F\) .*w1 \(1, 16, 16\)"),
    (changed(operands(), w1=np.ones(16, np.float32)), r"w1 must be \(D, F\)"),
    (changed(operands(), w1=np.ones((24, 16), np.float32)), r"w1 must be \(D, F\) .*x \(4, 16\), w1 \(24, 16\)"),
    (changed(operands(), w2=np.ones((32, 16), np.float32)), r"w2 must be \(F, E\) .*w2 \(32, 16\)"),
    (changed(operands(), w2=np.ones(16, np.float32)), r"w2 must be \(F, E\)"),
    (changed(operands(), b1=np.ones(32, np.float32)), r"b1 must be \(F\) = \(16\), not \(32\)"),
    (changed(operands(), b1=np.ones((1, 16), np.float32)), r"b1 must be \(F\) = \(16\), not \(1, 16\)"),
    (changed(operands(), b2=np.ones(8, np.float32)), r"b2 must be \(E\) = \(16\), not \(8\)"),
    (changed(operands(), x=np.array(1.0, np.float32)), r"x must have a last dimension"),
    # Linear (x, w, b)
    (layer_operands(e=24), r"E must be a multiple of 16; w \(16, 24\)$"),
    (layer_operands(e=8), r"E must be a multiple of 16; w \(16, 8\)$"),
    (changed(layer_operands(), w1=np.ones((1, 16, 16), np.float32)),
     r"w must be \(D, E\) with D = x's last dimension; x \(4, 16\), w \(1, 16, 16\)$"),
    (changed(layer_operands(), w1=np.ones(16, np.float32)), r"w must be \(D, E\) .*; x \(4, 16\), w \(16\)$"),
    (changed(layer_operands(), w1=np.ones((24, 16), np.float32)), r"w must be \(D, E\) .*; x \(4, 16\), w \(24, 16\)$"),
    (changed(layer_operands(), x=np.ones((2, 3, 24), np.float32)),
     r"w must be \(D, E\) .*; x \(2, 3, 24\), w \(16, 16\)$"),
    (changed(layer_operands(rows=0), w1=np.ones((24, 16), np.float32)),
     r"w must be \(D, E\) .*; x \(0, 16\), w \(24, 16\)$"),
    (changed(layer_operands(), b1=np.ones(32, np.float32)), r"b must be \(E\) = \(16\), not \(32\)$"),
    (changed(layer_operands(), b1=np.ones((1, 16), np.float32)), r"b must be \(E\) = \(16\), not \(1, 16\)$"),
    (changed(layer_operands(), b1=np.array(1.0, np.float32)), r"b must be \(E\) = \(16\), not \(\)$"),
    (changed(layer_operands(), x=np.array(1.0, np.float32)), r"x must have a last dimension \(\.\.\., D\)$"),
], ids=["F-24", "E-8", "w1-rank-3", "w1-rank-1", "w1-rows", "w2-rows", "w2-rank-1", "b1-length", "b1-rank-2",
        "b2-length", "x-scalar", "linear-E-24", "linear-E-8", "linear-w-rank-3", "linear-w-rank-1", "linear-w-rows",
        "linear-x-rank-3-D", "linear-no-rows-w-rows", "linear-b-length", "linear-b-rank-2", "linear-b-scalar",
        "linear-x-scalar"])
def test_hostile_inputs_are_refused(inputs: dict[str, np.ndarray], message: str) -> None:
    """Operands the kernel cannot take (widths not multiples of 16, weights or biases of the wrong
    rank or length, a scalar x; for Linear also when x has no rows) are refused with the op's own
    message naming the shapes, not run."""
    with pytest.raises((ort_errors.InvalidArgument, ort_errors.Fail, ort_errors.RuntimeException),
                       match=f"ai\\.m2fp::{op_of(inputs)}: " + message):
        run(op_model(inputs), inputs)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


# The two rewrites: the op each writes and the metadata key its count goes to.
FUSIONS = {"FeedForward": (feedforward.rewrite, feedforward.METADATA_KEY),
           "Linear": (feedforward.rewrite_linear, feedforward.LINEAR_METADATA_KEY)}


@pytest.mark.parametrize("bias_first", [False, True], ids=["bias-second", "bias-first"])
@pytest.mark.parametrize("identity", [False, True], ids=["initialisers", "through-identity"])
@pytest.mark.parametrize("op", list(FUSIONS))
def test_a_chain_becomes_one_node_with_the_same_result(op: str, bias_first: bool, identity: bool) -> None:
    """The five nodes (Linear: MatMul and Add) become one node of the op reading the initialisers
    themselves (the Identity copies, read by nothing else, go, and so do the value_info entries of
    the tensors that no longer exist); the count is returned and recorded with the model's other
    metadata; the ai.m2fp opset is added."""
    w = weights(24, 64, 32, seed=5) if op == "FeedForward" else layer(24, 32, seed=5)
    model = onnx.shape_inference.infer_shapes(chain_model(w, bias_first=bias_first, identity=identity))
    assert "p1" in {v.name for v in model.graph.value_info}
    helper.set_model_props(model, {"exporter": "test"})
    fuse, key = FUSIONS[op]
    fast = rewritten(model, fuse=fuse)
    (node,) = fast.graph.node
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == (op, "ai.m2fp", ["x", *w], ["y"])
    assert metadata(fast) == {"exporter": "test", key: "1"}
    assert [(o.domain, o.version) for o in fast.opset_import] == [("", 17), ("ai.m2fp", 1)]
    assert not fast.graph.value_info
    onnx.checker.check_model(fast)
    x = np.random.default_rng(6).standard_normal((2, 7, 24)).astype(np.float32)
    assert_close(run(model, {"x": x}, library=False).astype(np.float64), run(fast, {"x": x}))


@pytest.mark.parametrize("op", list(FUSIONS))
def test_an_identity_read_elsewhere_is_kept_and_an_existing_opset_reused(op: str) -> None:
    """Only the fused chains' Identity copies that nothing reads any more go (w1's, read by another
    MatMul, stays; an unread one the chains never read is not the rewrite's business);
    a model that already imports ai.m2fp (the exporter's MSDeformAttn) does not get it twice. F = E,
    so that b1 and b2 swapped would run and only the numbers would tell."""
    w = weights(16, 32, 32, seed=7) if op == "FeedForward" else layer(16, 32, seed=7)  # F = E: b1, b2 swapped run
    model = chain_model(w, identity=True)
    model.opset_import.append(helper.make_opsetid(feedforward.DOMAIN, 1))
    model.graph.node.append(helper.make_node("MatMul", ["x", "w1_id"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    model.graph.node.append(helper.make_node("Identity", ["w1"], ["unread"], name="unrelated"))  # not the rewrite's
    fast = rewritten(model, fuse=FUSIONS[op][0])
    assert [n.op_type for n in fast.graph.node] == ["Identity", op, "MatMul", "Identity"]
    assert fast.graph.node[0].output[0] == "w1_id"
    assert sum(o.domain == feedforward.DOMAIN for o in fast.opset_import) == 1
    x = np.random.default_rng(8).standard_normal((1, 9, 16)).astype(np.float32)
    want, got = session(model, library=False).run(None, {"x": x}), session(fast).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        assert_close(a.astype(np.float64), b)


def dequantized_bias(model: onnx.ModelProto, computed: bool = False) -> onnx.ModelProto:
    """b1 as an INT8 model holds a float bias it shares with a quantized convolution: DequantizeLinear of an
    int32 initialiser with per-element scales (of a computed tensor when ``computed``)."""
    (b1,) = [t for t in model.graph.initializer if t.name == "b1"]
    model.graph.initializer.remove(b1)
    value = numpy_helper.to_array(b1)
    scale = np.full(value.shape, 1 / 256, np.float32)
    quantized = np.round(value / scale).astype(np.int32)
    model.graph.initializer.extend([numpy_helper.from_array(quantized, "b1q"), numpy_helper.from_array(scale, "b1s"),
                                    numpy_helper.from_array(np.zeros(value.shape, np.int32), "b1z")])
    nodes = [helper.make_node("DequantizeLinear", ["b1n" if computed else "b1q", "b1s", "b1z"], ["b1"], axis=0)]
    if computed:
        nodes.insert(0, helper.make_node("Neg", ["b1q"], ["b1n"]))
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    return model


def test_a_bias_dequantized_from_initialisers_is_taken_as_a_constant() -> None:
    """In an INT8 model, a float bias the exporter shares with a quantized convolution reaches the Add through
    the convolution's DequantizeLinear of an int32 initialiser: the linear rewrite reads that node's output as
    the layer's bias (the node stays: it is read elsewhere too), with ONNX Runtime's result; a DequantizeLinear
    of a computed tensor is no constant, and the layer is left alone."""
    model = also_read(dequantized_bias(chain_model(layer(16, 32, seed=15))), "b1")
    fast = rewritten(model, fuse=feedforward.rewrite_linear)
    assert [(n.op_type, list(n.input)) for n in fast.graph.node if n.op_type != "Identity"][:2] == [
        ("DequantizeLinear", ["b1q", "b1s", "b1z"]), ("Linear", ["x", "w1", "b1"])]
    x = np.random.default_rng(16).standard_normal((2, 9, 16)).astype(np.float32)
    assert_close(run(model, {"x": x}, library=False).astype(np.float64), run(fast, {"x": x}))
    computed = dequantized_bias(chain_model(layer(16, 32, seed=15)), computed=True)
    before = computed.SerializeToString()
    assert feedforward.rewrite_linear(computed) == 0 and computed.SerializeToString() == before


def test_an_mlp_of_three_linears_is_fused_once() -> None:
    """L0 relu L1 relu L2: the first chain (L0, L1) wins; L1's output then feeds Relu, L2 as before.
    The linear rewrite after it (as ``rewrite.apply`` runs them) takes L2, the lone layer left, and
    not L0 or L1 again; each count is recorded; a second pass of either finds nothing. (Linear
    first would take all three layers: the order is what keeps the MLP one FeedForward.)"""
    model = chain_model(weights(16, 64, 32, seed=9))
    w3 = layer(32, 16, seed=10)
    model.graph.initializer.extend([numpy_helper.from_array(w3["w1"], "w3"), numpy_helper.from_array(w3["b1"], "b3")])
    model.graph.node.extend([helper.make_node("Relu", ["y"], ["h2"]), helper.make_node("MatMul", ["h2", "w3"], ["p3"]),
                             helper.make_node("Add", ["p3", "b3"], ["z"])])
    model.graph.output[0].name = "z"
    fast = rewritten(model)
    assert [n.op_type for n in fast.graph.node] == ["FeedForward", "Relu", "MatMul", "Add"]
    both = rewritten(fast, fuse=feedforward.rewrite_linear)
    assert [(n.op_type, list(n.input), list(n.output)) for n in both.graph.node] == [
        ("FeedForward", ["x", "w1", "b1", "w2", "b2"], ["y"]), ("Relu", ["y"], ["h2"]),
        ("Linear", ["h2", "w3", "b3"], ["z"])]
    assert metadata(both) == {feedforward.METADATA_KEY: "1", feedforward.LINEAR_METADATA_KEY: "1"}
    assert sum(o.domain == feedforward.DOMAIN for o in both.opset_import) == 1
    for fuse, _ in FUSIONS.values():
        rewritten(both, count=0, fuse=fuse)
    applied = copied(model)
    assert rewrite.apply(applied) == {"winograd_convolutions": 0, "feedforward_blocks": 1, "int8_feedforward_blocks": 0,
                                      "int8_linear_layers": 0, "linear_layers": 1, "softmax_nodes": 0,
                                      "position_embeddings": 0}
    assert applied.SerializeToString() == both.SerializeToString()
    assert [n.op_type for n in rewritten(model, count=3, fuse=feedforward.rewrite_linear).graph.node] == [
        "Linear", "Relu", "Linear", "Relu", "Linear"]
    x = np.random.default_rng(11).standard_normal((3, 50, 16)).astype(np.float32)
    want = run(model, {"x": x}, library=False).astype(np.float64)
    assert_close(want, run(fast, {"x": x}))
    assert_close(want, run(both, {"x": x}))


def also_read(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``name`` read by a second node, whose output is a graph output."""
    model.graph.node.append(helper.make_node("Neg", [name], [f"{name}_neg"]))
    model.graph.output.append(helper.make_tensor_value_info(f"{name}_neg", TensorProto.FLOAT, None))
    return model


def read_in_a_subgraph(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``name`` also read inside an If's branches (the If's output a graph output)."""
    branch = helper.make_graph([helper.make_node("Neg", [name], [f"{name}_neg"])], "branch", [],
                               [helper.make_tensor_value_info(f"{name}_neg", TensorProto.FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "yes"))
    model.graph.node.append(helper.make_node("If", ["yes"], ["side"], then_branch=branch, else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    return model


def quantised_w1(model: onnx.ModelProto) -> onnx.ModelProto:
    """INT8 weights: W1 (16, 32) is a DequantizeLinear's output, no longer an initialiser."""
    (w1,) = [t for t in model.graph.initializer if t.name == "w1"]
    model.graph.initializer.remove(w1)
    model.graph.initializer.extend([numpy_helper.from_array(np.ones((16, 32), np.int8), "w1q"),
                                    numpy_helper.from_array(np.array(0.01, np.float32), "s"),
                                    numpy_helper.from_array(np.array(0, np.int8), "z")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w1q", "s", "z"], ["w1"]))
    return model


def declined_layer(kind: str) -> onnx.ModelProto:
    """A linear layer (MatMul, Add: D = 16, E = 32) that ``rewrite_linear`` must leave alone."""
    w = layer(16, 32, seed=14)
    if kind == "E-24":  # its bias (24) fits: only the width stops it
        return chain_model(layer(16, 24))
    if kind == "weight-is-input":
        return chain_model(w, as_inputs=("w1",))
    if kind == "weight-first":  # MatMul(W, x) is W @ x, not x @ W (square, so the graph is valid)
        model = chain_model(layer(32, 32, seed=14))
        model.graph.node[0].input[:] = list(reversed(model.graph.node[0].input))
        return model
    if kind == "weight-rank-3":  # (2, 32, 32) with a (32) bias: a batched product, not (D, E)
        return chain_model({"w1": np.ones((2, 32, 32), np.float32), "b1": w["b1"]})
    if kind == "product-read-twice":
        return also_read(chain_model(w, identity=True), "p1")
    if kind == "product-in-a-subgraph":
        return read_in_a_subgraph(chain_model(w), "p1")
    if kind == "product-is-output":
        model = chain_model(w)
        model.graph.output.append(helper.make_tensor_value_info("p1", TensorProto.FLOAT, None))
        return model
    if kind == "bias-1xE":  # valid broadcasts, but not an (E) bias
        return chain_model({**w, "b1": w["b1"][None]})
    if kind == "bias-length-1":
        return chain_model({**w, "b1": np.ones(1, np.float32)})
    if kind == "bias-E+16":  # no broadcast: ONNX Runtime refuses the graph as it is
        return chain_model({**w, "b1": np.ones(48, np.float32)})
    if kind == "bias-is-input":
        return chain_model(w, as_inputs=("b1",))
    if kind == "bias-computed":  # a node's output, not an initialiser
        model = chain_model(w)
        (b1,) = [t for t in model.graph.initializer if t.name == "b1"]
        b1.name = "b0"
        model.graph.node.insert(0, helper.make_node("Neg", ["b0"], ["b1"]))
        return model
    if kind == "sub":
        model = chain_model(w)
        model.graph.node[-1].op_type = "Sub"
        return model
    if kind == "qdq":
        return quantised_w1(chain_model(w))
    assert kind == "int32"  # the whole layer in integers
    model = chain_model({"w1": np.ones((16, 32), np.int32), "b1": np.ones(32, np.int32)})
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT32
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT32
    return model


def declined(kind: str) -> onnx.ModelProto:
    if kind.startswith("linear-"):
        return declined_layer(kind.removeprefix("linear-"))
    w = weights(16, 32, 16, seed=12)
    if kind == "F-24":
        return chain_model(weights(16, 24, 16))
    if kind == "E-8":
        return chain_model(weights(16, 32, 8))
    if kind == "weights-are-inputs":
        return chain_model(w, as_inputs=("w1", "w2"))
    if kind == "bias-is-input":
        return chain_model(w, as_inputs=("b2",))
    if kind == "relu-is-output":
        model = chain_model(w)
        model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
        return model
    if kind in ("p1", "a1", "h", "p2"):
        return also_read(chain_model(w, identity=True), kind)
    if kind == "h-in-a-subgraph":  # the hidden tensor also read inside an If's branch
        return read_in_a_subgraph(chain_model(w), "h")
    if kind == "sigmoid":
        return chain_model(w, act="Sigmoid")
    if kind == "b1-length-1":  # a valid broadcast, but not a (F) bias
        return chain_model({**w, "b1": np.ones(1, np.float32)})
    if kind == "b2-rank-2":
        return chain_model({**w, "b2": w["b2"][None]})
    assert kind == "qdq"
    return quantised_w1(chain_model(w))


@pytest.mark.parametrize("kind", ["F-24", "E-8", "weights-are-inputs", "bias-is-input", "relu-is-output", "p1", "a1",
                                  "h", "p2", "h-in-a-subgraph", "sigmoid", "b1-length-1", "b2-rank-2", "qdq",
                                  *(f"linear-{k}" for k in (
                                      "E-24", "weight-is-input", "weight-first", "weight-rank-3", "product-read-twice",
                                      "product-in-a-subgraph", "product-is-output", "bias-1xE", "bias-length-1",
                                      "bias-E+16", "bias-is-input", "bias-computed", "sub", "qdq", "int32"))])
def test_chains_that_do_not_qualify_are_left_alone(kind: str) -> None:
    """Thin or odd widths, weights that are not float initialisers (or not 2-D), an intermediate
    (a layer's product) read by a second node or a graph output, another activation (a layer's
    product read by something other than Add), a bias that is not (F)/(E): untouched by the
    rewrite for the chain (``rewrite``; ``rewrite_linear`` for the linear- ones). (Each model runs
    as written: the rewrite declines valid graphs, not broken ones; except a bias of (E + 16),
    which cannot be added to the product at all, and stays ONNX Runtime's error.)"""
    model = declined(kind)
    if kind == "linear-bias-E+16":
        with pytest.raises(ort_errors.Fail, match="Incompatible dimensions"):
            session(model, library=False)
    else:
        session(model, library=False)
    before = model.SerializeToString()
    assert FUSIONS["Linear" if kind.startswith("linear-") else "FeedForward"][0](model) == 0
    assert model.SerializeToString() == before


@pytest.fixture()
def tiny_copy(tiny_model_path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny.onnx"
    shutil.copyfile(tiny_model_path, copy)
    return copy


def test_engine_runs_the_tiny_model_s_blocks_fused(tiny_copy: Path, tmp_path: Path) -> None:
    """The engine fuses every block the rewrite finds (8 in the tiny M2FP: encoder and decoder
    feed-forward layers, the mask-embedding MLP's first two linears) and then every linear layer
    left (26: the attention's projections, the MLPs' last linears), says so also from its cache,
    and its raw outputs are those of the graph run without the library (0 of either fused)."""
    model = onnx.load(str(tiny_copy))
    expected = feedforward.rewrite(model), feedforward.rewrite_linear(model)
    assert expected == (8, 26)
    options = EngineOptions(intra_op_threads=1, cache_dir=tmp_path)
    first = ParsingEngine(tiny_copy, options=options, warmup=False)
    assert (first.cache_status, first.feedforward_blocks, first.linear_layers) == ("cache written", *expected)
    again = ParsingEngine(tiny_copy, options=options, warmup=False)
    assert (again.cache_status, again.feedforward_blocks, again.linear_layers) == ("cache hit", *expected)
    plain = ParsingEngine(tiny_copy, options=EngineOptions(intra_op_threads=1, cache_dir=tmp_path, msda_kernel="off"),
                          warmup=False)
    assert (plain.feedforward_blocks, plain.linear_layers) == (0, 0)
    x = np.random.default_rng(13).uniform(0, 255, (1, 3, 128, 192)).astype(np.float32)
    want = plain.run(x)
    assert float(np.abs(want.mask_logits).max()) > 0.1
    for got in (first.run(x), again.run(x)):
        np.testing.assert_allclose(got.class_logits, want.class_logits, rtol=1e-3, atol=1e-3)
        assert float(np.abs(got.mask_logits - want.mask_logits).max()) <= 1e-3 * float(np.abs(want.mask_logits).max())


def test_rewrite_command_writes_the_fused_model(tiny_copy: Path, tmp_path: Path) -> None:
    """``python -m m2fp_service.rewrite``: the rewritten model on stdout, the counts on stderr; a
    file that is not a model fails (the engine then runs the graph as exported)."""
    child = subprocess.run([sys.executable, "-m", "m2fp_service.rewrite", str(tiny_copy)], capture_output=True,
                           check=False)
    assert child.returncode == 0, child.stderr.decode()
    fused = onnx.load_from_string(child.stdout)
    assert sum(n.op_type == "FeedForward" for n in fused.graph.node) == 8
    assert sum(n.op_type == "Linear" for n in fused.graph.node) == 26
    assert metadata(fused)[feedforward.METADATA_KEY] == "8" and metadata(fused)[feedforward.LINEAR_METADATA_KEY] == "26"
    stderr = child.stderr.decode()
    assert "8 feed-forward block(s) fused, 0 INT8 feed-forward block(s) fused, 0 INT8 linear layer(s) fused, " \
           "26 linear layer(s) fused" in stderr
    assert "convolution(s) as Winograd" in stderr
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    child = subprocess.run([sys.executable, "-m", "m2fp_service.rewrite", str(broken)], capture_output=True,
                           check=False)
    assert child.returncode != 0 and child.stdout == b""
