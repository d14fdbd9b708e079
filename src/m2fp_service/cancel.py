"""Cooperative cancellation of one request's work, across threads.

The worker pool gives each job a ``CancelToken`` in a context variable; the engine registers a
way to stop its ONNX Runtime run (``RunOptions.terminate``) while the run lasts. When the request
times out, the pool cancels the token: the run stops at its next node and the worker is free.
Nothing here knows about HTTP or ONNX Runtime.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

current_token: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("m2fp_cancel", default=None)


class CancelToken:
    """Set once, from any thread; callbacks registered with ``on_cancel`` run when it is set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        """Marks the work cancelled and runs the registered callbacks (first call only)."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    @contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Runs ``callback`` if the token is cancelled while the block runs (at once if it already is)."""
        with self._lock:
            already = self.reason is not None
            if not already:
                self._callbacks.append(callback)
        if already:
            callback()
        try:
            yield
        finally:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)


def current() -> CancelToken | None:
    """The token of the job running in this context, if any."""
    return current_token.get()
