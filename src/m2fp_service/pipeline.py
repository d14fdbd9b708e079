"""``parse_image``: decode -> preprocess -> engine -> postprocess. No HTTP here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from m2fp_service.engine import ParsingEngine
from m2fp_service.imaging import postprocess, preprocess
from m2fp_service.imaging.decode import decode_image
from m2fp_service.result import ParsingResult

STAGES = ("decode", "preprocess", "infer", "postprocess", "encode")


@dataclass
class Timings:
    """Seconds spent per stage of one request."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - started
        return now

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def parse_array(
    engine: ParsingEngine, image_rgb: np.ndarray, mode: postprocess.Mode = "exact", timings: Timings | None = None
) -> ParsingResult:
    """Parses an (H, W, 3) uint8 RGB image."""
    timings = timings if timings is not None else Timings()
    card = engine.card
    t = time.perf_counter()
    tensor, meta = preprocess.prepare(image_rgb, card.input_policy)
    t = timings.add("preprocess", t)
    raw = engine.run(tensor)
    del tensor
    t = timings.add("infer", t)
    result = postprocess.to_result(
        raw.class_logits, raw.mask_logits, meta, card.inference, card.classes, mode=mode, trained=card.trained
    )
    timings.add("postprocess", t)
    return result


def parse_image(
    engine: ParsingEngine,
    data: bytes,
    *,
    max_pixels: int,
    max_side: int,
    mode: postprocess.Mode = "exact",
    timings: Timings | None = None,
) -> tuple[np.ndarray, ParsingResult]:
    """Decodes and parses encoded image bytes; returns the RGB image and its result."""
    timings = timings if timings is not None else Timings()
    t = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels, max_side=max_side).rgb
    timings.add("decode", t)
    return image, parse_array(engine, image, mode=mode, timings=timings)
