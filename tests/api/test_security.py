"""API key on every /api/* route (Bearer or X-API-Key), the schema that says so, CORS, security headers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from m2fp_service.api.logging import _TextFormatter, escape_control
from m2fp_service.api.security import inline_hashes, presented_keys
from m2fp_service.config import Settings
from tests.api.conftest import image_file, make_settings, multipart_head, running_client, started_app

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def keyed(tiny_model_path: Path) -> Iterator[TestClient]:
    with running_client(make_settings(tiny_model_path, api_key=KEY)) as c:
        yield c


def assert_401(r: httpx.Response, word: str) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["code"] == 1003 and r.json()["data"] is None and word in r.json()["message"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["x-request-id"]


def test_every_api_route_needs_the_key(keyed: TestClient, photo_jpeg: bytes) -> None:
    assert_401(keyed.post("/api/parse", files=image_file(photo_jpeg)), "requires an API key")
    assert_401(keyed.get("/api/info"), "Authorization: Bearer")
    assert_401(keyed.get("/api/no-such-route"), "requires")  # no route discovery without the key
    assert_401(keyed.get("/api/info", headers={"X-API-Key": "wrong"}), "wrong API key")
    assert_401(keyed.get("/api/info", headers={"Authorization": f"Bearer {KEY}x"}), "wrong")
    assert_401(keyed.get("/api/info", headers={"Authorization": f"Basic {KEY}"}), "wrong")
    both = {"Authorization": f"Bearer {KEY}", "X-API-Key": "wrong"}  # a wrong key is never ignored
    assert_401(keyed.get("/api/info", headers=both), "wrong")


def test_the_right_key_in_either_header(keyed: TestClient, photo_jpeg: bytes) -> None:
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer  {KEY} "}, {"X-API-Key": KEY}):
        r = keyed.get("/api/info", headers=headers)
        assert r.status_code == 200 and r.json()["api_key_required"] is True
    r = keyed.post("/api/parse", files=image_file(photo_jpeg), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and len(r.json()["data"]["classes"]) >= 3


def test_health_docs_and_webui_stay_open(keyed: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json", "/", "/webui/app.js",
                 "/webui/app.css"):
        assert keyed.get(path).status_code == 200, path


def test_refused_before_the_upload_is_read(tiny_model_path: Path, photo_jpeg: bytes) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for chunk in (multipart_head("b0undary"), photo_jpeg, b"\r\n--b0undary--\r\n"):
            pulled += len(chunk)
            yield chunk

    async def scenario() -> httpx.Response:
        async with started_app(make_settings(tiny_model_path, api_key=KEY)) as (_, client):
            return await client.post("/api/parse", content=body(),
                                     headers={"Content-Type": "multipart/form-data; boundary=b0undary"})

    assert_401(asyncio.run(scenario()), "requires")
    assert pulled == 0


def test_schema_describes_the_configured_auth(keyed: TestClient, client: TestClient) -> None:
    doc = keyed.get("/openapi.json").json()
    assert set(doc["components"]["securitySchemes"]) == {"Bearer", "ApiKey"}
    assert doc["components"]["securitySchemes"]["Bearer"]["scheme"] == "bearer"
    assert doc["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    for path, item in doc["paths"].items():
        for op in item.values():
            if path.startswith("/api/"):
                assert op["security"] == [{"Bearer": []}, {"ApiKey": []}], path
                assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith(
                    "/ErrorResponse")
            else:
                assert "security" not in op and "401" not in op["responses"], path
    open_doc = client.get("/openapi.json").json()
    assert "securitySchemes" not in open_doc["components"]


def test_blank_key_setting_means_no_key(tiny_model_path: Path) -> None:
    assert make_settings(tiny_model_path, api_key="  ").api_key is None
    assert Settings(_env_file=None, api_key=" k ").api_key == "k"  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("headers", "keys"),
    [
        ([], []),
        ([(b"x-api-key", b"a")], ["a"]),
        ([(b"authorization", b"Bearer b")], ["b"]),
        ([(b"authorization", b"Token b")], [""]),
        ([(b"authorization", b"Bearer")], [""]),
        ([(b"x-api-key", b"a"), (b"authorization", b"bearer b")], ["a", "b"]),
    ],
)
def test_presented_keys(headers: list[tuple[bytes, bytes]], keys: list[str]) -> None:
    assert presented_keys(headers) == keys


# --- CORS -----------------------------------------------------------------------------------------

def test_cors_is_closed_by_default(client: TestClient) -> None:
    r = client.get("/api/info", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = client.options("/api/parse", headers={"Origin": "https://evil.example",
                                                "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_allows_only_the_configured_origins(tiny_model_path: Path) -> None:
    settings = make_settings(tiny_model_path, api_key=KEY, cors_origins="https://app.example, https://b.example")
    with running_client(settings) as c:
        pre = c.options("/api/parse", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200, pre.text  # preflight needs no key: browsers never send one there
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        refused = c.get("/api/info", headers={"Origin": "https://app.example"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/api/info", headers={"Origin": "https://evil.example", "X-API-Key": KEY})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


# --- response headers -----------------------------------------------------------------------------

def _csp(r: httpx.Response) -> dict[str, str]:
    return {d.split(" ", 1)[0]: (d.split(" ", 1) + [""])[1] for d in r.headers["content-security-policy"].split("; ")}


@pytest.mark.parametrize("path", ["/", "/webui/app.js", "/api/info", "/healthz", "/openapi.json", "/api/nope"])
def test_security_headers_everywhere(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    csp = _csp(r)
    assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"  # no inline script or style


def test_webui_page_has_no_inline_script_or_style(client: TestClient) -> None:
    html = client.get("/").text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script> in index.html"
    assert "<style" not in html and not re.search(r"\sstyle\s*=", html), "inline style in index.html"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler in index.html"
    assert inline_hashes(html.encode()) == {}


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_allow_exactly_their_inline_blocks(client: TestClient, path: str) -> None:
    r = client.get(path)
    csp = _csp(r)
    scripts = re.findall(r"<script>(.*?)</script>", r.text, re.DOTALL)
    for body in scripts:
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp["script-src"]
    assert "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
    assert csp["frame-ancestors"] == "'none'"
    if path == "/docs":
        assert scripts, "Swagger UI's page has its inline start-up script"


def test_text_logs_escape_request_input() -> None:
    record = logging.makeLogRecord({"msg": "%s %s", "args": ("GET", "/api/x\n{\"level\":\"fake\"}\x1b[31m"),
                                    "levelname": "INFO", "name": "m2fp.access"})
    line = _TextFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line and "\\n" in line and "\\x1b" in line
    assert escape_control("plain /path?q=1") == "plain /path?q=1"
