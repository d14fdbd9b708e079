"""Structured logs: one JSON object per line with request id, route, status and duration."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from m2fp_service.api.logging import JsonFormatter, accept_request_id, request_id_var
from tests.api.conftest import image_file


def test_access_line_per_request(client: TestClient, photo_jpeg: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="m2fp.access"):
        client.post("/api/parse", files=image_file(b""), headers={"X-Request-ID": "abc-123"})
    records = [r for r in caplog.records if r.name == "m2fp.access"]
    assert len(records) == 1
    line = JsonFormatter().format(records[0])
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["request_id"] == "abc-123"
    assert entry["route"] == "/api/parse" and entry["method"] == "POST" and entry["status"] == 422
    assert entry["duration_ms"] > 0 and entry["level"] == "info" and entry["ts"].endswith("+00:00")


def test_formatter_uses_context_request_id_and_keeps_tracebacks() -> None:
    token = request_id_var.set("rid-1")
    try:
        try:
            raise ValueError("multi\nline")
        except ValueError:
            record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",),
                                                       exc_info=True)
            import sys

            record.exc_info = sys.exc_info()
        entry = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert entry["msg"] == "failed here" and entry["request_id"] == "rid-1" and "ValueError" in entry["exc"]


@pytest.mark.parametrize(("incoming", "kept"), [("abc-123", True), ("a" * 128, True), ("a" * 129, False),
                                                ("x y", False), ("<script>", False), (None, False)])
def test_accept_request_id(incoming: str | None, kept: bool) -> None:
    assert (accept_request_id(incoming) == incoming) is kept
