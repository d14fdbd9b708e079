"""What every upload route does around its job: admit, read the upload, run the job on a worker.

A route calls ``run_upload_job`` with the file fields it accepts and a function that turns the
upload into the job; the pool slot is reserved before the upload is read (bounded memory), the
upload has its own time limit, and the job runs off the event loop within the request's limit.
``make_job`` runs on the event loop once the upload is in and before the job waits for a worker:
that is where a route refuses what needs no worker to judge (options, the image header via
``pipeline.probe``), so a bad request is answered at once, not after the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from starlette.requests import Request

from m2fp_service.api.deps import request_started
from m2fp_service.api.metrics import Metrics
from m2fp_service.api.upload import FILE_FIELD, Upload, check_declared_length, read_upload
from m2fp_service.api.workers import WorkerPool
from m2fp_service.config import Settings
from m2fp_service.errors import InferenceTimeout, Overloaded, UploadTimeout
from m2fp_service.timings import Timings

T = TypeVar("T")


async def run_upload_job(
    request: Request,
    settings: Settings,
    pool: WorkerPool,
    metrics: Metrics,
    make_job: Callable[[Upload, Timings], Callable[[], T]],
    file_fields: tuple[str, ...] = (FILE_FIELD,),
) -> tuple[T, Timings]:
    """Admits the request, reads its multipart upload and runs ``make_job(upload, timings)()`` on a worker.

    ``make_job`` itself runs here, on the event loop, before the job queues: it must be quick.

    Raises:
        Overloaded: the pool and its queue are full (503 + Retry-After), before anything is read.
        UploadTimeout: the upload did not arrive within ``settings.upload_timeout_s``.
        InferenceTimeout: not done within ``settings.request_timeout_s``.
        ServiceError: whatever reading the upload or the job raises.
    """
    check_declared_length(request, settings.max_upload_bytes, len(file_fields))
    try:
        slot = pool.reserve()
    except Overloaded:
        metrics.rejected.labels("overloaded").inc()
        raise
    with slot:  # held from before the upload is read until the job ends: bounded memory
        started = request_started(request)  # the request's time limit counts from its arrival
        upload = await _read(request, settings, file_fields)
        timings = Timings()
        job = make_job(upload, timings)
        del upload
        remaining = max(0.001, settings.request_timeout_s - (time.monotonic() - started))
        try:
            result, waited = await slot.run(job, remaining, limit_s=settings.request_timeout_s)
        except InferenceTimeout:
            metrics.rejected.labels("timeout").inc()
            raise
    metrics.observe_parse(timings, waited)
    return result, timings


async def _read(request: Request, settings: Settings, file_fields: tuple[str, ...]) -> Upload:
    """The upload, within its own time limit (a slow sender must not hold a slot for ever)."""
    try:
        return await asyncio.wait_for(read_upload(request, settings.max_upload_bytes, file_fields),
                                      settings.upload_timeout_s)
    except TimeoutError:
        raise UploadTimeout(
            f"the upload did not arrive within {settings.upload_timeout_s:g} s (M2FP_UPLOAD_TIMEOUT_S)"
        ) from None


def server_timing(timings: Timings) -> str:
    """The ``Server-Timing`` header value: each stage in milliseconds, and ``cache`` on a result-cache hit."""
    entries = [f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in timings.seconds.items()]
    if timings.cache_hit:
        entries.append('cache;desc="hit"')
    return ", ".join(entries)
