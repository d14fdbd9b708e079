"""Tests for ``m2fp_service.imaging.preprocess`` against hand-computed sizes and ModelScope's own code.

The reference is ``ImageHumanParsingPipeline``: ``_get_preprocess_shape`` for the size and
``T.Compose([T.Resize((h, w)), T.ToTensor()])(pil_image) * 255`` for the pixels.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from m2fp_service.imaging.preprocess import PreprocessMeta, padded_hw, prepare, resized_hw
from m2fp_service.modelcard import InputPolicy

POLICY = InputPolicy()
# A small policy so down- and up-scaling cases stay tiny; same rules, other numbers.
SMALL = InputPolicy(short_edge=20, max_long_edge=36, size_divisibility=8, pad_rgb=(1.5, 2.25, 3.0))


@pytest.fixture(scope="module")
def get_preprocess_shape() -> Callable[[int, int, int, int], tuple[int, int]]:
    """ModelScope's ``_get_preprocess_shape``, unbound (it never touches ``self``)."""
    from m2fp_export import msda

    msda.install()
    with warnings.catch_warnings():  # timm/modelscope deprecation noise at import time
        warnings.simplefilter("ignore", FutureWarning)
        from modelscope.pipelines.cv.image_human_parsing_pipeline import ImageHumanParsingPipeline

    def shape(h: int, w: int, short: int, longest: int) -> tuple[int, int]:
        return ImageHumanParsingPipeline._get_preprocess_shape(None, h, w, short, longest)  # type: ignore[no-any-return]

    return shape


def _reference_pixels(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(3, h, w) float32, exactly as ModelScope's pipeline transforms a PIL image."""
    transform = T.Compose([T.Resize(hw), T.ToTensor()])
    with torch.no_grad():
        return (transform(Image.fromarray(image)) * 255.0).numpy()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# resized_hw
# ---------------------------------------------------------------------------------------------

RESIZED = [
    # (orig_hw, short_edge, max_long_edge, expected), every expected worked out by hand
    pytest.param((480, 640), 640, 1333, (640, 853), id="landscape-4:3"),  # 640*4/3 = 853.3
    pytest.param((640, 480), 640, 1333, (853, 640), id="portrait-3:4"),
    pytest.param((640, 640), 640, 1333, (640, 640), id="already-640-square"),
    pytest.param((640, 700), 640, 1333, (640, 700), id="already-right-size"),
    pytest.param((1, 1), 640, 1333, (640, 640), id="1x1"),
    pytest.param((256, 257), 640, 1333, (640, 643), id="half-rounds-up"),  # 2.5*257 = 642.5 -> 643
    pytest.param((512, 1024), 640, 1333, (640, 1280), id="2:1-under-cap"),
    pytest.param((640, 1333), 640, 1333, (640, 1333), id="long-edge-equal-to-cap"),
    pytest.param((640, 1334), 640, 1333, (640, 1333), id="long-edge-one-over-cap"),  # 639.52 -> 640
    pytest.param((300, 700), 640, 1333, (571, 1333), id="capped-landscape"),  # 640*1333/1493.3 = 571.3
    pytest.param((100, 1000), 640, 1333, (133, 1333), id="capped-10:1"),
    pytest.param((1000, 100), 640, 1333, (1333, 133), id="capped-1:10"),
    pytest.param((3, 1), 640, 1333, (1333, 444), id="capped-3:1"),  # 1333/3 = 444.3
    # ModelScope rounds these to 0 and its resize then fails; we keep 1 pixel.
    pytest.param((1, 5000), 640, 1333, (1, 1333), id="1x5000-height-kept-at-1"),  # 0.27 -> 0 -> 1
    pytest.param((5000, 1), 640, 1333, (1333, 1), id="5000x1-width-kept-at-1"),
    pytest.param((4000, 3000), 640, 1333, (853, 640), id="downscale-portrait"),
    pytest.param((100, 200), 32, 1000, (32, 64), id="other-short-edge"),
    pytest.param((100, 200), 32, 40, (20, 40), id="other-cap"),
]


@pytest.mark.parametrize(("orig", "short", "longest", "expected"), RESIZED)
def test_resized_hw_table(
    orig: tuple[int, int],
    short: int,
    longest: int,
    expected: tuple[int, int],
    get_preprocess_shape: Callable[[int, int, int, int], tuple[int, int]],
) -> None:
    got = resized_hw(orig, short, longest)
    assert got == expected
    assert all(type(v) is int for v in got)
    # The table is also ModelScope's answer (guards against a wrong hand computation), except
    # where ModelScope rounds a side to 0.
    theirs = get_preprocess_shape(*orig, short, longest)
    assert theirs == expected or (0 in theirs and tuple(max(1, v) for v in theirs) == expected)


def _random_sizes(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    extreme = [(1, 5000), (5000, 1), (1, 1), (1, 2), (2, 1), (1, 1333), (1333, 1), (7, 9999), (9999, 7)]
    log_sizes = np.exp(rng.uniform(0, np.log(8000), size=(n, 2))).astype(int) + 1
    uniform = rng.integers(1, 2500, size=(n, 2))
    return extreme + [tuple(map(int, s)) for s in np.concatenate([log_sizes, uniform])]


def test_resized_hw_matches_modelscope_on_random_sizes(
    get_preprocess_shape: Callable[[int, int, int, int], tuple[int, int]],
) -> None:
    rng = np.random.default_rng(0)
    sizes = _random_sizes(rng, 1500)
    mismatches = [
        (s, resized_hw(s, 640, 1333), get_preprocess_shape(*s, 640, 1333))
        for s in sizes
        if resized_hw(s, 640, 1333) != tuple(max(1, v) for v in get_preprocess_shape(*s, 640, 1333))
    ]
    assert not mismatches, mismatches[:10]


def test_resized_hw_matches_modelscope_with_random_policies(
    get_preprocess_shape: Callable[[int, int, int, int], tuple[int, int]],
) -> None:
    rng = np.random.default_rng(1)
    for _ in range(1500):
        h, w = (int(v) for v in rng.integers(1, 4000, size=2))
        short = int(rng.integers(1, 1200))
        longest = int(rng.integers(short, 2500))
        assert resized_hw((h, w), short, longest) == get_preprocess_shape(h, w, short, longest), (
            h,
            w,
            short,
            longest,
        )


# ---------------------------------------------------------------------------------------------
# padded_hw
# ---------------------------------------------------------------------------------------------

PADDED = [
    # (hw, divisibility, expected, raises)
    pytest.param((640, 853), 32, (640, 864), None, id="pad-width"),
    pytest.param((853, 640), 32, (864, 640), None, id="pad-height"),
    pytest.param((640, 640), 32, (640, 640), None, id="already-multiple"),
    pytest.param((1, 1), 32, (32, 32), None, id="1x1"),
    pytest.param((33, 65), 32, (64, 96), None, id="one-over"),
    pytest.param((31, 63), 32, (32, 64), None, id="one-under"),
    pytest.param((0, 1333), 32, (0, 1344), None, id="zero-height"),
    pytest.param((5, 7), 1, (5, 7), None, id="divisibility-1"),
    pytest.param((5, 7), 4, (8, 8), None, id="divisibility-4"),
    pytest.param((5, 7), 0, None, ZeroDivisionError, id="divisibility-0"),
]


@pytest.mark.parametrize(("hw", "div", "expected", "raises"), PADDED)
def test_padded_hw(
    hw: tuple[int, int], div: int, expected: tuple[int, int] | None, raises: type[Exception] | None
) -> None:
    with pytest.raises(raises) if raises else contextlib.nullcontext():
        assert padded_hw(hw, div) == expected


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: content a resize cannot get right by accident."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * yy / max(h - 1, 1), 255 * xx / max(w - 1, 1), 127 + 0 * xx], -1)
    return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


PREPARE = [
    # (orig_hw, policy, resized_hw, padded_hw)
    pytest.param((48, 64), POLICY, (640, 853), (640, 864), id="upscale-landscape"),
    pytest.param((70, 30), POLICY, (1333, 571), (1344, 576), id="upscale-capped-portrait"),
    pytest.param((900, 1200), POLICY, (640, 853), (640, 864), id="downscale-landscape"),
    pytest.param((1, 1), POLICY, (640, 640), (640, 640), id="1x1"),
    pytest.param((13, 17), SMALL, (20, 26), (24, 32), id="small-policy-upscale"),
    pytest.param((97, 61), SMALL, (32, 20), (32, 24), id="small-policy-downscale"),
    pytest.param((40, 200), SMALL, (7, 36), (8, 40), id="small-policy-capped"),
]


@pytest.mark.parametrize(("orig", "policy", "new_hw", "pad_hw"), PREPARE)
def test_prepare_matches_modelscope_transform(
    orig: tuple[int, int], policy: InputPolicy, new_hw: tuple[int, int], pad_hw: tuple[int, int]
) -> None:
    image = _image(*orig)
    before = image.copy()
    tensor, meta = prepare(image, policy)

    assert meta == PreprocessMeta(orig, new_hw, pad_hw)
    assert tensor.shape == (1, 3, *pad_hw)
    assert tensor.dtype == np.float32
    np.testing.assert_array_equal(image, before)  # input untouched

    h, w = new_hw
    region = tensor[0, :, :h, :w]
    reference = _reference_pixels(image, new_hw)
    assert reference.shape == region.shape
    np.testing.assert_allclose(region, reference, rtol=0, atol=1e-4)

    # Pad: the policy colour, exactly, in every padded pixel of each channel.
    pad = np.asarray(policy.pad_rgb, np.float32)
    for c in range(3):
        below, right = tensor[0, c, h:, :], tensor[0, c, :h, w:]
        assert below.size + right.size == pad_hw[0] * pad_hw[1] - h * w
        assert np.all(below == pad[c]) and np.all(right == pad[c])


def test_prepare_without_resize_copies_pixels_exactly() -> None:
    image = _image(640, 700, seed=3)
    tensor, meta = prepare(image, POLICY)
    assert meta == PreprocessMeta((640, 700), (640, 700), (640, 704))
    np.testing.assert_array_equal(tensor[0, :, :, :700], image.transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(tensor[0, :, :, :700], _reference_pixels(image, (640, 700)))
    assert np.all(tensor[0, :, :, 700:] == np.asarray(POLICY.pad_rgb, np.float32)[:, None, None])


def test_prepare_exact_fit_has_no_padding() -> None:
    policy = InputPolicy(short_edge=32, max_long_edge=64, size_divisibility=16)
    image = _image(32, 48)
    tensor, meta = prepare(image, policy)
    assert meta == PreprocessMeta((32, 48), (32, 48), (32, 48))
    np.testing.assert_array_equal(tensor[0], image.transpose(2, 0, 1).astype(np.float32))


def test_prepare_keeps_rgb_channel_order() -> None:
    image = np.zeros((640, 640, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30
    tensor, _ = prepare(image, POLICY)
    assert [float(tensor[0, c, 5, 5]) for c in range(3)] == [10.0, 20.0, 30.0]


def test_prepare_accepts_non_contiguous_views() -> None:
    image = _image(60, 80)
    view = image[:, ::-1]  # negative stride, as a horizontal flip gives
    tensor, _ = prepare(view, SMALL)
    expected, _ = prepare(np.ascontiguousarray(view), SMALL)
    np.testing.assert_array_equal(tensor, expected)


REJECTS = [
    # (array, raises)
    pytest.param(np.zeros((8, 8), np.uint8), ValueError, id="grey-2d"),
    pytest.param(np.zeros((8, 8, 1), np.uint8), ValueError, id="one-channel"),
    pytest.param(np.zeros((8, 8, 4), np.uint8), ValueError, id="rgba"),
    pytest.param(np.zeros((1, 8, 8, 3), np.uint8), ValueError, id="batched-4d"),
    pytest.param(np.zeros((3, 8, 8), np.uint8), ValueError, id="chw-layout"),
    pytest.param(np.zeros((8, 8, 3), np.float32), ValueError, id="float32"),
    pytest.param(np.zeros((8, 8, 3), np.uint16), ValueError, id="uint16"),
    pytest.param(np.zeros((8, 8, 3), np.int8), ValueError, id="int8"),
    pytest.param(np.zeros((8, 8, 3), bool), ValueError, id="bool"),
    # The reference size rounds one side to 0; there is no image to make (PIL refuses too).
    pytest.param(np.zeros((0, 5, 3), np.uint8), ValueError, id="empty-height"),
    pytest.param(np.zeros((5, 0, 3), np.uint8), ValueError, id="empty-width"),
]


@pytest.mark.parametrize(("array", "raises"), REJECTS)
def test_prepare_rejects(array: np.ndarray, raises: type[Exception]) -> None:
    with pytest.raises(raises):
        prepare(array, POLICY)


def test_prepare_error_message_names_shape_and_dtype() -> None:
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8, got \(8, 8, 3\) float32"):
        prepare(np.zeros((8, 8, 3), np.float32), POLICY)


@pytest.mark.parametrize("shape", [(1, 5000, 3), (5000, 1, 3)])
def test_prepare_serves_extremely_thin_images(shape: tuple[int, int, int]) -> None:
    tensor, meta = prepare(np.full(shape, 200, np.uint8), POLICY)
    assert min(meta.resized_hw) == 1 and max(meta.resized_hw) == 1333
    assert tensor.shape == (1, 3, *meta.padded_hw)


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0, 3)])
def test_prepare_rejects_empty_image_with_value_error(shape: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        prepare(np.zeros(shape, np.uint8), POLICY)
