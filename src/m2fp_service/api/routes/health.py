"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from m2fp_service.api.deps import MetricsDep, SlotDep
from m2fp_service.api.metrics import CONTENT_TYPE
from m2fp_service.schemas import HealthResponse

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """Liveness: 200 while the process serves HTTP, whether or not the model is loaded."""
    return HealthResponse(status="alive")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Model loading, or it failed to load (see detail)"}},
)
async def readyz(slot: SlotDep) -> Response:
    """Readiness: 200 only once the model is loaded and warmed up, else 503."""
    body = HealthResponse(status=slot.status, detail=None if slot.status == "ready" else slot.detail)
    return JSONResponse(body.model_dump(), status_code=200 if slot.status == "ready" else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition format"}},
)
async def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics: requests, latency per stage, queue depth, workers busy."""
    return Response(m.render(), media_type=CONTENT_TYPE)
