"""/api/live on a real `m2fp serve` (uvicorn's WebSocket protocol): frames round trip, the API key at the handshake."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.integration.server import Server, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed_server(tiny_model_path: Path, light_models: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_model_path, tmp_path_factory.mktemp("live"), light_model=light_models["general"],
               light_model_landscape=light_models["landscape"], api_key="k3y") as server:
        yield server


def ws_url(server: Server, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def test_frames_round_trip_over_a_real_socket(keyed_server: Server, photo: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo[::2, ::2]).save(buf, format="JPEG", quality=85)
    with connect(ws_url(keyed_server, "/api/live?api_key=k3y&mode=color&format=png"), max_size=2**24) as ws:
        assert json.loads(ws.recv())["type"] == "ready"
        for seq in range(3):
            ws.send(buf.getvalue())
            header = json.loads(ws.recv())
            picture = ws.recv()
            assert header["type"] == "frame" and header["seq"] == seq and isinstance(picture, bytes)
            out = np.asarray(Image.open(io.BytesIO(picture)))
            assert out.shape == (256, 512, 3)
            green = (out[..., 1] > 200) & (out[..., 0] < 60) & (out[..., 2] < 60)
            assert 0.02 < green.mean() < 0.98
    assert keyed_server.healthy()


@pytest.mark.parametrize("query", ["", "?api_key=wrong"])
def test_key_is_checked_at_the_handshake(keyed_server: Server, query: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(keyed_server, f"/api/live{query}"))
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["code"] == 1003


def test_header_key_works_too(keyed_server: Server) -> None:
    with connect(ws_url(keyed_server, "/api/live/watch?session=x"), additional_headers={"X-API-Key": "k3y"}) as ws:
        assert json.loads(ws.recv()) == {"type": "ready", "session": "x"}
