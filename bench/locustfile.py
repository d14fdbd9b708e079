"""Locust user for ``bench/load.py``: posts the benchmark JPEG to /api/parse, honours Retry-After.

Every response's status is counted (the server may answer only 200, or 503 when its queue is
full); the counts are written to ``$M2FP_BENCH_STATUS_OUT`` when the run ends. A 503 counts as a
failure in Locust's statistics so its percentiles describe served requests only.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

from locust import HttpUser, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import photo_jpeg  # noqa: E402

JPEG = photo_jpeg()
STATUSES: collections.Counter[str] = collections.Counter()
SERVED_S: list[float] = []  # latency of each 200, seconds
ERRORS: collections.Counter[str] = collections.Counter()  # what ended a request without an HTTP status


class ParseUser(HttpUser):
    """One client: posts, waits for the answer, posts again (after Retry-After on a 503)."""

    def wait_time(self) -> float:
        return 0.0

    @task
    def parse(self) -> None:
        t = time.perf_counter()
        with self.client.post("/api/parse", files={"image": ("photo.jpg", JPEG, "image/jpeg")},
                              catch_response=True, timeout=600) as r:
            STATUSES[str(r.status_code)] += 1
            if r.status_code == 0:
                ERRORS[repr(r.error)[:300]] += 1
            if r.status_code == 200:
                SERVED_S.append(time.perf_counter() - t)
            if r.status_code == 503:
                r.failure("503 overloaded")
                time.sleep(min(float(r.headers.get("Retry-After", "1")), 5.0))
            elif r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")


@events.quitting.add_listener
def _write_statuses(environment: object, **_: object) -> None:
    out = os.environ.get("M2FP_BENCH_STATUS_OUT")
    if out:
        Path(out).write_text(json.dumps({"statuses": dict(STATUSES), "served_s": SERVED_S,
                                          "errors": dict(ERRORS)}))
