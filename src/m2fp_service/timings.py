"""``Timings``: seconds per stage of one request (decode, preprocess, infer, postprocess, compose, encode)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STAGES = ("decode", "preprocess", "infer", "postprocess", "compose", "encode")


@dataclass
class Timings:
    """Seconds spent per stage of one request."""

    seconds: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False  # the parsing came from the result cache: no preprocess/infer/postprocess

    def add(self, stage: str, started: float) -> float:
        """Adds the time since ``started`` (a ``time.perf_counter()`` value) to ``stage``; returns now."""
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - started
        return now

    @property
    def total(self) -> float:
        return sum(self.seconds.values())
