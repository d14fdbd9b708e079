"""DequantizeLinear copies and measuring-only nodes taken out of an INT8 model's optimised graph (``qdedupe``).

The graphs are what ONNX Runtime saves after optimising an INT8 model: one DequantizeLinear per reader of a
quantized tensor, and DequantizeLinear nodes read only by Shape. After the rewrite every output is the same, bit
for bit, with fewer nodes; what must stay (a graph output, a name read inside a subgraph) stays. The engine opens a
saved graph so that ONNX Runtime does not make the copies again.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from m2fp_service import qdedupe
from m2fp_service.engine import EngineOptions, saved_graph_options


def dequantize(name: str, out: str, x: str = "x") -> onnx.NodeProto:
    return helper.make_node("DequantizeLinear", [x, "scale", "zero_point"], [out], name=name)


def graph_with_copies(*, extra_nodes: list[onnx.NodeProto] = (), extra_outputs: list[str] = ()) -> onnx.ModelProto:
    """x (1, 4, 6, 8) uint8 read through three DequantizeLinear copies (a Relu, a Softmax, a Resize each) and one
    read only by a Shape; and an initialiser dequantized twice (biases the exporter shares) for two Adds."""
    nodes = [
        dequantize("dq_a", "xa"), dequantize("dq_b", "xb"), dequantize("dq_c", "xc"), dequantize("dq_s", "xs"),
        helper.make_node("DequantizeLinear", ["bias_q", "scale"], ["b1"], name="dq_bias_1"),
        helper.make_node("DequantizeLinear", ["bias_q", "scale"], ["b2"], name="dq_bias_2"),
        helper.make_node("Relu", ["xa"], ["ra"]), helper.make_node("Add", ["ra", "b1"], ["y1"]),
        helper.make_node("Softmax", ["xb"], ["sb"], axis=-1), helper.make_node("Add", ["sb", "b2"], ["y2"]),
        helper.make_node("Resize", ["xc", "", "scales"], ["y3"], mode="linear"),
        helper.make_node("Shape", ["xs"], ["y4"]),
        *extra_nodes,
    ]
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(np.float32(0.05), "scale"), numpy_helper.from_array(np.uint8(120), "zero_point"),
            numpy_helper.from_array(rng.integers(-128, 128, 8, dtype=np.int8), "bias_q"),
            numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "scales")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "y4" else TensorProto.FLOAT, None)
               for n in ["y1", "y2", "y3", "y4", *extra_outputs]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 6, 8])],
                              outputs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = saved_graph_options(EngineOptions(intra_op_threads=1), None)
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})  # type: ignore[no-any-return]


def ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


X = np.random.default_rng(1).integers(0, 256, (1, 4, 6, 8), dtype=np.uint8)


def test_copies_and_measuring_only_nodes_go_with_the_same_outputs() -> None:
    """The three copies of x become one, the measuring-only node goes (the Shape reads x: the same shape), the
    twice-dequantized bias becomes one: 4 nodes fewer, the outputs the same bit for bit, the count in the metadata."""
    model = graph_with_copies()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert qdedupe.rewrite(copy) == 4
    assert ops(copy)["DequantizeLinear"] == 2
    assert next(n for n in copy.graph.node if n.op_type == "Shape").input[0] == "x"
    want, got = run(model, X), run(copy, X)
    assert [a.dtype for a in want] == [a.dtype for a in got]
    for a, b in zip(want, got, strict=True):
        assert np.array_equal(a, b)
    assert np.unique(want[0]).size > 20 and want[3].tolist() == [1, 4, 6, 8]
    assert {p.key: p.value for p in copy.metadata_props}[qdedupe.METADATA_KEY] == "4"


def test_a_copy_that_is_a_graph_output_or_read_in_a_subgraph_stays() -> None:
    """A copy whose output is a graph output keeps its name; one read inside an If body cannot be renamed there:
    both stay (the other copy still merges into the first)."""
    then = helper.make_graph([helper.make_node("Identity", ["xd"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["xd"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    extra = [dequantize("dq_out", "xo"), dequantize("dq_sub", "xd"),
             helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c")),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=other)]
    model = graph_with_copies(extra_nodes=extra, extra_outputs=["xo", "branch"])
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert qdedupe.rewrite(copy) == 4
    names = {n.name for n in copy.graph.node if n.op_type == "DequantizeLinear"}
    assert {"dq_out", "dq_sub", "dq_a", "dq_bias_1"} == names
    for a, b in zip(run(model, X), run(copy, X), strict=True):
        assert np.array_equal(a, b)


def test_a_graph_without_copies_is_left_alone() -> None:
    """One DequantizeLinear per tensor and none read only by Shape: nothing to do, the graph byte for byte."""
    nodes = [dequantize("dq", "xf"), helper.make_node("Relu", ["xf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.float32(0.1), "scale"),
                               numpy_helper.from_array(np.uint8(3), "zero_point")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert qdedupe.rewrite(model) == 0 and model.SerializeToString() == before


def test_dequantize_nodes_with_other_operands_are_not_merged() -> None:
    """Copies of the same input with another zero point or axis compute other values: they stay apart."""
    nodes = [helper.make_node("DequantizeLinear", ["x", "scale", "zero_point"], ["a"]),
             helper.make_node("DequantizeLinear", ["x", "scale", "other_zero_point"], ["b"]),
             helper.make_node("DequantizeLinear", ["x", "scale", "zero_point"], ["c"], axis=0),
             helper.make_node("Sub", ["a", "b"], ["ab"]), helper.make_node("Sub", ["a", "c"], ["y"]),
             helper.make_node("Add", ["ab", "y"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.float32(0.1), "scale"),
                               numpy_helper.from_array(np.uint8(3), "zero_point"),
                               numpy_helper.from_array(np.uint8(9), "other_zero_point")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert qdedupe.rewrite(model) == 0 and model.SerializeToString() == before


def test_the_engine_opens_a_saved_graph_without_copying_dequantize_nodes_again(tmp_path: Path) -> None:
    """ONNX Runtime gives each reader of a DequantizeLinear its own copy when it loads a graph, even with the
    optimisers off (EnsureUniqueDQForNodeUnit): the graph it runs, saved, has the copies back. With the engine's
    options for a saved graph it runs the graph as it is."""
    model = graph_with_copies()
    assert qdedupe.rewrite(model) == 4
    counts = {}
    for name, so in {"plain": ort.SessionOptions(), "engine": saved_graph_options(EngineOptions(), None)}.items():
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        counts[name] = ops(onnx.load(str(tmp_path / f"{name}.onnx")))["DequantizeLinear"]
    assert counts == {"plain": 5, "engine": 2}  # x read three times, the bias twice
