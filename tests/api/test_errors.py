"""Every failure is the envelope with the right status; client faults are never 5xx."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from m2fp_service.api.app import create_app
from m2fp_service.api.routes import parse as parse_route
from tests.api.conftest import (
    image_file,
    make_settings,
    multipart_head,
    png_header_only,
    running_client,
    started_app,
)

MB = 1024 * 1024


def assert_error(response: httpx.Response, status: int, code: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "data"}
    assert body["code"] == code and body["data"] is None
    for word in words:
        assert word.lower() in body["message"].lower(), body["message"]
    assert response.headers["x-request-id"]
    return body


@pytest.mark.parametrize(
    ("upload", "status", "code", "word"),
    [
        (("empty.jpg", b"", "image/jpeg"), 422, 1006, "empty"),
        (("notes.jpg", b"this is a text file, renamed .jpg\n" * 20, "image/jpeg"), 422, 1006, "not a recognisable"),
        (("noise.jpg", os.urandom(256 * 1024), "image/jpeg"), 422, 1006, "not a recognisable"),
        (("cut.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image/jpeg"), 422, 1006, "JPEG"),
        (("anim.gif", b"GIF89a" + b"\x00" * 64, "image/gif"), 415, 1005, "GIF"),
        (("bomb.png", png_header_only(30000, 30000), "image/png"), 413, 1007, "30000x30000"),
    ],
)
def test_bad_images(client: TestClient, upload: tuple[str, bytes, str], status: int, code: int, word: str) -> None:
    assert_error(client.post("/api/parse", files={"image": upload}), status, code, word)


def test_missing_image_field(client: TestClient, photo_jpeg: bytes) -> None:
    r = client.post("/api/parse", files={"picture": ("a.jpg", photo_jpeg, "image/jpeg")})
    assert_error(r, 400, 1001, "image")
    assert_error(client.post("/api/parse", data={"outputs": "label"}), 415, 1005, "multipart")


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({}, 415, 1005),
        ({"json": {"image": "aGVsbG8="}}, 415, 1005),
        ({"content": b"\xff\xd8\xff", "headers": {"Content-Type": "image/jpeg"}}, 415, 1005),
        ({"content": b"garbage", "headers": {"Content-Type": "multipart/form-data"}}, 400, 1002),
        ({"content": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}, 400, 1002),
    ],
)
def test_not_a_multipart_upload(client: TestClient, kwargs: dict, status: int, code: int) -> None:
    assert_error(client.post("/api/parse", **kwargs), status, code)


def test_two_images_and_truncated_body(client: TestClient, photo_jpeg: bytes) -> None:
    files = [("image", ("a.jpg", photo_jpeg, "image/jpeg")), ("image", ("b.jpg", photo_jpeg, "image/jpeg"))]
    assert_error(client.post("/api/parse", files=files), 400, 1002, "one")
    body = multipart_head("b0undary") + photo_jpeg[:1000]
    r = client.post("/api/parse", content=body, headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert_error(r, 400, 1002)


def test_upload_over_limit(make_client, photo_jpeg: bytes) -> None:  # type: ignore[no-untyped-def]
    c = make_client(max_upload_bytes=64 * 1024)
    assert_error(c.post("/api/parse", files=image_file(photo_jpeg)), 413, 1004, "limit")


async def _huge_chunked_upload(settings_model: Path, declared: int | None) -> tuple[httpx.Response, int]:
    """Streams a 1 GB multipart body; returns the response and how many bytes the app pulled."""
    pulled = 0
    boundary = "b0undary"

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        head = multipart_head(boundary)
        pulled += len(head)
        yield head
        chunk = b"\xff" * MB
        for _ in range(1024):
            pulled += len(chunk)
            yield chunk

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if declared is not None:
        headers["Content-Length"] = str(declared)
    async with started_app(make_settings(settings_model, max_upload_bytes=4 * MB)) as (_, client):
        response = await client.post("/api/parse", content=body(), headers=headers)
    return response, pulled


def test_1gb_chunked_upload_refused_while_reading(tiny_model_path: Path) -> None:
    response, pulled = asyncio.run(_huge_chunked_upload(tiny_model_path, declared=None))
    assert_error(response, 413, 1004, "limit")
    assert pulled <= 6 * MB, f"the app read {pulled / MB:.0f} MB of a 1 GB upload before refusing it"


def test_declared_content_length_refused_before_reading(tiny_model_path: Path) -> None:
    response, pulled = asyncio.run(_huge_chunked_upload(tiny_model_path, declared=1024 * MB))
    assert_error(response, 413, 1004)
    assert pulled <= 2 * MB


def test_not_found_and_method_not_allowed(client: TestClient) -> None:
    assert_error(client.get("/api/nope"), 404, 1013, "/api/nope")
    r = assert_error(client.get("/api/parse"), 405, 1014, "GET")
    del r
    assert "POST" in client.get("/api/parse").headers.get("allow", "")


def test_request_validation_error_is_400_envelope(tiny_model_path: Path) -> None:
    app = create_app(make_settings(tiny_model_path))

    @app.get("/_probe/{n}")
    async def probe(n: int) -> dict[str, int]:
        return {"n": n}

    with TestClient(app) as c:
        assert_error(c.get("/_probe/abc"), 400, 1002, "path.n")


def test_unexpected_exception_is_500_envelope_with_request_id(
    client: TestClient, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(parse_route, "parse_to_json", boom)
    r = client.post("/api/parse", files=image_file(photo_jpeg), headers={"X-Request-ID": "trace-me"})
    body = assert_error(r, 500, 1000, "trace-me")
    assert "secret" not in body["message"]


def test_model_missing_app_still_serves(tmp_path: Path, photo_jpeg: bytes) -> None:
    with running_client(make_settings(tmp_path / "missing.onnx")) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "m2fp export" in ready.json()["detail"]
        body = assert_error(c.post("/api/parse", files=image_file(photo_jpeg)), 503, 1009, "m2fp export")
        assert "missing.onnx" in body["message"]
        info = c.get("/api/info").json()
        assert info["status"] == "failed" and info["trained"] is None and "m2fp export" in info["detail"]
        assert c.get("/").status_code == 200


class _Gate:
    """Replaces the parse job with one that blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> bytes:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        return b'{"code":0,"message":"success","data":{}}'


def test_overloaded_is_503_with_retry_after_at_once(
    tiny_model_path: Path, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate()
    monkeypatch.setattr(parse_route, "parse_to_json", gate)

    async def scenario() -> list[httpx.Response]:
        async with started_app(make_settings(tiny_model_path, workers=1, queue_size=1)) as (_, client):
            def post() -> asyncio.Task[httpx.Response]:
                return asyncio.ensure_future(client.post("/api/parse", files=image_file(photo_jpeg)))

            running = post()
            await asyncio.to_thread(gate.started.wait, 5)
            queued = post()
            await asyncio.sleep(0.1)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            refused = [await client.post("/api/parse", files=image_file(photo_jpeg)) for _ in range(3)]
            assert loop.time() - t0 < 1.0, "503 must come at once, not after waiting"
            gate.release.set()
            return [await running, await queued, *refused]

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200, 200, 503, 503, 503]
    for r in responses[2:]:
        assert_error(r, 503, 1008, "busy")
        assert int(r.headers["retry-after"]) >= 1
        # told to come back later: the connection is not kept idle through the wait (keep-alive race)
        assert r.headers["connection"] == "close"
    assert gate.calls == 2


def test_timeout_is_504_and_slot_is_held_until_the_job_ends(
    tiny_model_path: Path, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate()
    monkeypatch.setattr(parse_route, "parse_to_json", gate)

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        settings = make_settings(tiny_model_path, workers=1, queue_size=0, request_timeout_s=0.3)
        async with started_app(settings) as (_, client):
            timed_out = await client.post("/api/parse", files=image_file(photo_jpeg))
            still_busy = await client.post("/api/parse", files=image_file(photo_jpeg))
            gate.release.set()
            for _ in range(100):
                after = await client.post("/api/parse", files=image_file(photo_jpeg))
                if after.status_code != 503:
                    break
                await asyncio.sleep(0.02)
            return timed_out, still_busy, after

    timed_out, still_busy, after = asyncio.run(scenario())
    assert_error(timed_out, 504, 1010, "0.3 s")
    assert_error(still_busy, 503, 1008)
    assert after.status_code == 200


def test_slow_upload_is_408_and_frees_its_slot(
    tiny_model_path: Path, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _Gate()
    fast.release.set()
    monkeypatch.setattr(parse_route, "parse_to_json", fast)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async def dribble() -> AsyncIterator[bytes]:
            yield multipart_head("b0undary")
            await asyncio.sleep(1.0)
            yield b"\xff\xd8\xff"

        settings = make_settings(tiny_model_path, workers=1, queue_size=0, upload_timeout_s=0.3)
        async with started_app(settings) as (_, client):
            slow = await client.post("/api/parse", content=dribble(),
                                     headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
            after = await client.post("/api/parse", files=image_file(photo_jpeg))
            return slow, after

    slow, after = asyncio.run(scenario())
    assert_error(slow, 408, 1015, "0.3 s")
    assert after.status_code == 200 and fast.calls == 1


def test_refused_request_body_is_not_read_and_failed_requests_free_their_slot(
    tiny_model_path: Path, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate()
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for chunk in (multipart_head("b0undary"), photo_jpeg, b"\r\n--b0undary--\r\n"):
            pulled += len(chunk)
            yield chunk

    async def scenario() -> list[httpx.Response]:
        async with started_app(make_settings(tiny_model_path, workers=1, queue_size=0)) as (_, client):
            out = [await client.post("/api/parse", files={"picture": ("a.jpg", b"x", "image/jpeg")}),
                   await client.post("/api/parse", files=image_file(b"not an image"))]
            monkeypatch.setattr(parse_route, "parse_to_json", gate)
            running = asyncio.ensure_future(client.post("/api/parse", files=image_file(photo_jpeg)))
            await asyncio.to_thread(gate.started.wait, 5)
            out.append(await client.post("/api/parse", content=body(),
                                         headers={"Content-Type": "multipart/form-data; boundary=b0undary"}))
            gate.release.set()
            out.append(await running)
            return out

    missing, undecodable, refused, ok = asyncio.run(scenario())
    assert_error(missing, 400, 1001)
    assert_error(undecodable, 422, 1006)  # both freed their slot: the next request ran
    assert_error(refused, 503, 1008)
    assert pulled == 0, "the body of a refused request was read"
    assert ok.status_code == 200
