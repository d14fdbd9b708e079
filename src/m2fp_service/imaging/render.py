"""ParsingResult -> pictures: colour map, overlay, label PNG, per-class masks, RGBA cutout.

Colouring is one palette lookup (``palette[label_map]``), never a loop over classes.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import cv2
import numpy as np
from zlib_ng import zlib_ng

from m2fp_service.imaging import THREADS, fused


def palette_lut(palette: list[tuple[int, int, int]]) -> np.ndarray:
    """(256, 3) uint8 lookup table; ids past the palette are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    return lut


def colorize(label_map: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W) uint8 labels -> (H, W, 3) uint8 RGB colour map.

    OpenCV's per-channel table lookup over the labels in three channels: the same values as numpy's
    ``palette_lut(palette)[label_map]``, ~2 ms instead of ~15 at 720p."""
    if label_map.dtype != np.uint8 or label_map.size == 0:  # OpenCV's lookup takes uint8 labels only
        return palette_lut(palette)[label_map]  # type: ignore[no-any-return]
    labels = np.ascontiguousarray(label_map)
    return cv2.LUT(cv2.merge([labels, labels, labels]), palette_lut(palette)[:, None, :])


def overlay(image_rgb: np.ndarray, label_map: np.ndarray, palette: list[tuple[int, int, int]],
            alpha: float = 0.5) -> np.ndarray:
    """Blends the colour map over the image where the label is not background.

    Args:
        image_rgb: (H, W, 3) uint8.
        label_map: (H, W) uint8.
        alpha: weight of the colour map on labelled pixels, 0..1.
    """
    colored = colorize(label_map, palette)
    blended = cv2.addWeighted(image_rgb, 1.0 - alpha, colored, alpha, 0.0)
    return np.where((label_map > 0)[..., None], blended, image_rgb)


def present_classes(label_map: np.ndarray) -> list[int]:
    """Class ids present in the label map, ascending (OpenCV's histogram: half numpy's bincount)."""
    if label_map.dtype != np.uint8 or label_map.size == 0:  # OpenCV's histogram: uint8 labels here
        return [int(i) for i in np.flatnonzero(np.bincount(label_map.ravel(), minlength=256))]
    counts = cv2.calcHist([np.ascontiguousarray(label_map)], [0], None, [256], [0, 256]).ravel()
    return [int(i) for i in np.flatnonzero(counts)]  # float counts: exact zeros where absent


def class_mask(label_map: np.ndarray, class_id: int) -> np.ndarray:
    """(H, W) uint8 binary mask (0 / 255) of one class: one OpenCV comparison, ~6x numpy's three
    passes; numpy's for a 1-pixel map, which OpenCV cannot tell from the number it is compared to."""
    if label_map.dtype != np.uint8 or label_map.size <= 1 or not 0 <= class_id <= 255:
        return (label_map == class_id).astype(np.uint8) * 255  # type: ignore[no-any-return]
    return cv2.compare(np.ascontiguousarray(label_map), class_id, cv2.CMP_EQ)  # type: ignore[call-overload,no-any-return]


def cutout(image_rgb: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """(H, W, 4) RGBA: the image with alpha 255 on ``foreground`` (H, W) bool, 0 elsewhere."""
    alpha = foreground.astype(np.uint8) * 255
    return np.dstack([image_rgb, alpha])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """PNG bytes of an (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 array.

    Each row is filtered against the row above ("up", numpy) and the rows deflated at
    ``compression`` (0-9) with run-length matches only (Z_RLE) by zlib-ng: masks, label and colour
    maps are flat and compress well even so, and encoding is on every request's critical path.
    OpenCV's writer with these settings (its default, a filter chosen per row by trial, took 2-4x
    as long for files as large or larger) went through zlib at ~500 MB/s whatever the content:
    the colour map and 17 class masks of the bench photo took 77 ms on one thread, 41 on
    ``encode_all``'s two; here 25 and 15, in 364,572 bytes against 365,016 (zlib-ng's run-length
    deflate is zlib's, with SIMD compares; medians of one interleaved run).

    Raises:
        ValueError: another dtype or shape, an empty image (PNG has none), a side or compressed
            data past PNG's 2^31 - 1, or a level outside 0-9.
    """
    channels = 1 if image.ndim == 2 else image.shape[2] if image.ndim == 3 else 0
    if image.dtype != np.uint8 or channels not in PNG_COLOUR_TYPES or 0 in image.shape or max(image.shape) >= 2**31:
        raise ValueError(f"cannot encode array {image.shape} {image.dtype} as PNG")
    if not 0 <= compression <= 9:
        raise ValueError(f"PNG compression level must be 0-9, got {compression}")
    height, width = image.shape[:2]
    rows = image.reshape(height, width * channels)  # a copy only for a non-contiguous view
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # filter type "up" on every row (the first row's "above" is zeros)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256
    return _png(filtered, width, channels, compression)


def encode_class_png(label_map: np.ndarray, class_id: int, compression: int = 1,
                     kernel: fused.Choice = "built") -> bytes:
    """``encode_png(class_mask(label_map, class_id), compression)``, the same bytes: with the native kernel,
    the mask's filtered rows come from the label map in one pass (``fused.PostKernel.mask_rows_up``)."""
    fast = fused.chosen(kernel)
    if (fast is None or label_map.dtype != np.uint8 or label_map.ndim != 2 or 0 in label_map.shape
            or not 0 <= class_id <= 255 or max(label_map.shape) >= 2**31 or not 0 <= compression <= 9):
        return encode_png(class_mask(label_map, class_id), compression)
    return _png(fast.mask_rows_up(np.ascontiguousarray(label_map), class_id), label_map.shape[1], 1, compression)


def _png(filtered: np.ndarray, width: int, channels: int, compression: int) -> bytes:
    """The PNG of ``filtered`` rows (each led by its filter byte), deflated as ``encode_png`` says."""
    height = filtered.shape[0]
    deflate = zlib_ng.compressobj(compression, zlib_ng.DEFLATED, 15, 8, zlib_ng.Z_RLE)
    data = deflate.compress(filtered) + deflate.flush()
    if len(data) >= 2**31:  # one IDAT chunk holds less
        raise ValueError(f"cannot encode a {height}x{width}x{channels} image as PNG: {len(data)} bytes compressed")
    header = struct.pack(">IIBBBBB", width, height, 8, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib_ng.crc32(data, zlib_ng.crc32(kind)))


def encode_all(jobs: Sequence[Callable[[], bytes]]) -> list[bytes]:
    """Runs encoding jobs on up to ``THREADS`` threads (numpy, zlib-ng and OpenCV encode with the GIL
    released); the results in the jobs' order. The seed envelope's 17 class masks and colour map of
    a 720p photo took 23-25 ms one after another and 15-18 ms on two threads here (medians, two runs)."""
    if len(jobs) < 2 or THREADS < 2:
        return [job() for job in jobs]
    with ThreadPoolExecutor(min(THREADS, len(jobs)), thread_name_prefix="m2fp-encode") as pool:
        return list(pool.map(lambda job: job(), jobs))


def b64_png(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


ImageFormat = Literal["png", "webp", "jpeg"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
FILE_SUFFIXES: dict[str, str] = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}


def encode_image(image: np.ndarray, fmt: ImageFormat, quality: int = 90) -> bytes:
    """PNG, WebP or JPEG bytes of an (H, W, 3) RGB or (H, W, 4) RGBA uint8 array.

    PNG is lossless (fastest level); WebP keeps alpha, lossy at ``quality`` (1..100; 100 means
    lossless); JPEG has no alpha, so an RGBA array is refused (``ValueError``).
    """
    if fmt == "png":
        return encode_png(image)
    if image.ndim == 3 and image.shape[2] == 4:
        if fmt == "jpeg":
            raise ValueError("JPEG has no alpha channel")
        bgr = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    else:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 101 if quality >= 100 else max(1, quality)]
    else:
        params = [cv2.IMWRITE_JPEG_QUALITY, max(1, min(100, quality))]
    ok, buf = cv2.imencode(FILE_SUFFIXES[fmt], bgr, params)
    if not ok:  # pragma: no cover - imencode fails only on unsupported dtypes/shapes
        raise ValueError(f"cannot encode array {image.shape} {image.dtype} as {fmt}")
    return buf.tobytes()
