"""Turn uploaded bytes into an RGB array, safely.

Only JPEG, PNG, WebP and BMP are accepted. The format is identified from the leading bytes and
the matching Pillow plugin class parses the header directly, so the size limits are checked
*before* any pixel data is decoded. Going to the plugin class (instead of ``Image.open``) also
means Pillow's global decompression-bomb check (``Image.MAX_IMAGE_PIXELS``) does not run, except
inside the WebP plugin, whose header we read and check first: an image over our own, per-call
``max_pixels`` is refused with our message before Pillow looks at it. No global Pillow state is
changed, nor read per call (Pillow's PNG text limits are read once, at import, to size our own
chunk bound), and ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone, so truncated files fail.

Error mapping (see ``m2fp_service.errors``):

* ``InvalidImage`` (422): empty upload; bytes that are no recognisable image (random data, plain
  text, HTML, JSON, ...); an accepted format whose header or pixel data is corrupt or truncated; a
  PNG whose chunks only a hostile file has (see ``_check_png_chunks``).
* ``UnsupportedMediaType`` (415): a recognisable file of a type we do not accept: GIF, TIFF,
  ICO/CUR, PSD, ICNS, DDS, QOI, JPEG 2000, JPEG XL, HEIC/HEIF, AVIF, and the vector/document
  formats SVG, PDF and PostScript/EPS. The fix for all of them is the same: convert to one of
  the accepted formats.
* ``ImageTooLarge`` (413): more than ``max_pixels`` pixels or a side longer than ``max_side``.

``probe_image`` makes the checks that need no pixels (format, declared size, limits) without
decompressing anything, so a caller can refuse a bad upload before it queues for decoding. It
reads JPEG, PNG and WebP headers itself: Pillow's header parse is not bounded (it inflates every
PNG ``iCCP`` chunk before the first ``IDAT``: 57 s for a 20 MB file of them, measured). For the
same reason both functions walk a PNG's chunk headers first and refuse more than one ``iCCP``,
more than 64 ``zTXt``/``iTXt`` or more than 32,768 chunks in all, which keeps Pillow's chunk
reading under half a second.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import BmpImagePlugin, Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from m2fp_service.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType

# JPEG uses JpegImageFile, not Pillow's jpeg_factory: a multi-picture (MPO) camera file then
# opens as its first picture, which is the photo, and MPO's own bomb check is never reached.
_OPENERS: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
}
ACCEPTED_FORMATS: frozenset[str] = frozenset(_OPENERS)
_ACCEPTED_TEXT = "JPEG, PNG, WebP or BMP"

_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"%PDF-", "PDF"),
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
)
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded upload.

    Attributes:
        rgb: (H, W, 3) uint8 RGB array, C-contiguous and read-only, EXIF orientation applied.
        format: Pillow format name of the upload, one of ``ACCEPTED_FORMATS`` (e.g. ``"JPEG"``).
        original_mode: Pillow mode before conversion to RGB (e.g. ``"P"``, ``"I;16"``, ``"CMYK"``).
    """

    rgb: np.ndarray
    format: str
    original_mode: str


@dataclass(frozen=True)
class ImageHeader:
    """What an upload's header says, read without decoding pixels.

    Attributes:
        format: Pillow format name, one of ``ACCEPTED_FORMATS``.
        size_wh: (width, height) in pixels as the header declares them; None when they could not be
            read cheaply (``decode_image`` then decides).
    """

    format: str
    size_wh: tuple[int, int] | None


def probe_image(data: bytes, *, max_pixels: int, max_side: int = 16384) -> ImageHeader:
    """The checks of ``decode_image`` that need no pixel data, in bounded time (nothing is decompressed).

    The format comes from the leading bytes and the size from the format's fixed header: PNG's
    ``IHDR``, WebP's first chunk, JPEG's frame header (found by walking at most
    ``_JPEG_MAX_SEGMENTS`` segments) and BMP's info header (through Pillow, whose BMP header read is
    bounded). A PNG's chunk headers are walked to ``IEND`` first, as ``decode_image`` walks them. It
    refuses only what ``decode_image`` refuses too, with the same error class; what it cannot judge
    it lets through, for ``decode_image`` to judge. A header that both declares an
    over-limit size and is corrupt in another way may get ``ImageTooLarge`` here where
    ``decode_image`` would raise ``InvalidImage``.

    Args:
        data: The uploaded bytes.
        max_pixels: Largest allowed width * height.
        max_side: Largest allowed width or height.

    Returns:
        The format and, when read, the declared size.

    Raises:
        InvalidImage: Empty, not an image, a header cut short, or a PNG with more than one colour
            profile or far more chunks than any real picture.
        UnsupportedMediaType: A recognised file type that is not accepted (GIF, TIFF, SVG, ...).
        ImageTooLarge: The header declares more than ``max_pixels`` pixels or a side longer than ``max_side``.
    """
    fmt = _accepted_format(data)
    if fmt == "PNG":
        _check_png_chunks(data)
    size_wh = _HEADER_READERS[fmt](data)
    if size_wh is not None:
        _check_size(size_wh, max_pixels=max_pixels, max_side=max_side)
    return ImageHeader(format=fmt, size_wh=size_wh)


def decode_image(data: bytes, *, max_pixels: int, max_side: int = 16384) -> DecodedImage:
    """Decode an uploaded JPEG, PNG, WebP or BMP into an RGB array.

    Width and height come from the file header and are checked before pixel data is decoded.
    EXIF rotation swaps width and height but changes neither the pixel count nor the longest
    side, so the header values are checked as they are. Animated PNG/WebP give their first
    frame. Conversion to RGB:

    * anything with transparency (RGBA, LA, PA, P with a transparent palette or ``tRNS``
      colour key, L/RGB with a colour key) is composited over a WHITE background, the way
      viewers and browsers show it on a page;
    * 16-bit greyscale (``I;16*``, and ``I`` as PNG produces it) keeps the high byte
      (``v >> 8``) instead of clipping at 255; ``I`` values outside 0..65535 are clipped;
    * ``1``, ``L``, ``P``, ``CMYK`` (Adobe-inverted JPEG included), ``YCbCr``, ``F`` go through
      Pillow's ``convert("RGB")``. Embedded ICC profiles are not applied.

    Args:
        data: The uploaded bytes.
        max_pixels: Largest allowed width * height.
        max_side: Largest allowed width or height.

    Returns:
        The decoded image.

    Raises:
        InvalidImage: Empty, not an image, a corrupt/truncated JPEG/PNG/WebP/BMP, or a PNG with more
            than one colour profile or far more chunks than any real picture (checked before Pillow
            reads them).
        UnsupportedMediaType: A recognised file type that is not accepted (GIF, TIFF, SVG, ...).
        ImageTooLarge: More than ``max_pixels`` pixels or a side longer than ``max_side``.
    """
    fmt = _accepted_format(data)
    if fmt == "PNG":  # Pillow's chunk reading is not bounded: ours first
        _check_png_chunks(data)
    declared = _webp_size(data) if fmt == "WEBP" else None
    if declared is not None:  # Pillow's WebP plugin runs its own bomb check while opening: ours first
        _check_size(declared, max_pixels=max_pixels, max_side=max_side)
    with _open(fmt, data) as im:
        _check_size(im.size, max_pixels=max_pixels, max_side=max_side)
        try:
            im.load()
        except MemoryError:
            raise
        except Exception as exc:
            raise InvalidImage(
                f"the {fmt} image is truncated or corrupt ({_reason(exc)}); re-export it and upload again"
            ) from exc
        original_mode = im.mode
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except MemoryError:
            raise
        except Exception:  # unreadable EXIF: keep the pixels as stored
            pass
        try:
            rgb = _to_rgb(im)
        except MemoryError:
            raise
        except Exception as exc:
            raise InvalidImage(
                f"the {fmt} image (mode {original_mode}) could not be converted to RGB"
            ) from exc
    rgb.flags.writeable = False
    return DecodedImage(rgb=rgb, format=fmt, original_mode=original_mode)


def _accepted_format(data: bytes) -> str:
    """The upload's format from its leading bytes, or the 422/415 that says why it has none we accept."""
    if not data:
        raise InvalidImage(f"empty upload: received 0 bytes; send a {_ACCEPTED_TEXT} image")
    fmt = _sniff_accepted(data)
    if fmt is not None:
        return fmt
    other = _sniff_unsupported(data)
    if other is not None:
        raise UnsupportedMediaType(f"received a {other} file, which is not accepted; convert it to {_ACCEPTED_TEXT}")
    raise InvalidImage(
        f"the upload ({len(data):,} bytes) is not a recognisable image; send a {_ACCEPTED_TEXT} image"
    )


def _open(fmt: str, data: bytes) -> ImageFile.ImageFile:
    """The Pillow plugin's image, header parsed and pixels not decoded yet."""
    try:
        return _OPENERS[fmt](io.BytesIO(data))
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:  # only past Pillow's limit, which we checked below ours
        raise ImageTooLarge(f"the {fmt} image is far larger than allowed ({_reason(exc)}); downscale it") from exc
    except Exception as exc:
        raise InvalidImage(f"the {fmt} header is corrupt or incomplete ({_reason(exc)})") from exc


def _cut_short(fmt: str, data: bytes) -> InvalidImage:
    return InvalidImage(
        f"the {fmt} header is corrupt or incomplete (the file ends inside the header, after {len(data):,} bytes)"
    )


# PNG: signature + IHDR chunk (length, type, 13 bytes, CRC). Pillow opens no PNG shorter than this.
_PNG_HEADER_BYTES = 8 + 4 + 4 + 13 + 4


# Bit depths allowed per colour type (the PNG specification's table; Pillow reads exactly these).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the ``IHDR`` chunk when it comes first (as the specification requires) and is sound.

    None otherwise (another first chunk, a bad checksum, an unknown bit depth or filter method):
    Pillow reads on, and decides.
    """
    if len(data) < _PNG_HEADER_BYTES:
        raise _cut_short("PNG", data)
    ihdr = data[16:29]
    sound = (
        data[8:16] == b"\x00\x00\x00\x0dIHDR"
        and zlib.crc32(b"IHDR" + ihdr) == int.from_bytes(data[29:33], "big")
        and ihdr[8] in _PNG_DEPTHS.get(ihdr[9], ())
        and ihdr[11] == 0
    )
    return (int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")) if sound else None


# Pillow reads a PNG's chunks one at a time up to IEND, before and after IDAT, in Python (2-4 us
# each), and inflates every iCCP, zTXt and compressed iTXt chunk it meets, up to MAX_TEXT_CHUNK
# (1 MiB, ~3 ms) apiece. Its MAX_TEXT_MEMORY (64 MiB) caps the text it keeps, but neither the iCCP
# chunks nor the text it inflates and then drops (an empty keyword, iTXt that is not UTF-8): 20 MB
# of such chunks take it about a minute (measured). Cameras, phones and editors write one profile,
# a few text chunks (XMP, comments, prompts) and IDAT in pieces of 8 kB (libpng) to 64 kB (Pillow).
_PNG_MAX_ICCP = 1  # the PNG specification allows one
_PNG_TEXT_CHUNKS = (b"zTXt", b"iTXt")
# Pillow's own text budget in whole chunks (64): at most 64 MiB inflated, however the text is dropped
_PNG_MAX_TEXT_CHUNKS = PngImagePlugin.MAX_TEXT_MEMORY // PngImagePlugin.MAX_TEXT_CHUNK
# 256 MB in libpng's 8 kB IDAT pieces, 12x the default upload limit; Pillow steps through them in ~0.1 s
_PNG_MAX_CHUNKS = 32_768
_PNG_CHUNK_HEADER = struct.Struct(">I4s")  # payload length, chunk type


def _check_png_chunks(data: bytes) -> None:
    """Refuse a PNG whose chunks only a hostile file has, before Pillow reads them.

    Walks the chunk headers from the signature to ``IEND`` (8 bytes each, payloads skipped, at most
    ``_PNG_MAX_CHUNKS`` steps, ~20 ms). A chunk that runs off the end of the data ends the walk, and
    Pillow decides about the truncation. The bounds keep Pillow's chunk reading under ~0.5 s.

    Raises:
        InvalidImage: More than one ``iCCP``, more than ``_PNG_MAX_TEXT_CHUNKS`` ``zTXt``/``iTXt``
            or more than ``_PNG_MAX_CHUNKS`` chunks in all.
    """
    iccp = text = chunks = 0
    pos = 8
    while pos + 8 <= len(data):
        length, kind = _PNG_CHUNK_HEADER.unpack_from(data, pos)
        if kind == b"IEND":
            return
        chunks += 1
        iccp += kind == b"iCCP"
        text += kind in _PNG_TEXT_CHUNKS
        if iccp > _PNG_MAX_ICCP:
            raise _hostile_png("more than one colour profile (iCCP chunk)", "the PNG specification forbids")
        if text > _PNG_MAX_TEXT_CHUNKS:
            raise _hostile_png(f"more than {_PNG_MAX_TEXT_CHUNKS} text chunks (zTXt, iTXt)")
        if chunks > _PNG_MAX_CHUNKS:
            raise _hostile_png(f"more than {_PNG_MAX_CHUNKS:,} chunks")
        pos += 12 + length


def _hostile_png(what: str, which: str = "no camera or editor writes") -> InvalidImage:
    return InvalidImage(f"the PNG holds {what}, which {which}; re-export it and upload again")


# JPEG markers Pillow reads as a 2-byte length plus payload, and those among them that set the size.
_JPEG_SEGMENTS = frozenset({*range(0xC0, 0xC8), *range(0xC9, 0xD0), *range(0xDA, 0xF0), 0xFE})
_JPEG_FRAMES = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xDE})
_JPEG_SOS = 0xDA
# Camera files put a few to a few dozen segments (EXIF, XMP, ICC in 64 kB pieces) before the scan.
_JPEG_MAX_SEGMENTS = 1024


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the last frame header before the scan, walking the segments as Pillow does.

    None when the walk meets anything but well-formed segments (junk between them, stand-alone
    markers, too many segments): Pillow copes with some of those, so it decides. A segment or file
    that ends before the frame header is certain to fail in Pillow too, and is refused.
    """
    size_wh: tuple[int, int] | None = None
    pos = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        if pos + 4 > len(data):
            if size_wh is None:
                raise _cut_short("JPEG", data)
            return size_wh if pos == len(data) else None
        marker = data[pos + 1]
        if data[pos] != 0xFF or (marker != 0xFF and marker not in _JPEG_SEGMENTS):
            return None
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if end > len(data):
            raise _cut_short("JPEG", data)
        if marker == _JPEG_SOS:
            if size_wh is None:  # Pillow opens no JPEG without a frame header
                raise InvalidImage("the JPEG header is corrupt or incomplete (no frame header before the scan)")
            return size_wh
        if length < 2:
            return None
        if marker in _JPEG_FRAMES:
            # Pillow takes 8-bit frames of 1, 3 or 4 components; it refuses others (its call)
            if length < 8 or data[pos + 4] != 8 or data[pos + 9] not in (1, 3, 4):
                return None
            size_wh = int.from_bytes(data[pos + 7 : pos + 9], "big"), int.from_bytes(data[pos + 5 : pos + 7], "big")
        pos = end
    return None


# WebP: RIFF header + chunk header + the frame or canvas header that holds the size.
_WEBP_HEADER_BYTES = 30


def _webp_probe_size(data: bytes) -> tuple[int, int] | None:
    """``_webp_size``; a file too short to hold it cannot be opened (libwebp reads the same bytes)."""
    size_wh = _webp_size(data)
    if size_wh is None and len(data) < _WEBP_HEADER_BYTES:
        raise _cut_short("WEBP", data)
    return size_wh


def _bmp_size(data: bytes) -> tuple[int, int]:
    """Pillow's BMP header read: a fixed header and at most a 256-colour palette."""
    with _open("BMP", data) as im:
        return im.size


_HEADER_READERS: dict[str, Callable[[bytes], tuple[int, int] | None]] = {
    "JPEG": _jpeg_size,
    "PNG": _png_size,
    "WEBP": _webp_probe_size,
    "BMP": _bmp_size,
}


def _sniff_accepted(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def _sniff_unsupported(data: bytes) -> str | None:
    for magic, name in _UNSUPPORTED_SIGNATURES:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":  # ISO-BMFF: major brand at 8..12, compatible brands up to the box end
        box = data[8 : max(12, min(int.from_bytes(data[:4], "big"), 256))]
        if box[:4] in _AVIF_BRANDS or (box[:4] in _HEIF_BRANDS and b"avif" in box):
            return "AVIF"
        if box[:4] in _HEIF_BRANDS:
            return "HEIC/HEIF"
    text = data[:4096].removeprefix(b"\xef\xbb\xbf").decode("utf-8", "ignore").lstrip().lower()
    if text.startswith("<") and "<svg" in text and "<html" not in text:
        return "SVG"
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP file's first chunk (VP8X canvas, VP8L or VP8 frame), if readable."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _check_size(size: tuple[int, int], *, max_pixels: int, max_side: int) -> None:
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        got, limit = _megapixels(pixels), _megapixels(max_pixels)
        if got == limit:
            got, limit = f"{pixels:,} pixels", f"{max_pixels:,} pixels"
        raise ImageTooLarge(
            f"image is {width}x{height} = {got}; the limit is {limit}; downscale it and upload again"
        )
    if max(width, height) > max_side:
        raise ImageTooLarge(
            f"image is {width}x{height}; the longest side allowed is {max_side} pixels; "
            "downscale it and upload again"
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels:,} pixels"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I;16") or im.mode == "I":
        return _wide_grey_to_rgb(im)
    if im.mode == "La":  # premultiplied; Pillow converts it to nothing but LA
        im = im.convert("LA")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        rgb_im = canvas.convert("RGB")
    else:
        rgb_im = im if im.mode == "RGB" else im.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb_im, dtype=np.uint8))


def _wide_grey_to_rgb(im: Image.Image) -> np.ndarray:
    values = np.asarray(im)
    if im.mode == "I":
        values = np.clip(values, 0, 0xFFFF)
    grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    key = im.info.get("transparency")
    if isinstance(key, int):  # tRNS colour key on 16-bit grey: fully transparent -> white
        grey[np.asarray(im) == key] = 255
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
