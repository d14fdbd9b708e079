"""POST /api/parse: the seed's endpoint, same request and envelope, plus opt-in outputs and label sets."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from m2fp_service import labelsets, pipeline
from m2fp_service.api.deps import CacheDep, EngineDep, MetricsDep, PoolDep, SettingsDep
from m2fp_service.api.jobs import run_upload_job, server_timing
from m2fp_service.api.upload import FILE_FIELD, Upload
from m2fp_service.config import Settings
from m2fp_service.engine import ParsingEngine
from m2fp_service.errors import InvalidParameter
from m2fp_service.outputs import Rendered, RenderRequest
from m2fp_service.schemas import (
    LABELS_DESCRIPTION,
    OUTPUT_NAMES,
    OUTPUTS_DESCRIPTION,
    OUTPUTS_PATTERN,
    ErrorResponse,
    ParseData,
    ParseParams,
    ParseResponse,
    PersonOut,
)
from m2fp_service.timings import Timings

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
                    "labels": {
                        "type": "string", "description": LABELS_DESCRIPTION, "examples": ["atr"],
                    },
                },
            },
        },
    },
}


def error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: error_doc("Missing field 'image', malformed multipart body, or an invalid option (the message names "
                   "the valid ones)"),
    408: error_doc("The upload did not arrive within M2FP_UPLOAD_TIMEOUT_S"),
    413: error_doc("Upload larger than M2FP_MAX_UPLOAD_BYTES, or an image over M2FP_MAX_PIXELS / M2FP_MAX_SIDE"),
    415: error_doc("Not multipart/form-data, or an image type that is not accepted (GIF, TIFF, HEIC, ...)"),
    422: error_doc("The upload is not a decodable image (empty, truncated, corrupt, not an image)"),
    503: error_doc("Overloaded (queue full; see the Retry-After header) or the model is not loaded yet"),
    504: error_doc("Not processed within M2FP_REQUEST_TIMEOUT_S"),
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
LabelsQuery = Annotated[
    str | None,
    Query(description=LABELS_DESCRIPTION,
          openapi_examples={"cihp": {"summary": "CIHP, the model's own 20 classes (default)", "value": "cihp"},
                            "atr": {"summary": "ATR's 18 classes", "value": "atr"},
                            "tryon": {"summary": "Virtual try-on regions", "value": "tryon"},
                            "person": {"summary": "Person / background", "value": "person"}}),
]


@router.post(
    "/api/parse",
    response_model=ParseResponse,
    responses=UPLOAD_ERRORS,
    openapi_extra={"requestBody": _REQUEST_BODY},
    summary="Parse the people in a photo",
)
async def parse(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    pool: PoolDep,
    metrics: MetricsDep,
    cache: CacheDep,
    outputs: OutputsQuery = None,
    labels: LabelsQuery = None,
) -> Response:
    """Labels every pixel with a body part or clothing class and returns the seed's JSON envelope."""
    ParseParams.from_texts(outputs, labels=labels)  # bad options fail before the upload is read

    def make_job(upload: Upload, timings: Timings) -> Callable[[], bytes]:
        form_labels = upload.fields.get("labels")
        if labels and form_labels and labels.strip().lower() != form_labels.strip().lower():
            raise InvalidParameter("labels: given as query parameter and as form field, with different values")
        params = ParseParams.from_texts(outputs, upload.fields.get("outputs"), labels=form_labels or labels)
        data = upload.image
        pipeline.probe(data, settings.image_limits())  # a bad image is refused now, not after the queue
        return lambda: parse_to_json(engine, data, params, settings, cache, timings)

    payload, timings = await run_upload_job(request, settings, pool, metrics, make_job)
    return Response(
        content=payload,
        media_type="application/json",
        headers={"Server-Timing": server_timing(timings), "X-Model-Trained": str(engine.card.trained).lower()},
    )


def parse_to_json(engine: ParsingEngine, data: bytes, params: ParseParams, settings: Settings,
                cache: pipeline.ResultCache, timings: Timings) -> bytes:
    """Runs on a worker: every stage, then the JSON (megabytes of base64 must not stall the event loop)."""
    request = RenderRequest(outputs=frozenset({"color", "masks", *params.outputs}),
                            labels=labelsets.label_set(params.labels, engine.card.palette))
    rendered = pipeline.process(engine, data, request, limits=settings.image_limits(),
                                mode=settings.mask_resolution, timings=timings, cache=cache)
    response = ParseResponse(data=parse_data(rendered, round(timings.total, 4)))
    return response.model_dump_json(exclude_none=True).encode()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def parse_data(rendered: Rendered, inference_time: float) -> ParseData:
    """The response's ``data`` from the rendered outputs (absent outputs stay None, and are left out)."""
    people = None
    if rendered.people is not None:
        people = [PersonOut(**{**person, "mask": _b64(person["mask"])}) for person in rendered.people]
    return ParseData(
        result_image=_b64(rendered.color) or "",
        masks=[_b64(m) or "" for m in rendered.masks or []],
        classes=rendered.classes_present,
        inference_time=inference_time,
        label_map=_b64(rendered.label),
        overlay=_b64(rendered.overlay),
        people=people,
        areas=rendered.areas,
        cutout=_b64(rendered.cutout),
    )
