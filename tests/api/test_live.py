"""WebSocket /api/live and /api/live/watch in-process: protocol, stale-frame dropping, limits, auth."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from tests.api.conftest import make_settings, running_client


def jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def frame(photo: np.ndarray) -> np.ndarray:
    """One person, 320 x 256 (the astronaut, halved)."""
    return np.ascontiguousarray(photo[::2, :512:2])


@pytest.fixture(scope="module")
def live_client(tiny_model_path: Path, light_models: dict[str, Path]) -> Iterator[TestClient]:
    settings = make_settings(tiny_model_path, light_model=light_models["general"],
                             light_model_landscape=light_models["landscape"], live_max_connections=3,
                             live_max_frame_bytes=200_000)
    with running_client(settings) as client:
        yield client


def receive_frame(ws: Any) -> tuple[dict[str, Any], bytes]:
    """The next header + picture pair (skipping nothing: an error message fails the test)."""
    header = ws.receive_json()
    assert header["type"] == "frame", header
    return header, ws.receive_bytes()


def test_composite_frames_round_trip(live_client: TestClient, frame: np.ndarray) -> None:
    with live_client.websocket_connect("/api/live?mode=color&color=%2300ff00&format=jpeg") as ws:
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["output"] == "composite" and ready["format"] == "jpeg"
        assert ready["parts"] is False  # keep=people needs only the light model
        for i in range(3):
            ws.send_bytes(jpeg(frame))
            header, data = receive_frame(ws)
            assert header["seq"] == i and (header["height"], header["width"]) == frame.shape[:2]
            assert header["server_ms"] > 0 and header["dropped"] == 0
            out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert out.shape == frame.shape
            green = (out[..., 1] > 200) & (out[..., 0] < 60) & (out[..., 2] < 60)
            assert 0.05 < green.mean() < 0.95, "the background became green and the person did not"


def test_mask_output_is_a_grey_png(live_client: TestClient, frame: np.ndarray) -> None:
    with live_client.websocket_connect("/api/live?output=mask") as ws:
        assert ws.receive_json()["output"] == "mask"
        ws.send_bytes(jpeg(frame))
        header, data = receive_frame(ws)
        assert header["format"] == "png" and data.startswith(b"\x89PNG")
        mask = np.asarray(Image.open(io.BytesIO(data)))
        assert mask.shape == frame.shape[:2] and mask.dtype == np.uint8
        assert (mask == 255).mean() > 0.05 and (mask == 0).mean() > 0.05


def test_stale_frames_are_dropped_not_queued(live_client: TestClient, frame: np.ndarray) -> None:
    sent = 12
    with live_client.websocket_connect("/api/live?mode=blur") as ws:
        ws.receive_json()
        for _ in range(sent):
            ws.send_bytes(jpeg(frame))
        answers = []
        while True:
            header, _ = receive_frame(ws)
            answers.append(header)
            if header["seq"] + header["dropped"] + 1 == sent:
                break
        assert answers[-1]["dropped"] > 0, "frames sent faster than processed are dropped"
        assert len(answers) < sent


def test_bad_frame_gets_an_error_and_the_stream_goes_on(live_client: TestClient, frame: np.ndarray) -> None:
    with live_client.websocket_connect("/api/live") as ws:
        ws.receive_json()
        ws.send_bytes(b"definitely not a picture")
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == 1006 and "not a recognisable image" in error["message"]
        ws.send_text("hello")
        assert "binary" in ws.receive_json()["message"]
        ws.send_bytes(jpeg(frame))
        header, _ = receive_frame(ws)
        assert header["seq"] == 0


def test_oversize_frame_closes_with_1009(live_client: TestClient) -> None:
    with live_client.websocket_connect("/api/live") as ws:
        ws.receive_json()
        ws.send_bytes(b"\xff" * 300_000)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1009 and "limit" in closed.value.reason


@pytest.mark.parametrize(("query", "message"), [
    ("mode=sparkle", "mode"),
    ("keep=classes:nose", "unknown class"),
    ("output=video", "composite or mask"),
    ("mode=image", "not available live"),
    ("session=bad%20name", "session"),
    ("format=jpeg&mode=transparent", "no alpha"),
])
def test_invalid_options_are_refused_with_a_reason(live_client: TestClient, query: str, message: str) -> None:
    with live_client.websocket_connect(f"/api/live?{query}") as ws:
        error = ws.receive_json()
        assert error["type"] == "error" and message in error["message"], error
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008


def test_connection_limit(live_client: TestClient) -> None:
    opened = [live_client.websocket_connect("/api/live") for _ in range(3)]
    sockets = [cm.__enter__() for cm in opened]
    try:
        for ws in sockets:
            assert ws.receive_json()["type"] == "ready"
        with live_client.websocket_connect("/api/live") as extra:
            error = extra.receive_json()
            assert "too many live connections" in error["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                extra.receive_json()
            assert closed.value.code == 1013
    finally:
        for cm in opened:
            cm.__exit__(None, None, None)
    with live_client.websocket_connect("/api/live") as ws:  # the places were given back
        assert ws.receive_json()["type"] == "ready"


def test_viewers_receive_the_producers_frames(live_client: TestClient, frame: np.ndarray) -> None:
    with live_client.websocket_connect("/api/live/watch?session=studio") as viewer:
        assert viewer.receive_json() == {"type": "ready", "session": "studio"}
        with live_client.websocket_connect("/api/live?session=studio&mode=transparent&format=png") as producer:
            producer.receive_json()
            producer.send_bytes(jpeg(frame))
            header, data = receive_frame(producer)
            seen_header, seen = receive_frame(viewer)
            assert seen == data and seen_header["seq"] == header["seq"]
            rgba = np.asarray(Image.open(io.BytesIO(seen)))
            assert rgba.shape == (*frame.shape[:2], 4) and rgba[..., 3].min() == 0 and rgba[..., 3].max() == 255


def test_watch_needs_a_session_name(live_client: TestClient) -> None:
    with live_client.websocket_connect("/api/live/watch") as ws:
        assert "session" in ws.receive_json()["message"]


def test_parts_selection_gets_key_frames(live_client: TestClient, frame: np.ndarray) -> None:
    import time

    with live_client.websocket_connect("/api/live?keep=largest&mode=blur") as ws:
        assert ws.receive_json()["parts"] is True
        deadline = time.monotonic() + 60
        header: dict[str, Any] = {}
        while time.monotonic() < deadline:
            ws.send_bytes(jpeg(frame))
            header, _ = receive_frame(ws)
            if header["parts_age_frames"] is not None:
                break
            time.sleep(0.05)
        assert header["parts_age_frames"] is not None and header["people"], header


def test_api_key(tiny_model_path: Path, light_models: dict[str, Path], frame: np.ndarray,
                 make_client: Callable[..., TestClient]) -> None:
    client = make_client(light_model=light_models["general"], api_key="s3cret")
    for url in ("/api/live", "/api/live?api_key=wrong", "/api/live/watch?session=studio"):
        with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect(url):
            pass
        assert denied.value.status_code == 401, url  # refused at the handshake, before any frame
    for url, headers in (("/api/live?api_key=s3cret", {}), ("/api/live", {"X-API-Key": "s3cret"}),
                         ("/api/live", {"Authorization": "Bearer s3cret"})):
        with client.websocket_connect(url, headers=headers) as ws:
            assert ws.receive_json()["type"] == "ready"
            ws.send_bytes(jpeg(frame))
            receive_frame(ws)
