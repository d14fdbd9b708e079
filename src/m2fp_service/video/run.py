"""``process_video``: a video file through the hybrid, frame by frame, audio kept (``m2fp video``).

Three threads in a pipeline, so a 2-core machine keeps both cores busy:

* the reader decodes ahead of the frame loop (one key-frame interval plus a few frames), runs the
  light model on each frame, and hands every key frame to the M2FP worker as it decodes it, so
  M2FP works on key frame k while the loop is still on the frames before it;
* the frame loop builds each frame's alpha in order (``FrameProcessor.matte``: smoothing, carried
  parts, refinement — the stateful part — and the border's colour sums the composer uses);
* the composer composes each frame over its backdrop and writes it, and writes the audio packets
  in file order (one thread owns the output container).

The output appears under its name only when complete.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from m2fp_service.result import ParsingResult
from m2fp_service.video.io import AudioPacket, Frame, VideoReader, VideoWriter
from m2fp_service.video.keyframes import KeyframeWorker
from m2fp_service.video.processor import FrameProcessor, Segmenter, VideoOptions

_END = object()
log = logging.getLogger("m2fp.video")


@dataclass
class VideoReport:
    """What ``process_video`` did."""

    frames: int = 0
    seconds: float = 0.0
    width: int = 0
    height: int = 0
    fps_in: float = 0.0
    audio_packets: int = 0
    key_frames: int = 0
    max_parts_age: int | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def process_video(
    source: Path,
    target: Path,
    segmenter: Segmenter,
    options: VideoOptions,
    *,
    parse: Callable[[np.ndarray], ParsingResult] | None = None,
    background_rgb: np.ndarray | None = None,
    crf: int = 20,
    preset: str = "veryfast",
    progress: bool = True,
    err: TextIO | None = None,
) -> VideoReport:
    """Composes every frame of ``source`` into ``target`` (same size, frame rate and audio).

    Args:
        parse: M2FP on one frame; required when ``options.needs_parts``.
        background_rgb: backdrop picture of ``mode=image``.

    Raises:
        VideoError: unreadable input or unwritable output.
        InvalidParameter: an output that cannot hold what is asked (alpha in .mp4).
    """
    from tqdm import tqdm

    reader = VideoReader(source)
    info = reader.info
    alpha = options.spec.options.mode == "transparent"
    partial = target if not target.suffix else target.with_name(f".{target.stem}.partial{target.suffix}")
    writer: VideoWriter | None = None
    worker = KeyframeWorker(parse, ordered=True) if options.needs_parts and parse is not None else None
    report = VideoReport(width=info.width, height=info.height, fps_in=info.fps)
    abandoned = False  # the composer thread would not stop: its container must not be closed under it
    try:
        writer = VideoWriter(partial, info, alpha=alpha, audio_stream=reader.audio, crf=crf, preset=preset)
        processor = FrameProcessor(segmenter, options, info.fps, worker, background_rgb)
        items: queue.Queue[object] = queue.Queue(maxsize=processor.interval + 8)
        stop = threading.Event()
        feeder = threading.Thread(target=_read_ahead, args=(reader, processor, worker, items, stop),
                                  name="m2fp-video-reader", daemon=True)
        bar = tqdm(total=info.frames or None, unit="frame", disable=not progress, file=err, dynamic_ncols=True)
        started = time.perf_counter()
        composer = _Composer(processor, writer)  # its thread starts here: nothing may raise before the try
        try:
            feeder.start()
            while True:
                item = items.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, AudioPacket):
                    composer.put(item)
                    continue
                assert isinstance(item, _Segmented)
                result = processor.matte(item.frame.index, item.frame.rgb, item.prob)
                composer.put(_Matted(item.frame, result.alpha, result.sums))
                report.frames += 1
                for step, seconds in result.seconds.items():
                    report.step_seconds[step] = report.step_seconds.get(step, 0.0) + seconds
                if result.parts_age is not None:
                    report.max_parts_age = max(report.max_parts_age or 0, result.parts_age)
                bar.update(1)
            composer.finish()
        finally:
            stop.set()
            _drain(items)
            if feeder.is_alive():
                feeder.join(timeout=10)
            if not composer.join():  # still writing: closing the container under it could crash
                log.error("the video composer did not stop; %s is left open", partial)
                abandoned = True
            bar.close()
        report.step_seconds["compose"] = composer.seconds
        writer.close()
        report.seconds = time.perf_counter() - started
        report.audio_packets = writer.audio_packets
        report.key_frames = processor.key_frames_used
        writer = None
        if partial != target:
            partial.replace(target)
        return report
    finally:
        if worker is not None:
            worker.close()
        if writer is not None:  # failed half-way: nothing half-written stays under either name
            if not abandoned:
                with contextlib.suppress(Exception):  # the original error matters more
                    writer.close()
            if partial != target:
                partial.unlink(missing_ok=True)
        reader.close()


@dataclass(frozen=True)
class _Segmented:
    """A decoded frame and the light model's output for it (computed by the reader)."""

    frame: Frame
    prob: np.ndarray


@dataclass(frozen=True)
class _Matted:
    """A frame with its alpha and the border's colour sums (``FrameProcessor.matte``), for the composer."""

    frame: Frame
    alpha: np.ndarray
    sums: np.ndarray | None


class _Composer:
    """The last stage: composes each frame over its backdrop and writes it; writes audio in order.

    ``put`` hands it ``_Matted`` frames and audio packets in file order; ``finish`` waits for
    everything to be written and raises the composer's error, if any.
    """

    def __init__(self, processor: FrameProcessor, writer: VideoWriter) -> None:
        self._processor = processor
        self._writer = writer
        self._items: queue.Queue[object] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="m2fp-video-composer", daemon=True)
        self._thread.start()

    def put(self, item: object) -> None:
        """Queues an item (blocking while the queue is full); raises the composer's error, if any."""
        if not _put(self._items, item, lambda: self._error is not None):
            assert self._error is not None
            raise self._error

    def finish(self) -> None:
        self.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def join(self) -> bool:
        """Ends the thread (after ``finish``, or on the way out of a failure); whether it has ended."""
        if self._thread.is_alive():
            _drain(self._items)
            with contextlib.suppress(queue.Full):
                self._items.put_nowait(_END)
            self._thread.join(timeout=30)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while True:
                item = self._items.get()
                if item is _END:
                    return
                if isinstance(item, AudioPacket):
                    self._writer.write_audio(item.packet)
                    continue
                assert isinstance(item, _Matted)
                t = time.perf_counter()
                image = self._processor.compose(item.frame.rgb, item.alpha, item.sums)
                self.seconds += time.perf_counter() - t
                self._writer.write(image, item.frame.pts, item.frame.index)
        except BaseException as exc:  # handed to the frame loop, which raises it
            self._error = exc


def _read_ahead(reader: VideoReader, processor: FrameProcessor, worker: KeyframeWorker | None,
                items: queue.Queue[object], stop: threading.Event) -> None:
    """Decodes into ``items`` (bounded: at most an interval ahead) with the light model's output for
    each frame, and submits key frames to M2FP."""
    try:
        for item in reader:
            if stop.is_set():
                return
            if isinstance(item, Frame):
                if worker is not None and processor.is_key(item.index):
                    worker.submit(item.index, item.rgb, processor.key_gray(item.rgb))
                _put(items, _Segmented(item, processor.segmenter.run_small(item.rgb)), stop.is_set)
            else:
                _put(items, item, stop.is_set)
        _put(items, _END, stop.is_set)
    except BaseException as exc:  # handed to the loop, which raises it
        _put(items, exc, stop.is_set)


def _put(items: queue.Queue[object], item: object, stopped: Callable[[], bool]) -> bool:
    """Queues ``item``, waiting while the queue is full, unless ``stopped()`` first; whether it was queued."""
    while not stopped():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _drain(items: queue.Queue[object]) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return
