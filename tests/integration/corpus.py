"""The hostile-input corpus, generated in memory (no large binaries in the repository).

``hostile_cases()`` are uploads a public endpoint must refuse with a typed 4xx and a clear
message; ``odd_valid_images()`` are unusual but valid pictures it must parse. Both are built from
a real photograph and from headers written by hand, for every accepted format.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms

MB = 1024 * 1024
BOUNDARY = "hostile0boundary"


@dataclass
class Upload:
    """One request body: multipart parts or raw bytes, plus headers and query."""

    parts: list[tuple[str, str | None, bytes, str | None]] = field(default_factory=list)  # name, filename, data, type
    raw: bytes | None = None
    content_type: str | None = "multipart"  # "multipart" = multipart/form-data with BOUNDARY
    params: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        out = bytearray()
        for name, filename, data, ctype in self.parts:
            disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
            out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode("utf-8", "surrogateescape")
            if ctype is not None:
                out += f"Content-Type: {ctype}\r\n".encode()
            out += b"\r\n" + data + b"\r\n"
        out += f"--{BOUNDARY}--\r\n".encode()
        return bytes(out)

    def headers(self) -> dict[str, str]:
        if self.content_type is None:
            return {}
        if self.content_type == "multipart":
            return {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        return {"Content-Type": self.content_type}


def image_upload(data: bytes, filename: str = "photo.jpg", ctype: str = "image/jpeg", **kwargs: object) -> Upload:
    return Upload(parts=[("image", filename, data, ctype)], **kwargs)  # type: ignore[arg-type]


@dataclass
class Case:
    """An upload and what the endpoint must answer: status and the error code (None: success)."""

    name: str
    make: Callable[[bytes], Upload]  # from a valid JPEG photo
    status: int
    code: int | None
    words: tuple[str, ...] = ()


def save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _small(photo_jpeg: bytes, size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.open(io.BytesIO(photo_jpeg)).convert("RGB").resize(size)


# --- decompression bombs: small files declaring huge pictures, one per accepted format -------------

def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header (correct CRCs) declaring width x height, with a few compressed rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(bytes(4096)))
            + _png_chunk(b"IEND", b""))


def jpeg_bomb(photo_jpeg: bytes, width: int = 60000, height: int = 60000) -> bytes:
    """A real small JPEG whose SOF0 frame header is patched to declare width x height."""
    data = bytearray(save(_small(photo_jpeg), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def webp_bomb(photo_jpeg: bytes, width: int = 16383, height: int = 16383) -> bytes:
    """A real small lossy WebP whose VP8 frame header declares width x height (the format's maximum)."""
    data = bytearray(save(_small(photo_jpeg), "WEBP", quality=80))
    start = data.index(b"\x9d\x01\x2a")
    struct.pack_into("<HH", data, start + 3, width, height)
    return bytes(data)


def webp_canvas_bomb(photo_jpeg: bytes, width: int = 1 << 24, height: int = 1 << 24) -> bytes:
    """A small WebP behind a VP8X chunk declaring a 16M x 16M canvas."""
    frame = save(_small(photo_jpeg), "WEBP", quality=80)[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") + (
        height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def bmp_bomb(width: int = 50000, height: int = 50000) -> bytes:
    """A BMP header declaring width x height 24-bit, followed by 64 kB of pixel rows."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 65536, 0, 0, 14 + len(info)) + info + bytes(65536)


def zlib_bomb_png(side: int = 8000) -> bytes:
    """A real, fully decodable PNG of side x side black pixels (64 MP, 192 MB as RGB) in ~200 kB."""
    row = b"\x00" + bytes(side * 3)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# --- other formats posing as images -----------------------------------------------------------

def animated_gif(photo_jpeg: bytes) -> bytes:
    frames = [_small(photo_jpeg).rotate(a) for a in (0, 90, 180)]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff(photo_jpeg: bytes) -> bytes:
    frames = [_small(photo_jpeg), _small(photo_jpeg).rotate(180)]
    return save(frames[0], "TIFF", save_all=True, append_images=frames[1:])


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4000" height="4000">' \
      b'<script>alert(1)</script><rect width="100%" height="100%" fill="red"/></svg>'
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)><script>alert(document.cookie)</script></body></html>"


def hostile_cases() -> list[Case]:
    """Uploads every multipart image endpoint must refuse (or, where named, accept harmlessly)."""
    return [
        Case("zero bytes", lambda p: image_upload(b""), 422, 1006, ("empty",)),
        Case("1 MB of random bytes", lambda p: image_upload(os.urandom(MB)), 422, 1006, ("not a recognisable",)),
        Case("random bytes after a JPEG signature", lambda p: image_upload(b"\xff\xd8\xff\xe0" + os.urandom(4096)),
             422, 1006, ("JPEG",)),
        Case("truncated JPEG", lambda p: image_upload(p[: len(p) // 3]), 422, 1006, ("truncated",)),
        Case("truncated PNG", lambda p: image_upload(_cut(save(_small(p, (400, 300)), "PNG")), "a.png", "image/png"),
             422, 1006, ("PNG",)),
        Case("truncated WebP", lambda p: image_upload(_cut(save(_small(p, (400, 300)), "WEBP")), "a.webp",
                                                      "image/webp"), 422, 1006, ("WEBP",)),
        Case("truncated BMP", lambda p: image_upload(_cut(save(_small(p), "BMP")), "a.bmp", "image/bmp"),
             422, 1006, ("BMP",)),
        Case("PNG bomb 30000x30000", lambda p: image_upload(png_bomb(), "bomb.png", "image/png"), 413, 1007,
             ("30000x30000",)),
        Case("JPEG bomb 60000x60000", lambda p: image_upload(jpeg_bomb(p), "bomb.jpg"), 413, 1007, ("60000x60000",)),
        Case("WebP bomb 16383x16383", lambda p: image_upload(webp_bomb(p), "bomb.webp", "image/webp"), 413, 1007,
             ("16383x16383",)),
        Case("WebP canvas bomb 16Mx16M", lambda p: image_upload(webp_canvas_bomb(p), "bomb.webp", "image/webp"),
             413, 1007, ("16777216x16777216",)),
        Case("BMP bomb 50000x50000", lambda p: image_upload(bmp_bomb(), "bomb.bmp", "image/bmp"), 413, 1007,
             ("50000x50000",)),
        Case("decodable 8000x8000 PNG in 200 kB (64 MP)", lambda p: image_upload(zlib_bomb_png(), "z.png", "image/png"),
             413, 1007, ("64.0 MP",)),
        Case("60 MB upload", lambda p: image_upload(p + os.urandom(60 * MB)), 413, 1004, ("limit",)),
        Case("SVG posing as JPEG", lambda p: image_upload(SVG, "x.jpg"), 415, 1005, ("SVG",)),
        Case("HTML posing as PNG", lambda p: image_upload(HTML, "x.png", "image/png"), 422, 1006,
             ("not a recognisable",)),
        Case("text posing as JPEG", lambda p: image_upload(b"hello\n" * 500, "x.jpg"), 422, 1006,
             ("not a recognisable",)),
        Case("JSON posing as WebP", lambda p: image_upload(b'{"image": "x"}', "x.webp", "image/webp"), 422, 1006, ()),
        Case("PDF", lambda p: image_upload(b"%PDF-1.7\n%\xe2\xe3\n1 0 obj\n", "x.pdf", "application/pdf"), 415, 1005,
             ("PDF",)),
        Case("animated GIF", lambda p: image_upload(animated_gif(p), "a.gif", "image/gif"), 415, 1005, ("GIF",)),
        Case("multi-frame TIFF", lambda p: image_upload(multipage_tiff(p), "a.tif", "image/tiff"), 415, 1005,
             ("TIFF",)),
        Case("missing image field", lambda p: Upload(parts=[("photo", "a.jpg", p, "image/jpeg")]), 400, 1001,
             ("missing form field 'image'",)),
        Case("only text fields", lambda p: Upload(parts=[("outputs", None, b"label", None)]), 400, 1001, ("image",)),
        Case("image as a text field", lambda p: Upload(parts=[("image", None, b"aGVsbG8=", None)]), 422, 1006, ()),
        Case("two image fields", lambda p: Upload(parts=[("image", "a.jpg", p, "image/jpeg")] * 2), 400, 1002,
             ("one 'image'",)),
        Case("17 form parts", lambda p: Upload(parts=[(f"f{i}", None, b"x", None) for i in range(16)]
                                                + [("image", "a.jpg", p, "image/jpeg")]), 400, 1002, ("too many",)),
        Case("5 kB text field", lambda p: Upload(parts=[("image", "a.jpg", p, "image/jpeg"),
                                                         ("outputs", None, b"label," * 900, None)]), 400, 1002,
             ("longer than",)),
        # /api/parse: an unknown output name; /api/background: an option it does not have. Both list the valid ones.
        Case("unknown output", lambda p: image_upload(p, params={"outputs": "everything"}), 400, 1002,
             ("unknown", "valid")),
        Case("JSON body", lambda p: Upload(raw=b'{"image": "aGVsbG8="}', content_type="application/json"), 415, 1005,
             ("multipart",)),
        Case("raw JPEG body", lambda p: Upload(raw=p, content_type="image/jpeg"), 415, 1005, ("multipart",)),
        Case("no Content-Type", lambda p: Upload(raw=p, content_type=None), 415, 1005, ("multipart",)),
        Case("multipart without boundary", lambda p: Upload(raw=b"x", content_type="multipart/form-data"), 400, 1002,
             ("boundary",)),
        Case("garbage multipart", lambda p: Upload(raw=b"this is not a multipart body\r\n" * 100), 400, 1002,
             ("malformed multipart",)),
        Case("multipart cut mid-part", lambda p: Upload(raw=image_upload(p).body()[:5000]), 400, 1002, ()),
    ]


def _cut(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


# --- names that must never become paths, and harmless oddities that must be accepted ------------------

TRAVERSAL_NAMES = [
    "../../../../../../tmp/m2fp-pwned.jpg",
    "..\\..\\..\\windows\\win.ini",
    "/etc/passwd",
    "a\x00b.jpg",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "photo.jpg\r\nX-Injected: yes",
    "\u202egpj.exe",
    "😀" * 200 + ".jpg",
]


# --- odd but valid images ------------------------------------------------------------------------

@dataclass
class OddImage:
    name: str
    data: bytes
    mime: str
    hw: tuple[int, int]  # (height, width) the result must have


def _synthetic(width: int = 120, height: int = 80) -> Image.Image:
    """A small colourful picture (gradients and a disc), so the odd images need no photo."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, ((x - width / 2) ** 2 + (y - height / 2) ** 2 < 400) * 200],
                   axis=2).astype(np.uint8)
    return Image.fromarray(rgb)


def odd_valid_images() -> list[OddImage]:
    base = _synthetic()
    rotated = base.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    grey16 = Image.fromarray((np.linspace(0, 65535, 80 * 120).reshape(80, 120)).astype(np.uint16))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    frames = [base, base.rotate(180)]
    return [
        OddImage("EXIF orientation 6", save(rotated, "JPEG", exif=exif), "image/jpeg", (120, 80)),
        OddImage("CMYK JPEG", save(base.convert("CMYK"), "JPEG"), "image/jpeg", (80, 120)),
        OddImage("16-bit greyscale PNG", save(grey16, "PNG"), "image/png", (80, 120)),
        OddImage("palette PNG with transparency", save(palette, "PNG", transparency=0), "image/png", (80, 120)),
        OddImage("RGBA PNG", save(rgba, "PNG"), "image/png", (80, 120)),
        OddImage("greyscale JPEG", save(base.convert("L"), "JPEG"), "image/jpeg", (80, 120)),
        OddImage("1x1 PNG", save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "image/png", (1, 1)),
        OddImage("4000x3 strip", save(base.resize((4000, 3)), "PNG"), "image/png", (3, 4000)),
        OddImage("3x4000 strip", save(base.resize((3, 4000)), "PNG"), "image/png", (4000, 3)),
        OddImage("progressive JPEG", save(base, "JPEG", progressive=True, quality=85), "image/jpeg", (80, 120)),
        OddImage("JPEG with ICC profile", save(base, "JPEG", icc_profile=srgb), "image/jpeg", (80, 120)),
        OddImage("animated WebP (first frame)", save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
                 "image/webp", (80, 120)),
        OddImage("animated PNG (first frame)", save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
                 "image/png", (80, 120)),
        OddImage("32-bit BMP", save(rgba, "BMP"), "image/bmp", (80, 120)),
        OddImage("WebP lossless", save(base, "WEBP", lossless=True), "image/webp", (80, 120)),
    ]
