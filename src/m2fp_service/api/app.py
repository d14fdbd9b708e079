"""``create_app(settings)``: the FastAPI application.

The lifespan starts loading the model on a background thread and returns at once, so the
server answers ``/healthz`` (and ``/readyz`` 503) while a big model loads and warms up; API
requests arriving meanwhile wait for it in the pool's queue. If loading fails, ``on_load_failure``
is called (``m2fp serve`` stops and exits non-zero); without one the app keeps running with
``/readyz`` 503 and ``/api/*`` answering ``ModelNotReady`` with the reason. On shutdown the worker
pool drains.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from m2fp_service import __version__
from m2fp_service.api.deps import ModelSlot
from m2fp_service.api.disconnect import CancelOnDisconnectMiddleware
from m2fp_service.api.errors import internal_error_response, register_error_handlers
from m2fp_service.api.logging import RequestContextMiddleware
from m2fp_service.api.metrics import Metrics
from m2fp_service.api.routes import background, health, info, live, parse
from m2fp_service.api.security import ApiKeyMiddleware, SecurityHeadersMiddleware, describe_auth
from m2fp_service.api.workers import WorkerPool
from m2fp_service.config import Settings
from m2fp_service.engine import ParsingEngine, engine_options
from m2fp_service.errors import ServiceError
from m2fp_service.imaging.decode import ACCEPTED_FORMATS
from m2fp_service.modelcard import UNTRAINED_WARNING
from m2fp_service.pipeline import ResultCache

log = logging.getLogger("m2fp.api")

DESCRIPTION = """\
Multi-person human parsing (M2FP) on ONNX Runtime, on the CPU.

`POST /api/parse` takes a photo (multipart field `image`) and labels every pixel with a body part
or clothing class, keeping the seed service's JSON envelope. Extra outputs (label map, overlay,
people, areas, RGBA cutout) are opt-in with `outputs`; `labels` re-expresses the classes in another
label set (ATR, LIP, try-on, MediaPipe's six, person). `POST /api/background` returns the photo with
its background made transparent, blurred, a colour, another picture or pixelated — keeping everyone,
one person or chosen classes. Errors use the same envelope with a non-zero `code` and a real HTTP
status. Every response carries `X-Request-ID`.

The M2FP weights are licensed **CC BY-NC 4.0** (non-commercial). `GET /api/info` says whether the
loaded model is trained; an untrained demo model returns meaningless parts.
"""

TAGS = [
    {"name": "parse", "description": "Human parsing"},
    {"name": "background", "description": "Virtual backgrounds: keep people or parts, replace or blur the rest"},
    {"name": "info", "description": "Model card and limits"},
    {"name": "ops", "description": "Health, readiness and metrics"},
]


def operation_id(route: APIRoute) -> str:
    """Stable operation ids (``parse``, ``get_info``...) so diffs of openapi.json stay readable."""
    return route.name


def _webui_dir() -> str:
    return str(resources.files("m2fp_service") / "webui")


def _load(settings: Settings) -> ParsingEngine:
    return ParsingEngine(settings.model, options=engine_options(settings))


LoadFailureHandler = Callable[[str], None]


async def _load_model(app: FastAPI, settings: Settings) -> None:
    slot: ModelSlot = app.state.model
    metrics: Metrics = app.state.metrics
    on_failure: LoadFailureHandler | None = app.state.on_load_failure
    log.info("loading model %s (%d worker(s), %d thread(s) each)", settings.model, settings.workers,
             settings.threads_per_worker())
    try:
        engine = await asyncio.to_thread(_load, settings)
    except Exception as exc:  # ServiceError (missing, corrupt, not ours) or a model that breaks warm-up
        detail = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
        slot.set_failed(detail)
        if on_failure is not None:
            log.error("MODEL NOT LOADED, stopping: %s", detail, exc_info=not isinstance(exc, ServiceError))
            on_failure(detail)
        else:
            log.error("MODEL NOT LOADED, /api/* answers 503 until it is fixed: %s", detail,
                      exc_info=not isinstance(exc, ServiceError))
        return
    slot.set_ready(engine)
    metrics.model_ready.set(1)
    metrics.model_trained.set(1 if engine.card.trained else 0)
    log.info("model ready in %.2f s: %s, %s, input profile %s, deformable attention %s, %d classes, trained=%s, "
             "licence %s", engine.load_seconds, settings.model.name, engine.precision,
             engine.card.input_policy.profile, engine.deformable_attention, len(engine.card.parsing_classes),
             engine.card.trained, engine.card.license)
    if not engine.card.trained:
        for line in ("!" * 78, UNTRAINED_WARNING, "!" * 78):
            log.warning(line)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    pool = WorkerPool(settings.workers, settings.queue_size)
    app.state.pool = pool
    app.state.metrics.bind_pool(lambda: pool.waiting, lambda: pool.running)
    loader = asyncio.create_task(_load_model(app, settings))
    try:
        yield
    finally:
        if not loader.done():
            await asyncio.wait([loader], timeout=settings.shutdown_timeout_s)
        log.info("draining the worker pool")
        await asyncio.to_thread(pool.shutdown)
        app.state.model.set_failed("server shut down")
        app.state.metrics.model_ready.set(0)
        log.info("worker pool drained")


def create_app(settings: Settings, on_load_failure: LoadFailureHandler | None = None) -> FastAPI:
    """The application for ``settings``; nothing is read from the environment here.

    Args:
        settings: the configuration.
        on_load_failure: called with the reason when the model cannot be loaded (``m2fp serve``
            stops then); without it the app keeps serving with ``/readyz`` 503.
    """
    app = FastAPIOffline(
        title="m2fp-service",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        license_info={"name": "Service: Apache-2.0; M2FP weights: CC BY-NC 4.0",
                      "url": "https://creativecommons.org/licenses/by-nc/4.0/"},
        generate_unique_id_function=operation_id,
        # No validator badge: it would make the browser call validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True},
        lifespan=_lifespan,
        favicon_url=None,
    )
    app.state.settings = settings
    app.state.model = ModelSlot()
    app.state.metrics = Metrics()
    app.state.cache = ResultCache(settings.result_cache_mb * 2**20)
    app.state.on_load_failure = on_load_failure
    register_error_handlers(app)
    # Outermost last: request id and metrics -> security headers -> disconnect watch -> CORS -> API
    # key -> routes, so refusals carry the request id, the headers and (for allowed origins) CORS headers.
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"],
            expose_headers=["X-Request-ID", "Retry-After", "Server-Timing"],
        )
    app.add_middleware(CancelOnDisconnectMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestContextMiddleware, observer=app.state.metrics, on_crash=internal_error_response)
    app.include_router(parse.router)
    app.include_router(background.router)
    live.install(app)
    app.include_router(info.router)
    app.include_router(health.router)

    webui = _webui_dir()
    app.mount("/webui", StaticFiles(directory=webui), name="webui")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(f"{webui}/index.html", media_type="text/html")

    @app.get("/live", include_in_schema=False)
    async def live_page() -> FileResponse:
        """Webcam in, virtual background out (WebSocket /api/live)."""
        return FileResponse(f"{webui}/live.html", media_type="text/html")

    @app.get("/obs", include_in_schema=False)
    async def obs_page() -> FileResponse:
        """A transparent page for OBS's Browser Source: a live session's frames (/api/live/watch)."""
        return FileResponse(f"{webui}/obs.html", media_type="text/html")

    _complete_openapi(app, auth_required=settings.api_key is not None)
    return app


UPLOAD_MEDIA_TYPES = ", ".join(f"image/{fmt.lower()}" for fmt in sorted(ACCEPTED_FORMATS))


def describe_uploads(doc: dict[str, Any]) -> dict[str, Any]:
    """States the accepted picture types (multipart ``encoding.contentType``) for every binary field
    of every multipart body, so clients and schema-driven tools send pictures we accept."""
    for item in doc.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if not form:
                continue
            for name, prop in form.get("schema", {}).get("properties", {}).items():
                if prop.get("format") == "binary":
                    form.setdefault("encoding", {}).setdefault(name, {"contentType": UPLOAD_MEDIA_TYPES})
    return doc


def _complete_openapi(app: FastAPI, auth_required: bool) -> None:
    """The served schema states the accepted upload types and the auth this server enforces."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe_auth(describe_uploads(build()), auth_required)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
