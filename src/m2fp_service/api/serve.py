"""``m2fp serve`` and ``m2fp openapi``: run the app under uvicorn; dump its OpenAPI document."""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from m2fp_service.api.app import create_app
from m2fp_service.api.logging import configure_logging
from m2fp_service.config import Settings

log = logging.getLogger("m2fp.serve")

DEFAULT_OPENAPI_PATH = Path("openapi/openapi.json")


def serve(settings: Settings) -> int:
    """Serves until SIGTERM/SIGINT, then stops accepting, lets in-flight requests finish
    (up to ``settings.shutdown_timeout_s``), drains the worker pool and returns 0.

    Returns 1 when the server cannot start, or when the model cannot be loaded: the server then
    stops at once (it answered ``/readyz`` 503 meanwhile, never 200) and says why.
    """
    configure_logging(settings.log_level, settings.log_json)
    load_failure: list[str] = []

    def stop_on_load_failure(reason: str) -> None:
        load_failure.append(reason)
        server.should_exit = True

    app = create_app(settings, on_load_failure=stop_on_load_failure)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level, timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        server_header=False, lifespan="on", limit_concurrency=settings.max_connections,
    )
    server = uvicorn.Server(config)
    log.info("m2fp-service on http://%s:%d (WebUI /, API docs /docs); model %s", settings.host, settings.port,
             settings.model)

    def stop(signum: int, frame: FrameType | None) -> None:
        # Outside uvicorn's own handlers: a signal before it installs them, or the one it re-raises
        # after its graceful shutdown (which would otherwise kill us with a non-zero status).
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if load_failure:
        log.error("m2fp serve: exiting because the model could not be loaded: %s", load_failure[0])
        return 1
    if not server.started:
        return 1
    log.info("stopped")
    return 0


def openapi_document(settings: Settings | None = None) -> dict[str, Any]:
    """The OpenAPI document the app serves (it does not depend on settings or the model)."""
    return create_app(settings or Settings()).openapi()


def openapi_text(settings: Settings | None = None) -> str:
    return json.dumps(openapi_document(settings), indent=2, ensure_ascii=False) + "\n"


def write_openapi(path: Path, check: bool = False) -> int:
    """Writes the document to ``path``; with ``check``, only reports whether the file is current."""
    text = openapi_text()
    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            print(f"{path} is out of date: run `m2fp openapi -o {path}` (or `make openapi`)")
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0
