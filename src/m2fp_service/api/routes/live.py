"""WebSocket ``/api/live`` (frames in, composed frames or masks out) and ``/api/live/watch`` (viewers).

Protocol (all JSON messages are text frames, pictures binary):

* client -> ``/api/live?mode=blur&keep=people&output=composite&format=jpeg&session=studio``: binary
  messages, each one encoded frame (JPEG, WebP, PNG or BMP).
* server -> client: first ``{"type": "ready", ...}``; then per processed frame a ``{"type": "frame",
  "seq", "width", "height", "output", "format", "server_ms", "queued_ms", "dropped",
  "parts_age_frames", "people"}`` header followed by one binary message (the picture). A frame that
  arrives while another is being processed replaces the waiting one (``dropped`` counts them), so
  latency stays bounded. A bad frame gets ``{"type": "error", "code", "message"}`` and the stream
  goes on; a frame over the size limit closes the socket (1009).
* ``/api/live/watch?session=studio``: receives the same header + picture pairs as the producer of
  that session (the OBS Browser Source page uses it).

The query takes ``/api/background``'s options plus ``output`` (``composite`` or ``mask``) and
``session``. With ``M2FP_API_KEY`` set, the key comes as ``?api_key=`` (browsers cannot set headers on
a WebSocket) or the ``X-API-Key`` / ``Authorization: Bearer`` headers (``api/security.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from m2fp_service import pipeline
from m2fp_service.api.deps import ModelSlot
from m2fp_service.config import Settings
from m2fp_service.errors import ServiceError
from m2fp_service.limits import ImageLimits
from m2fp_service.result import ParsingResult
from m2fp_service.schemas import BackgroundParams
from m2fp_service.video.live import LatestSlot, LiveAnswer, LiveHub, LiveSession
from m2fp_service.video.processor import VideoOptions

router = APIRouter()
log = logging.getLogger("m2fp.live")

_SESSION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LIVE_KEYS = {"output", "session", "api_key", "fps"}

# Close codes (RFC 6455 and the registry): policy violation, message too big, try again later.
POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1008, 1009, 1011, 1013


async def _refuse(websocket: WebSocket, code: int, message: str, error: int) -> None:
    """Accepts only to say why, then closes (a browser sees the reason only after the handshake)."""
    await websocket.accept()
    await websocket.send_json({"type": "error", "code": error, "message": message})
    await websocket.close(code=code, reason=message[:120])


def _options(websocket: WebSocket, settings: Settings) -> tuple[BackgroundParams, dict[str, str]]:
    query = dict(websocket.query_params)
    live = {k: query.pop(k) for k in list(query) if k in _LIVE_KEYS}
    params = BackgroundParams.merged(query, {})
    params.precheck()
    if params.resolved_mode(False) == "image":
        raise ValueError("mode=image is not available live (no background upload on a WebSocket); use blur, "
                         "color, pixelate or transparent")
    output = live.get("output", "composite")
    if output not in ("composite", "mask"):
        raise ValueError(f"output={output!r}: use composite or mask")
    session = live.get("session", "")
    if session and not _SESSION_NAME.match(session):
        raise ValueError("session must be 1-64 letters, digits, '-' or '_'")
    return params, live


@router.websocket("/api/live")
async def live(websocket: WebSocket) -> None:
    """Live frames in, composed frames (or alpha masks) out; see the module docstring for the protocol."""
    app = websocket.app
    settings: Settings = app.state.settings
    try:
        params, live_opts = _options(websocket, settings)
    except (ValidationError, ValueError, ServiceError) as exc:
        message = exc.message if isinstance(exc, ServiceError) else str(exc)
        await _refuse(websocket, POLICY, f"invalid options: {message}", 1002)
        return
    counter: _Counter = app.state.live_connections
    if not counter.acquire(settings.live_max_connections):
        await _refuse(websocket, TRY_LATER, f"too many live connections (limit {settings.live_max_connections}); "
                      "retry later", 1008)
        return
    session: LiveSession | None = None
    try:
        try:
            session = await asyncio.to_thread(_new_session, app, settings, params, live_opts)
        except ServiceError as exc:
            await _refuse(websocket, INTERNAL, exc.message, exc.code)
            return
        await websocket.accept()
        name = live_opts.get("session", "")
        await websocket.send_json({"type": "ready", "session": name or None, "output": session.output,
                                   "format": session.format, "parts": session.worker is not None,
                                   "max_frame_bytes": settings.live_max_frame_bytes})
        await _stream(websocket, session, settings, app.state.live_hub, name)
    finally:
        counter.release()
        if session is not None:  # off the event loop: it waits for a key frame still running
            await asyncio.to_thread(session.close)


def _new_session(app: Any, settings: Settings, params: BackgroundParams, live_opts: dict[str, str]) -> LiveSession:
    from m2fp_service.segmenter import FrameSegmenter

    segmenter = FrameSegmenter(settings.light_model, settings.light_model_landscape)
    request = params.to_request(False)
    assert request.compose is not None
    options = VideoOptions(spec=request.compose, labels=request.labels,
                           keyframe_interval_s=settings.live_keyframe_interval_s)
    slot: ModelSlot = app.state.model
    gate: threading.Semaphore = app.state.live_m2fp
    parse = None
    if slot.status == "ready" and slot.engine is not None:
        engine = slot.engine

        def parse(frame: np.ndarray) -> ParsingResult:
            with gate:  # live key frames from every connection share one M2FP run at a time
                return pipeline.parse_array(engine, frame, mode="fast")

    fps = float(live_opts.get("fps", "15") or 15)
    limits = ImageLimits(max_pixels=settings.live_max_pixels, max_side=settings.max_side)
    return LiveSession(segmenter, options, output=live_opts.get("output", "composite"),  # type: ignore[arg-type]
                       fmt=params.format, quality=params.quality, limits=limits, parse=parse,
                       fps_hint=max(1.0, min(fps, 120.0)))


async def _stream(websocket: WebSocket, session: LiveSession, settings: Settings, hub: LiveHub, name: str) -> None:
    latest = LatestSlot()
    too_big: list[int] = []

    async def receive() -> None:
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None:
                    await websocket.send_json({"type": "error", "code": 1002,
                                               "message": "send frames as binary messages (JPEG, WebP, PNG, BMP)"})
                    continue
                if len(data) > settings.live_max_frame_bytes:
                    too_big.append(len(data))
                    return
                latest.put(data)
        finally:
            latest.close()

    receiver = asyncio.create_task(receive())
    try:
        while (item := await latest.take()) is not None:
            data, received_at = item
            try:
                answer = await asyncio.to_thread(session.process, data, received_at)
            except ServiceError as exc:
                await websocket.send_json({"type": "error", "code": exc.code, "message": exc.message})
                continue
            header = {"type": "frame", **answer.header, "dropped": latest.dropped}
            await websocket.send_json(header)
            await websocket.send_bytes(answer.data)
            if name:
                hub.publish(name, LiveAnswer(header, answer.data))
        if too_big:
            await websocket.close(code=TOO_BIG, reason=f"frame of {too_big[0]} bytes is over the "
                                                       f"{settings.live_max_frame_bytes}-byte limit")
    except (WebSocketDisconnect, RuntimeError):  # the client went away mid-send
        pass
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
            await receiver


@router.websocket("/api/live/watch")
async def watch(websocket: WebSocket) -> None:
    """The answers of the live session named ``session``, as they are produced (for the OBS output page)."""
    app = websocket.app
    settings: Settings = app.state.settings
    name = websocket.query_params.get("session", "")
    if not _SESSION_NAME.match(name):
        await _refuse(websocket, POLICY, "watch needs ?session=<name> (1-64 letters, digits, '-' or '_')", 1002)
        return
    counter: _Counter = app.state.live_connections
    if not counter.acquire(settings.live_max_connections):
        await _refuse(websocket, TRY_LATER, f"too many live connections (limit {settings.live_max_connections})", 1008)
        return
    hub: LiveHub = app.state.live_hub
    q = hub.subscribe(name)
    try:
        await websocket.accept()
        await websocket.send_json({"type": "ready", "session": name})
        closed = asyncio.create_task(_until_disconnect(websocket))
        while not closed.done():
            getter = asyncio.create_task(q.get())
            done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            answer = getter.result()
            await websocket.send_json(answer.header)
            await websocket.send_bytes(answer.data)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        hub.unsubscribe(name, q)
        counter.release()


async def _until_disconnect(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


class _Counter:
    """Open live connections (producers and viewers), bounded by ``M2FP_LIVE_MAX_CONNECTIONS``."""

    def __init__(self) -> None:
        self.open = 0

    def acquire(self, limit: int) -> bool:
        if self.open >= limit:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


def install(app: Any) -> None:
    """The live state on ``app.state`` and the routes."""
    app.state.live_hub = LiveHub()
    app.state.live_connections = _Counter()
    app.state.live_m2fp = threading.Semaphore(1)
    app.include_router(router)
