"""POST /api/parse: the seed's endpoint, same request and envelope, plus opt-in outputs."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from m2fp_service.api.deps import EngineDep, MetricsDep, PoolDep, SettingsDep, request_started
from m2fp_service.api.outputs import parse_to_json
from m2fp_service.api.upload import FILE_FIELD, Upload, check_declared_length, read_upload
from m2fp_service.config import Settings
from m2fp_service.errors import InferenceTimeout, Overloaded, UploadTimeout
from m2fp_service.pipeline import Timings
from m2fp_service.schemas import (
    OUTPUT_NAMES,
    OUTPUTS_DESCRIPTION,
    OUTPUTS_PATTERN,
    ErrorResponse,
    ParseParams,
    ParseResponse,
)

router = APIRouter(tags=["parse"])

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
                        "description": "The photo: JPEG, PNG, WebP or BMP. Size limits: M2FP_MAX_UPLOAD_BYTES "
                                       "(bytes), M2FP_MAX_PIXELS and M2FP_MAX_SIDE (pixels); see /api/info.",
                    },
                    "outputs": {
                        "type": "string", "description": OUTPUTS_DESCRIPTION, "examples": ["label,overlay,people"],
                        "pattern": OUTPUTS_PATTERN,
                    },
                },
            },
        },
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Missing field 'image', malformed multipart body, or an unknown output name"),
    408: _error("The upload did not arrive within M2FP_UPLOAD_TIMEOUT_S"),
    413: _error("Upload larger than M2FP_MAX_UPLOAD_BYTES, or an image over M2FP_MAX_PIXELS / M2FP_MAX_SIDE"),
    415: _error("Not multipart/form-data, or an image type that is not accepted (GIF, TIFF, HEIC, ...)"),
    422: _error("The upload is not a decodable image (empty, truncated, corrupt, not an image)"),
    503: _error("Overloaded (queue full; see the Retry-After header) or the model is not loaded yet"),
    504: _error("Not processed within M2FP_REQUEST_TIMEOUT_S"),
}

OutputsQuery = Annotated[
    str | None,
    Query(
        description=OUTPUTS_DESCRIPTION,
        json_schema_extra={"pattern": OUTPUTS_PATTERN},  # documented; checked by ParseParams with a clear message
        openapi_examples={
            "seed": {"summary": "Seed fields only (default)", "value": ""},
            "overlay": {"summary": "Label map and overlay", "value": "label,overlay"},
            "people": {"summary": "People with boxes, scores, parts and masks", "value": "people,areas"},
            "background": {"summary": "RGBA cutout for virtual backgrounds", "value": "cutout"},
            "all": {"summary": "Everything", "value": ",".join(OUTPUT_NAMES)},
        },
    ),
]


@router.post(
    "/api/parse",
    response_model=ParseResponse,
    responses=_RESPONSES,
    openapi_extra={"requestBody": _REQUEST_BODY},
    summary="Parse the people in a photo",
)
async def parse(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    pool: PoolDep,
    metrics: MetricsDep,
    outputs: OutputsQuery = None,
) -> Response:
    """Labels every pixel with a body part or clothing class and returns the seed's JSON envelope."""
    ParseParams.from_texts(outputs)  # a bad query fails before the upload is read
    check_declared_length(request, settings.max_upload_bytes)
    try:
        slot = pool.reserve()
    except Overloaded:
        metrics.rejected.labels("overloaded").inc()
        raise
    with slot:  # held from before the upload is read until the job ends: bounded memory
        started = request_started(request)  # the request's time limit counts from its arrival
        upload = await _read(request, settings)
        params = ParseParams.from_texts(outputs, upload.fields.get("outputs"))
        timings = Timings()
        job = functools.partial(
            parse_to_json, engine, upload.image, params, max_pixels=settings.max_pixels,
            max_side=settings.max_side, mode=settings.mask_resolution, timings=timings,
        )
        del upload
        remaining = max(0.001, settings.request_timeout_s - (time.monotonic() - started))
        try:
            payload, waited = await slot.run(job, remaining, limit_s=settings.request_timeout_s)
        except InferenceTimeout:
            metrics.rejected.labels("timeout").inc()
            raise
    metrics.observe_parse(timings, waited)
    server_timing = ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in timings.seconds.items())
    return Response(
        content=payload,
        media_type="application/json",
        headers={"Server-Timing": server_timing, "X-Model-Trained": str(engine.card.trained).lower()},
    )


async def _read(request: Request, settings: Settings) -> Upload:
    """The upload, within the request's time limit (a slow sender must not hold a slot for ever)."""
    try:
        return await asyncio.wait_for(read_upload(request, settings.max_upload_bytes), settings.upload_timeout_s)
    except TimeoutError:
        raise UploadTimeout(
            f"the upload did not arrive within {settings.upload_timeout_s:g} s (M2FP_UPLOAD_TIMEOUT_S)"
        ) from None
