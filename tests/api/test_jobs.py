"""What every upload route does around its job (``api/jobs.py``): a bad picture never waits for a worker.

The pool's only worker is held by a real job (a long inference, as far as the queue can tell) and a
valid photo waits behind it; then bad uploads are sent. Each must get its usual 4xx while the
worker is still held: the route refuses it from the header, before the job queues. With the check
back on the worker they would wait for it and time out (504) instead.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image

from m2fp_service.api.workers import WorkerPool
from tests.api.conftest import make_settings, png_header_only, started_app
from tests.api.test_errors import assert_error

MAX_SIDE = 4096
# Only a failure waits this long: a bad upload wrongly queued behind the held worker times out (504).
REQUEST_TIMEOUT_S = 20.0


class HeldWorker:
    """Holds a pool's only worker with a real job until the block ends."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.started = threading.Event()
        self.release = threading.Event()

    def _job(self) -> None:
        self.started.set()
        self.release.wait(2 * REQUEST_TIMEOUT_S)

    async def __aenter__(self) -> HeldWorker:
        self.task = asyncio.ensure_future(self.pool.run(self._job, 3 * REQUEST_TIMEOUT_S))
        await asyncio.to_thread(self.started.wait, 10)
        assert self.pool.running == 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.task


async def until(condition: Callable[[], bool], what: str) -> None:
    """Waits for ``condition`` (set-up only: the pool's counters have no event to wait on)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def _save(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def jpeg_header_declaring(width: int, height: int) -> bytes:
    """SOI + baseline frame header + scan header, no scan data: ~40 bytes."""
    sof = struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sos = struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x00\x03\x00\x00\x3f\x00"
    return b"\xff\xd8\xff\xc0" + sof + b"\xff\xda" + sos


def webp_header_declaring(width: int, height: int) -> bytes:
    """RIFF/WEBP with a VP8X canvas chunk only: 30 bytes."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") + (
        height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def bmp_header_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def png_with_colour_profiles(count: int) -> bytes:
    """A sound 64x48 PNG with ``count`` iCCP chunks before its pixels, each ~1 kB that inflates to 1 MiB.

    Pillow inflated every one (~3 ms each, about a minute for an upload's worth) on the worker.
    """
    payload = b"p\x00\x00" + zlib.compress(bytes(2**20 - 1), 9)
    iccp = struct.pack(">I", len(payload)) + b"iCCP" + payload + struct.pack(">I", zlib.crc32(b"iCCP" + payload))
    data = _save(Image.new("RGB", (64, 48)), "PNG")
    ihdr_end = 8 + 25
    return data[:ihdr_end] + iccp * count + data[ihdr_end:]


def png_with_garbage_pixels(width: int, height: int) -> bytes:
    """A sound PNG header whose pixel data is not zlib: only decoding finds out."""
    data = png_header_only(width, height)
    idat = data.index(b"IDAT") + 4
    return data[:idat] + b"\x55" * 16 + data[idat + 16:]


BAD_PHOTOS = [  # (file, status, code, words in the message)
    (("empty.jpg", b"", "image/jpeg"), 422, 1006, "empty"),
    (("notes.jpg", b"this is a text file, renamed .jpg\n" * 20, "image/jpeg"), 422, 1006, "not a recognisable"),
    (("noise.jpg", bytes(range(256)) * 1024, "image/jpeg"), 422, 1006, "not a recognisable"),
    (("anim.gif", _save(Image.new("P", (4, 4)), "GIF"), "image/gif"), 415, 1005, "GIF"),
    (("cut.png", _save(Image.new("RGB", (64, 48)), "PNG")[:20], "image/png"), 422, 1006, "PNG header"),
    (("cut.jpg", _save(Image.new("RGB", (64, 48)), "JPEG")[:100], "image/jpeg"), 422, 1006, "JPEG header"),
    (("wide.png", _save(Image.new("RGB", (MAX_SIDE + 1, 8)), "PNG"), "image/png"), 413, 1007,
     f"longest side allowed is {MAX_SIDE}"),
    (("bomb.png", png_header_only(30000, 30000), "image/png"), 413, 1007, "30000x30000"),
    (("bomb.jpg", jpeg_header_declaring(60000, 50000), "image/jpeg"), 413, 1007, "60000x50000"),
    (("bomb.webp", webp_header_declaring(16383, 16383), "image/webp"), 413, 1007, "16383x16383"),
    (("bomb.bmp", bmp_header_declaring(40000, 40000), "image/bmp"), 413, 1007, "40000x40000"),
    (("profiles.png", png_with_colour_profiles(18_000), "image/png"), 422, 1006,  # 18.9 MB, under the upload limit
     "more than one colour profile"),
]


def _post(client: httpx.AsyncClient, path: str, image: tuple[str, bytes, str],
          background: tuple[str, bytes, str] | None = None) -> asyncio.Future[httpx.Response]:
    files = {"image": image, **({"background": background} if background else {})}
    return asyncio.ensure_future(client.post(path, files=files))


def test_bad_photos_are_refused_while_the_only_worker_is_busy(tiny_model_path: Path, photo_jpeg: bytes) -> None:
    async def scenario() -> tuple[list[httpx.Response], tuple[int, bool, bool], httpx.Response, httpx.Response]:
        settings = make_settings(tiny_model_path, workers=1, queue_size=len(BAD_PHOTOS) + 3, max_side=MAX_SIDE,
                                 request_timeout_s=REQUEST_TIMEOUT_S)
        async with started_app(settings) as (app, client):
            pool: WorkerPool = app.state.pool
            async with HeldWorker(pool):
                photo = _post(client, "/api/parse", ("photo.jpg", photo_jpeg, "image/jpeg"))
                garbage = _post(client, "/api/parse", ("garbage.png", png_with_garbage_pixels(64, 48), "image/png"))
                await until(lambda: pool.waiting == 2, "the photo and the garbage PNG wait for the worker")
                empty_body = client.post("/api/parse", content=b"",
                                         headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
                refused = await asyncio.gather(empty_body, *(_post(client, "/api/parse", bad[0]) for bad in BAD_PHOTOS))
                # answered with the worker still held; the two sound headers still wait, nothing else does
                still_waiting = pool.waiting, photo.done(), garbage.done()
            return refused, still_waiting, await photo, await garbage

    refused, still_waiting, photo, garbage = asyncio.run(scenario())
    assert_error(refused[0], 400, 1001, "image")
    for response, (upload, status, code, words) in zip(refused[1:], BAD_PHOTOS, strict=True):
        assert response.status_code == status, (upload[0], response.text)
        assert_error(response, status, code, words)
    assert still_waiting == (2, False, False)
    assert photo.status_code == 200, photo.text
    assert photo.json()["data"]["result_image"]
    # a sound header over garbage pixels is for the full decode, on the worker as before: the same 422
    assert_error(garbage, 422, 1006, "PNG image is truncated or corrupt")


def test_bad_pictures_are_refused_by_background_while_the_only_worker_is_busy(
    tiny_model_path: Path, photo_jpeg: bytes
) -> None:
    photo = ("photo.jpg", photo_jpeg, "image/jpeg")
    backdrop = ("beach.png", _save(Image.new("RGB", (64, 48), (0, 120, 255)), "PNG"), "image/png")
    bad = [  # (photo, backdrop, status, code, words)
        (("notes.jpg", b"plain text\n" * 10, "image/jpeg"), backdrop, 422, 1006, "not a recognisable"),
        (("bomb.png", png_header_only(30000, 30000), "image/png"), backdrop, 413, 1007, "30000x30000"),
        (photo, ("notes.png", b"plain text\n" * 10, "image/png"), 422, 1006, "background picture: the upload"),
        (photo, ("bomb.jpg", jpeg_header_declaring(60000, 50000), "image/jpeg"), 413, 1007,
         "background picture: image is 60000x50000"),
        (photo, ("anim.gif", _save(Image.new("P", (4, 4)), "GIF"), "image/gif"), 415, 1005,
         "background picture: received a GIF"),
    ]

    async def scenario() -> tuple[list[httpx.Response], tuple[int, bool], httpx.Response]:
        settings = make_settings(tiny_model_path, workers=1, queue_size=len(bad) + 2,
                                 request_timeout_s=REQUEST_TIMEOUT_S)
        async with started_app(settings) as (app, client):
            pool: WorkerPool = app.state.pool
            async with HeldWorker(pool):
                composed = _post(client, "/api/background", photo, backdrop)
                await until(lambda: pool.waiting == 1, "the valid request waits for the worker")
                refused = await asyncio.gather(*(_post(client, "/api/background", p, b)
                                                 for p, b, *_ in bad))
                still_waiting = pool.waiting, composed.done()
            return refused, still_waiting, await composed

    refused, still_waiting, composed = asyncio.run(scenario())
    for response, (_, _, status, code, words) in zip(refused, bad, strict=True):
        assert_error(response, status, code, words)
    assert still_waiting == (1, False)
    assert composed.status_code == 200, composed.text
    assert composed.headers["content-type"] == "image/png"
