"""GET /api/info, /healthz, /readyz, and the offline /docs and /redoc."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from m2fp_service.api import app as app_module
from m2fp_service.schemas import OUTPUT_NAMES
from tests.api.conftest import make_settings, running_client, wait_ready


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


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive", "detail": None}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_not_ready_while_loading(tiny_model_path: Path, photo_jpeg: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_load = app_module._load

    def slow_load(settings):  # type: ignore[no-untyped-def]
        gate.wait(10)
        return real_load(settings)

    monkeypatch.setattr(app_module, "_load", slow_load)
    with running_client(make_settings(tiny_model_path), ready=False) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        parse = c.post("/api/parse", files={"image": ("a.jpg", photo_jpeg, "image/jpeg")})
        assert parse.status_code == 503 and parse.json()["code"] == 1009 and "loading" in parse.json()["message"]
        assert c.get("/api/info").json()["status"] == "loading"
        gate.set()
        wait_ready(c)
        assert c.get("/readyz").status_code == 200
        assert c.post("/api/parse", files={"image": ("a.jpg", photo_jpeg, "image/jpeg")}).status_code == 200


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
