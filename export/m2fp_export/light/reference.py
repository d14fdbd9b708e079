"""MediaPipe's own runtime for the selfie segmentation .tflite: the parity reference.

``mediapipe`` 1.2.x (PyPI) runs the file through its Tasks ``ImageSegmenter`` (TFLite with
XNNPACK and MediaPipe's ``Convolution2DTransposeBias`` op), with numpy 2. It is an export/test
time reference only, never a runtime dependency. It reads the input normalisation from the
model's own metadata (mean 0, std 255: input 0..1), stretches the image to the model input as
the legacy solution graph does, and resizes the mask back to the image size.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np


def available() -> bool:
    return importlib.util.find_spec("mediapipe") is not None


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("mediapipe")


class MediaPipeReference:
    """One MediaPipe ImageSegmenter on a .tflite file (confidence masks only)."""

    def __init__(self, tflite_path: Path) -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ INFO lines on every graph start
        logging.getLogger("absl").setLevel(logging.ERROR)
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        options = vision.ImageSegmenterOptions(base_options=BaseOptions(model_asset_path=str(tflite_path)),
                                               output_confidence_masks=True, output_category_mask=False)
        self._segmenter: Any = vision.ImageSegmenter.create_from_options(options)

    def segment(self, image_rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 person probability, MediaPipe's whole pipeline."""
        h, w = image_rgb.shape[:2]
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(image_rgb))
        masks = self._segmenter.segment(image).confidence_masks
        return np.array(masks[0].numpy_view(), dtype=np.float32).reshape(h, w)

    def close(self) -> None:
        self._segmenter.close()

    def __enter__(self) -> MediaPipeReference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
