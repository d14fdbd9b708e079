"""One picture through the stages: decode -> preprocess -> infer -> postprocess -> render. No HTTP here.

``parse_image`` stops at the ``ParsingResult``; ``process`` goes on through the render stage
(``outputs.render``), which the API, ``m2fp parse`` and video share. A ``ResultCache`` lets a
picture seen again (the WebUI composing the same photo with other options) skip inference.
``probe`` makes the decode stage's checks that need no pixels, so a caller can refuse a bad
upload before it waits for a worker (the API does); the full decode stays with the rest.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from m2fp_service.engine import ParsingEngine
from m2fp_service.errors import ServiceError
from m2fp_service.imaging import postprocess, preprocess
from m2fp_service.imaging.decode import ImageHeader, decode_image, probe_image
from m2fp_service.limits import ImageLimits
from m2fp_service.outputs import Rendered, RenderRequest, render
from m2fp_service.result import ParsingResult
from m2fp_service.timings import STAGES, Timings

__all__ = ["STAGES", "ImageHeader", "ImageLimits", "ResultCache", "Timings", "parse_array", "parse_image",
           "probe", "process"]


class ResultCache:
    """Parsing results of recently seen pictures, by content hash, bounded in bytes (LRU).

    Inference is deterministic, so a picture's result depends only on its bytes and the
    post-processing mode; cached arrays are made read-only because requests share them.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[ParsingResult, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(data: bytes, mode: str) -> str:
        return f"{mode}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"

    def get(self, key: str) -> ParsingResult | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, result: ParsingResult) -> None:
        size = result.label_map.nbytes + result.person_masks.nbytes
        if size > self.max_bytes:
            return
        for array in (result.label_map, result.person_masks, result.person_scores):
            array.flags.writeable = False
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (result, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


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


def probe(data: bytes, limits: ImageLimits) -> ImageHeader:
    """The checks of ``decode`` that need no pixels (format, header, ``limits``); microseconds for real files.
    Run them before a request waits for a worker, so a bad upload is refused at once; ``decode`` makes them
    again (and the ones a header alone cannot settle)."""
    return probe_image(data, max_pixels=limits.max_pixels, max_side=limits.max_side)


def probe_background(data: bytes, limits: ImageLimits) -> ImageHeader:
    """``probe`` for a backdrop picture; errors name the backdrop (not the photo)."""
    with _as_backdrop():
        return probe(data, limits)


def decode(data: bytes, limits: ImageLimits, timings: Timings | None = None) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB within ``limits`` (typed errors otherwise)."""
    t = time.perf_counter()
    image = decode_image(data, max_pixels=limits.max_pixels, max_side=limits.max_side).rgb
    if timings is not None:
        timings.add("decode", t)
    return image


def parse_image(
    engine: ParsingEngine,
    data: bytes,
    *,
    max_pixels: int,
    max_side: int,
    mode: postprocess.Mode = "exact",
    timings: Timings | None = None,
    cache: ResultCache | None = None,
) -> tuple[np.ndarray, ParsingResult]:
    """Decodes and parses encoded image bytes; returns the RGB image and its result."""
    timings = timings if timings is not None else Timings()
    image = decode(data, ImageLimits(max_pixels, max_side), timings)
    return image, parse_cached(engine, image, data, mode=mode, timings=timings, cache=cache)


def parse_cached(engine: ParsingEngine, image_rgb: np.ndarray, data: bytes, *, mode: postprocess.Mode,
                 timings: Timings, cache: ResultCache | None) -> ParsingResult:
    """``parse_array`` of the decoded ``data``, from ``cache`` when the same bytes were parsed before."""
    key = ResultCache.key(data, mode) if cache is not None else ""
    result = cache.get(key) if cache is not None else None
    timings.cache_hit = result is not None
    if result is None:
        result = parse_array(engine, image_rgb, mode=mode, timings=timings)
        if cache is not None:
            cache.put(key, result)
    return result


def decode_background(data: bytes, limits: ImageLimits, timings: Timings | None = None) -> np.ndarray:
    """A backdrop picture's bytes -> RGB; errors name the backdrop (not the photo)."""
    with _as_backdrop():
        return decode(data, limits, timings)


@contextmanager
def _as_backdrop() -> Iterator[None]:
    try:
        yield
    except ServiceError as exc:
        raise type(exc)(f"background picture: {exc.message}") from None


def process(
    engine: ParsingEngine,
    data: bytes,
    request: RenderRequest,
    *,
    limits: ImageLimits,
    mode: postprocess.Mode = "exact",
    background: bytes | np.ndarray | None = None,
    timings: Timings | None = None,
    cache: ResultCache | None = None,
) -> Rendered:
    """Every stage for one upload: decode the photo and the backdrop (bytes, or an already decoded
    array), parse, render. Both pictures are decoded before inference, so a bad backdrop costs none."""
    timings = timings if timings is not None else Timings()
    image = decode(data, limits, timings)
    background_rgb = decode_background(background, limits, timings) if isinstance(background, bytes) else background
    result = parse_cached(engine, image, data, mode=mode, timings=timings, cache=cache)
    return render(image, result, request, background_rgb=background_rgb, timings=timings)
