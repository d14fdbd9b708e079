"""Dependencies of the routes: typed ``Annotated`` aliases over ``app.state``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import Depends, Request

from m2fp_service.api.metrics import Metrics
from m2fp_service.api.workers import WorkerPool
from m2fp_service.config import Settings
from m2fp_service.engine import ParsingEngine
from m2fp_service.errors import InferenceTimeout, ModelNotReady
from m2fp_service.pipeline import ResultCache


@dataclass
class ModelSlot:
    """The engine once loaded and warm, or why it is not there (yet)."""

    status: Literal["loading", "ready", "failed"] = "loading"
    engine: ParsingEngine | None = None
    detail: str | None = "the model is loading"
    settled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set once loaded or failed

    def set_ready(self, engine: ParsingEngine) -> None:
        self.engine, self.status, self.detail = engine, "ready", None
        self.settled.set()

    def set_failed(self, detail: str) -> None:
        self.engine, self.status, self.detail = None, "failed", detail
        self.settled.set()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_slot(request: Request) -> ModelSlot:
    return request.app.state.model  # type: ignore[no-any-return]


def request_started(request: Request) -> float:
    """``time.monotonic()`` when the request arrived (set by the request middleware)."""
    started = request.scope.get("state", {}).get("started")
    return started if isinstance(started, float) else time.monotonic()


async def get_engine(request: Request) -> ParsingEngine:
    """The ready engine. A request that arrives while the model loads waits for it, holding a
    place in the pool's queue (a full queue refuses it at once with 503) for at most the request
    timeout (then 504); a model that failed to load gives ``ModelNotReady`` (503) saying why.
    """
    slot: ModelSlot = request.app.state.model
    if slot.status == "loading":
        settings: Settings = request.app.state.settings
        pool: WorkerPool = request.app.state.pool
        remaining = settings.request_timeout_s - (time.monotonic() - request_started(request))
        with pool.reserve():
            try:
                await asyncio.wait_for(slot.settled.wait(), max(0.001, remaining))
            except TimeoutError:
                raise InferenceTimeout(
                    f"the model was still loading after {settings.request_timeout_s:g} s (M2FP_REQUEST_TIMEOUT_S); "
                    "retry once /readyz answers 200"
                ) from None
    if slot.status != "ready" or slot.engine is None:
        raise ModelNotReady(f"model not ready ({slot.status}): {slot.detail}")
    return slot.engine


def get_pool(request: Request) -> WorkerPool:
    return request.app.state.pool  # type: ignore[no-any-return]


def get_cache(request: Request) -> ResultCache:
    return request.app.state.cache  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
SlotDep = Annotated[ModelSlot, Depends(get_slot)]
EngineDep = Annotated[ParsingEngine, Depends(get_engine)]
PoolDep = Annotated[WorkerPool, Depends(get_pool)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
CacheDep = Annotated[ResultCache, Depends(get_cache)]
