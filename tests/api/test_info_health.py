"""GET /api/info, /healthz, /readyz, and the offline /docs and /redoc."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from m2fp_service.api import app as app_module
from m2fp_service.engine import BUILT_MSDA_KERNEL
from m2fp_service.errors import ModelLoadError
from m2fp_service.schemas import OUTPUT_NAMES
from tests.api.conftest import image_file, make_settings, started_app


def test_info_is_the_model_card(client: TestClient) -> None:
    r = client.get("/api/info")
    assert r.status_code == 200
    info = r.json()
    assert info["status"] == "ready" and info["detail"] is None
    assert info["trained"] is False and info["model"]["trained"] is False
    assert info["warnings"][0].startswith("UNTRAINED DEMO MODEL") and "m2fp export" in info["warnings"][0]
    assert any("CC BY-NC 4.0" in w for w in info["warnings"])
    assert info["model"]["license"].startswith("CC BY-NC 4.0")
    assert info["model"]["file"] == "tiny.onnx"
    # `make test` builds the kernel, and the tiny model calls its node (tests/test_engine.py covers "standard").
    assert info["model"]["deformable_attention"] == ("fused" if BUILT_MSDA_KERNEL.is_file() else "standard")
    assert info["model"]["winograd_convolutions"] == 0  # the tiny model's convolutions are too thin (64 channels)
    assert info["model"]["int8_convolutions"] == info["model"]["int8_group_norms"] == 0  # an FP32 model
    # Its encoder layer, 3 decoder layers and 4 mask-embedding MLPs run as the library's fused op.
    assert info["model"]["feedforward_blocks"] == (8 if BUILT_MSDA_KERNEL.is_file() else 0)
    assert info["model"]["linear_layers"] == (26 if BUILT_MSDA_KERNEL.is_file() else 0)
    assert info["model"]["softmax_nodes"] == (3 if BUILT_MSDA_KERNEL.is_file() else 0)  # its 3 masked attentions
    assert info["model"]["position_embeddings"] == (6 if BUILT_MSDA_KERNEL.is_file() else 0)  # 3 levels, twice
    assert len(info["classes"]) == 20 and info["classes"][0] == "background" and "face" in info["classes"]
    assert len(info["palette"]) == 20 and info["palette"][0] == [0, 0, 0]
    assert len({tuple(c) for c in info["palette"]}) == 20
    assert info["input_policy"]["short_edge"] > 0 and info["input_policy"]["size_divisibility"] == 32
    assert info["inference"]["num_parsing"] == 20
    assert list(info["outputs"]) == list(OUTPUT_NAMES)
    assert info["limits"]["max_upload_bytes"] == 20 * 1024 * 1024
    assert info["workers"]["workers"] == 1 and info["api_key_required"] is False
    assert {"m2fp_service", "onnxruntime", "python"} <= set(info["versions"])
    assert re.match(r"\d+\.\d+", info["versions"]["onnxruntime"])


def test_info_says_standard_ops_when_the_kernel_is_off(tiny_model_path: Path) -> None:
    async def scenario() -> object:
        async with started_app(make_settings(tiny_model_path, msda_kernel="off")) as (_, client):
            return (await client.get("/api/info")).json()["model"]["deformable_attention"]

    assert asyncio.run(scenario()) == "standard"


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive", "detail": None}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


class _SlowLoad:
    """Holds the model load until released (the real load then runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.release = threading.Event()
        real_load = app_module._load

        def load(settings):  # type: ignore[no-untyped-def]
            self.release.wait(10)
            if fail:
                raise ModelLoadError("the model file is corrupt (test)")
            return real_load(settings)

        monkeypatch.setattr(app_module, "_load", load)


def test_requests_wait_for_the_model_while_it_loads(
    tiny_model_path: Path, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = _SlowLoad(monkeypatch)

    async def scenario() -> tuple[list[httpx.Response], dict[str, object]]:
        async with started_app(make_settings(tiny_model_path), wait_loaded=False) as (_, client):
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "loading"
            posts = [asyncio.ensure_future(client.post("/api/parse", files=image_file(photo_jpeg))) for _ in range(2)]
            await asyncio.sleep(0.3)
            assert not any(p.done() for p in posts), "a request did not wait for the model"
            info = (await client.get("/api/info")).json()
            metrics = (await client.get("/metrics")).text
            slow.release.set()
            return list(await asyncio.gather(*posts)), {"info": info, "metrics": metrics}

    responses, seen = asyncio.run(scenario())
    assert seen["info"]["status"] == "loading"  # type: ignore[index]
    assert "m2fp_queue_depth 2.0" in str(seen["metrics"]), "waiting requests hold their places in the queue"
    for r in responses:
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]["classes"]) >= 3


def test_waiting_for_the_model_is_bounded_by_the_queue_and_the_timeout(
    tiny_model_path: Path, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = _SlowLoad(monkeypatch)

    async def scenario() -> list[httpx.Response]:
        settings = make_settings(tiny_model_path, workers=1, queue_size=0, request_timeout_s=0.5)
        async with started_app(settings, wait_loaded=False) as (_, client):
            waiting = asyncio.ensure_future(client.post("/api/parse", files=image_file(photo_jpeg)))
            await asyncio.sleep(0.1)
            full = await client.post("/api/parse", files=image_file(photo_jpeg))
            timed_out = await waiting
            slow.release.set()
            for _ in range(500):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            return [full, timed_out, await client.get("/readyz")]

    full, timed_out, ready = asyncio.run(scenario())
    assert full.status_code == 503 and full.json()["code"] == 1008 and "retry-after" in full.headers
    assert timed_out.status_code == 504 and timed_out.json()["code"] == 1010
    assert "still loading" in timed_out.json()["message"]
    assert ready.status_code == 200


def test_requests_waiting_for_a_model_that_fails_get_the_reason(
    tiny_model_path: Path, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = _SlowLoad(monkeypatch, fail=True)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with started_app(make_settings(tiny_model_path), wait_loaded=False) as (_, client):
            waiting = asyncio.ensure_future(client.post("/api/parse", files=image_file(photo_jpeg)))
            await asyncio.sleep(0.1)
            slow.release.set()
            return await waiting, await client.get("/readyz")

    waiting, ready = asyncio.run(scenario())
    assert waiting.status_code == 503 and waiting.json()["code"] == 1009
    assert "corrupt (test)" in waiting.json()["message"]
    assert ready.status_code == 503 and ready.json()["status"] == "failed"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_work_offline(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", r.text)
    assert urls, "no asset URLs found"
    assert not re.search(r"https?://", r.text.replace("https://creativecommons.org", "")), \
        "the page references an external URL"
    for url in urls:
        assert url.startswith("/"), url
        assert client.get(url).status_code == 200, url
