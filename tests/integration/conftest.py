"""Fixtures for the real-server tests: broken and faulty model files made from the tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image


@pytest.fixture(scope="session")
def faulty_model_path(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with one extra branch that ONNX Runtime rejects at run time for some inputs.

    A near-white input (mean > 250 after pre-processing) makes a ``Gather`` index 7 into a 2-element
    tensor, which ONNX Runtime refuses ("indices element out of data bounds"); for every other
    input the branch adds 0 to the class logits, so the model loads, warms up (zeros) and parses
    photos exactly as the tiny model does.
    """
    model = onnx.load(str(tiny_model_path))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["class_logits_raw" if o == "class_logits" else o for o in node.output]
    graph.initializer.extend([
        numpy_helper.from_array(np.array(250.0, np.float32), "fault_threshold"),
        numpy_helper.from_array(np.array(7, np.int64), "fault_index"),
        numpy_helper.from_array(np.zeros(2, np.float32), "fault_table"),
    ])
    graph.node.extend([
        helper.make_node("ReduceMean", ["image"], ["fault_mean"], keepdims=0),
        helper.make_node("Greater", ["fault_mean", "fault_threshold"], ["fault_flag"]),
        helper.make_node("Cast", ["fault_flag"], ["fault_flag64"], to=TensorProto.INT64),
        helper.make_node("Mul", ["fault_flag64", "fault_index"], ["fault_at"]),
        helper.make_node("Gather", ["fault_table", "fault_at"], ["fault_zero"]),
        helper.make_node("Add", ["class_logits_raw", "fault_zero"], ["class_logits"]),
    ])
    path = tmp_path_factory.mktemp("models") / "faulty.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def white_png() -> bytes:
    """640x640 white: the input the faulty model's extra branch rejects (no resize, no padding)."""
    buf = io.BytesIO()
    Image.new("RGB", (640, 640), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()
