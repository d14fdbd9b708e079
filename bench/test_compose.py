"""Compositing cost per mode at 720p and 1080p, refinement on and off, one thread (pytest-benchmark).

Run by ``make bench`` (it lives outside ``tests/`` and asserts no time)::

    python -m pytest bench/test_compose.py --benchmark-json bench/results/compose.json

The photo is the shared 720p photo (or its 1080p upscale); the kept region is a real person's
shape: the light model's mask of that photo (trained weights), thresholded. "compose" is all the
array work for one picture — matte (selection -> refined alpha) and composite (foreground colour,
backdrop, blend) — without encoding, which is measured apart (PNG with alpha, JPEG).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, photo_720p  # noqa: E402

from m2fp_service.imaging import compose, render  # noqa: E402

cv2.setNumThreads(1)
LIGHT = ROOT / "models" / "light.onnx"
SIZES = {"720p": (720, 1280), "1080p": (1080, 1920)}
if os.environ.get("M2FP_BENCH_QUICK") == "1":
    del SIZES["1080p"]
MODES = ("blur", "image", "color", "transparent", "pixelate")


@pytest.fixture(scope="module")
def person_mask() -> np.ndarray:
    """The light model's person mask of the 720p photo, (720, 1280) bool."""
    if not LIGHT.is_file():
        subprocess.run([sys.executable, "-m", "m2fp_service.cli", "export-light", "-o", str(LIGHT)], check=True,
                       cwd=ROOT)
    from m2fp_service.segmenter import PersonSegmenter

    mask = PersonSegmenter(LIGHT).run(photo_720p()) > 0.5
    assert 0.05 < mask.mean() < 0.9, "the photo's people must be found for this benchmark to mean anything"
    return mask


def at_size(size: str, photo: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = SIZES[size]
    if photo.shape[:2] == (h, w):
        return photo, mask
    return (cv2.resize(photo, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0)


@pytest.mark.parametrize("refine", [True, False], ids=["refine", "no-refine"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
def test_compose(benchmark: Any, person_mask: np.ndarray, size: str, mode: str, refine: bool) -> None:
    photo, mask = at_size(size, photo_720p(), person_mask)
    backdrop = np.ascontiguousarray(photo[::-1, ::-1]) if mode == "image" else None
    options = compose.ComposeOptions(mode=mode)  # type: ignore[arg-type]

    def run() -> np.ndarray:
        alpha = compose.matte(mask, photo, refine=refine)
        return compose.composite(photo, alpha, options, backdrop)

    out = benchmark(run)
    assert out.shape[:2] == photo.shape[:2]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("size", list(SIZES))
def test_encode(benchmark: Any, person_mask: np.ndarray, size: str, fmt: str) -> None:
    photo, mask = at_size(size, photo_720p(), person_mask)
    alpha = compose.matte(mask, photo)
    mode = "transparent" if fmt == "png" else "blur"
    picture = compose.composite(photo, alpha, compose.ComposeOptions(mode=mode))  # type: ignore[arg-type]
    data = benchmark(render.encode_image, picture, fmt)
    assert len(data) > 1000
