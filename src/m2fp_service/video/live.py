"""A live stream's state, independent of the transport: encoded frame in, encoded answer out.

``LiveSession`` owns one ``FrameProcessor`` (the light model's own session, smoothing, carried
parts) and, when the selection needs parts, an M2FP key-frame worker that never makes the stream
wait (latest frame wins). ``LatestSlot`` keeps only the newest unprocessed frame, so a client
that sends faster than the server processes gets fresh answers, not a growing delay.
``LiveHub`` fans a producer's answers out to viewers (the OBS output page).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from m2fp_service.imaging import render
from m2fp_service.imaging.decode import decode_image
from m2fp_service.imaging.render import ImageFormat
from m2fp_service.limits import ImageLimits
from m2fp_service.result import ParsingResult
from m2fp_service.video.keyframes import KeyframeWorker
from m2fp_service.video.processor import FrameProcessor, Segmenter, VideoOptions

LiveOutput = Literal["composite", "mask"]


@dataclass(frozen=True)
class LiveAnswer:
    """One processed frame: a JSON-able header and the encoded picture."""

    header: dict[str, Any]
    data: bytes


class LiveSession:
    """One client's stream.

    Args:
        segmenter: a light-model session for this stream.
        options: selection and effect.
        output: ``composite`` (the composed frame) or ``mask`` (the alpha, 8-bit grey PNG).
        fmt: encoding of ``composite`` frames.
        limits: largest frame accepted.
        parse: M2FP on one frame (for selections that need parts or people); None: unavailable.
        fps_hint: frame rate assumed for the key-frame interval (live streams do not say).
    """

    def __init__(self, segmenter: Segmenter, options: VideoOptions, *, output: LiveOutput, fmt: ImageFormat,
                 quality: int, limits: ImageLimits, parse: Callable[[np.ndarray], ParsingResult] | None,
                 background_rgb: np.ndarray | None = None, fps_hint: float = 15.0) -> None:
        self.output = output
        self.format: ImageFormat = "png" if output == "mask" else fmt
        self.quality = quality
        self.limits = limits
        self.worker = KeyframeWorker(parse, name="m2fp-live-keyframes") if options.needs_parts and parse else None
        live_options = VideoOptions(spec=options.spec, labels=options.labels,
                                    keyframe_interval_s=options.keyframe_interval_s, key_policy="latest",
                                    smoothing=options.smoothing, work_long_side=options.work_long_side)
        self.processor = FrameProcessor(segmenter, live_options, fps_hint, self.worker, background_rgb)
        self.index = 0

    def process(self, data: bytes, received_at: float) -> LiveAnswer:
        """Decodes, processes and encodes one frame (blocking: call it off the event loop).

        Raises:
            ServiceError: the frame is not a decodable picture within the limits.
        """
        started = time.perf_counter()
        frame = decode_image(data, max_pixels=self.limits.max_pixels, max_side=self.limits.max_side).rgb
        if self.output == "mask":  # the alpha alone: nothing composed
            result = self.processor.matte(self.index, frame, border=False)
            picture = render.encode_png(np.clip(result.alpha * 255.0 + 0.5, 0, 255).astype(np.uint8))
        else:
            result = self.processor.process(self.index, frame)
            picture = render.encode_image(result.image, self.format, self.quality)
        done = time.perf_counter()
        header = {
            "seq": self.index,
            "width": int(frame.shape[1]),
            "height": int(frame.shape[0]),
            "output": self.output,
            "format": self.format,
            "server_ms": round((done - started) * 1000, 1),
            "queued_ms": round((started - received_at) * 1000, 1),
            "parts_age_frames": result.parts_age,
            "people": result.people,
        }
        self.index += 1
        return LiveAnswer(header, picture)

    def close(self) -> None:
        """Stops the key-frame worker and waits up to 10 s for a frame in progress: long enough for one
        M2FP run, short enough that a run queued behind other sessions' key frames does not hold a
        thread of the server's pool for long."""
        if self.worker is not None:
            self.worker.close(timeout_s=10)


class LatestSlot:
    """Holds the newest frame not processed yet; a newer one replaces it (counted as dropped)."""

    def __init__(self) -> None:
        self._item: tuple[bytes, float] | None = None
        self._event = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def put(self, data: bytes) -> None:
        if self._item is not None:
            self.dropped += 1
        self._item = (data, time.perf_counter())
        self._event.set()

    async def take(self) -> tuple[bytes, float] | None:
        """The newest frame, waiting for one; None once closed and empty."""
        while self._item is None:
            if self.closed:
                return None
            self._event.clear()
            await self._event.wait()
        item, self._item = self._item, None
        return item

    def close(self) -> None:
        self.closed = True
        self._event.set()


class LiveHub:
    """Named streams and their viewers: each viewer holds only the newest answer of its stream."""

    def __init__(self) -> None:
        self._viewers: dict[str, set[asyncio.Queue[LiveAnswer]]] = {}

    def subscribe(self, name: str) -> asyncio.Queue[LiveAnswer]:
        q: asyncio.Queue[LiveAnswer] = asyncio.Queue(maxsize=1)
        self._viewers.setdefault(name, set()).add(q)
        return q

    def unsubscribe(self, name: str, q: asyncio.Queue[LiveAnswer]) -> None:
        viewers = self._viewers.get(name)
        if viewers is not None:
            viewers.discard(q)
            if not viewers:
                del self._viewers[name]

    def viewers(self, name: str) -> int:
        return len(self._viewers.get(name, ()))

    def publish(self, name: str, answer: LiveAnswer) -> None:
        for q in self._viewers.get(name, ()):
            if q.full():
                q.get_nowait()
            q.put_nowait(answer)
