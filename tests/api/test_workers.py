"""The bounded pool: admission at once, timeouts, slots held until the thread ends, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from m2fp_service import cancel
from m2fp_service.api.logging import request_id_var
from m2fp_service.api.workers import WorkerPool
from m2fp_service.errors import InferenceTimeout, ModelNotReady, Overloaded


def test_runs_off_the_event_loop_with_the_callers_context() -> None:
    async def main() -> tuple[str, str | None, float]:
        pool = WorkerPool(workers=2, queue_size=0)
        request_id_var.set("rid-7")
        loop_thread = threading.current_thread().name
        (name, rid), waited = await pool.run(lambda: (threading.current_thread().name, request_id_var.get()), 5)
        pool.shutdown()
        assert name != loop_thread
        return name, rid, waited

    name, rid, waited = asyncio.run(main())
    assert name.startswith("m2fp-worker") and rid == "rid-7" and 0 <= waited < 1


def test_capacity_is_workers_plus_queue_and_refusal_is_immediate() -> None:
    gate = threading.Event()

    async def main() -> None:
        pool = WorkerPool(workers=2, queue_size=1)
        jobs = [asyncio.ensure_future(pool.run(lambda: gate.wait(5), 10)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert (pool.running, pool.waiting) == (2, 1)  # full: the next one is refused below
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as err:
            await pool.run(lambda: None, 10)
        assert time.perf_counter() - t0 < 0.05
        assert err.value.retry_after_s >= 1 and "2 running, 1 waiting" in err.value.message
        gate.set()
        assert [r for r, _ in await asyncio.gather(*jobs)] == [True, True, True]
        assert (pool.running, pool.waiting) == (0, 0)
        assert (await pool.run(lambda: "admitted again", 1))[0] == "admitted again"
        pool.shutdown()

    asyncio.run(main())


def test_timeout_keeps_the_slot_until_the_thread_finishes_and_drops_queued_jobs() -> None:
    gate = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        pool = WorkerPool(workers=1, queue_size=1)
        running = asyncio.ensure_future(pool.run(lambda: (gate.wait(5), ran.append("first")), 0.2))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(pool.run(lambda: ran.append("queued"), 0.2))
        for fut in (running, queued):
            with pytest.raises(InferenceTimeout):
                await fut
        assert (pool.running, pool.waiting) == (1, 0)  # the first job still runs and holds its slot
        gate.set()
        for _ in range(100):
            if pool.running == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.running == 0
        assert (await pool.run(lambda: "admitted again", 1))[0] == "admitted again"
        pool.shutdown()

    asyncio.run(main())
    assert ran == ["first"], "a queued job whose request timed out must not run"


def test_job_errors_propagate_and_shutdown_refuses_new_jobs() -> None:
    async def main() -> None:
        pool = WorkerPool(workers=1, queue_size=0)

        def fail() -> None:
            raise ValueError("bad")

        with pytest.raises(ValueError, match="bad"):
            await pool.run(fail, 5)
        assert (pool.running, pool.waiting) == (0, 0)  # the failed job gave its slot back
        assert (await pool.run(lambda: "admitted again", 1))[0] == "admitted again"
        await asyncio.to_thread(pool.shutdown)
        with pytest.raises(ModelNotReady):
            await pool.run(lambda: None, 5)

    asyncio.run(main())


def test_shutdown_waits_for_running_jobs() -> None:
    done = threading.Event()

    async def main() -> None:
        pool = WorkerPool(workers=1, queue_size=1)
        job = asyncio.ensure_future(pool.run(lambda: (time.sleep(0.3), done.set()), 5))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(pool.shutdown)
        assert done.is_set()
        await job

    asyncio.run(main())


def test_timeout_cancels_the_running_job_and_its_slot_comes_back() -> None:
    """The job sees its token cancelled when its request times out (the engine then terminates its
    ONNX Runtime run); the slot is free as soon as the job gives up, without anything else."""
    seen: list[str | None] = []

    def cooperative_job() -> str:
        token = cancel.current()
        assert token is not None, "jobs run with a cancel token"
        stopped = threading.Event()
        with token.on_cancel(stopped.set):
            if not stopped.wait(30):
                return "never cancelled"
        seen.append(token.reason)
        raise InferenceTimeout(f"inference stopped: {token.reason}")

    async def main() -> None:
        pool = WorkerPool(workers=1, queue_size=0)
        with pytest.raises(InferenceTimeout):
            await pool.run(cooperative_job, 0.2)
        for _ in range(500):
            if pool.running == 0 and pool.waiting == 0:
                break
            await asyncio.sleep(0.01)
        assert (pool.running, pool.waiting) == (0, 0)
        assert (await pool.run(lambda: "admitted again", 1))[0] == "admitted again"
        pool.shutdown()

    asyncio.run(main())
    assert seen == ["the request timed out after 0.2 s"]
