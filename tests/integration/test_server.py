"""A real `m2fp serve` process on 127.0.0.1: the seed's client, concurrency, overload, SIGTERM, hostile input.

Each server is `python -m m2fp_service.cli serve` on a free port with the tiny model; the tests talk
to it over TCP with ``requests`` exactly as users do.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.api.conftest import multipart_head, png_header_only
from tests.integration.server import Server, assert_non_trivial, parse, serve

pytestmark = pytest.mark.slow

MB = 1024 * 1024
MAX_UPLOAD = 8 * MB

SEED_CLIENT = '''
import requests
import base64

files = {'image': open('test.jpg', 'rb')}
response = requests.post(url, files=files)
result = response.json()
if result['code'] == 0:
    img_data = base64.b64decode(result['data']['result_image'])
    with open('output.png', 'wb') as f:
        f.write(img_data)
    print(f"✅ 推理完成,耗时 {result['data']['inference_time']:.2f}s")
else:
    print("❌ 错误:", result['message'])
'''


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_model_path, tmp_path_factory.mktemp("server"), queue_size=8,
               max_upload_bytes=MAX_UPLOAD) as s:
        yield s


def test_seed_client_literally(server: Server, photo_jpeg: bytes, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    Path("test.jpg").write_bytes(photo_jpeg)
    exec(SEED_CLIENT, {"url": f"{server.url}/api/parse"})  # the seed's code, unchanged
    printed = capsys.readouterr().out
    assert printed.startswith("✅ 推理完成,耗时 ") and printed.rstrip().endswith("s"), printed
    with Image.open("output.png") as im:
        assert im.format == "PNG" and im.size == (1024, 512)
        assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) >= 3


def test_concurrent_requests_all_succeed(server: Server, photo_jpeg: bytes) -> None:
    with_outputs = ["", "people", "overlay,areas", "cutout", "", "label"]
    results: list[requests.Response | None] = [None] * len(with_outputs)

    def worker(i: int) -> None:
        results[i] = parse(server, photo_jpeg, with_outputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(with_outputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        assert r is not None and r.status_code == 200, r and r.text
        assert_non_trivial(r.json())
    ids = {r.headers["x-request-id"] for r in results if r is not None}
    assert len(ids) == len(results)


def _chunked_form(total_bytes: int) -> Iterator[bytes]:
    yield multipart_head("b0undary")
    chunk = os.urandom(MB)
    for _ in range(total_bytes // MB):
        yield chunk


HOSTILE = [
    ("empty file", {"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 422),
    ("5 MB of random bytes", {"files": {"image": ("noise.jpg", os.urandom(5 * MB), "image/jpeg")}}, 422),
    ("text renamed .jpg", {"files": {"image": ("notes.jpg", b"just some text\n" * 100, "image/jpeg")}}, 422),
    ("PNG claiming 30000x30000", {"files": {"image": ("bomb.png", png_header_only(30000, 30000), "image/png")}}, 413),
    ("GIF", {"files": {"image": ("a.gif", b"GIF89a" + bytes(100), "image/gif")}}, 415),
    ("no image field", {"files": {"photo": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")}}, 400),
    ("unknown output", {"files": {"image": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")},
                        "params": {"outputs": "everything"}}, 400),
]


@pytest.mark.parametrize(("what", "kwargs", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input(server: Server, what: str, kwargs: dict, status: int) -> None:
    r = requests.post(f"{server.url}/api/parse", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] != 0 and body["data"] is None and body["message"]
    assert server.healthy()


def _post_declaring(server: Server, content_length: int, body: Iterator[bytes]) -> tuple[int, bytes]:
    """POSTs with a declared Content-Length (no chunking), sending ``body`` until the server stops us."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/api/parse")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b0undary")
    conn.putheader("Content-Length", str(content_length))
    conn.endheaders()
    try:
        for chunk in body:
            conn.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused early, as intended; the response is waiting
    response = conn.getresponse()
    try:
        return response.status, response.read()
    finally:
        conn.close()


def test_oversized_uploads_are_refused_without_buffering(server: Server, photo_jpeg: bytes) -> None:
    rss_before = server.rss_mb()
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    t0 = time.monotonic()
    chunked = requests.post(f"{server.url}/api/parse", data=_chunked_form(96 * MB), headers=headers, timeout=60)
    assert chunked.status_code == 413 and chunked.json()["code"] == 1004, chunked.text
    status, body = _post_declaring(server, 1024 * MB, _chunked_form(16 * MB))
    assert status == 413 and json.loads(body)["code"] == 1004, body
    assert time.monotonic() - t0 < 30
    assert server.rss_mb() - rss_before < 48, "the server buffered a refused upload"
    assert server.healthy()
    assert_non_trivial(parse(server, photo_jpeg).json())


def test_rss_stays_bounded(server: Server, photo_jpeg: bytes) -> None:
    for _ in range(3):
        assert parse(server, photo_jpeg, "all").status_code == 200
    before = server.rss_mb()
    for i in range(20):
        r = parse(server, photo_jpeg, "all" if i % 2 else "")
        assert r.status_code == 200
    after = server.rss_mb()
    assert_non_trivial(r.json())
    assert after - before < 64, f"RSS grew from {before:.0f} MB to {after:.0f} MB over 20 requests"


def test_logs_are_json_lines_with_request_ids(server: Server) -> None:
    requests.get(f"{server.url}/healthz", headers={"X-Request-ID": "log-check-1"}, timeout=10)
    time.sleep(0.2)
    entries = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    access = [e for e in entries if e["logger"] == "m2fp.access" and e.get("request_id") == "log-check-1"]
    assert access and access[0]["route"] == "/healthz" and access[0]["status"] == 200
    assert "duration_ms" in access[0]
    assert any("UNTRAINED DEMO MODEL" in e["msg"] and e["level"] == "warning" for e in entries)


def test_overload_gives_503_with_retry_after(tiny_model_path: Path, tmp_path: Path, photo_jpeg: bytes) -> None:
    with serve(tiny_model_path, tmp_path, workers=1, queue_size=0) as s:
        barrier = threading.Barrier(5)
        responses: list[requests.Response] = []

        def worker() -> None:
            barrier.wait()
            responses.append(parse(s, photo_jpeg))

        threads = [threading.Thread(target=worker) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 1 and statuses.count(503) >= 2, statuses
        assert set(statuses) == {200, 503}
        for r in responses:
            if r.status_code == 503:
                assert r.json()["code"] == 1008 and int(r.headers["Retry-After"]) >= 1
                assert r.headers["Connection"] == "close"
                assert r.elapsed.total_seconds() < 1.0, "503 must be immediate"
            else:
                assert_non_trivial(r.json())
        assert s.healthy()


def test_sigterm_drains_in_flight_requests(tiny_model_path: Path, tmp_path: Path, photo_jpeg: bytes) -> None:
    big = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg)).resize((2048, 1024)).save(big, format="JPEG", quality=90)
    # Draining, not speed, is tested: a generous grace period keeps a loaded machine from cutting it short.
    with serve(tiny_model_path, tmp_path, workers=1, queue_size=4, shutdown_timeout_s=120) as s:
        responses: list[requests.Response] = []
        threads = [threading.Thread(target=lambda: responses.append(parse(s, big.getvalue(), "all")))
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while s.metric("m2fp_workers_busy") < 1 or s.metric("m2fp_queue_depth") < 1:
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)

        refused = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not refused:
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
                time.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
        assert refused, "new connections are still accepted after SIGTERM"
        assert any(t.is_alive() for t in threads), "the test did not overlap shutdown with in-flight work"

        for t in threads:
            t.join(60)
        assert [r.status_code for r in responses] == [200, 200]
        for r in responses:
            assert_non_trivial(r.json())
            assert base64.b64decode(r.json()["data"]["cutout"]).startswith(b"\x89PNG")
        assert s.proc.wait(30) == 0
        log = s.log.read_text()
        assert "worker pool drained" in log

