"""Tests for ``m2fp_service.imaging.decode``; every input is generated here."""

from __future__ import annotations

import dataclasses
import io
import struct
import tracemalloc
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from m2fp_service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedMediaType
from m2fp_service.imaging import decode
from m2fp_service.imaging.decode import ACCEPTED_FORMATS, DecodedImage, _to_rgb, decode_image, probe_image

BIG = 10**9  # max_pixels for tests that are not about the limit

# A 3x2 pattern of distinct, well-separated colours; no symmetry maps it onto itself.
PATTERN = np.array(
    [
        [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
        [[255, 255, 0], [0, 255, 255], [255, 0, 255]],
    ],
    dtype=np.uint8,
)


def _blocks(pattern: np.ndarray, size: int) -> np.ndarray:
    """Scale each pixel up to a size x size flat block (so JPEG keeps the colours)."""
    return np.ascontiguousarray(np.repeat(np.repeat(pattern, size, axis=0), size, axis=1))


def _save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def _raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (filter 0 on every row), for layouts Pillow cannot save."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG header claiming width x height whose IDAT is garbage: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"not zlib") + _chunk(b"IEND", b"")


def _jpeg_header_only(width: int, height: int) -> bytes:
    """SOI + baseline SOF0 + SOS and no scan data."""
    sof = struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sos = struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x00\x03\x00\x00\x3f\x00"
    return b"\xff\xd8\xff\xc0" + sof + b"\xff\xda" + sos


def _bmp_header_only(width: int, height: int) -> bytes:
    """BITMAPFILEHEADER + BITMAPINFOHEADER (24-bit) and no pixel rows."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    """A valid 1-bit 20000x20000 PNG (400 MP, 1.2 GB as RGB) in about 50 kB."""
    width = height = 20000
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


# --------------------------------------------------------------------------- accepted formats

ROUND_TRIP = [
    pytest.param("PNG", {}, 0, id="png"),
    pytest.param("BMP", {}, 0, id="bmp"),
    pytest.param("WEBP", {"lossless": True}, 0, id="webp-lossless"),
    pytest.param("JPEG", {"quality": 100, "subsampling": 0}, 6, id="jpeg-q100"),
]


@pytest.mark.parametrize(("fmt", "kwargs", "tol"), ROUND_TRIP)
def test_accepted_formats_round_trip(fmt: str, kwargs: dict[str, object], tol: int) -> None:
    expected = _blocks(PATTERN, 8)
    out = decode_image(_save(Image.fromarray(expected), fmt, **kwargs), max_pixels=BIG)
    assert out.format == fmt
    assert out.original_mode == "RGB"
    assert out.rgb.shape == (16, 24, 3)
    assert out.rgb.dtype == np.uint8
    assert out.rgb.flags.c_contiguous
    assert not out.rgb.flags.writeable
    assert np.abs(out.rgb.astype(int) - expected.astype(int)).max() <= tol


def test_accepted_formats_constant() -> None:
    assert frozenset({"JPEG", "PNG", "WEBP", "BMP"}) == ACCEPTED_FORMATS


def test_decoded_image_is_frozen() -> None:
    out = decode_image(_save(Image.new("RGB", (2, 2)), "PNG"), max_pixels=BIG)
    assert isinstance(out, DecodedImage)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.format = "PNG"  # type: ignore[misc]


# --------------------------------------------------------------------------- modes

WHITE = (255, 255, 255)


def _palette_image(transparency: object | None) -> bytes:
    im = Image.new("P", (2, 1))
    im.putpalette([200, 0, 0, 12, 34, 56] + [0, 0, 0] * 254)
    im.putdata([0, 1])
    return _save(im, "PNG") if transparency is None else _save(im, "PNG", transparency=transparency)


def _rgba(fmt: str, **kwargs: object) -> bytes:
    px = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 0, 0, 128]]], dtype=np.uint8)
    return _save(Image.fromarray(px, "RGBA"), fmt, **kwargs)


def _mode_image(mode: str, values: list[int]) -> bytes:
    im = Image.new(mode, (len(values), 1))
    im.putdata(values)
    return _save(im, "PNG")


def _grey16(values: list[int], **kwargs: object) -> bytes:
    return _save(Image.fromarray(np.array([values], dtype=np.uint16)), "PNG", **kwargs)


def _cmyk_jpeg(cmyk: tuple[int, int, int, int]) -> bytes:
    return _save(Image.new("CMYK", (8, 8), cmyk), "JPEG", quality=100)


def _u16(*values: int) -> bytes:
    return b"".join(struct.pack(">H", v) for v in values)


# (id, bytes factory, expected original mode, expected first-row pixels, tolerance)
MODES: list[tuple[str, Callable[[], bytes], str, list[tuple[int, int, int]], int]] = [
    ("1-png", lambda: _mode_image("1", [0, 255, 0]), "1", [(0, 0, 0), WHITE, (0, 0, 0)], 0),
    ("1-bmp", lambda: _save(Image.new("1", (2, 1), 1), "BMP"), "1", [WHITE, WHITE], 0),
    ("L", lambda: _mode_image("L", [0, 77, 255]), "L", [(0, 0, 0), (77, 77, 77), WHITE], 0),
    ("LA", lambda: _save(Image.new("LA", (1, 1), (10, 0)), "PNG"), "LA", [WHITE], 0),
    ("LA-opaque", lambda: _save(Image.new("LA", (1, 1), (10, 255)), "PNG"), "LA", [(10, 10, 10)], 0),
    ("L-colour-key", lambda: _save(Image.new("L", (1, 1), 9), "PNG", transparency=9), "L", [WHITE], 0),
    ("P", lambda: _palette_image(None), "P", [(200, 0, 0), (12, 34, 56)], 0),
    ("P-bmp", lambda: _save(Image.open(io.BytesIO(_palette_image(None))), "BMP"), "P", [(200, 0, 0)], 0),
    ("P-tRNS-index", lambda: _palette_image(0), "P", [WHITE, (12, 34, 56)], 0),
    ("P-tRNS-alpha", lambda: _palette_image(bytes([128, 255])), "P", [(228, 127, 127), (12, 34, 56)], 1),
    ("RGBA-png", lambda: _rgba("PNG"), "RGBA", [WHITE, (10, 20, 30), (228, 127, 127)], 1),
    ("RGBA-webp", lambda: _rgba("WEBP", lossless=True, exact=True), "RGBA", [WHITE, (10, 20, 30)], 1),
    (
        "RGB-colour-key",
        lambda: _save(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG", transparency=(1, 2, 3)),
        "RGB",
        [WHITE],
        0,
    ),
    (
        "I;16",
        lambda: _grey16([0xABCD, 0x00FF, 0xFFFF, 0x0100]),
        "I;16",
        [(0xAB,) * 3, (0,) * 3, WHITE, (1,) * 3],
        0,
    ),
    ("I;16-tRNS", lambda: _grey16([0xABCD, 0x1234], transparency=0xABCD), "I;16", [WHITE, (0x12,) * 3], 0),
    (
        "RGB-16bit",
        lambda: _raw_png(1, 1, 16, 2, [_u16(0xABCD, 0x1234, 0xFF01)]),
        "RGB",
        [(0xAB, 0x12, 0xFF)],
        0,
    ),
    (
        "RGBA-16bit",
        lambda: _raw_png(2, 1, 16, 6, [_u16(1, 2, 3, 0, 0xABCD, 0x1234, 0xFF01, 0xFFFF)]),
        "RGBA",
        [WHITE, (0xAB, 0x12, 0xFF)],
        0,
    ),
    # Pillow opens 16-bit grey+alpha as RGBA.
    (
        "LA-16bit",
        lambda: _raw_png(2, 1, 16, 4, [_u16(0x4000, 0, 0xABCD, 0xFFFF)]),
        "RGBA",
        [WHITE, (0xAB,) * 3],
        0,
    ),
    ("CMYK-cyan", lambda: _cmyk_jpeg((255, 0, 0, 0)), "CMYK", [(0, 255, 255)], 3),
    ("CMYK-magenta", lambda: _cmyk_jpeg((0, 255, 0, 0)), "CMYK", [(255, 0, 255)], 3),
    ("CMYK-yellow", lambda: _cmyk_jpeg((0, 0, 255, 0)), "CMYK", [(255, 255, 0)], 3),
    ("CMYK-black", lambda: _cmyk_jpeg((0, 0, 0, 255)), "CMYK", [(0, 0, 0)], 3),
    ("L-jpeg", lambda: _save(Image.new("L", (8, 8), 90), "JPEG", quality=100), "L", [(90, 90, 90)], 1),
]


@pytest.mark.parametrize(("make", "mode", "row", "tol"), [pytest.param(*m[1:], id=m[0]) for m in MODES])
def test_mode_conversion(
    make: Callable[[], bytes], mode: str, row: list[tuple[int, int, int]], tol: int
) -> None:
    out = decode_image(make(), max_pixels=BIG)
    assert out.original_mode == mode
    assert out.rgb.dtype == np.uint8 and out.rgb.ndim == 3 and out.rgb.shape[2] == 3
    assert out.rgb.flags.c_contiguous
    got = out.rgb[0, : len(row)].astype(int)
    assert np.abs(got - np.array(row)).max() <= tol, got.tolist()


# Modes that no accepted file format produces in Pillow, checked at the conversion step.
UNREACHABLE_MODES = [
    pytest.param(Image.fromarray(np.array([[0xABCD, -5, 70000]], np.int32)), [0xAB, 0, 255], id="I"),
    pytest.param(Image.frombytes("I;16B", (2, 1), _u16(0xABCD, 0x0102)), [0xAB, 1], id="I;16B"),
    pytest.param(Image.fromarray(np.array([[1.4, 300.0, -3.0]], np.float32)), [1, 255, 0], id="F"),
    pytest.param(Image.new("YCbCr", (1, 1), (77, 128, 128)), [77], id="YCbCr"),
    pytest.param(Image.new("PA", (1, 1), (0, 0)), [255], id="PA-transparent"),
    pytest.param(Image.new("LA", (1, 1), (40, 255)).convert("La"), [40], id="La-opaque"),
]


@pytest.mark.parametrize(("im", "grey"), UNREACHABLE_MODES)
def test_unreachable_mode_conversion(im: Image.Image, grey: list[int]) -> None:
    rgb = _to_rgb(im)
    assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert rgb[0].tolist() == [[g, g, g] for g in grey]


# --------------------------------------------------------------------------- EXIF orientation

# What a viewer shows for each EXIF orientation, written with numpy, independent of Pillow.
ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}
EXIF_FORMATS = [
    pytest.param("PNG", {}, 0, id="png"),
    pytest.param("WEBP", {"lossless": True}, 0, id="webp"),
    pytest.param("JPEG", {"quality": 100, "subsampling": 0}, 6, id="jpeg"),
]


@pytest.mark.parametrize(("fmt", "kwargs", "tol"), EXIF_FORMATS)
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation(orientation: int, fmt: str, kwargs: dict[str, object], tol: int) -> None:
    stored = _blocks(PATTERN, 8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(stored), fmt, exif=exif.tobytes(), **kwargs)
    out = decode_image(data, max_pixels=BIG)
    expected = ORIENTATIONS[orientation](stored)
    assert out.rgb.shape == expected.shape
    assert out.rgb.flags.c_contiguous
    assert np.abs(out.rgb.astype(int) - expected.astype(int)).max() <= tol


def test_corrupt_exif_is_ignored() -> None:
    data = _save(Image.fromarray(_blocks(PATTERN, 8)), "PNG", exif=b"Exif\x00\x00garbage-not-tiff")
    out = decode_image(data, max_pixels=BIG)
    assert out.rgb.shape == (16, 24, 3)


# --------------------------------------------------------------------------- animation, MPO


@pytest.mark.parametrize(("fmt", "kwargs"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_takes_first_frame(fmt: str, kwargs: dict[str, object]) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kwargs)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data, max_pixels=BIG)
    assert out.format == fmt
    assert np.abs(out.rgb.astype(int) - [255, 0, 0]).max() <= 1


def test_mpo_is_read_as_its_first_jpeg() -> None:
    first, second = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    data = _save(first, "MPO", save_all=True, append_images=[second], quality=100)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = decode_image(data, max_pixels=BIG)
    assert out.format == "JPEG"
    assert out.rgb.shape == (16, 16, 3)
    assert np.abs(out.rgb.astype(int) - [255, 0, 0]).max() <= 3


# --------------------------------------------------------------------------- size limits


@pytest.mark.parametrize(
    "header_only",
    [
        pytest.param(_png_header_only, id="png"),
        pytest.param(_jpeg_header_only, id="jpeg"),
        pytest.param(_bmp_header_only, id="bmp"),
    ],
)
def test_pixel_limit_checked_from_header(header_only: Callable[[int, int], bytes]) -> None:
    # These files have no valid pixel data: decoding one fails (shown at a small size), so
    # ImageTooLarge for the huge one proves the limit was checked before any decoding.
    with pytest.raises(ImageTooLarge) as info:
        decode_image(header_only(60000, 50000), max_pixels=40_000_000, max_side=100_000)
    assert info.value.message.startswith("image is 60000x50000 = 3000.0 MP; the limit is 40.0 MP")
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(header_only(64, 48), max_pixels=BIG)


def test_bomb_rejected_quickly_without_allocating(png_bomb: bytes) -> None:
    with pytest.raises(Image.DecompressionBombError):  # what plain Image.open does with it
        Image.open(io.BytesIO(png_bomb))
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageTooLarge) as info:
                decode_image(png_bomb, max_pixels=40_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.message.startswith("image is 20000x20000 = 400.0 MP; the limit is 40.0 MP")
    assert peak < 5_000_000 < 20000 * 20000 * 3


def webp_declaring(kind: str, width: int, height: int) -> bytes:
    """A small real WebP whose first chunk is patched (or, for VP8X, prefixed) to declare width x height."""
    lossless = kind == "VP8L"
    data = bytearray(_save(Image.fromarray(_blocks(PATTERN, 8)), "WEBP", lossless=lossless))
    if kind == "VP8 ":
        start = data.index(b"\x9d\x01\x2a")
        struct.pack_into("<HH", data, start + 3, width, height)
    elif kind == "VP8L":
        struct.pack_into("<I", data, 21, (width - 1) | (height - 1) << 14)
    else:  # VP8X canvas in front of the frame
        vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") + (
            height - 1).to_bytes(3, "little")
        body = b"WEBP" + vp8x + bytes(data[12:])
        data = bytearray(b"RIFF" + struct.pack("<I", len(body)) + body)
    return bytes(data)


@pytest.mark.parametrize("kind", ["VP8 ", "VP8L", "VP8X"])
def test_webp_bombs_get_our_limit_not_pillows(kind: str) -> None:
    """Pillow's WebP plugin runs its own bomb check while opening (an error past ~179 MP): our
    limit is checked from the header first, with our message and status."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLarge) as info:
            decode_image(webp_declaring(kind, 16383, 16383), max_pixels=40_000_000)
    assert info.value.message.startswith("image is 16383x16383 = 268.4 MP; the limit is 40.0 MP")
    with pytest.raises(ImageTooLarge, match="image is 9000x8000 = 72.0 MP"):
        decode_image(webp_declaring(kind, 9000, 8000), max_pixels=40_000_000)


def test_pillow_bomb_limit_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our max_pixels, not Pillow's global MAX_IMAGE_PIXELS, decides: no DecompressionBomb error or warning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _save(Image.fromarray(_blocks(PATTERN, 20)), "PNG")  # 60x40 = 2400 > 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_image(data, max_pixels=2400)
    assert out.rgb.shape == (40, 60, 3)


@pytest.mark.parametrize(("fmt", "kwargs"), [pytest.param(*p.values[:2], id=p.id) for p in ROUND_TRIP])
def test_pixel_limit_boundary(fmt: str, kwargs: dict[str, object]) -> None:
    data = _save(Image.fromarray(_blocks(PATTERN, 8)), fmt, **kwargs)  # 24x16 = 384 pixels
    assert decode_image(data, max_pixels=384).rgb.shape == (16, 24, 3)
    with pytest.raises(ImageTooLarge, match=r"image is 24x16 = 384 pixels; the limit is 383 pixels"):
        decode_image(data, max_pixels=383)


def test_megapixel_message_shows_exact_counts_when_rounding_hides_the_difference() -> None:
    with pytest.raises(ImageTooLarge) as info:
        decode_image(_png_header_only(6001, 6000), max_pixels=36_000_000)
    assert "36,006,000 pixels; the limit is 36,000,000 pixels" in info.value.message


def test_side_limit() -> None:
    with pytest.raises(ImageTooLarge) as info:
        decode_image(_png_header_only(20000, 10), max_pixels=BIG)
    assert info.value.message.startswith("image is 20000x10; the longest side allowed is 16384 pixels")
    data = _save(Image.new("RGB", (64, 32)), "PNG")
    assert decode_image(data, max_pixels=BIG, max_side=64).rgb.shape == (32, 64, 3)
    with pytest.raises(ImageTooLarge, match="longest side allowed is 63 pixels"):
        decode_image(data, max_pixels=BIG, max_side=63)


def test_exif_rotation_does_not_change_limits() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.new("RGB", (64, 32)), "PNG", exif=exif.tobytes())
    out = decode_image(data, max_pixels=64 * 32, max_side=64)
    assert out.rgb.shape == (64, 32, 3)


# --------------------------------------------------------------------------- rejections

_GIF = _save(Image.new("P", (4, 4)), "GIF")
_TIFF = _save(Image.new("RGB", (4, 4)), "TIFF")
_ICO = _save(Image.new("RGB", (16, 16)), "ICO")
_NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
_PNG = _save(_NOISE, "PNG")
_JPEG = _save(_NOISE, "JPEG", quality=90)
_WEBP = _save(_NOISE, "WEBP", quality=90)
_BMP = _save(_NOISE, "BMP")
_SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>'

UNSUPPORTED = [
    pytest.param(_GIF, "GIF", id="gif"),
    pytest.param(_TIFF, "TIFF", id="tiff"),
    pytest.param(_ICO, "ICO", id="ico"),
    pytest.param(b"8BPS\x00\x01" + bytes(40), "PSD", id="psd"),
    pytest.param(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(40), "JPEG 2000", id="jp2"),
    pytest.param(b"\xff\x0a\xfa\x7f" + bytes(40), "JPEG XL", id="jxl"),
    pytest.param(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(40), "AVIF", id="avif"),
    pytest.param(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40), "HEIC", id="heic"),
    pytest.param(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "PDF", id="pdf"),
    pytest.param(_SVG, "SVG", id="svg"),
    pytest.param(b"\xef\xbb\xbf  <svg viewBox='0 0 1 1'></svg>", "SVG", id="svg-bom"),
]


@pytest.mark.parametrize(("data", "name"), UNSUPPORTED)
def test_unsupported_media_type(data: bytes, name: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode_image(data, max_pixels=BIG)
    assert name in info.value.message
    assert "JPEG, PNG, WebP or BMP" in info.value.message


INVALID = [
    pytest.param(b"", "empty upload", id="empty"),
    pytest.param(np.random.default_rng(0).bytes(4096), "not a recognisable image", id="random"),
    pytest.param(b"hello, this is a plain text file\n", "not a recognisable image", id="text"),
    pytest.param(b'{"image": "base64..."}', "not a recognisable image", id="json"),
    pytest.param(
        b"<!DOCTYPE html><html><body><svg></svg></body></html>", "not a recognisable image", id="html"
    ),
    pytest.param(b"BMW 3 series", "BMP header is corrupt", id="bm-text"),
    pytest.param(b"\xff\xd8\xff", "JPEG header is corrupt", id="jpeg-magic-only"),
    pytest.param(_JPEG[: len(_JPEG) // 2], "JPEG image is truncated or corrupt", id="truncated-jpeg"),
    pytest.param(_PNG[: len(_PNG) // 2], "PNG image is truncated or corrupt", id="truncated-png"),
    pytest.param(_PNG[:40], "PNG", id="truncated-png-header"),
    pytest.param(_WEBP[: len(_WEBP) // 2], "WEBP", id="truncated-webp"),
    pytest.param(_BMP[: len(_BMP) // 2], "BMP image is truncated or corrupt", id="truncated-bmp"),
    pytest.param(_png_header_only(8, 8), "PNG image is truncated or corrupt", id="png-garbage-idat"),
]


@pytest.mark.parametrize(("data", "fragment"), INVALID)
def test_invalid_image(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidImage) as info:
        decode_image(data, max_pixels=BIG)
    assert fragment in info.value.message


@pytest.mark.parametrize(
    "data",
    [pytest.param(d, id=i) for i, d in [("png", _PNG), ("jpeg", _JPEG), ("webp", _WEBP), ("bmp", _BMP)]],
)
def test_damaged_files_only_raise_service_errors(data: bytes) -> None:
    rng = np.random.default_rng(1)
    variants = [data[:cut] for cut in (1, 2, 8, 16, 30, 60, len(data) - 1)]
    for _ in range(40):
        damaged = bytearray(data)
        for pos in rng.integers(0, len(data), size=3):
            damaged[pos] = int(rng.integers(0, 256))
        variants.append(bytes(damaged))
    for variant in variants:
        try:
            out = decode_image(variant, max_pixels=10_000_000)
        except ServiceError:
            continue
        assert out.rgb.dtype == np.uint8 and out.rgb.shape[2] == 3


# --------------------------------------------------------------------------- probe_image: the header alone

_MIB_OF_ZEROS = zlib.compress(bytes(2**20 - 1), 9)  # ~1 kB that Pillow inflates to (just under) its 1 MiB cap
_ICCP = _chunk(b"iCCP", b"p\x00\x00" + _MIB_OF_ZEROS)


def _png_with(before: bytes = b"", after: bytes = b"") -> bytes:
    """A 4x4 grey PNG with the given chunks before its IDAT and after it."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00\x00" * 4))
    return b"\x89PNG\r\n\x1a\n" + ihdr + before + idat + after + _chunk(b"IEND", b"")


def _png_iccp_flood(chunks: int) -> bytes:
    """A 4x4 PNG with ``chunks`` iCCP chunks of 1 MiB (compressed to ~1 kB each) before its IDAT."""
    return _png_with(before=_ICCP * chunks)


def _top_down_bmp() -> bytes:
    data = bytearray(_BMP)
    struct.pack_into("<i", data, 22, -96)  # negative height: rows stored top to bottom
    return bytes(data)


def _png_with_text() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * 5000, zip=True)
    info.add_itxt("Title", "human parsing")
    return _save(_NOISE, "PNG", pnginfo=info)


_EXIF = Image.Exif()
_EXIF[0x010F] = "m2fp test camera"
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _png_as_cameras_write_it() -> bytes:
    """Pillow's PNG with a real sRGB profile, EXIF, plain, compressed and international text."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "m2fp test")
    info.add_text("Comment", "a long comment " * 500, zip=True)
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta xmlns:x='adobe:ns:meta/'/>", zip=True)
    info.add_itxt("Title", "human parsing")
    return _save(_NOISE, "PNG", icc_profile=_SRGB, exif=_EXIF.tobytes(), pnginfo=info)


PROBED = [  # real files of every accepted kind; each is 128x96
    pytest.param(_PNG, id="png"),
    pytest.param(_png_with_text(), id="png-text-chunks"),
    pytest.param(_png_as_cameras_write_it(), id="png-profile-text-exif"),
    pytest.param(_JPEG, id="jpeg"),
    pytest.param(_save(_NOISE, "JPEG", progressive=True), id="jpeg-progressive"),
    pytest.param(_save(_NOISE, "JPEG", exif=_EXIF.tobytes(), icc_profile=bytes(200_000)), id="jpeg-exif-icc-pieces"),
    pytest.param(_WEBP, id="webp-lossy"),
    pytest.param(_save(_NOISE, "WEBP", lossless=True), id="webp-lossless"),
    pytest.param(_save(_NOISE.convert("RGBA"), "WEBP", quality=80, exif=_EXIF.tobytes()), id="webp-vp8x"),
    pytest.param(_BMP, id="bmp"),
    pytest.param(_top_down_bmp(), id="bmp-top-down"),
]


@pytest.mark.parametrize("data", PROBED)
def test_probe_reads_the_size_pillow_reads(data: bytes) -> None:
    header = probe_image(data, max_pixels=BIG)
    with Image.open(io.BytesIO(data)) as im:
        assert (header.format, header.size_wh) == (im.format, im.size) == (header.format, (128, 96))
    with pytest.raises(ImageTooLarge, match=r"image is 128x96 = 12,288 pixels; the limit is 12,287 pixels"):
        probe_image(data, max_pixels=128 * 96 - 1)
    with pytest.raises(ImageTooLarge, match="longest side allowed is 127 pixels"):
        probe_image(data, max_pixels=BIG, max_side=127)


@pytest.mark.parametrize("data", PROBED)
def test_probe_refuses_only_what_decoding_refuses(data: bytes) -> None:
    """Every cut through the header (and a spread of cuts after it) and randomly damaged copies: what
    the probe refuses, ``decode_image`` refuses with the same error class; a size the probe reads is
    the size of the decoded picture."""
    cuts = {*range(400), *range(400, len(data), max(1, len(data) // 300))}
    variants = [data[:cut] for cut in sorted(cuts)]
    rng = np.random.default_rng(2)
    for _ in range(60):
        damaged = bytearray(data)
        for pos in rng.integers(0, min(len(data), 1024), size=2):
            damaged[pos] = int(rng.integers(0, 256))
        variants.append(bytes(damaged))
    for variant in variants:
        try:
            header = probe_image(variant, max_pixels=BIG)
        except ServiceError as refused:
            with pytest.raises(type(refused)):
                decode_image(variant, max_pixels=BIG)
            continue
        try:
            out = decode_image(variant, max_pixels=BIG)
        except ServiceError:
            continue
        assert header.size_wh in (None, (out.rgb.shape[1], out.rgb.shape[0]))


def _jpeg_without_frame_header() -> bytes:
    sof = _JPEG.index(b"\xff\xc0")
    return _JPEG[:sof] + _JPEG[_JPEG.index(b"\xff\xc4", sof):]


_JPEG_AFTER_APP0 = 20  # SOI (2) + APP0 JFIF (2 + 16)

PROBE_REFUSALS = [
    pytest.param(b"", InvalidImage, "empty upload", id="empty"),
    pytest.param(b"hello, this is a plain text file\n", InvalidImage, "not a recognisable image", id="text"),
    pytest.param(np.random.default_rng(0).bytes(4096), InvalidImage, "not a recognisable image", id="random"),
    pytest.param(_GIF, UnsupportedMediaType, "GIF", id="gif"),
    pytest.param(_SVG, UnsupportedMediaType, "SVG", id="svg"),
    pytest.param(b"BMW 3 series", InvalidImage, "BMP header is corrupt", id="bm-text"),
    pytest.param(_PNG[:20], InvalidImage, "PNG header is corrupt or incomplete", id="png-cut-in-ihdr"),
    pytest.param(_JPEG[:100], InvalidImage, "JPEG header is corrupt or incomplete", id="jpeg-cut-before-sof"),
    pytest.param(_JPEG[:200], InvalidImage, "JPEG header is corrupt or incomplete", id="jpeg-cut-after-sof"),
    pytest.param(_jpeg_without_frame_header(), InvalidImage, "JPEG header is corrupt", id="jpeg-no-sof"),
    pytest.param(_WEBP[:20], InvalidImage, "WEBP header is corrupt or incomplete", id="webp-cut"),
    pytest.param(_BMP[:20], InvalidImage, "BMP header is corrupt or incomplete", id="bmp-cut"),
    pytest.param(_png_header_only(60000, 50000), ImageTooLarge, "image is 60000x50000 = 3000.0 MP", id="png-bomb"),
    pytest.param(_jpeg_header_only(60000, 50000), ImageTooLarge, "image is 60000x50000", id="jpeg-bomb"),
    pytest.param(_bmp_header_only(40000, 40000), ImageTooLarge, "image is 40000x40000", id="bmp-bomb"),
    pytest.param(webp_declaring("VP8 ", 16383, 16383), ImageTooLarge, "image is 16383x16383", id="webp-vp8-bomb"),
    pytest.param(webp_declaring("VP8L", 16383, 16383), ImageTooLarge, "image is 16383x16383", id="webp-vp8l-bomb"),
    pytest.param(webp_declaring("VP8X", 16383, 16383), ImageTooLarge, "image is 16383x16383", id="webp-vp8x-bomb"),
    pytest.param(_png_header_only(20000, 10), ImageTooLarge, "longest side allowed is 16384", id="png-too-wide"),
]


@pytest.mark.parametrize(("data", "error", "fragment"), PROBE_REFUSALS)
def test_probe_refuses_at_the_header(data: bytes, error: type[ServiceError], fragment: str) -> None:
    with pytest.raises(error) as probed:
        probe_image(data, max_pixels=40_000_000)
    with pytest.raises(error) as decoded:
        decode_image(data, max_pixels=40_000_000)
    assert fragment in probed.value.message and fragment in decoded.value.message
    if error is not InvalidImage or "header" not in fragment:  # cut headers: Pillow words its reason its own way
        assert probed.value.message == decoded.value.message


PROBE_PASSES = [  # (data, size the probe reads, what decoding says: None = it decodes)
    pytest.param(_png_header_only(8, 8), (8, 8), "PNG image is truncated or corrupt", id="png-garbage-pixels"),
    pytest.param(_PNG[:40], (128, 96), "PNG header is corrupt", id="png-cut-after-ihdr"),
    pytest.param(_JPEG[: len(_JPEG) // 2], (128, 96), "JPEG image is truncated or corrupt", id="jpeg-cut-in-scan"),
    pytest.param(_JPEG[:_JPEG_AFTER_APP0] + b"\x12" + _JPEG[_JPEG_AFTER_APP0:], None, None, id="jpeg-junk-byte"),
    pytest.param(_JPEG[:_JPEG_AFTER_APP0] + b"\xff\xfe\x00\x02" * 1100 + _JPEG[_JPEG_AFTER_APP0:], None, None,
                 id="jpeg-1100-segments"),
    pytest.param(_png_iccp_flood(1), (4, 4), None, id="png-iccp-chunk"),
]


@pytest.mark.parametrize(("data", "size_wh", "fragment"), PROBE_PASSES)
def test_probe_lets_through_what_only_decoding_settles(data: bytes, size_wh: tuple[int, int] | None,
                                                       fragment: str | None) -> None:
    assert probe_image(data, max_pixels=BIG).size_wh == size_wh
    if fragment is None:
        assert decode_image(data, max_pixels=BIG).rgb.shape[2] == 3
    else:
        with pytest.raises(InvalidImage, match=fragment):
            decode_image(data, max_pixels=BIG)


@pytest.mark.parametrize(("data", "fmt"), [(_png_iccp_flood(1), "PNG"), (_JPEG, "JPEG"), (_WEBP, "WEBP")])
def test_probe_reads_png_jpeg_and_webp_headers_without_pillow(
    data: bytes, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's header parse is not bounded: it inflates every iCCP chunk before a PNG's IDAT (57 s for a
    20 MB file of them, measured) and steps through JPEG junk a byte at a time. The probe reads these
    headers itself; only the BMP header (fixed size, bounded palette) goes through Pillow."""

    def refuse(*args: object) -> None:
        raise AssertionError(f"the probe handed the {fmt} file to Pillow")

    monkeypatch.setitem(decode._OPENERS, fmt, refuse)
    assert probe_image(data, max_pixels=BIG).format == fmt


# --------------------------------------------------------------------------- PNG chunk bounds

# Pillow reads every chunk of a PNG and inflates each iCCP and zTXt/iTXt chunk (up to 1 MiB); files
# of such chunks the size of an upload (the default limit) took it about a minute.
_UPLOAD_BYTES = 20 * 2**20


def _flood(chunk: bytes, *, after_idat: bool = False) -> bytes:
    """A PNG filled to the upload limit with copies of ``chunk``, before its IDAT or after it."""
    copies = chunk * (_UPLOAD_BYTES // len(chunk))
    return _png_with(after=copies) if after_idat else _png_with(before=copies)


_ZTXT_NO_KEYWORD = _chunk(b"zTXt", b"\x00\x00" + _MIB_OF_ZEROS)  # Pillow inflates it, then drops it uncounted
_ITXT_NOT_UTF8 = _chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + zlib.compress(b"\xff" * (2**20 - 1), 9))  # idem

HOSTILE_PNGS = [  # (builds the file, words of the refusal); without the bounds each decoded, in 8 to 59 s
    pytest.param(lambda: _flood(_ICCP), "more than one colour profile (iCCP chunk)", id="iccp-before-idat"),
    pytest.param(lambda: _flood(_ICCP, after_idat=True), "more than one colour profile", id="iccp-after-idat"),
    pytest.param(lambda: _flood(_ZTXT_NO_KEYWORD), "more than 64 text chunks", id="ztxt-no-keyword"),
    pytest.param(lambda: _flood(_ITXT_NOT_UTF8, after_idat=True), "more than 64 text chunks", id="itxt-not-utf8"),
    pytest.param(lambda: _flood(_chunk(b"prVt", b"")), "more than 32,768 chunks", id="empty-private-chunks"),
    pytest.param(lambda: _flood(_chunk(b"IDAT", b""), after_idat=True), "more than 32,768 chunks", id="empty-idat"),
]


@pytest.mark.parametrize(("build", "words"), HOSTILE_PNGS)
def test_png_chunk_floods_are_refused_before_pillow_reads_them(build: Callable[[], bytes], words: str) -> None:
    data = build()
    with pytest.raises(InvalidImage) as decoded:
        decode_image(data, max_pixels=BIG)
    with pytest.raises(InvalidImage) as probed:
        probe_image(data, max_pixels=BIG)
    assert words in decoded.value.message and "re-export it" in decoded.value.message
    assert probed.value.message == decoded.value.message


def _png_chunk_kinds(data: bytes) -> list[bytes]:
    kinds: list[bytes] = []
    pos = 8
    while pos < len(data):
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + struct.unpack_from(">I", data, pos)[0]
    return kinds


def test_png_with_a_profile_text_and_exif_still_decodes() -> None:
    data = _png_as_cameras_write_it()
    kinds = _png_chunk_kinds(data)
    assert {b"iCCP", b"eXIf", b"tEXt", b"zTXt", b"iTXt"} <= set(kinds) and kinds.count(b"iCCP") == 1
    assert probe_image(data, max_pixels=BIG).size_wh == (128, 96)
    np.testing.assert_array_equal(decode_image(data, max_pixels=BIG).rgb, np.asarray(_NOISE))


CHUNK_BOUNDS = [  # (chunks before IDAT, refused with these words or None: it decodes)
    pytest.param(_ICCP, None, id="one-iccp"),
    pytest.param(_ICCP * 2, "colour profile", id="two-iccp"),
    pytest.param(_ZTXT_NO_KEYWORD * 64, None, id="64-text"),
    pytest.param(_ZTXT_NO_KEYWORD * 64 + _chunk(b"iTXt", b"k\x00\x00\x00\x00\x00v"), "64 text chunks", id="65-text"),
    pytest.param(_chunk(b"prVt", b"") * (32_768 - 2), None, id="32768-chunks"),  # IHDR and IDAT count too
    pytest.param(_chunk(b"prVt", b"") * (32_768 - 1), "32,768 chunks", id="32769-chunks"),
]


@pytest.mark.parametrize(("before", "words"), CHUNK_BOUNDS)
def test_png_chunk_bounds(before: bytes, words: str | None) -> None:
    data = _png_with(before=before)
    if words is None:
        assert probe_image(data, max_pixels=BIG).size_wh == (4, 4)
        assert decode_image(data, max_pixels=BIG).rgb.shape == (4, 4, 3)
    else:
        with pytest.raises(InvalidImage, match=words):
            probe_image(data, max_pixels=BIG)
        with pytest.raises(InvalidImage, match=words):
            decode_image(data, max_pixels=BIG)
