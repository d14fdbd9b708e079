"""KeyframeWorker: closing waits for the frame in progress, so no thread outlives its owner."""

from __future__ import annotations

import threading
import time

import numpy as np

from m2fp_service.result import ParsingResult
from m2fp_service.video.keyframes import KeyframeWorker


def test_close_waits_for_the_running_key_frame() -> None:
    started = threading.Event()
    finished: list[bool] = []

    def slow_parse(frame: np.ndarray) -> ParsingResult:
        started.set()
        time.sleep(0.3)  # stands for an ONNX Runtime call that cannot be interrupted from Python
        finished.append(True)
        raise RuntimeError("not a real parse")

    worker = KeyframeWorker(slow_parse)
    worker.submit(0, np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    assert started.wait(5)
    worker.close()
    # A daemon thread left inside native code at interpreter exit aborts the process (exit 134):
    # close() must return only when the thread has ended.
    assert finished == [True]
    assert not any(t.name == "m2fp-keyframes" and t.is_alive() for t in threading.enumerate())
    assert isinstance(worker.last_error, RuntimeError)


def test_close_of_an_idle_worker_returns_at_once() -> None:
    worker = KeyframeWorker(lambda frame: None)  # type: ignore[arg-type,return-value]
    t0 = time.monotonic()
    worker.close()
    assert time.monotonic() - t0 < 2
    worker.submit(1, np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8))  # ignored once closed
    assert worker.idle
