"""Feed-forward blocks as one op (``feedforward.rewrite`` + ``native/m2fp_ffn.cc``).

The op is checked against a float64 numpy reference and against ONNX Runtime running the five
nodes it replaces (MatMul, Add, Relu, MatMul, Add) with the same weights; the rewrite against the
graph as exported, and against the graphs it must leave alone byte for byte.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from m2fp_service import feedforward
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


def reference(x: np.ndarray, w: Weights) -> tuple[np.ndarray, float]:
    """y in float64, and the fraction of hidden units the Relu zeroes."""
    hidden = np.maximum(x.astype(np.float64) @ w["w1"].astype(np.float64) + w["b1"], 0.0)
    return hidden @ w["w2"].astype(np.float64) + w["b2"], float((hidden == 0).mean())


def chain_model(w: Weights, rank: int = 3, *, act: str = "Relu", bias_first: bool = False, identity: bool = False,
                as_inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x (..., D) -> MatMul(w1) -> Add(b1) -> act -> MatMul(w2) -> Add(b2) -> y, as an exporter writes it:
    weights are initialisers (graph inputs for the names in ``as_inputs``), optionally read through
    Identity nodes, each bias on the right of its Add (on the left with ``bias_first``)."""
    nodes: list[onnx.NodeProto] = []

    def operand(name: str) -> str:
        if not identity or name in as_inputs:
            return name
        nodes.append(helper.make_node("Identity", [name], [f"{name}_id"], name=f"{name}_identity"))
        return f"{name}_id"

    def add(product: str, bias: str, out: str) -> onnx.NodeProto:
        return helper.make_node("Add", [bias, product] if bias_first else [product, bias], [out], name=f"add_{out}")

    w1, b1, w2, b2 = (operand(n) for n in ("w1", "b1", "w2", "b2"))
    nodes += [helper.make_node("MatMul", ["x", w1], ["p1"], name="mm1"), add("p1", b1, "a1"),
              helper.make_node(act, ["a1"], ["h"], name="act"),
              helper.make_node("MatMul", ["h", w2], ["p2"], name="mm2"), add("p2", b2, "y")]
    d = w["w1"].shape[0]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * (rank - 1) + [d])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(w[n].shape)) for n in as_inputs]
    inits = [numpy_helper.from_array(a, n) for n, a in w.items() if n not in as_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def op_model(inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One ai.m2fp::FeedForward node whose five operands are graph inputs of the given ranks."""
    graph = helper.make_graph(
        [helper.make_node("FeedForward", list(inputs), ["y"], domain=feedforward.DOMAIN)], "g",
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


def rewritten(model: onnx.ModelProto, count: int = 1) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert feedforward.rewrite(copy) == count
    return copy


def assert_close(expected: np.ndarray, got: np.ndarray, rtol: float = 1e-5) -> None:
    """Equal within ``rtol`` of the output's scale, which is large enough to mean something."""
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0.5
    assert float(np.abs(got.astype(np.float64) - expected).max()) <= rtol * scale


@pytest.mark.parametrize("shape,f,e", [
    ((1, 16), 16, 16), ((5, 24), 64, 32), ((6, 256), 1024, 256), ((7, 24), 16, 16), ((48, 256), 1024, 256),
    ((49, 24), 64, 32), ((100, 16), 64, 256), ((301, 256), 1024, 256),
    ((24,), 64, 32), ((3, 100, 16), 1024, 32), ((2, 3, 5, 24), 16, 32), ((4, 13, 256), 64, 16),
    ((2, 400, 24), 64, 32), ((0, 24), 64, 32), ((2, 0, 16), 16, 16),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_op_matches_numpy_and_the_unfused_graph(shape: tuple[int, ...], f: int, e: int) -> None:
    """Every row of x, whatever its rank and however its rows fall into 6-row groups and blocks
    (1, 5, 6, 7, 48, 49, 100, 301, 800 rows; several blocks, full 48-row ones; batch > 1), gets relu(x w1 + b1) w2 + b2:
    the float64 result, and ONNX Runtime's own for the five nodes. No rows: an empty y."""
    w = weights(shape[-1], f, e, seed=sum(shape) + f + e)
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    got = run(op_model({"x": x, **w}), {"x": x, **w})
    unfused = run(chain_model(w, rank=x.ndim), {"x": x}, library=False)
    assert got.shape == unfused.shape == (*shape[:-1], e) and got.dtype == np.float32
    if x.size == 0:
        return
    expected, zeroed = reference(x, w)
    assert 0.2 < zeroed < 0.8  # the Relu does something, and not everything
    assert_close(expected, got)
    assert_close(unfused.astype(np.float64), got)


def test_a_nan_row_stays_nan() -> None:
    """A NaN in x reaches y as it does through ONNX's Relu (kept, not turned into 0); other rows are finite."""
    w = weights(16, 32, 16, seed=3)
    x = np.random.default_rng(4).standard_normal((8, 16)).astype(np.float32)
    x[5, 3] = np.nan
    got = run(op_model({"x": x, **w}), {"x": x, **w})
    unfused = run(chain_model(w, rank=2), {"x": x}, library=False)
    assert np.isnan(unfused[5]).all() and np.isnan(got[5]).all()
    assert np.isfinite(np.delete(got, 5, axis=0)).all()


def test_the_generic_build_gives_the_same_results() -> None:
    """M2FP_FFN_KERNEL=generic (read once per process) runs the products built for any CPU instead
    of the AVX2 build: the op tests pass on it too, in a child process that says which build ran."""
    library = ctypes.CDLL(str(BUILT_MSDA_KERNEL))
    library.m2fp_ffn_kernel.restype = ctypes.c_char_p
    here = library.m2fp_ffn_kernel().decode()
    flags = set()
    if Path("/proc/cpuinfo").is_file():
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
    on_avx2 = platform.machine() == "x86_64" and {"avx2", "fma"} <= flags
    assert here == ("avx2-fma" if on_avx2 else "generic")  # this CPU's build is the one that runs here
    probe = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.m2fp_ffn_kernel.restype = ctypes.c_char_p; "
             "print(lib.m2fp_ffn_kernel().decode())")
    env = {**os.environ, "M2FP_FFN_KERNEL": "generic"}
    which = subprocess.run([sys.executable, "-c", probe, str(BUILT_MSDA_KERNEL)], env=env, capture_output=True,
                           text=True, check=True)
    assert which.stdout.strip() == "generic"
    child = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                            "-k", "op_matches or nan_row"], env=env, capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stdout[-3000:]
    assert "16 passed" in child.stdout  # 15 shapes and the NaN row


def operands(d: int = 16, f: int = 16, e: int = 16, rows: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.ones((rows, d), np.float32), **weights(d, f, e)}


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
], ids=["F-24", "E-8", "w1-rank-3", "w1-rank-1", "w1-rows", "w2-rows", "w2-rank-1", "b1-length", "b1-rank-2",
        "b2-length", "x-scalar"])
def test_hostile_inputs_are_refused(inputs: dict[str, np.ndarray], message: str) -> None:
    """Operands the kernel cannot take (widths not multiples of 16, weights or biases of the wrong
    rank or length, a scalar x) are refused with the op's own message naming the shapes, not run."""
    with pytest.raises((ort_errors.InvalidArgument, ort_errors.Fail, ort_errors.RuntimeException),
                       match="ai\\.m2fp::FeedForward: " + message):
        run(op_model(inputs), inputs)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.mark.parametrize("bias_first", [False, True], ids=["bias-second", "bias-first"])
@pytest.mark.parametrize("identity", [False, True], ids=["initialisers", "through-identity"])
def test_a_chain_becomes_one_node_with_the_same_result(bias_first: bool, identity: bool) -> None:
    """The five nodes become one FeedForward reading the initialisers themselves (the Identity
    copies, read by nothing else, go); the count is returned and recorded with the model's other
    metadata; the ai.m2fp opset is added."""
    w = weights(24, 64, 32, seed=5)
    model = chain_model(w, bias_first=bias_first, identity=identity)
    helper.set_model_props(model, {"exporter": "test"})
    fast = rewritten(model)
    (node,) = fast.graph.node
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == (
        "FeedForward", "ai.m2fp", ["x", "w1", "b1", "w2", "b2"], ["y"])
    assert metadata(fast) == {"exporter": "test", feedforward.METADATA_KEY: "1"}
    assert [(o.domain, o.version) for o in fast.opset_import] == [("", 17), ("ai.m2fp", 1)]
    x = np.random.default_rng(6).standard_normal((2, 7, 24)).astype(np.float32)
    assert_close(run(model, {"x": x}, library=False).astype(np.float64), run(fast, {"x": x}))


def test_an_identity_read_elsewhere_is_kept_and_an_existing_opset_reused() -> None:
    """Only the fused blocks' Identity copies that nothing reads any more go (w1's, read by another
    MatMul, stays; an unread one the blocks never read is not the rewrite's business);
    a model that already imports ai.m2fp (the exporter's MSDeformAttn) does not get it twice. F = E,
    so that b1 and b2 swapped would run and only the numbers would tell."""
    w = weights(16, 32, 32, seed=7)  # F = E: biases swapped would still run
    model = chain_model(w, identity=True)
    model.opset_import.append(helper.make_opsetid(feedforward.DOMAIN, 1))
    model.graph.node.append(helper.make_node("MatMul", ["x", "w1_id"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    model.graph.node.append(helper.make_node("Identity", ["w2"], ["unread"], name="unrelated"))  # not the rewrite's
    fast = rewritten(model)
    assert [n.op_type for n in fast.graph.node] == ["Identity", "FeedForward", "MatMul", "Identity"]
    assert fast.graph.node[0].output[0] == "w1_id"
    assert sum(o.domain == feedforward.DOMAIN for o in fast.opset_import) == 1
    x = np.random.default_rng(8).standard_normal((1, 9, 16)).astype(np.float32)
    want, got = session(model, library=False).run(None, {"x": x}), session(fast).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        assert_close(a.astype(np.float64), b)


def test_an_mlp_of_three_linears_is_fused_once() -> None:
    """L0 relu L1 relu L2: the first chain (L0, L1) wins; L1's output then feeds Relu, L2 as before."""
    model = chain_model(weights(16, 64, 32, seed=9))
    w3 = weights(32, 16, 16, seed=10)
    model.graph.initializer.extend([numpy_helper.from_array(w3["w1"], "w3"), numpy_helper.from_array(w3["b1"], "b3")])
    model.graph.node.extend([helper.make_node("Relu", ["y"], ["h2"]), helper.make_node("MatMul", ["h2", "w3"], ["p3"]),
                             helper.make_node("Add", ["p3", "b3"], ["z"])])
    model.graph.output[0].name = "z"
    fast = rewritten(model)
    assert [n.op_type for n in fast.graph.node] == ["FeedForward", "Relu", "MatMul", "Add"]
    x = np.random.default_rng(11).standard_normal((3, 50, 16)).astype(np.float32)
    assert_close(run(model, {"x": x}, library=False).astype(np.float64), run(fast, {"x": x}))


def also_read(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``name`` read by a second node, whose output is a graph output."""
    model.graph.node.append(helper.make_node("Neg", [name], [f"{name}_neg"]))
    model.graph.output.append(helper.make_tensor_value_info(f"{name}_neg", TensorProto.FLOAT, None))
    return model


def declined(kind: str) -> onnx.ModelProto:
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
        model = chain_model(w)
        branch = helper.make_graph([helper.make_node("Neg", ["h"], ["h_neg"])], "branch", [],
                                   [helper.make_tensor_value_info("h_neg", TensorProto.FLOAT, None)])
        model.graph.initializer.append(numpy_helper.from_array(np.array(True), "yes"))
        model.graph.node.append(helper.make_node("If", ["yes"], ["side"], then_branch=branch, else_branch=branch))
        model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
        return model
    if kind == "sigmoid":
        return chain_model(w, act="Sigmoid")
    if kind == "b1-length-1":  # a valid broadcast, but not a (F) bias
        return chain_model({**w, "b1": np.ones(1, np.float32)})
    if kind == "b2-rank-2":
        return chain_model({**w, "b2": w["b2"][None]})
    assert kind == "qdq"  # INT8 weights: W1 is a DequantizeLinear's output
    model = chain_model(w)
    (w1,) = [t for t in model.graph.initializer if t.name == "w1"]
    model.graph.initializer.remove(w1)
    model.graph.initializer.extend([numpy_helper.from_array(np.ones((16, 32), np.int8), "w1q"),
                                    numpy_helper.from_array(np.array(0.01, np.float32), "s"),
                                    numpy_helper.from_array(np.array(0, np.int8), "z")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w1q", "s", "z"], ["w1"]))
    return model


@pytest.mark.parametrize("kind", ["F-24", "E-8", "weights-are-inputs", "bias-is-input", "relu-is-output", "p1", "a1",
                                  "h", "p2", "h-in-a-subgraph", "sigmoid", "b1-length-1", "b2-rank-2", "qdq"])
def test_chains_that_do_not_qualify_are_left_alone(kind: str) -> None:
    """Thin or odd widths, weights that are not float initialisers, an intermediate read by a
    second node or a graph output, another activation, a bias that is not (F)/(E): untouched.
    (Each model runs as written: the rewrite declines valid graphs, not broken ones.)"""
    model = declined(kind)
    session(model, library=False)
    before = model.SerializeToString()
    assert feedforward.rewrite(model) == 0
    assert model.SerializeToString() == before


@pytest.fixture()
def tiny_copy(tiny_model_path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny.onnx"
    shutil.copyfile(tiny_model_path, copy)
    return copy


def test_engine_runs_the_tiny_model_s_blocks_fused(tiny_copy: Path, tmp_path: Path) -> None:
    """The engine fuses every block the rewrite finds (8 in the tiny M2FP: encoder and decoder
    feed-forward layers, the mask-embedding MLP's first two linears), says so also from its cache,
    and its raw outputs are those of the graph run without the library."""
    expected = feedforward.rewrite(onnx.load(str(tiny_copy)))
    assert expected == 8
    options = EngineOptions(intra_op_threads=1, cache_dir=tmp_path)
    first = ParsingEngine(tiny_copy, options=options, warmup=False)
    assert (first.cache_status, first.feedforward_blocks) == ("cache written", expected)
    again = ParsingEngine(tiny_copy, options=options, warmup=False)
    assert (again.cache_status, again.feedforward_blocks) == ("cache hit", expected)
    plain = ParsingEngine(tiny_copy, options=EngineOptions(intra_op_threads=1, cache_dir=tmp_path, msda_kernel="off"),
                          warmup=False)
    assert plain.feedforward_blocks == 0
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
    assert "8 feed-forward block(s) fused, 26 linear layer(s) fused" in stderr
    assert "convolution(s) as Winograd" in stderr
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    child = subprocess.run([sys.executable, "-m", "m2fp_service.rewrite", str(broken)], capture_output=True,
                           check=False)
    assert child.returncode != 0 and child.stdout == b""
