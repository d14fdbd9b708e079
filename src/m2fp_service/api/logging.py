"""Structured logs (one JSON object per line) and the request-id / access-log middleware.

Each request gets an id: a sane incoming ``X-Request-ID`` is kept, anything else is replaced by
a fresh one. The id is returned in the ``X-Request-ID`` header, stored in a context variable so
every log line written while serving the request carries it (worker threads included: the pool
copies the context), and logged with route, status and duration when the request ends.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("m2fp_request_id", default=None)

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_STD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}

access_log = logging.getLogger("m2fp.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            payload["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and key not in payload:
                payload[key] = value
        if record.exc_info:
            payload["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(payload, default=str, ensure_ascii=False)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """Control characters (newlines, escape sequences...) as Python escapes: one record, one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class _TextFormatter(logging.Formatter):
    """Plain lines; request input inside a message (paths, names) cannot forge or colour lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = request_id_var.get()
        return f"{text} [{rid}]" if rid else text


def configure_logging(level: str = "info", json_lines: bool = True) -> None:
    """Routes our and uvicorn's loggers to one stderr handler (JSON lines or plain text)."""
    handler = logging.StreamHandler(sys.stderr)
    text = _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if json_lines else text)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs each request


def accept_request_id(incoming: str | None) -> str:
    """The client's id when it is short and plain, else a new random one."""
    if incoming and _SANE_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestObserver(Protocol):
    def request_started(self) -> None: ...

    def request_finished(self, route: str, method: str, status: int, seconds: float) -> None: ...


def route_label(scope: Scope) -> str:
    """The matched route's template (``/api/parse``), never the raw path: bounded label values."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    return "<unmatched>"


class RequestContextMiddleware:
    """Pure ASGI middleware: request id, access log line, request metrics, last-resort 500.

    Args:
        app: the wrapped application.
        observer: receives start/finish of each HTTP request (metrics), may be None.
        on_crash: builds the response for an exception nobody handled, from the request id.
    """

    def __init__(self, app: ASGIApp, observer: RequestObserver | None,
                 on_crash: Callable[[str], Any]) -> None:
        self.app = app
        self.observer = observer
        self.on_crash = on_crash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = accept_request_id(incoming)
        token = request_id_var.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = rid, time.monotonic()
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        if self.observer:
            self.observer.request_started()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logging.getLogger("m2fp.api").exception("unhandled error on %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            await self.on_crash(rid)(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = route_label(scope)
            if self.observer:
                self.observer.request_finished(route, scope["method"], status, seconds)
            access_log.info(
                "%s %s %d %.1f ms", scope["method"], scope["path"], status, seconds * 1000,
                extra={"request_id": rid, "method": scope["method"], "route": route, "path": scope["path"],
                       "status": status, "duration_ms": round(seconds * 1000, 2),
                       "client": (scope.get("client") or ("", 0))[0]},
            )
            request_id_var.reset(token)
