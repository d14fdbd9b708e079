"""The hostile-input corpus against a real `m2fp serve`, on every multipart image endpoint.

The endpoints come from the app's own OpenAPI document (every operation taking a multipart body with
a binary ``image`` field), so new ones (``POST /api/background``) are covered when they land. Each
hostile upload must get its typed 4xx, with a clear message, without reaching inference; odd but
valid pictures must be parsed at their right size; slow and vanishing clients must leave nothing
behind. The last test checks the server's descriptors, temporary files and memory.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from m2fp_service.api.serve import openapi_document
from tests.integration.corpus import (
    BOUNDARY,
    TRAVERSAL_NAMES,
    Case,
    OddImage,
    Upload,
    hostile_cases,
    image_upload,
    odd_valid_images,
)
from tests.integration.server import Server, serve

pytestmark = pytest.mark.slow

UPLOAD_TIMEOUT_S = 2


def multipart_image_endpoints(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(METHOD, path) of every operation whose multipart body has a binary ``image`` field."""
    found = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            schema = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
            image = schema.get("properties", {}).get("image", {})
            if image.get("format") == "binary":
                found.append((method.upper(), path))
    return sorted(found)


ENDPOINTS = multipart_image_endpoints(openapi_document())
ENDPOINT_IDS = [f"{m} {p}" for m, p in ENDPOINTS]
INFER_COUNT = 'm2fp_stage_duration_seconds_count{stage="infer"}'


@dataclass
class Outcome:
    case: str
    endpoint: str
    status: int
    code: int | None
    seconds: float


OUTCOMES: list[Outcome] = []


@dataclass
class Baseline:
    fds: int
    rss_mb: float
    tmp_files: set[Path]


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory,
           photo_jpeg: bytes) -> Iterator[tuple[Server, Baseline]]:
    with serve(tiny_model_path, tmp_path_factory.mktemp("hostile"), workers=1, queue_size=8,
               upload_timeout_s=UPLOAD_TIMEOUT_S) as s:
        for method, path in ENDPOINTS:  # warm up every endpoint before taking the baseline
            for _ in range(2):
                assert send(s, method, path, image_upload(photo_jpeg))[0] == 200
        s.wait_idle()
        yield s, Baseline(fds=s.open_fds(), rss_mb=s.rss_mb(), tmp_files=s.tmp_files())
    if OUTCOMES:
        print("\nhostile corpus outcomes:")
        for o in OUTCOMES:
            print(f"  {o.endpoint:22} {o.case:45} {o.status} {o.code} {o.seconds * 1000:8.1f} ms")


def send(s: Server, method: str, path: str, upload: Upload, rid: str | None = None,
         chunk: int = 1 << 20) -> tuple[int, dict[str, str], bytes]:
    """Sends the upload over a fresh connection with its Content-Length; a server that answers
    before the body is all sent (a refused upload) is heard out, not treated as a failure."""
    body = upload.body()
    query = "&".join(f"{k}={v}" for k, v in upload.params.items())
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
    try:
        conn.putrequest(method, path + (f"?{query}" if query else ""))
        for key, value in upload.headers().items():
            conn.putheader(key, value)
        if rid:
            conn.putheader("X-Request-ID", rid)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            for i in range(0, len(body), chunk):
                conn.send(body[i : i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("case", hostile_cases(), ids=lambda c: c.name)
@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_hostile_upload_gets_its_4xx_before_inference(
    server: tuple[Server, Baseline], method: str, path: str, case: Case, photo_jpeg: bytes
) -> None:
    s, _ = server
    inferences = s.metric(INFER_COUNT)
    rid = f"hostile-{abs(hash(case.name)) % 10**8}"
    upload = case.make(photo_jpeg)
    t0 = time.monotonic()
    status, headers, raw = send(s, method, path, upload, rid=rid)
    OUTCOMES.append(Outcome(case.name, f"{method} {path}", status, json.loads(raw).get("code"),
                            time.monotonic() - t0))
    assert status == case.status, raw[:500]
    body = json.loads(raw)
    assert set(body) == {"code", "message", "data"} and body["data"] is None
    assert body["code"] == case.code, body
    for word in case.words:
        assert word.lower() in body["message"].lower(), body["message"]
    assert headers["x-request-id"] == rid and headers["content-type"] == "application/json"
    assert s.metric(INFER_COUNT) == inferences, "a refused upload reached inference"
    assert s.healthy()


@pytest.mark.parametrize("name", TRAVERSAL_NAMES, ids=range(len(TRAVERSAL_NAMES)))
@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_file_names_never_become_paths(server: tuple[Server, Baseline], method: str, path: str, name: str) -> None:
    s, baseline = server
    # The name is parsed with the multipart headers whatever the content; an empty picture keeps it fast.
    status, _, raw = send(s, method, path, image_upload(b"", filename=name))
    # A name breaking the part header may make the body malformed (400); otherwise it is just ignored.
    assert status in (422, 400), raw[:300]
    assert not Path("/tmp/m2fp-pwned.jpg").exists()
    assert s.tmp_files() == baseline.tmp_files
    log_lines = s.log.read_text().splitlines()
    assert all(line.startswith("{") for line in log_lines if line), "a name broke a log line"


def _result_hw(headers: dict[str, str], raw: bytes) -> tuple[int, int]:
    if headers["content-type"].startswith("application/json"):
        picture = base64.b64decode(json.loads(raw)["data"]["result_image"])
    else:
        picture = raw
    with Image.open(io.BytesIO(picture)) as im:
        return im.height, im.width


@pytest.mark.parametrize("odd", odd_valid_images(), ids=lambda o: o.name)
@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_odd_valid_images_are_parsed(server: tuple[Server, Baseline], method: str, path: str, odd: OddImage) -> None:
    s, _ = server
    t0 = time.monotonic()
    status, headers, raw = send(s, method, path, image_upload(odd.data, filename="odd", ctype=odd.mime))
    OUTCOMES.append(Outcome(odd.name, f"{method} {path}", status, None, time.monotonic() - t0))
    assert status == 200, (odd.name, raw[:300])
    assert _result_hw(headers, raw) == odd.hw, odd.name


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_wrong_part_content_type_is_ignored(server: tuple[Server, Baseline], method: str, path: str,
                                            photo_jpeg: bytes) -> None:
    """The bytes decide what the picture is, not the declared type."""
    s, _ = server
    for ctype in ("text/plain", "image/png", None):
        status, _, raw = send(s, method, path, image_upload(photo_jpeg, ctype=ctype))  # type: ignore[arg-type]
        assert status == 200, raw[:300]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_slow_upload_is_408_and_frees_its_place(server: tuple[Server, Baseline], method: str, path: str,
                                                photo_jpeg: bytes) -> None:
    s, _ = server
    body = image_upload(photo_jpeg).body()
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:2000])
        t0 = time.monotonic()
        response = http.client.HTTPResponse(sock)
        response.begin()
        waited = time.monotonic() - t0
        assert response.status == 408
        assert json.loads(response.read())["code"] == 1015
    assert waited >= UPLOAD_TIMEOUT_S * 0.9
    s.wait_idle(10)


def _disconnect_after(s: Server, method: str, path: str, body: bytes, sent: int, wait_for_inference: bool) -> None:
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:sent])
        if wait_for_inference:
            deadline = time.monotonic() + 30
            while s.metric("m2fp_workers_busy") < 1:
                assert time.monotonic() < deadline, "the request never started running"
                time.sleep(0.01)


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_client_vanishing_mid_upload_leaves_nothing(server: tuple[Server, Baseline], method: str, path: str,
                                                    photo_jpeg: bytes) -> None:
    s, _ = server
    body = image_upload(photo_jpeg).body()
    for _ in range(5):
        _disconnect_after(s, method, path, body, len(body) // 2, wait_for_inference=False)
    s.wait_idle(10)
    assert s.healthy()


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_client_vanishing_mid_inference_stops_its_run(server: tuple[Server, Baseline], method: str, path: str,
                                                      photo_jpeg: bytes) -> None:
    s, _ = server
    big = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg)).resize((2666, 1280)).save(big, format="JPEG", quality=90)
    body = image_upload(big.getvalue()).body()
    log_size = len(s.log.read_text())
    _disconnect_after(s, method, path, body, len(body), wait_for_inference=True)
    s.wait_idle(30)
    deadline = time.monotonic() + 10
    stopped: list[dict[str, Any]] = []
    while not stopped and time.monotonic() < deadline:
        new = [json.loads(line) for line in s.log.read_text()[log_size:].splitlines() if line.startswith("{")]
        stopped = [e for e in new if "stopped a job" in e["msg"]]
        time.sleep(0.05)
    assert stopped and "the client disconnected" in stopped[0]["msg"]
    assert send(s, method, path, image_upload(photo_jpeg))[0] == 200


def test_nothing_left_behind(server: tuple[Server, Baseline], photo_jpeg: bytes) -> None:
    """Runs last in this module: after the whole corpus the server holds no extra descriptors,
    wrote no temporary file, and its memory is where it was after warm-up."""
    s, baseline = server
    s.wait_idle()
    deadline = time.monotonic() + 10
    while s.open_fds() > baseline.fds and time.monotonic() < deadline:  # closing sockets settle
        time.sleep(0.1)
    assert s.open_fds() <= baseline.fds, f"descriptors: {baseline.fds} after warm-up, {s.open_fds()} now"
    assert s.tmp_files() == baseline.tmp_files, "temporary files were left behind"
    rss = s.rss_mb()
    print(f"\nRSS after warm-up {baseline.rss_mb:.0f} MB, after the corpus {rss:.0f} MB; "
          f"descriptors {baseline.fds} -> {s.open_fds()}")
    assert rss < baseline.rss_mb * 1.25 + 64, f"RSS grew from {baseline.rss_mb:.0f} to {rss:.0f} MB"
    assert s.healthy()
