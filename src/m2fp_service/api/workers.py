"""The bounded inference pool: ``workers`` threads sharing one ONNX Runtime session, and a bounded queue.

Threads, not processes, measured on the 2-core build box (astronaut pair, 512x1024 JPEG, the
seed's outputs; images/s at 1 / 2 / 4 concurrent clients, single-request latency, RSS):

- tiny model, 1 thread x 2 ORT threads:    1.20 / 1.22 / 1.20 img/s, 827 ms, 0.2 GB
- tiny model, 2 threads x 1 ORT thread:    1.07 / 2.03 / 2.19 img/s, 934 ms, 0.7 GB
- tiny model, 2 processes x 1 ORT thread:  1.06 / 2.03 / 2.07 img/s, 941 ms, 0.4 GB
- full model, 1 thread x 2 ORT threads:    0.21 / 0.21 img/s, 4.5 s, 0.8 GB
- full model, 2 threads x 1 ORT thread:    0.13 / 0.25 img/s, 7.7 s, 1.5 GB

Processes bring no throughput over threads (ONNX Runtime, OpenCV and NumPy release the GIL), but
cost a model copy each, spawn start-up and pickled results, so the pool uses threads. Two threads
help when post-processing dominates (tiny model: 1.8x); with the full model inference dominates,
so one worker using both cores cuts single-request latency by 40% for 16% less peak throughput and
half the memory: the default is ``M2FP_WORKERS=1`` (intra-op threads = cores / workers).

Admission is decided at once, on the event loop, without waiting: at most ``workers`` jobs run
and at most ``queue_size`` more wait; one more is refused with ``Overloaded`` (503 +
``Retry-After``). A request reserves its slot before its upload is read, so the pool also bounds
how many uploads are held in memory. A job holds its slot until its thread really finishes, even
when the request already timed out, so a burst of timeouts cannot pile up work behind the pool;
but a timed-out job is cancelled (``m2fp_service.cancel``): a queued one never starts and a running
ONNX Runtime run is terminated at its next node, so the slot comes back within moments.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from m2fp_service.cancel import CancelToken, current_token
from m2fp_service.errors import InferenceTimeout, ModelNotReady, Overloaded

T = TypeVar("T")
log = logging.getLogger("m2fp.workers")


class WorkerPool:
    """A fixed number of worker threads plus a bounded waiting room.

    Args:
        workers: jobs run at the same time (threads).
        queue_size: jobs allowed to wait for a worker; beyond ``workers + queue_size`` -> 503.
    """

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m2fp-worker")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._mean_job_s: float | None = None  # moving average of job duration, for Retry-After
        self._closed = False

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    @property
    def running(self) -> int:
        """Jobs being executed by a worker thread now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests admitted but not running yet: uploading, or queued for a worker (the queue depth)."""
        with self._lock:
            return max(0, self._admitted - self._running)

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: time to drain the current queue, 1..60."""
        with self._lock:
            mean = self._mean_job_s or 1.0
            backlog = self._admitted + 1
        return max(1, min(60, math.ceil(mean * backlog / self.workers)))

    def overloaded(self) -> Overloaded:
        retry = self.retry_after_s()
        return Overloaded(
            f"server busy: {self.running} running, {self.waiting} waiting (limit {self.capacity}); "
            f"retry in {retry} s",
            retry_after_s=retry,
        )

    def reserve(self) -> Slot:
        """Admits one request now or raises. Use the slot as a context manager: it is freed when
        its job ends, or on exit when no job was started. Reserve before reading the upload, so at
        most ``capacity`` uploads are held at a time.

        Raises:
            Overloaded: pool and queue are full.
            ModelNotReady: the pool is shutting down.
        """
        with self._lock:
            closed = self._closed
            full = self._admitted >= self.capacity
            if not closed and not full:
                self._admitted += 1
        if closed:
            raise ModelNotReady("server is shutting down; retry on another instance")
        if full:
            raise self.overloaded()
        return Slot(self)

    async def run(self, fn: Callable[[], T], timeout_s: float) -> tuple[T, float]:
        """``reserve()`` then ``Slot.run``: runs ``fn()`` on a worker, or refuses at once when full."""
        with self.reserve() as slot:
            return await slot.run(fn, timeout_s)

    def _job(self, fn: Callable[[], T], deadline: float, token: CancelToken) -> tuple[Callable[[], T], list[float]]:
        submitted = time.perf_counter()
        context = contextvars.copy_context()
        context.run(current_token.set, token)  # the engine finds the token of its job here
        waited: list[float] = []

        def guarded() -> T:  # runs in the request's context: its log lines carry the request id
            try:
                return fn()
            except InferenceTimeout as exc:
                if token.cancelled:  # nobody awaits this outcome any more: say what happened
                    log.info("stopped a job after %.2f s: %s", time.perf_counter() - submitted, exc.message,
                             extra={"detail": exc.detail})
                raise

        def job() -> T:
            started = time.perf_counter()
            waited.append(started - submitted)
            if started > deadline or token.cancelled:  # the request already timed out while this waited
                raise InferenceTimeout("timed out waiting for a worker")
            with self._lock:
                self._running += 1
            try:
                return context.run(guarded)
            finally:
                took = time.perf_counter() - started
                with self._lock:
                    self._running -= 1
                    prev = self._mean_job_s
                    self._mean_job_s = took if prev is None else 0.8 * prev + 0.2 * took

        return job, waited

    def _release(self, _: object) -> None:
        with self._lock:
            self._admitted -= 1

    def shutdown(self) -> None:
        """Refuses new jobs and waits for admitted ones to finish (blocking: call it off the loop)."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)


class Slot:
    """One admitted request's place in the pool (see ``WorkerPool.reserve``)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.handed_over = False

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.handed_over:  # no job took it over (bad upload, error): free it now
            self.handed_over = True
            self.pool._release(None)

    async def run(self, fn: Callable[[], T], timeout_s: float, limit_s: float | None = None) -> tuple[T, float]:
        """Runs ``fn()`` on a worker thread; the slot is freed when the thread is done with it.

        Args:
            fn: the job; it runs with a copy of the caller's context variables (request id).
            timeout_s: limit for queue wait plus execution.
            limit_s: the whole request's limit, for the message (default ``timeout_s``).

        Returns:
            ``(fn's result, seconds the job waited for a worker)``.

        Raises:
            InferenceTimeout: not finished within ``timeout_s``; the job is cancelled (see module doc).
            ModelNotReady: the pool is shutting down.
        """
        if self.handed_over:
            raise RuntimeError("a slot runs one job")
        pool = self.pool
        token = current_token.get() or CancelToken()  # the request's own (see api/disconnect.py) if any
        job, waited = pool._job(fn, time.perf_counter() + timeout_s, token)
        try:
            cfut: Future[T] = pool._executor.submit(job)
        except RuntimeError:  # shut down since the slot was reserved
            raise ModelNotReady("server is shutting down; retry on another instance") from None
        self.handed_over = True
        cfut.add_done_callback(pool._release)
        afut = asyncio.wrap_future(cfut)
        afut.add_done_callback(_consume_exception)
        try:
            result = await asyncio.wait_for(asyncio.shield(afut), timeout_s)
        except TimeoutError:
            cfut.cancel()  # drops it if it has not started
            token.cancel(f"the request timed out after {limit_s or timeout_s:g} s")  # stops a running one
            raise InferenceTimeout(
                f"the image was not processed within {limit_s or timeout_s:g} s (M2FP_REQUEST_TIMEOUT_S); "
                "the server is busy or the image is very large"
            ) from None
        except asyncio.CancelledError:
            cfut.cancel()
            token.cancel("the request was cancelled")
            raise
        return result, (waited[0] if waited else 0.0)


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    # A timed-out request no longer awaits its job; fetch the outcome so asyncio does not log it.
    if not fut.cancelled():
        fut.exception()
