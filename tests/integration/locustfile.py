"""Locust users for the burst and soak tests (run headless by tests/integration/test_load.py).

Settings come from the environment the test passes: ``LOAD_MODE`` (``burst``: valid photos as fast as
possible; ``soak``: a mix of valid and invalid uploads), ``LOAD_PHOTO`` (a JPEG file), ``LOAD_PATHS``
(comma-separated multipart image endpoints) and ``LOAD_REPORT`` (where the per-status counts go).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from typing import Any

from locust import HttpUser, between, constant, events, task
from PIL import Image

MODE = os.environ.get("LOAD_MODE", "burst")
PATHS = os.environ.get("LOAD_PATHS", "/api/parse").split(",")
with open(os.environ["LOAD_PHOTO"], "rb") as f:
    PHOTO = f.read()


def _jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(PHOTO)).resize(size).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# (name, upload bytes, expected status): valid pictures of several sizes, and refusals of every kind.
SOAK_MIX: list[tuple[str, bytes, int]] = [
    ("photo", PHOTO, 200),
    ("small", _jpeg((160, 120)), 200),
    ("portrait", _jpeg((300, 480)), 200),
    ("empty", b"", 422),
    ("noise", random.Random(7).randbytes(64 * 1024), 422),
    ("truncated", PHOTO[: len(PHOTO) // 2], 422),
    ("gif", b"GIF89a" + bytes(64), 415),
]

counts: Counter[str] = Counter()
latency_ms: dict[str, list[float]] = {}
unexpected: list[str] = []
retry_after_missing = 0


@events.request.add_listener
def _count(request_type: str, name: str, response_time: float, response: Any, exception: Any, **_: Any) -> None:
    global retry_after_missing
    status = getattr(response, "status_code", 0) if response is not None else 0
    counts[str(status)] += 1
    latency_ms.setdefault(str(status), []).append(response_time)
    if status == 503 and not response.headers.get("Retry-After"):
        retry_after_missing += 1


@events.quitting.add_listener
def _report(environment: Any, **_: Any) -> None:
    with open(os.environ["LOAD_REPORT"], "w") as out:
        percentiles = {
            status: {f"p{q}": round(sorted(values)[min(len(values) - 1, len(values) * q // 100)]) for q in (50, 95, 99)}
            for status, values in latency_ms.items()
        }
        json.dump({"statuses": dict(counts), "latency_ms": percentiles, "unexpected": unexpected[:20],
                   "retry_after_missing": retry_after_missing}, out)


class ApiUser(HttpUser):
    wait_time = constant(0) if MODE == "burst" else between(0.0, 0.2)

    @task
    def upload(self) -> None:
        path = random.choice(PATHS)
        if MODE == "burst":
            name, data, expected = "photo", PHOTO, 200
        else:
            name, data, expected = random.choice(SOAK_MIX)
        with self.client.post(path, files={"image": (f"{name}.jpg", data, "image/jpeg")}, name=f"{path} {name}",
                              catch_response=True, timeout=120) as response:
            ok = response.status_code == expected or (MODE == "burst" and response.status_code == 503)
            if ok:
                response.success()
            else:
                unexpected.append(f"{name}: {response.status_code} {response.text[:200]}")
                response.failure(f"expected {expected}, got {response.status_code}")
