"""The "encode" stage: ``ParsingResult`` -> the JSON bytes of the parse response.

Runs on a worker thread, like inference: PNG encoding and JSON serialisation of megabytes of
base64 would otherwise stall the event loop.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from m2fp_service.engine import ParsingEngine
from m2fp_service.imaging import render
from m2fp_service.pipeline import Timings, parse_image
from m2fp_service.result import ParsingResult
from m2fp_service.schemas import ParseParams


def encode_data(image_rgb: np.ndarray, result: ParsingResult, palette: list[tuple[int, int, int]],
                params: ParseParams) -> dict[str, Any]:
    """The ``data`` object: the seed's fields, plus the opt-in outputs requested.

    Args:
        image_rgb: (H, W, 3) uint8, the decoded photo.
        result: its parsing, at the same (H, W).
        palette: RGB colour per class id.
        params: which extra outputs to add.
    """
    label_map = result.label_map
    present = render.present_classes(label_map)
    data: dict[str, Any] = {
        "result_image": render.b64_png(render.colorize(label_map, palette)),
        "masks": [render.b64_png(render.class_mask(label_map, c)) for c in present],
        "classes": [result.classes[c] for c in present],
        "inference_time": 0.0,  # set by the caller once everything is encoded; keeps the seed's key order
    }
    wanted = params.outputs
    if "label" in wanted:
        data["label_map"] = render.b64_png(label_map)
    if "overlay" in wanted:
        data["overlay"] = render.b64_png(render.overlay(image_rgb, label_map, palette))
    if "people" in wanted:
        data["people"] = people_out(result)
    if "areas" in wanted:
        data["areas"] = result.class_areas()
    if "cutout" in wanted:
        data["cutout"] = render.b64_png(render.cutout(image_rgb, foreground(result)))
    return data


def people_out(result: ParsingResult) -> list[dict[str, Any]]:
    """One ``PersonOut``-shaped dict per person, highest score first."""
    return [
        {**person, "mask": render.b64_png(result.person_masks[i].astype(np.uint8) * 255)}
        for i, person in enumerate(result.people_summary())
    ]


def foreground(result: ParsingResult) -> np.ndarray:
    """(H, W) bool: pixels of any person or any non-background part (the virtual-background matte)."""
    fg = result.label_map > 0
    if result.num_people:
        fg |= result.person_masks.any(axis=0)
    return fg


def parse_to_json(engine: ParsingEngine, data: bytes, params: ParseParams, *, max_pixels: int,
                  max_side: int, mode: str, timings: Timings) -> bytes:
    """Decode -> parse -> encode one upload into the seed's success envelope, as JSON bytes.

    ``inference_time`` is the sum of the stages (decode to PNG encoding), in seconds.
    """
    image, result = parse_image(engine, data, max_pixels=max_pixels, max_side=max_side,
                                mode=mode, timings=timings)  # type: ignore[arg-type]
    t = time.perf_counter()
    body = encode_data(image, result, engine.card.palette, params)
    timings.add("encode", t)
    body["inference_time"] = round(timings.total, 4)
    t = time.perf_counter()
    payload = json.dumps({"code": 0, "message": "success", "data": body}, separators=(",", ":")).encode()
    timings.add("encode", t)
    return payload
