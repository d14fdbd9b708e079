"""POST /api/background: a virtual background — keep people or parts, replace or blur the rest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from m2fp_service import pipeline
from m2fp_service.api.deps import CacheDep, EngineDep, MetricsDep, PoolDep, SettingsDep
from m2fp_service.api.jobs import run_upload_job, server_timing
from m2fp_service.api.routes.parse import UPLOAD_ERRORS
from m2fp_service.api.upload import FILE_FIELD, Upload
from m2fp_service.config import Settings
from m2fp_service.engine import ParsingEngine
from m2fp_service.outputs import Picture, RenderRequest
from m2fp_service.schemas import BackgroundParams
from m2fp_service.timings import Timings

router = APIRouter(tags=["background"])

BACKGROUND_FIELD = "background"

_OPTION_FIELDS = {
    name: {"type": "string", "description": f"Same as the query parameter `{name}`"}
    for name in BackgroundParams.model_fields
}
_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FILE_FIELD],
                "properties": {
                    FILE_FIELD: {
                        "type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                        "description": "The photo: JPEG, PNG, WebP or BMP (limits as /api/parse).",
                    },
                    BACKGROUND_FIELD: {
                        "type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                        "description": "Optional backdrop picture for mode=image (JPEG, PNG, WebP or BMP, the same "
                                       "limits): scaled to cover the photo and centred, never stretched.",
                    },
                    **_OPTION_FIELDS,
                },
            },
        },
    },
}
_PICTURE = {"schema": {"type": "string", "format": "binary"}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The composed picture (PNG and WebP keep alpha). Headers: X-People (people found), "
                         "X-Model-Trained, Server-Timing.",
          "content": {"image/png": _PICTURE, "image/webp": _PICTURE, "image/jpeg": _PICTURE}},
    **UPLOAD_ERRORS,
}
_EXAMPLES = {
    "blur": {"summary": "Keep everyone, blur the background", "value": {"mode": "blur", "blur": 20}},
    "presenter": {"summary": "Keep the central person on green", "value": {"keep": "central", "mode": "color",
                                                                          "color": "#00ff00"}},
    "anonymise": {"summary": "Pixelate faces only", "value": {"keep": "classes:face", "invert": True,
                                                              "mode": "pixelate"}},
    "cutout": {"summary": "Transparent background, WebP", "value": {"mode": "transparent", "format": "webp"}},
}


@router.post(
    "/api/background",
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra={"requestBody": _REQUEST_BODY},
    summary="Replace or blur the background of a photo",
)
async def background(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    pool: PoolDep,
    metrics: MetricsDep,
    cache: CacheDep,
    query: Annotated[BackgroundParams, Query(openapi_examples=_EXAMPLES)],
) -> Response:
    """Keeps people (all, the largest, the central one, chosen ids) or classes, and makes the rest transparent,
    blurred, a colour, a picture or pixelated; returns the picture itself."""
    query.precheck()  # bad options fail before the upload is read
    raw_query = dict(request.query_params)
    BackgroundParams.merged(raw_query, {})

    def make_job(upload: Upload, timings: Timings) -> Callable[[], tuple[Picture, int]]:
        params = BackgroundParams.merged(raw_query, upload.fields)
        backdrop = upload.files.get(BACKGROUND_FIELD)
        render_request = params.to_request(backdrop is not None, engine.card.palette)
        data = upload.image
        pipeline.probe(data, settings.image_limits())  # bad pictures are refused now, not after the queue
        if backdrop is not None:
            pipeline.probe_background(backdrop, settings.image_limits())
        return lambda: _compose(engine, data, backdrop, render_request, settings, cache, timings)

    (picture, people), timings = await run_upload_job(request, settings, pool, metrics, make_job,
                                                      file_fields=(FILE_FIELD, BACKGROUND_FIELD))
    return Response(
        content=picture.data,
        media_type=picture.media_type,
        headers={
            "Server-Timing": server_timing(timings),
            "X-Model-Trained": str(engine.card.trained).lower(),
            "X-People": str(people),
            "Content-Disposition": f'inline; filename="background{picture.suffix}"',
        },
    )


def _compose(engine: ParsingEngine, data: bytes, backdrop: bytes | None, request: RenderRequest,
             settings: Settings, cache: pipeline.ResultCache, timings: Timings) -> tuple[Picture, int]:
    """Runs on a worker: every stage; returns the picture and the number of people found."""
    rendered = pipeline.process(engine, data, request, limits=settings.image_limits(),
                                mode=settings.mask_resolution, background=backdrop, timings=timings, cache=cache)
    assert rendered.composite is not None  # the request asks for it
    return rendered.composite, rendered.result.num_people
