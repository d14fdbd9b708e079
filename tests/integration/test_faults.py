"""Faults on a real `m2fp serve`: models that cannot load, inference that fails or overruns, connection limits."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import requests
from onnx import TensorProto, helper
from PIL import Image

from tests.integration.server import assert_non_trivial, parse, serve, start, stop

pytestmark = pytest.mark.slow


def _identity_onnx(path: Path) -> Path:
    """A valid ONNX file that is not an m2fp export (no model card, other inputs/outputs)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


BROKEN_MODELS: list[tuple[str, Callable[[Path, Path], Path], str]] = [
    ("missing file", lambda tiny, d: d / "absent.onnx", "not found; export one with `m2fp export"),
    ("random bytes", lambda tiny, d: _write(d / "noise.onnx", os.urandom(4096)), "ONNX Runtime cannot load"),
    ("truncated export", lambda tiny, d: _write(d / "cut.onnx", tiny.read_bytes()[: tiny.stat().st_size // 2]),
     "ONNX Runtime cannot load"),
    ("another ONNX model", lambda tiny, d: _identity_onnx(d / "other.onnx"), "no m2fp model card"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("what", "make", "reason"), BROKEN_MODELS, ids=[b[0] for b in BROKEN_MODELS])
def test_a_model_that_cannot_load_stops_the_server_with_a_clear_message(
    tiny_model_path: Path, tmp_path: Path, what: str, make: Callable[[Path, Path], Path], reason: str
) -> None:
    server = start(make(tiny_model_path, tmp_path), tmp_path)
    readiness: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while server.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(requests.ConnectionError):
                readiness.append(requests.get(f"{server.url}/readyz", timeout=2).status_code)
            time.sleep(0.05)
        assert server.proc.poll() is not None, "the server kept running without a model"
    finally:
        stop(server)
    assert server.proc.returncode == 1
    assert 200 not in readiness, "a server without a model looked ready"
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    final = [e for e in lines if "exiting because the model could not be loaded" in e["msg"]]
    assert final and final[-1]["level"] == "error" and reason in final[-1]["msg"], server.log.read_text()


def test_a_failing_inference_is_a_500_for_that_request_only(
    faulty_model_path: Path, tmp_path: Path, photo_jpeg: bytes, white_png: bytes
) -> None:
    with serve(faulty_model_path, tmp_path, workers=2, queue_size=8) as s:
        outcomes: dict[str, requests.Response] = {}

        def post(name: str, data: bytes, mime: str) -> None:
            outcomes[name] = requests.post(f"{s.url}/api/parse", files={"image": ("x", data, mime)},
                                           headers={"X-Request-ID": name}, timeout=120)

        jobs = [("fault-1", white_png, "image/png"), ("photo-1", photo_jpeg, "image/jpeg"),
                ("fault-2", white_png, "image/png"), ("photo-2", photo_jpeg, "image/jpeg")]
        threads = [threading.Thread(target=post, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for name in ("fault-1", "fault-2"):
            r = outcomes[name]
            assert r.status_code == 500 and r.headers["x-request-id"] == name, r.text
            body = r.json()
            assert body["code"] == 1011 and body["data"] is None
            assert f"quote request id {name}" in body["message"] and "the model failed on this image" in body["message"]
            assert "Gather" not in body["message"] and "ONNXRuntimeError" not in body["message"]  # internals: log only
        for name in ("photo-1", "photo-2"):
            assert outcomes[name].status_code == 200
            assert_non_trivial(outcomes[name].json())
        assert s.healthy() and requests.get(f"{s.url}/readyz", timeout=10).status_code == 200
        assert parse(s, photo_jpeg).status_code == 200
        logged = [json.loads(line) for line in s.log.read_text().splitlines() if line.startswith("{")]
        errors = [e for e in logged if e["level"] == "error" and e.get("request_id") == "fault-1"]
        assert errors and "out of data bounds" in errors[0]["msg"], "the details go to the log, with the request id"
        assert all(line.startswith("{") for line in s.log.read_text().splitlines() if line), \
            "ONNX Runtime printed its own non-JSON lines"


def test_a_timed_out_inference_is_terminated_and_frees_its_worker(
    full_model_path: Path, tmp_path: Path, photo_jpeg: bytes
) -> None:
    # The full-size network (seconds per run here) so that the 0.5 s limit always falls inside the
    # run: the tiny one, once the fused kernel and the decoder's smaller mask made it faster, could
    # finish on a quick machine before the limit, and then nothing is there to terminate.
    big = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg)).resize((2666, 1280)).save(big, format="JPEG", quality=90)
    with serve(full_model_path, tmp_path, workers=1, queue_size=0, request_timeout_s=0.5) as s:
        r = requests.post(f"{s.url}/api/parse", files={"image": ("big.jpg", big.getvalue(), "image/jpeg")},
                          headers={"X-Request-ID": "overrun"}, timeout=60)
        assert r.status_code == 504 and r.json()["code"] == 1010, r.text
        s.wait_idle(30)
        deadline = time.monotonic() + 10
        while True:
            logged = [json.loads(line) for line in s.log.read_text().splitlines() if line.startswith("{")]
            stopped = [e for e in logged if e.get("request_id") == "overrun" and "stopped a job" in e["msg"]]
            if stopped or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert stopped, "no record of the job being stopped"
        assert "the request timed out after 0.5 s" in stopped[0]["msg"]
        assert "terminate flag" in stopped[0]["detail"], "ONNX Runtime's run was not terminated"
        assert s.metric('m2fp_rejected_total{reason="timeout"}') == 1


def test_connections_beyond_the_limit_are_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    with serve(tiny_model_path, tmp_path, max_connections=4) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(4)]
        try:
            time.sleep(0.2)
            refused = requests.get(f"{s.url}/healthz", timeout=10)
            assert refused.status_code == 503
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while requests.get(f"{s.url}/healthz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the server did not recover when the connections closed"
            time.sleep(0.05)
