"""Stops a request's work when its client goes away.

Each ``/api/`` request gets a ``CancelToken`` (``m2fp_service.cancel``) in its context; the worker
pool hands it to the job, whose ONNX Runtime run stops when the token is cancelled. Once the
request body has been read, a watcher waits for the ASGI ``http.disconnect`` message: a client that
disconnects while its picture is being parsed frees the worker at once instead of at the end of a
run nobody will read. A message the watcher takes is handed back to the app if it asks for one.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from m2fp_service.cancel import CancelToken, current_token


class CancelOnDisconnectMiddleware:
    """Pure ASGI middleware: a cancel token per ``/api/`` request, cancelled on client disconnect."""

    def __init__(self, app: ASGIApp, prefix: str = "/api/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        token = CancelToken()
        reset = current_token.set(token)
        watcher: asyncio.Task[Message] | None = None

        async def watch() -> Message:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    token.cancel("the client disconnected")
                    return message

        async def receive_then_watch() -> Message:
            nonlocal watcher
            if watcher is not None:  # the app reads after the body: give it what the watcher got
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch())
            elif message["type"] == "http.disconnect":
                token.cancel("the client disconnected")
            return message

        try:
            await self.app(scope, receive_then_watch, send)
        finally:
            current_token.reset(reset)
            if watcher is not None and not watcher.done():
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
