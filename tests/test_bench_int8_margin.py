"""bench/int8_margin.py's measuring parts: the class maps it records give the post-processing's own label map,
and its margins and bins are what they say."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from m2fp_service.imaging.postprocess import to_result
from m2fp_service.imaging.preprocess import PreprocessMeta
from m2fp_service.modelcard import InferenceSettings
from tests.imaging.test_postprocess import NUM_CLASSES, synthetic_outputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import int8_margin  # noqa: E402

CLASSES = [f"class {i}" for i in range(NUM_CLASSES)]


def test_recorded_class_maps_give_the_label_map() -> None:
    hw = (96, 160)
    meta = PreprocessMeta(hw, hw, hw)
    class_logits, mask_logits = synthetic_outputs(meta, seed=3)
    labels, maps = int8_margin.class_maps(class_logits, mask_logits, hw, hw, InferenceSettings(), CLASSES)
    assert maps.shape == (InferenceSettings().num_parsing, *hw)
    assert len(np.unique(labels)) >= 5  # several classes voted: the recording has something to miss
    assert (maps.max(0) > 0).mean() > 0.5
    # The same label map as the service's default (fused kernel) path, up to float rounding.
    served = to_result(class_logits, mask_logits, meta, InferenceSettings(), CLASSES, mode="exact").label_map
    assert (labels == served).mean() > 0.999
    margin = int8_margin.margins(maps)
    assert margin.shape == hw and margin.min() >= 0
    assert np.allclose(margin, np.sort(maps, axis=0)[-1] - np.sort(maps, axis=0)[-2])


def test_margins_and_bins_by_hand() -> None:
    maps = np.array([[[0.2, 0.5, 0.3]], [[0.7, 0.1, 0.3]], [[0.1, 0.1, 0.0]]], np.float32)  # (3 classes, 1, 3)
    margin = int8_margin.margins(maps)
    assert np.allclose(margin, [[0.5, 0.4, 0.0]])
    bins = int8_margin.by_margin(np.array([0.0, 0.015, 0.5, 1.0]), np.array([False, True, True, False]))
    assert [b["pixels"] for b in bins] == [1, 1, 0, 0, 0, 2]
    assert bins[0]["agreement"] == 0.0 and bins[1]["agreement"] == 1.0 and bins[-1]["agreement"] == 0.5
    assert bins[2]["agreement"] is None
    assert sum(b["share"] for b in bins) == 1.0
