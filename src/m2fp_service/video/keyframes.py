"""M2FP on key frames, in a background thread.

Two ways to feed it:

* ``latest`` (live): the frame loop ``submit``s a frame when it wants fresh parts and never waits;
  a frame submitted while another waits replaces it (a stale key frame is worth less than a fresh
  one). Finished results are picked up with ``poll``.
* ``ordered`` (files): a reader that runs ahead of the frame loop submits every key frame as it
  decodes it; the loop, on reaching a key frame, takes its result with ``wait_for(index)``. With
  the reader one interval ahead, M2FP has that long to finish, and the parts used on any frame
  come from the key frame at most one interval before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from m2fp_service.result import ParsingResult

log = logging.getLogger("m2fp.video")


@dataclass(frozen=True)
class KeyResult:
    """A finished key frame.

    Attributes:
        index: the frame's index in the stream.
        gray: (h, w) uint8 grey of the frame at the work size (to carry the result by flow).
        result: M2FP's parsing of the frame.
        seconds: how long M2FP took.
    """

    index: int
    gray: np.ndarray
    result: ParsingResult
    seconds: float


class KeyframeWorker:
    """One background thread running ``parse(frame_rgb)`` on submitted frames.

    Args:
        parse: (H, W, 3) uint8 RGB -> ``ParsingResult``; may raise (the error is logged and kept
            in ``last_error``; the worker goes on with the next frame).
        ordered: every submitted frame is parsed, in order (``wait_for``); else the latest wins
            (``poll``).
        max_pending: ordered mode: ``submit`` blocks while this many frames wait (bounded memory).
    """

    def __init__(self, parse: Callable[[np.ndarray], ParsingResult], *, ordered: bool = False,
                 max_pending: int = 2, name: str = "m2fp-keyframes") -> None:
        self._parse = parse
        self.ordered = ordered
        self.max_pending = max(1, max_pending)
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, np.ndarray, np.ndarray]] = deque()
        self._done: KeyResult | None = None
        self._results: dict[int, KeyResult | None] = {}
        self._running = False
        self._closed = False
        self.last_error: BaseException | None = None
        self.completed = 0
        self.replaced = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        with self._cond:
            return not self._running and not self._queue

    def submit(self, index: int, frame_rgb: np.ndarray, gray: np.ndarray) -> None:
        """Queues a frame for M2FP. Latest mode: replaces a frame still waiting (not the running
        one). Ordered mode: blocks while ``max_pending`` frames wait."""
        with self._cond:
            if self.ordered:
                while len(self._queue) >= self.max_pending and not self._closed:
                    self._cond.wait()
            elif self._queue:
                self.replaced += 1
                self._queue.clear()
            if self._closed:
                return
            self._queue.append((index, frame_rgb, gray))
            self._cond.notify_all()

    def poll(self) -> KeyResult | None:
        """Latest mode: the newest finished result not taken yet, or None."""
        with self._cond:
            done, self._done = self._done, None
            return done

    def wait_for(self, index: int, timeout_s: float | None = None) -> KeyResult | None:
        """Ordered mode: blocks until frame ``index`` is parsed and takes its result (None if it
        failed, was never submitted, or the timeout passed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while index not in self._results and not self._closed and (
                    self._running or any(i == index for i, _, _ in self._queue)):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._results.pop(index, None)

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Stops taking frames and waits (up to ``timeout_s``) for the thread to end after its current
        frame. Waiting matters: a daemon thread still inside ONNX Runtime when the interpreter exits
        aborts the whole process (exit 134) instead of letting it end cleanly."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                index, frame, gray = self._queue.popleft()
                self._running = True
                self._cond.notify_all()  # a blocked ordered submit may go on
            started = time.perf_counter()
            try:
                result: ParsingResult | None = self._parse(frame)
            except Exception as exc:  # keep the video going with the parts it has
                log.warning("key frame %d failed: %s", index, exc)
                self.last_error = exc
                result = None
            seconds = time.perf_counter() - started
            done = KeyResult(index, gray, result, seconds) if result is not None else None
            with self._cond:
                self._running = False
                if self.ordered:
                    self._results[index] = done
                elif done is not None:
                    self._done = done
                self.completed += done is not None
                self._cond.notify_all()
