"""Stages of one request on the 720p photo, and the palette merge (pytest-benchmark).

Run by ``make bench`` (not by ``make test``: it lives outside ``tests/`` and asserts no time)::

    python -m pytest bench/test_stages.py --benchmark-json bench/results/stages.json

The palette merge compares the seed's per-class loop (``merge_masks_to_color_image`` as published:
for each class, for each channel, ``np.where`` over the whole image) with ours (one palette lookup,
``render.colorize``), at 512x512 and 1920x1080 with 20 classes. The seed starts from its one-hot
masks, ours from the label map: each from what its pipeline holds at that point.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import models, photo_720p, photo_jpeg  # noqa: E402

from m2fp_service.imaging import fused, postprocess, preprocess, render  # noqa: E402
from m2fp_service.imaging.decode import decode_image  # noqa: E402
from m2fp_service.labels import pascal_palette  # noqa: E402

QUICK = os.environ.get("M2FP_BENCH_QUICK") == "1"
PALETTE = pascal_palette(20)


def seed_merge_masks_to_color_image(masks: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """The seed's colour "puzzle" (seed/000_67d519f1daad60d9.txt), as published."""
    h, w = masks.shape[1], masks.shape[2]
    color_image = np.zeros((h, w, 3), dtype=np.uint8)
    for idx in range(masks.shape[0]):
        if idx >= len(colors):
            continue
        mask = masks[idx] > 0.5
        color = colors[idx]
        for c in range(3):
            color_image[:, :, c] = np.where(mask, color[c], color_image[:, :, c])
    return color_image


def label_map(hw: tuple[int, int]) -> np.ndarray:
    """A parsing-like (H, W) uint8 map: 20 classes in blobs (a coarse random grid, nearest-upscaled)."""
    import cv2

    coarse = np.random.default_rng(0).integers(0, 20, (hw[0] // 32 + 1, hw[1] // 32 + 1)).astype(np.uint8)
    return cv2.resize(coarse, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


SIZES = {"512x512": (512, 512), "1080p": (1080, 1920)}


@pytest.mark.parametrize("size", list(SIZES))
def test_palette_seed_loop(benchmark: Any, size: str) -> None:
    labels = label_map(SIZES[size])
    masks = (labels[None] == np.arange(20, dtype=np.uint8)[:, None, None]).astype(np.float32)
    out = benchmark(seed_merge_masks_to_color_image, masks, PALETTE)
    assert np.array_equal(out, render.colorize(labels, PALETTE))  # both make the same picture


@pytest.mark.parametrize("size", list(SIZES))
def test_palette_ours_lut(benchmark: Any, size: str) -> None:
    labels = label_map(SIZES[size])
    benchmark(render.colorize, labels, PALETTE)


@pytest.fixture(scope="module")
def raw_720p() -> tuple[Any, Any, Any]:
    """The FP32 model's raw outputs on the 720p photo (computed once), with the card and meta."""
    from common import engine

    eng = engine(models(QUICK).fp32)
    tensor, meta = preprocess.prepare(photo_720p(), eng.card.input_policy)
    return eng.run(tensor), eng.card, meta


def test_stage_decode_jpeg_720p(benchmark: Any) -> None:
    data = photo_jpeg()
    benchmark(decode_image, data, max_pixels=40_000_000, max_side=16384)


@pytest.mark.parametrize("path", ["fused", "pillow"])
def test_stage_preprocess_720p(benchmark: Any, raw_720p: tuple[Any, Any, Any], path: str) -> None:
    """``fused``: Pillow's resize done by the native kernel on row bands, into the model input
    (``make native``); ``pillow``: Pillow's own, then the float copy. The same tensor."""
    _, card, _ = raw_720p
    kernel = fused.built() if path == "fused" else None
    if path == "fused" and kernel is None:
        pytest.skip("the native kernel is not built (make native)")
    benchmark(preprocess.prepare, photo_720p(), card.input_policy, kernel=kernel)


@pytest.mark.parametrize("path", ["fused", "fused-avx2", "numpy"])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_stage_postprocess_720p(benchmark: Any, raw_720p: tuple[Any, Any, Any], mode: str, path: str) -> None:
    """``fused``: the per-pixel loops in the native kernel (``make native``), the CPU's widest build;
    ``fused-avx2``: the same library's 8-lane (AVX2) build, what a CPU without AVX-512 runs;
    ``numpy``: OpenCV/numpy. ``fast`` keeps a photo's own size up to twice the model input's pixels
    (720p: the exact path), so its stage takes the same outputs as a 1080p photo's (the model input is
    the same 640 x 1138): the one-pass path at the model-input size, resized to 1920 x 1080."""
    raw, card, meta = raw_720p
    if mode == "fast":
        meta = preprocess.PreprocessMeta(orig_hw=(1080, 1920), resized_hw=meta.resized_hw, padded_hw=meta.padded_hw)
        assert postprocess.work_hw_for(meta, "fast") == meta.resized_hw
    kernel = fused.built() if path.startswith("fused") else None
    if path.startswith("fused") and kernel is None:
        pytest.skip("the post-processing kernel is not built (make native)")
    if path == "fused-avx2":
        try:
            kernel = fused.PostKernel(kernel.path, lanes=8)  # type: ignore[union-attr]
        except OSError as e:
            pytest.skip(f"no AVX2 build this CPU runs: {e}")
    result = benchmark(postprocess.to_result, raw.class_logits, raw.mask_logits, meta, card.inference, card.classes,
                       mode=mode, kernel=kernel)
    assert len(np.unique(result.label_map)) >= 5  # confident weights: a non-trivial map


def test_stage_render_color_png_720p(benchmark: Any) -> None:
    labels = label_map((720, 1280))
    benchmark(lambda: render.b64_png(render.colorize(labels, PALETTE)))


@pytest.mark.parametrize("path", ["fused", "numpy"])
def test_stage_render_class_masks_png_720p(benchmark: Any, path: str) -> None:
    """The seed envelope's class masks (one 0/255 PNG per class present, 20 here) on the encoding threads:
    ``fused``, each mask's filtered rows made from the label map by the native kernel; ``numpy``, the mask
    by OpenCV and its rows filtered by numpy. The same files."""
    labels = label_map((720, 1280))
    present = render.present_classes(labels)
    kernel = fused.built() if path == "fused" else None
    if path == "fused" and kernel is None:
        pytest.skip("the native kernel is not built (make native)")
    jobs = [lambda c=c: render.encode_class_png(labels, c, kernel=kernel) for c in present]
    pngs = benchmark(render.encode_all, jobs)
    assert len(pngs) == len(present) >= 5
