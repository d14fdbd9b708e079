"""The native resize of preprocessing (``fused.PostKernel.resize_rgb``, native/m2fp_resize.c) against the
installed Pillow's own ``Image.resize(..., BILINEAR)``: the same bytes on images of many sizes, in any band
of rows, and ``prepare`` giving the same tensor with and without it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from m2fp_service.imaging import fused
from m2fp_service.imaging.preprocess import prepare
from m2fp_service.modelcard import InputPolicy
from tests.imaging.conftest import LIBRARY_UNDER_TEST, assert_tests_pass_on_a_build_for, cpu_lanes


def _needs_a_known_pillow() -> None:
    """Skips a test of the kernel against the installed Pillow when ``pillow_rows_first`` does not know
    its order of passes (a Pillow after 13: the kernel is then never used, and refuses)."""
    if not fused.pillow_rows_first((3, 3), (2, 2)):  # rows first in every version it knows
        pytest.skip(f"Pillow {Image.__version__}'s order of passes is not known to fused.pillow_rows_first: "
                    "teach it this version")


def _pillow(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(3, h, w) float32: Pillow's resize, planar."""
    resized = Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized).transpose(2, 0, 1).astype(np.float32)


def _kernel(kernel: fused.PostKernel, image: np.ndarray, hw: tuple[int, int], bands: list[int],
            margin: tuple[int, int] = (3, 5)) -> np.ndarray:
    """The kernel's resize, band by band (``bands``: the band edges), into a larger planar array whose
    margin must stay untouched."""
    out = np.full((3, hw[0] + margin[0], hw[1] + margin[1]), -7.0, np.float32)
    for y0, y1 in zip(bands[:-1], bands[1:], strict=True):
        kernel.resize_rgb(image, hw, out, (y0, y1))
    assert np.all(out[:, hw[0]:, :] == -7.0) and np.all(out[:, :, hw[1]:] == -7.0)
    return out[:, :hw[0], :hw[1]]


def _images(rng: np.random.Generator, h: int, w: int) -> list[np.ndarray]:
    """Noise, hard black/white edges, and flat extremes (sums at the ends of the fixed-point range)."""
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return [noise, np.where(noise > 127, 255, 0).astype(np.uint8), np.full((h, w, 3), 255, np.uint8),
            np.zeros((h, w, 3), np.uint8)]


def _cases(n: int, seed: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Random (input, output) sizes, shrinking and growing, that Pillow resizes along rows first."""
    rng, cases = np.random.default_rng(seed), []
    while len(cases) < n:
        h, w, oh, ow = (int(v) for v in rng.integers(1, 260, 4))
        if fused.pillow_rows_first((h, w), (oh, ow)):
            cases.append(((h, w), (oh, ow)))
    return cases


SIZES = [
    pytest.param((720, 1280), (640, 1138), id="720p-to-model"),
    pytest.param((1280, 720), (1138, 640), id="portrait-720p"),
    pytest.param((1080, 1920), (640, 1138), id="1080p"),
    pytest.param((48, 64), (640, 853), id="upscale"),
    pytest.param((1, 1), (640, 640), id="1x1"),
    pytest.param((1, 300), (2, 640), id="one-row"),
    pytest.param((300, 1), (640, 3), id="one-column"),
    pytest.param((100, 100), (100, 37), id="same-height"),
    pytest.param((100, 100), (250, 100), id="same-width"),
    pytest.param((37, 1000), (5, 133), id="strong-shrink"),
]


@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES)
def test_the_same_bytes_as_pillow(kernel: fused.PostKernel, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    _needs_a_known_pillow()
    rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
    for image in _images(rng, *in_hw):
        got = _kernel(kernel, image, out_hw, [0, out_hw[0]])
        np.testing.assert_array_equal(got, _pillow(image, out_hw))


def test_the_same_bytes_as_pillow_on_random_sizes_and_bands(kernel: fused.PostKernel) -> None:
    """Any split of the rows into bands (of one row too) gives Pillow's bytes: each band resizes the input
    rows it reads along the row itself."""
    _needs_a_known_pillow()
    rng = np.random.default_rng(5)
    for in_hw, out_hw in _cases(150, seed=11):
        image = _images(rng, *in_hw)[int(rng.integers(0, 2))]
        cuts = sorted({0, out_hw[0], *(int(c) for c in rng.integers(0, out_hw[0] + 1, int(rng.integers(0, 4))))})
        got = _kernel(kernel, image, out_hw, cuts)
        np.testing.assert_array_equal(got, _pillow(image, out_hw), err_msg=f"{in_hw} -> {out_hw} in bands {cuts}")


def test_pillow_rows_first_is_the_installed_pillows_order() -> None:
    """Where the rule says rows first, Pillow's resize equals its row pass then its column pass (each
    alone a one-axis resize); where it says columns first (12.2 and later), the other way round. Half
    the sizes are photo-like, half over 100 times as tall as wide (12.2-12.3's case). Sizes where the two
    orders give the same bytes say nothing and are not counted."""
    _needs_a_known_pillow()
    rng = np.random.default_rng(2)
    seen = {True: 0, False: 0}
    for i in range(400):
        if i % 2:
            h, w, oh, ow = (int(v) for v in rng.integers(2, 120, 4))
        else:
            w, ow = (int(v) for v in rng.integers(1, 4, 2))
            h = int(rng.integers(101 * w, 420))
            oh = int(rng.integers(2, h))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        whole = np.asarray(Image.fromarray(image).resize((ow, oh), Image.Resampling.BILINEAR))
        rows_then_columns = np.asarray(Image.fromarray(image).resize((ow, h), Image.Resampling.BILINEAR))
        rows_then_columns = np.asarray(Image.fromarray(rows_then_columns).resize((ow, oh), Image.Resampling.BILINEAR))
        columns_then_rows = np.asarray(Image.fromarray(image).resize((w, oh), Image.Resampling.BILINEAR))
        columns_then_rows = np.asarray(Image.fromarray(columns_then_rows).resize((ow, oh), Image.Resampling.BILINEAR))
        if np.array_equal(rows_then_columns, columns_then_rows):
            continue
        rows_first = fused.pillow_rows_first((h, w), (oh, ow))
        expected = rows_then_columns if rows_first else columns_then_rows
        np.testing.assert_array_equal(whole, expected, err_msg=f"{(h, w)} -> {(oh, ow)}")
        seen[rows_first] += 1
    assert seen[True] > 50  # both orders were put to the test, where the installed Pillow has two
    assert seen[False] > 20 or fused.PILLOW_VERSION is not None and fused.PILLOW_VERSION < (12, 2)


@pytest.mark.parametrize(("text", "version"), [("12.1.1", (12, 1)), ("12.2.0", (12, 2)), ("13.0.0", (13, 0)),
                                               ("13.1.0.dev0", None), ("14.0.0rc1", None), ("13", None)])
def test_pillow_version_of_releases_only(monkeypatch: pytest.MonkeyPatch, text: str,
                                          version: tuple[int, int] | None) -> None:
    monkeypatch.setattr(PIL, "__version__", text)
    assert fused._pillow_version() == version


def test_prepare_gives_pillows_tensor(kernel: fused.PostKernel) -> None:
    """``prepare`` with the kernel and without it (Pillow): the same tensor, padding included, for
    photo-like sizes and a tall image that Pillow 13 resizes along columns first (Pillow's path)."""
    _needs_a_known_pillow()  # else both calls take Pillow's path and the comparison says nothing
    rng = np.random.default_rng(8)
    policy = InputPolicy(pad_rgb=(1.5, 2.25, 3.0))
    for hw in [(720, 1280), (1280, 720), (481, 653), (2000, 700), (31, 47)]:
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        got, meta = prepare(image, policy, kernel=kernel)
        expected, expected_meta = prepare(image, policy, kernel=None)
        assert meta == expected_meta
        np.testing.assert_array_equal(got, expected)
    view = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)[::-1, ::2]  # not contiguous
    np.testing.assert_array_equal(prepare(view, policy, kernel=kernel)[0], prepare(view, policy, kernel=None)[0])


def test_prepare_leaves_the_image_alone(kernel: fused.PostKernel) -> None:
    image = np.random.default_rng(3).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    before = image.copy()
    prepare(image, InputPolicy(), kernel=kernel)
    np.testing.assert_array_equal(image, before)


BAD = [
    pytest.param(np.zeros((10, 10), np.uint8), (5, 5), (3, 5, 5), (0, 5), "image must be", id="2-d-image"),
    pytest.param(np.zeros((10, 10, 4), np.uint8), (5, 5), (3, 5, 5), (0, 5), "image must be", id="rgba"),
    pytest.param(np.zeros((10, 10, 3), np.float32), (5, 5), (3, 5, 5), (0, 5), "uint8", id="float-image"),
    pytest.param(np.zeros((10, 20, 3), np.uint8)[:, ::2], (5, 5), (3, 5, 5), (0, 5), "C-contiguous", id="strided"),
    pytest.param(np.zeros((10, 10, 3), np.uint8), (5, 5), (3, 4, 5), (0, 4), "room for", id="out-too-short"),
    pytest.param(np.zeros((10, 10, 3), np.uint8), (5, 5), (2, 5, 5), (0, 5), "out must be", id="two-planes"),
    pytest.param(np.zeros((10, 10, 3), np.uint8), (5, 5), (3, 5, 5), (0, 6), "not within", id="rows-past-end"),
    pytest.param(np.zeros((10, 10, 3), np.uint8), (5, 5), (3, 5, 5), (3, 2), "not within", id="rows-reversed"),
    pytest.param(np.zeros((10, 10, 3), np.uint8), (5, 5), (3, 5, 5), (-1, 2), "not within", id="rows-negative"),
    pytest.param(np.zeros((10, 10, 3), np.uint8), (0, 5), (3, 5, 5), (0, 0), "at least 1x1", id="no-height"),
    pytest.param(np.zeros((10, 10, 3), np.float32), (5, 5), (3, 5, 5), (2, 2), "uint8", id="empty-band-float"),
    pytest.param(np.zeros((100, 10, 3), np.uint8), (20, 9), (3, 20, 9), (0, 20), "columns first",
                 id="pillows-other-order"),
]


@pytest.mark.parametrize(("image", "hw", "out_shape", "rows", "message"), BAD)
def test_resize_rgb_refuses(kernel: fused.PostKernel, image: np.ndarray, hw: tuple[int, int],
                            out_shape: tuple[int, int, int], rows: tuple[int, int], message: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "PILLOW_VERSION", (13, 0))  # whose rule takes the columns first for one case
    out = np.full(out_shape, -7.0, np.float32)
    with pytest.raises(ValueError, match=message):
        kernel.resize_rgb(image, hw, out, rows)
    assert np.all(out == -7.0)


def test_resize_rgb_refuses_a_read_only_or_float64_output(kernel: fused.PostKernel) -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    read_only = np.zeros((3, 5, 5), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        kernel.resize_rgb(image, (5, 5), read_only, (0, 5))
    with pytest.raises(ValueError, match="float32"):
        kernel.resize_rgb(image, (5, 5), np.zeros((3, 5, 5)), (0, 5))


RULES = [
    # (in_hw, out_hw, version, rows first), worked out from each version's rule
    pytest.param((100, 10), (50, 5), (12, 1), True, id="before-12.2-always"),
    pytest.param((2000, 10), (1333, 7), (12, 1), True, id="before-12.2-tall"),
    pytest.param((2000, 10), (1333, 7), (12, 2), False, id="12.2-over-100x-shrinking"),
    pytest.param((1000, 10), (500, 5), (12, 3), True, id="12.3-exactly-100x"),
    pytest.param((2000, 10), (2100, 11), (12, 3), True, id="12.3-over-100x-growing"),
    pytest.param((300, 150), (100, 50), (13, 0), True, id="13-height-loses-twice-the-width"),
    pytest.param((300, 150), (99, 50), (13, 0), False, id="13-height-loses-more"),
    pytest.param((300, 100), (100, 100), (13, 0), True, id="13-width-kept-one-pass"),
    pytest.param((3000, 10), (1000, 10), (12, 2), True, id="12.2-width-kept-one-pass"),
    pytest.param((100, 300), (50, 150), (13, 0), True, id="13-wide"),
    pytest.param((100, 100), (50, 200), (13, 0), False, id="13-width-grows-height-shrinks"),
    pytest.param((100, 100), (200, 50), (13, 0), True, id="13-height-grows"),
    pytest.param((720, 1280), (640, 1138), (14, 0), False, id="14-unknown"),
    pytest.param((720, 1280), (640, 1138), (13, 1), False, id="13.1-unknown"),
    pytest.param((720, 1280), (640, 1138), (12, 4), False, id="12.4-unknown"),
]


@pytest.mark.parametrize(("in_hw", "out_hw", "version", "rows_first"), RULES)
def test_pillow_rows_first_per_version(in_hw: tuple[int, int], out_hw: tuple[int, int], version: tuple[int, int],
                                       rows_first: bool) -> None:
    assert fused.pillow_rows_first(in_hw, out_hw, version) is rows_first


def test_an_empty_band_writes_nothing(kernel: fused.PostKernel) -> None:
    _needs_a_known_pillow()
    out = np.full((3, 5, 5), -7.0, np.float32)
    kernel.resize_rgb(np.zeros((10, 10, 3), np.uint8), (5, 5), out, (2, 2))
    assert np.all(out == -7.0)


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_every_narrower_build_passes_these_tests(march: str, tmp_path: Path) -> None:
    """The resize's loops are built per x86-64 level too (target clones): each level built alone passes
    this module's tests in a child process."""
    if os.environ.get(LIBRARY_UNDER_TEST):
        pytest.skip("already a child")
    if platform.machine() != "x86_64" or cpu_lanes() < {"x86-64": 4, "x86-64-v3": 8, "x86-64-v4": 16}[march]:
        pytest.skip(f"this CPU does not run {march}")
    assert_tests_pass_on_a_build_for(march, tmp_path, __file__, "-k", "not installed_pillows_order")
