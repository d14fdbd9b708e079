"""In-process API fixtures: apps built by ``create_app`` on the tiny model, driven by TestClient/httpx."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from m2fp_service.api.app import create_app
from m2fp_service.config import Settings


def make_settings(model: Path, **overrides: Any) -> Settings:
    """Settings for tests: no .env file; explicit values win over the environment."""
    return Settings(_env_file=None, model=model, **overrides)  # type: ignore[call-arg]


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get("/readyz").json()["status"]
        if status in ("ready", "failed"):
            return
        time.sleep(0.02)
    raise AssertionError("model did not finish loading")


@contextmanager
def running_client(settings: Settings, ready: bool = True) -> Iterator[TestClient]:
    """A TestClient with the app's lifespan running (model loaded when ``ready``)."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        if ready:
            wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(tiny_model_path: Path) -> Iterator[TestClient]:
    with running_client(make_settings(tiny_model_path)) as c:
        yield c


@pytest.fixture
def make_client(tiny_model_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory: ``make_client(**setting_overrides)`` -> a ready TestClient, closed after the test."""
    stack: list[Any] = []

    def factory(**overrides: Any) -> TestClient:
        overrides.setdefault("model", tiny_model_path)
        cm = running_client(make_settings(**overrides))
        stack.append(cm)
        return cm.__enter__()

    yield factory
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def png_array(b64: str) -> np.ndarray:
    """Decodes a base64 PNG into (H, W) or (H, W, C) uint8, checking it is a PNG."""
    raw = base64.b64decode(b64, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(raw)))


def image_file(data: bytes, name: str = "test.jpg", mime: str = "image/jpeg") -> dict[str, tuple[str, bytes, str]]:
    return {"image": (name, data, mime)}


@asynccontextmanager
async def started_app(
    settings: Settings, app: FastAPI | None = None, wait_loaded: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running and an httpx client that streams request bodies to it
    (once the model has loaded or failed, unless ``wait_loaded`` is False).

    (TestClient reads a request body whole before the app sees it; ``httpx.ASGITransport`` hands
    it over chunk by chunk, as a real server does.)
    """
    app = app or create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            for _ in range(1500 if wait_loaded else 0):
                if (await client.get("/readyz")).json()["status"] != "loading":
                    break
                await asyncio.sleep(0.02)
            yield app, client


def multipart_head(boundary: str, name: str = "image", filename: str = "big.jpg") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` RGB, with a few bytes of pixel data (~100 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 256)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
