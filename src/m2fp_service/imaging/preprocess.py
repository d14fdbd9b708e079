"""Image -> model input, exactly as ModelScope's multi-person pipeline prepares it.

Reference (``ImageHumanParsingPipeline.preprocess``): scale so the short edge is 640 unless the
long edge would pass 1333, round half up, resize with PIL bilinear (antialiased, via
torchvision's ``Resize`` on a PIL image), then the model pads bottom/right to a multiple of 32.

The resize is Pillow's, or the native kernel's (``fused.PostKernel.resize_rgb``: the same bytes, on row
bands in parallel, written straight into the padded float input): at 720p ~4 ms where Pillow, the
conversions to and from its image and the float copy took ~15-22 ms here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from m2fp_service.imaging import THREADS, fused
from m2fp_service.modelcard import InputPolicy


@dataclass(frozen=True)
class PreprocessMeta:
    """Geometry of one prepared image, all as (height, width) in pixels."""

    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]


def resized_hw(orig_hw: tuple[int, int], short_edge: int, max_long_edge: int) -> tuple[int, int]:
    """ModelScope's ``_get_preprocess_shape``: the resized (height, width).

    One difference: a side that would round to 0 (images thinner than about 1:1300, which make
    ModelScope's resize fail) is kept at 1 pixel.
    """
    h, w = orig_hw
    if h < 1 or w < 1:
        raise ValueError(f"image has no pixels: {h}x{w}")
    scale = short_edge * 1.0 / min(h, w)
    new_h, new_w = (short_edge * 1.0, scale * w) if h < w else (scale * h, short_edge * 1.0)
    if max(new_h, new_w) > max_long_edge:
        scale = max_long_edge * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def padded_hw(hw: tuple[int, int], divisibility: int) -> tuple[int, int]:
    return -(-hw[0] // divisibility) * divisibility, -(-hw[1] // divisibility) * divisibility


def prepare(image_rgb: np.ndarray, policy: InputPolicy,
            kernel: fused.Choice = "built") -> tuple[np.ndarray, PreprocessMeta]:
    """Resizes and pads an image for the model.

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        policy: the model card's input policy.
        kernel: the native resize: "built" (the package's build when it loads), a
            ``fused.PostKernel``, or None (Pillow's). The same tensor either way.

    Returns:
        ``(tensor, meta)``: tensor is (1, 3, Hp, Wp) float32 RGB in 0..255, padded with the
        policy's pad colour (the normalisation mean, i.e. zero after the graph normalises).
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8 or 0 in image_rgb.shape:
        raise ValueError(f"expected (H, W, 3) uint8, got {image_rgb.shape} {image_rgb.dtype}")
    orig = (int(image_rgb.shape[0]), int(image_rgb.shape[1]))
    new_hw = resized_hw(orig, policy.short_edge, policy.max_long_edge)
    fast = fused.chosen(kernel)
    if new_hw != orig and fast is not None and fused.pillow_rows_first(orig, new_hw):
        tensor = _resized_into_input(fast, np.ascontiguousarray(image_rgb), new_hw, policy)
    else:
        resized = image_rgb if new_hw == orig else np.asarray(
            Image.fromarray(image_rgb).resize((new_hw[1], new_hw[0]), Image.Resampling.BILINEAR))
        tensor = pad_to_input(resized, policy)
    return tensor, PreprocessMeta(orig, new_hw, (int(tensor.shape[2]), int(tensor.shape[3])))


def _resized_into_input(kernel: fused.PostKernel, image_rgb: np.ndarray, hw: tuple[int, int],
                        policy: InputPolicy) -> np.ndarray:
    """``pad_to_input`` of Pillow's resize of the image to ``hw``, by the kernel on row bands in parallel
    (each band resizes the input rows it reads; every value is computed as in one piece)."""
    h, w = hw
    tensor = np.empty((1, 3, *padded_hw(hw, policy.size_divisibility)), np.float32)
    pad = np.asarray(policy.pad_rgb, np.float32)[:, None, None]
    tensor[0, :, :h, w:] = pad  # only the padding: the kernel writes the rest
    tensor[0, :, h:, :] = pad
    edges = np.linspace(0, h, min(THREADS, h) + 1).astype(int)
    bands = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    if len(bands) == 1:
        kernel.resize_rgb(image_rgb, hw, tensor[0], bands[0])
    else:
        with ThreadPoolExecutor(len(bands), thread_name_prefix="m2fp-pre") as pool:
            for done in [pool.submit(kernel.resize_rgb, image_rgb, hw, tensor[0], band) for band in bands]:
                done.result()
    return tensor


def pad_to_input(image_rgb: np.ndarray, policy: InputPolicy) -> np.ndarray:
    """(H, W, 3) image -> (1, 3, Hp, Wp) float32 tensor, padded bottom/right with ``policy.pad_rgb``."""
    h, w = image_rgb.shape[:2]
    tensor = np.empty((1, 3, *padded_hw((h, w), policy.size_divisibility)), np.float32)
    tensor[0] = np.asarray(policy.pad_rgb, np.float32)[:, None, None]
    tensor[0, :, :h, :w] = image_rgb.transpose(2, 0, 1)
    return tensor
