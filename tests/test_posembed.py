"""ai.m2fp::SinePositionEmbedding (``native/m2fp_posembed.cc``) and the rewrite that proves and replaces the
exported position embeddings (``m2fp_service/posembed.py``).

The op is checked against ModelScope's own ``PositionEmbeddingSine`` (the PyTorch module M2FP runs) and the
numpy port the rewrite proves with; the rewrite on the tiny M2FP model as exported and on its INT8 quantization
(whose graph ONNX Runtime optimised: there the embedding's tensor before its last transpose is read too), by the
embeddings' own tensors (the untrained weights cannot show them in the outputs: the encoder's sampling offsets
and attention weights are zero, the decoder's residual branches cut), and on a spoilt embedding it must leave.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from m2fp_service import feedforward, posembed
from m2fp_service.engine import BUILT_MSDA_KERNEL, session_options

pytestmark = pytest.mark.usefixtures("kernel_library")

EMBEDDING = re.compile(r"/pe_layer(?:_\d+)?/(?:Transpose|Concat_5)_output_0$")


def op_model() -> onnx.ModelProto:
    node = helper.make_node("SinePositionEmbedding", ["x", "params"], ["pos"], domain=feedforward.DOMAIN)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                            helper.make_tensor_value_info("params", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("pos", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(feedforward.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = session_options(2)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def op(shape: tuple[int, ...], params: list[float]) -> np.ndarray:
    x = np.zeros(shape, np.float32)
    return session(op_model()).run(None, {"x": x, "params": np.asarray(params, np.float32)})[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("shape", [(1, 4, 20, 36), (2, 3, 5, 7), (1, 1, 1, 1), (1, 2, 1, 9), (1, 256, 80, 144)])
def test_the_op_is_modelscope_s_position_embedding(shape: tuple[int, ...]) -> None:
    import torch
    from modelscope.models.cv.image_instance_segmentation.maskdino.position_encoding import PositionEmbeddingSine

    want = PositionEmbeddingSine(128, normalize=True)(torch.zeros(shape)).numpy()
    got = op(shape, [128, 10000, 2 * math.pi, 1, 0])
    assert got.shape == want.shape == (shape[0], 256, shape[2], shape[3])
    assert float(np.abs(got - want).max()) < 1e-6
    assert float(np.abs(posembed.sine_embedding(shape[0], shape[2], shape[3], 128) - want).max()) < 1e-6
    last = op(shape, [128, 10000, 2 * math.pi, 1, 1])
    assert np.array_equal(last, got.transpose(0, 2, 3, 1))


@pytest.mark.parametrize(("feats", "temperature", "normalize"), [(64, 10000.0, 1), (16, 20.0, 0), (2, 10000.0, 1)])
def test_the_op_s_parameters(feats: int, temperature: float, normalize: int) -> None:
    import torch
    from modelscope.models.cv.image_instance_segmentation.maskdino.position_encoding import PositionEmbeddingSine

    want = PositionEmbeddingSine(feats, temperature, normalize=bool(normalize))(torch.zeros(1, 3, 6, 11)).numpy()
    got = op((1, 3, 6, 11), [feats, temperature, 2 * math.pi, normalize, 0])
    assert float(np.abs(got - want).max()) <= 1e-6 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize(("shape", "params", "message"), [
    ((1, 4, 5), [128, 10000, 6.28, 1, 0], r"x must be \(N, C, H, W\)"),
    ((1, 4, 5, 5), [128, 10000, 6.28, 1], r"params must be \(5\)"),
    ((1, 4, 5, 5), [127, 10000, 6.28, 1, 0], "F must be an even whole number"),
    ((1, 4, 5, 5), [12.5, 10000, 6.28, 1, 0], "F must be an even whole number"),
    ((1, 4, 5, 5), [128, 0, 6.28, 1, 0], "temperature must be positive"),
    ((1, 4, 5, 5), [128, 10000, float("nan"), 1, 0], "scale finite"),
    ((1, 4, 5, 5), [128, 10000, 6.28, 2, 0], "normalize and channels_last 0 or 1"),
    ((1, 4, 5, 5), [128, 10000, 6.28, 1, 0.5], "normalize and channels_last 0 or 1"),
])
def test_the_op_refuses_what_it_cannot_compute(shape: tuple[int, ...], params: list[float], message: str) -> None:
    with pytest.raises(Exception, match=message):
        op(shape, params)


def test_an_empty_map_gives_an_empty_embedding() -> None:
    assert op((2, 3, 0, 7), [8, 10000, 6.28, 1, 0]).shape == (2, 16, 0, 7)
    assert op((0, 3, 4, 7), [8, 10000, 6.28, 1, 1]).shape == (0, 4, 7, 16)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return copy


def _embeddings(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """The rewritten model's embedding tensors (both layouts where both are there) and outputs are the original's."""
    made = {o for n in rewritten.graph.node for o in n.output}
    names = sorted({o for n in original.graph.node for o in n.output if EMBEDDING.search(o)} & made)
    assert len(names) >= 6  # each embedding's result at least (the tensors before the Transposes, where kept)
    first, second = session(_with_outputs(original, names)), session(_with_outputs(rewritten, names))
    for hw in ((320, 480), (224, 352)):
        x = np.random.default_rng(1).uniform(0, 255, (1, 3, *hw)).astype(np.float32)
        want, got = first.run(None, {"image": x}), second.run(None, {"image": x})
        for name, a, b in zip(["outputs", "", *names], want, got, strict=True):
            assert a.shape == b.shape and float(np.abs(a - b).max()) < 1e-6, name


def test_rewrite_replaces_the_tiny_model_s_six_embeddings(tiny_model_path: Path) -> None:
    original = onnx.load(str(tiny_model_path))
    model = onnx.load(str(tiny_model_path))
    assert posembed.rewrite(model) == 6
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("SinePositionEmbedding") == 6 and "Sin" not in ops and "Cos" not in ops
    assert len(model.graph.node) < len(original.graph.node) - 6 * 40
    assert {p.key: p.value for p in model.metadata_props}[posembed.METADATA_KEY] == "6"
    onnx.checker.check_model(model)
    _embeddings(original, model)
    assert posembed.rewrite(model) == 0  # nothing left to prove


def test_rewrite_proves_the_int8_graph_s_embeddings_channels_last(tiny_model_path: Path, tmp_path: Path) -> None:
    """In a graph ONNX Runtime optimised (the exporter does, before quantizing) later nodes read the shape of the
    tensor before the embedding's last Transpose: the op makes that tensor (channels last), the Transpose stays."""
    from m2fp_export.quantize import PRESETS, quantize_file

    config = dataclasses.replace(PRESETS["avx2"], calibration_count=2, calibration_short_edge=192,
                                 min_label_agreement=0.0, min_person_iou=0.0)
    quantize_file(tiny_model_path, tmp_path / "int8.onnx", config, [], report=lambda _: None)
    original = onnx.load(str(tmp_path / "int8.onnx"))
    model = onnx.load(str(tmp_path / "int8.onnx"))
    assert posembed.rewrite(model) == 6
    nodes = [n for n in model.graph.node if n.op_type == "SinePositionEmbedding"]
    params = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in {n.input[1] for n in nodes}]
    assert len(params) == 6 and any(p[4] == 1 for p in params)  # channels last where the NHWC tensor is read
    assert "Sin" not in [n.op_type for n in model.graph.node]
    _embeddings(original, model)


def test_rewrite_leaves_an_embedding_it_cannot_prove(tiny_model_path: Path) -> None:
    """One Sin turned into a Cos in one embedding: that one fails the proof and stays as it is; the others go."""
    original = onnx.load(str(tiny_model_path))
    (spoilt,) = [n for n in original.graph.node if n.op_type == "Sin" and "/predictor/pe_layer_1/" in n.name][:1]
    spoilt.op_type = "Cos"
    model = onnx.ModelProto()
    model.CopyFrom(original)
    assert posembed.rewrite(model) == 5
    assert [n.name for n in model.graph.node if n.op_type == "Sin" or n.op_type == "Cos"] and \
        all("/predictor/pe_layer_1/" in n.name for n in model.graph.node if n.op_type in ("Sin", "Cos"))
    _embeddings(original, model)


def test_rewrite_leaves_a_subgraph_reading_values() -> None:
    """A 'position embedding' whose subgraph reads the feature map's values (not only its shape) is not one."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="/m/pe_layer/Transpose", perm=[0, 1, 2, 3]),
             helper.make_node("Relu", ["t"], ["y"], name="/m/after")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    assert posembed.rewrite(model) == 0 and model.SerializeToString() == before
