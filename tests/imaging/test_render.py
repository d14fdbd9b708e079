"""Tests for ``m2fp_service.imaging.render`` on hand-written 2x2 .. 4x4 arrays (and the PNG writer on odd shapes)."""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import os
import platform
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from m2fp_service.imaging import fused, render
from m2fp_service.imaging.render import (
    b64_png,
    class_mask,
    colorize,
    cutout,
    encode_png,
    overlay,
    palette_lut,
    present_classes,
)
from m2fp_service.labels import pascal_palette
from tests.imaging.conftest import LIBRARY_UNDER_TEST, assert_tests_pass_on_a_build_for, cpu_lanes

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (10, 20, 30)]

LABELS_4X4 = np.array(
    [
        [0, 0, 1, 1],
        [0, 2, 2, 1],
        [3, 3, 0, 0],
        [3, 9, 200, 255],  # 9, 200, 255 are past the palette
    ],
    np.uint8,
)


# ---------------------------------------------------------------------------------------------
# palette_lut, colorize
# ---------------------------------------------------------------------------------------------

LUTS = [
    # (palette, rows to check {id: rgb}, raises)
    pytest.param(
        PALETTE,
        {0: (0, 0, 0), 1: (255, 0, 0), 3: (10, 20, 30), 4: (0, 0, 0), 255: (0, 0, 0)},
        None,
        id="short-palette-rest-black",
    ),
    pytest.param([(1, 2, 3)] * 256, {0: (1, 2, 3), 255: (1, 2, 3)}, None, id="full-palette"),
    pytest.param([(1, 2, 3)] * 300, {255: (1, 2, 3)}, None, id="longer-than-256-truncated"),
    pytest.param([(256, 0, 0)], {}, OverflowError, id="component-over-255"),
]


@pytest.mark.parametrize(("palette", "rows", "raises"), LUTS)
def test_palette_lut(
    palette: list[tuple[int, int, int]], rows: dict[int, tuple[int, int, int]], raises: type[Exception] | None
) -> None:
    with pytest.raises(raises) if raises else contextlib.nullcontext():
        lut = palette_lut(palette)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
        for i, rgb in rows.items():
            assert tuple(lut[i]) == rgb, i


def test_colorize_hand_4x4() -> None:
    got = colorize(LABELS_4X4, PALETTE)
    assert got.shape == (4, 4, 3) and got.dtype == np.uint8
    expected = np.zeros((4, 4, 3), np.uint8)
    expected[0, 2:] = expected[1, 3] = (255, 0, 0)
    expected[1, 1:3] = (0, 255, 0)
    expected[2, :2] = expected[3, 0] = (10, 20, 30)
    # ids 9, 200 and 255 are beyond the palette: black
    np.testing.assert_array_equal(got, expected)


def test_colorize_matches_per_pixel_lookup_with_real_palette() -> None:
    palette = pascal_palette(20)
    labels = np.random.default_rng(0).integers(0, 25, (13, 17)).astype(np.uint8)
    got = colorize(labels, palette)
    for (y, x), label in np.ndenumerate(labels):
        expected = palette[label] if label < len(palette) else (0, 0, 0)
        assert tuple(got[y, x]) == expected


@pytest.mark.parametrize("layout", ["contiguous", "view", "empty", "1x1", "2x2", "1x4"])
def test_colorize_present_and_masks_equal_numpy_on_a_photo_sized_map(layout: str) -> None:
    """OpenCV's lookup, histogram and comparison give numpy's fancy index, bincount and equality
    exactly (every id 0..255, ids past the palette black), on views and empty maps too."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 256, (720, 1281)).astype(np.uint8)
    labels[:300] = rng.integers(0, 20, (300, 1281))
    if layout == "view":
        labels = labels[::2, 1::3]
    elif layout == "empty":
        labels = labels[:0]
    elif "x" in layout:  # maps as small as a scalar, which OpenCV's arithmetic can mistake for one
        h, w = map(int, layout.split("x"))
        labels = labels[:h, :w].copy()
        labels[0, 0] = 7
    palette = pascal_palette(20)
    np.testing.assert_array_equal(colorize(labels, palette), palette_lut(palette)[labels])
    wide = labels.astype(np.int64)  # other integer labels take numpy's path, with the same results
    np.testing.assert_array_equal(colorize(wide, palette), palette_lut(palette)[labels])
    assert present_classes(wide) == present_classes(labels)
    np.testing.assert_array_equal(class_mask(wide, 7), class_mask(labels, 7))
    assert present_classes(labels) == [int(i) for i in np.flatnonzero(np.bincount(labels.ravel(), minlength=256))]
    for class_id in (0, 7, 19, 200, 255):
        np.testing.assert_array_equal(class_mask(labels, class_id), (labels == class_id).astype(np.uint8) * 255)


# ---------------------------------------------------------------------------------------------
# overlay
# ---------------------------------------------------------------------------------------------


def test_overlay_hand_2x2() -> None:
    image = np.array([[[100, 100, 100], [101, 100, 100]], [[0, 51, 200], [7, 7, 7]]], np.uint8)
    labels = np.array([[0, 1], [2, 0]], np.uint8)
    got = overlay(image, labels, PALETTE, alpha=0.5)
    assert got.shape == image.shape and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, 0], image[0, 0])  # background untouched
    np.testing.assert_array_equal(got[1, 1], image[1, 1])
    np.testing.assert_array_equal(got[0, 1], [178, 50, 50])  # red: ((101, 100, 100) + (255, 0, 0)) / 2
    np.testing.assert_array_equal(got[1, 0], [0, 153, 100])  # green: ((0, 51, 200) + (0, 255, 0)) / 2


ALPHAS = [
    # (alpha, labelled pixel expected as a function of image and colour)
    pytest.param(0.0, "image", id="alpha-0-keeps-image"),
    pytest.param(1.0, "colour", id="alpha-1-paints-colour"),
    pytest.param(0.25, "blend", id="alpha-quarter"),
    pytest.param(0.5, "blend", id="alpha-half"),
]


@pytest.mark.parametrize(("alpha", "expect"), ALPHAS)
def test_overlay_blends_only_labelled_pixels(alpha: float, expect: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    labels = LABELS_4X4.copy()
    before = image.copy()
    got = overlay(image, labels, PALETTE, alpha=alpha)
    np.testing.assert_array_equal(image, before)  # input untouched
    colour = colorize(labels, PALETTE).astype(np.float64)
    background = labels == 0
    np.testing.assert_array_equal(got[background], image[background])
    if expect == "image":
        wanted = image.astype(np.float64)
    elif expect == "colour":
        wanted = colour
    else:
        wanted = image * (1 - alpha) + colour * alpha
    diff = np.abs(got[~background].astype(np.float64) - wanted[~background])
    assert diff.max() <= 0.5 + 1e-9  # rounded to the nearest integer


def test_overlay_changes_labelled_pixels() -> None:
    image = np.full((4, 4, 3), 128, np.uint8)
    got = overlay(image, LABELS_4X4, PALETTE, alpha=0.5)
    in_palette = np.arange(256) < len(PALETTE)
    labelled = (LABELS_4X4 > 0) & in_palette[LABELS_4X4]
    assert np.all(np.any(got[labelled] != 128, axis=-1))
    # Past-palette ids are labelled too: blended with black.
    np.testing.assert_array_equal(got[3, 1], [64, 64, 64])


# ---------------------------------------------------------------------------------------------
# present_classes, class_mask, cutout
# ---------------------------------------------------------------------------------------------

PRESENT = [
    # (label_map, expected)
    pytest.param(LABELS_4X4, [0, 1, 2, 3, 9, 200, 255], id="4x4"),
    pytest.param(np.zeros((3, 3), np.uint8), [0], id="all-background"),
    pytest.param(np.full((2, 2), 7, np.uint8), [7], id="single-class-no-background"),
    pytest.param(np.zeros((0, 5), np.uint8), [], id="empty"),
]


@pytest.mark.parametrize(("labels", "expected"), PRESENT)
def test_present_classes(labels: np.ndarray, expected: list[int]) -> None:
    got = present_classes(labels)
    assert got == expected
    assert all(type(c) is int for c in got)


CLASS_MASKS = [
    # (class_id, expected)
    pytest.param(0, [[255, 255, 0, 0], [255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 0]], id="background"),
    pytest.param(1, [[0, 0, 255, 255], [0, 0, 0, 255], [0, 0, 0, 0], [0, 0, 0, 0]], id="class-1"),
    pytest.param(255, [[0] * 4, [0] * 4, [0] * 4, [0, 0, 0, 255]], id="class-255"),
    pytest.param(5, [[0] * 4] * 4, id="absent"),
]


@pytest.mark.parametrize(("class_id", "expected"), CLASS_MASKS)
def test_class_mask(class_id: int, expected: list[list[int]]) -> None:
    got = class_mask(LABELS_4X4, class_id)
    assert got.dtype == np.uint8 and got.shape == (4, 4)
    assert set(np.unique(got).tolist()) <= {0, 255}
    np.testing.assert_array_equal(got, np.array(expected, np.uint8))


def test_cutout() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    fg = np.array([[True, False, True], [False, False, True]])
    got = cutout(image, fg)
    assert got.shape == (2, 3, 4) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., :3], image)
    np.testing.assert_array_equal(got[..., 3], [[255, 0, 255], [0, 0, 255]])


# ---------------------------------------------------------------------------------------------
# encode_png, b64_png
# ---------------------------------------------------------------------------------------------


def _grey() -> np.ndarray:
    return np.array([[0, 1, 2], [128, 254, 255]], np.uint8)


def _rgb() -> np.ndarray:
    # Pure red / green / blue pixels: any channel swap shows.
    return np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[1, 2, 3], [250, 100, 5], [0, 0, 0]]], np.uint8)


def _rgba() -> np.ndarray:
    return np.dstack([_rgb(), np.array([[0, 64, 128], [255, 1, 200]], np.uint8)])


PNGS = [
    # (make, pil_mode, cv2 conversion of the decoded BGR(A) back to RGB(A))
    pytest.param(_grey, "L", None, id="grey"),
    pytest.param(_rgb, "RGB", cv2.COLOR_BGR2RGB, id="rgb"),
    pytest.param(_rgba, "RGBA", cv2.COLOR_BGRA2RGBA, id="rgba"),
]


@pytest.mark.parametrize(("make", "mode", "to_rgb"), PNGS)
@pytest.mark.parametrize("compression", [0, 1, 9])
def test_encode_png_round_trips(make: object, mode: str, to_rgb: int | None, compression: int) -> None:
    image = make()  # type: ignore[operator]
    data = encode_png(image, compression=compression)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == mode
        np.testing.assert_array_equal(np.asarray(im), image)  # Pillow decodes RGB(A) in RGB order

    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if to_rgb is not None:
        decoded = cv2.cvtColor(decoded, to_rgb)
    np.testing.assert_array_equal(decoded, image)


SHAPES = [(1, 1), (1, 300), (300, 1), (2, 2, 3), (1, 1, 4), (257, 129), (720, 1280)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("content", ["flat", "blobs", "noise"])
def test_encode_png_of_odd_shapes_and_contents_decodes_to_the_pixels(shape: tuple[int, ...], content: str) -> None:
    rng = np.random.default_rng(len(shape) * 1000 + shape[0])
    if content == "flat":  # runs far longer than deflate's 258-byte matches
        image = np.full(shape, 37, np.uint8)
    elif content == "blobs":  # a label map's regions
        image = (np.indices(shape[:2]).sum(0) // 40 % 7 * 36).astype(np.uint8)
        image = np.broadcast_to(image[..., None], shape).copy() if len(shape) == 3 else image
    else:
        image = rng.integers(0, 256, shape).astype(np.uint8)
    data = encode_png(image)
    with Image.open(io.BytesIO(data)) as im:  # Pillow checks each chunk's CRC
        np.testing.assert_array_equal(np.asarray(im), image)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None and decoded.shape[:2] == shape[:2]


def test_encode_png_writes_three_chunks_of_up_filtered_rows() -> None:
    image = np.array([[5, 9, 200], [6, 9, 100]], np.uint8)
    data = encode_png(image)
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at: at + 4])
        kind, body = data[at + 4: at + 8], data[at + 8: at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length: at + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        at += 12 + length
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert chunks[0][1] == struct.pack(">IIBBBBB", 3, 2, 8, 0, 0, 0, 0)
    # filter type 2 ("up") on each row: the first as is, the second minus the first, modulo 256
    assert zlib.decompress(chunks[1][1]) == bytes([2, 5, 9, 200, 2, 1, 0, 156])


def test_encode_png_files_are_no_larger_than_opencv_s() -> None:
    """The writer replaced OpenCV's (zlib level 1, "up", Z_RLE) for speed: its files must stay as small."""
    labels = (np.indices((720, 1280)).sum(0) // 53 % 11).astype(np.uint8)
    labels[::7, ::5] = 3  # speckle, as an untrained model's label maps have
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    for image in (class_mask(labels, 3), colorize(labels, PALETTE * 3)):
        ours = encode_png(image)
        bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        theirs = cv2.imencode(".png", bgr, params)[1].tobytes()
        assert len(ours) <= 1.02 * len(theirs)


@pytest.mark.parametrize("image", [
    np.zeros((0, 4), np.uint8), np.zeros((4, 0, 3), np.uint8), np.zeros((2, 2), np.float32),
    np.zeros((2, 2), bool), np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 5), np.uint8), np.zeros(4, np.uint8),
    np.zeros((2, 2, 3, 1), np.uint8), np.zeros((2, 2), np.uint16),
], ids=["no-rows", "no-columns", "float", "bool", "two-channels", "five-channels", "1-d", "4-d", "16-bit"])
def test_encode_png_refuses_what_it_cannot_write(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode_png(image)


@pytest.mark.parametrize("level", [-1, 10])
def test_encode_png_refuses_a_level_outside_0_to_9(level: int) -> None:
    with pytest.raises(ValueError, match="0-9"):
        encode_png(_grey(), compression=level)


def test_encode_png_does_not_touch_input() -> None:
    image = _rgb()
    before = image.copy()
    encode_png(image)
    np.testing.assert_array_equal(image, before)


def test_encode_png_of_real_render_outputs() -> None:
    image = np.random.default_rng(0).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    for out in (
        colorize(LABELS_4X4, PALETTE),
        overlay(image, LABELS_4X4, PALETTE),
        class_mask(LABELS_4X4, 1),
        cutout(image, LABELS_4X4 > 0),
        LABELS_4X4,
    ):
        with Image.open(io.BytesIO(encode_png(out))) as im:
            np.testing.assert_array_equal(np.asarray(im), out)


@pytest.mark.parametrize("make", [_grey, _rgb, _rgba])
def test_b64_png_decodes_to_the_same_png(make: object) -> None:
    image = make()  # type: ignore[operator]
    text = b64_png(image)
    assert isinstance(text, str) and text.isascii()
    data = base64.b64decode(text, validate=True)
    assert data == encode_png(image)
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(np.asarray(im), image)


VIEWS = [
    # (make a non-contiguous view of a test image)
    pytest.param(lambda: _grey()[:, ::-1], id="grey-flipped"),
    pytest.param(lambda: _grey().T, id="grey-transposed"),
    pytest.param(lambda: _rgb()[:, ::-1], id="rgb-flipped"),
    pytest.param(lambda: _rgb()[..., ::-1], id="rgb-channels-reversed-view"),
    pytest.param(lambda: _rgba().transpose(1, 0, 2), id="rgba-transposed"),
]


@pytest.mark.parametrize("make", VIEWS)
def test_encode_png_of_non_contiguous_views(make: object) -> None:
    view = make()  # type: ignore[operator]
    with Image.open(io.BytesIO(encode_png(view))) as im:
        np.testing.assert_array_equal(np.asarray(im), view)


def test_encode_all_returns_each_job_s_bytes_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    pictures = [rng.integers(0, 256, (37 + i, 53, 3), dtype=np.uint8) for i in range(7)]
    jobs = [functools.partial(encode_png, p) for p in pictures]
    serial = [job() for job in jobs]
    monkeypatch.setattr(render, "THREADS", 2)  # the threaded path, even on a 1-CPU runner
    assert render.encode_all(jobs) == serial  # on the threads: the same bytes, in the jobs' order
    decoded = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in render.encode_all(jobs)]
    for got, want in zip(decoded, pictures, strict=True):
        np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(render, "THREADS", 1)
    assert render.encode_all(jobs) == serial  # one thread: in the caller
    assert render.encode_all([]) == []


def test_encode_all_raises_a_job_s_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "THREADS", 2)
    rgba = np.zeros((4, 4, 4), np.uint8)
    jobs = [functools.partial(encode_png, rgba), functools.partial(render.encode_image, rgba, "jpeg")]
    with pytest.raises(ValueError, match="JPEG has no alpha"):
        render.encode_all(jobs)


# ---------------------------------------------------------------------------------------------
# encode_class_png: the mask's filtered rows from the label map in one pass (native kernel)
# ---------------------------------------------------------------------------------------------


def _label_maps() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    blobs = cv2.resize(rng.integers(0, 20, (9, 16), dtype=np.uint8), (1280, 720), interpolation=cv2.INTER_NEAREST)
    return [LABELS_4X4, np.array([[7]], np.uint8), rng.integers(0, 4, (1, 57), dtype=np.uint8),
            rng.integers(0, 4, (57, 1), dtype=np.uint8), rng.integers(0, 256, (33, 65), dtype=np.uint8), blobs]


def test_encode_class_png_gives_encode_png_s_bytes(kernel: fused.PostKernel) -> None:
    """The kernel's path and the numpy path write the same file for every class of maps of odd shapes (one
    row, one column, 1x1), for classes absent from the map, and for the ends of the uint8 range."""
    for labels in _label_maps():
        for class_id in {*np.unique(labels).tolist(), 0, 1, 254, 255}:
            expected = encode_png(class_mask(labels, class_id))
            assert render.encode_class_png(labels, class_id, kernel=kernel) == expected, (labels.shape, class_id)
    labels = _label_maps()[-1]
    assert render.encode_class_png(labels, 2, 6, kernel=kernel) == encode_png(class_mask(labels, 2), 6)
    with pytest.raises(ValueError, match="0-9"):
        render.encode_class_png(labels, 2, 10, kernel=kernel)


def test_encode_class_png_decodes_to_the_class_mask(kernel: fused.PostKernel) -> None:
    labels = _label_maps()[-1]
    assert 0 < np.count_nonzero(labels == 3) < labels.size  # a mask with both values
    decoded = np.asarray(Image.open(io.BytesIO(render.encode_class_png(labels, 3, kernel=kernel))))
    np.testing.assert_array_equal(decoded, np.where(labels == 3, 255, 0))


def test_encode_class_png_of_a_view_and_of_other_arrays(kernel: fused.PostKernel) -> None:
    """A non-contiguous view is copied for the kernel; maps the kernel does not take (int32 labels, a class
    id past 255) go the numpy way, with its results."""
    labels = _label_maps()[-1]
    view = labels[::2, ::3]
    assert render.encode_class_png(view, 5, kernel=kernel) == encode_png(class_mask(view, 5))
    wide = labels.astype(np.int32)
    assert render.encode_class_png(wide, 5, kernel=kernel) == encode_png(class_mask(wide, 5))
    assert render.encode_class_png(wide, 300, kernel=kernel) == encode_png(class_mask(wide, 300))


@pytest.mark.parametrize(("labels", "class_id", "message"), [
    pytest.param(np.zeros((4, 4, 1), np.uint8), 1, "non-empty", id="3-d"),
    pytest.param(np.zeros((0, 4), np.uint8), 1, "non-empty", id="empty"),
    pytest.param(np.zeros((4, 4), np.int32), 1, "uint8", id="int32"),
    pytest.param(np.zeros((4, 8), np.uint8)[:, ::2], 1, "C-contiguous", id="strided"),
    pytest.param(np.zeros((4, 4), np.uint8), 256, "does not fit", id="class-256"),
    pytest.param(np.zeros((4, 4), np.uint8), -1, "does not fit", id="class-negative"),
])
def test_mask_rows_up_refuses(kernel: fused.PostKernel, labels: np.ndarray, class_id: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kernel.mask_rows_up(labels, class_id)


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_every_narrower_build_writes_the_same_masks(march: str, tmp_path: Path) -> None:
    """The mask rows' loop is built per x86-64 level (target clones): each level built alone passes the
    tests above in a child process."""
    if os.environ.get(LIBRARY_UNDER_TEST):
        pytest.skip("already a child")
    if platform.machine() != "x86_64" or cpu_lanes() < {"x86-64": 4, "x86-64-v3": 8, "x86-64-v4": 16}[march]:
        pytest.skip(f"this CPU does not run {march}")
    assert_tests_pass_on_a_build_for(march, tmp_path, __file__, "-k", "class_png or mask_rows_up")
