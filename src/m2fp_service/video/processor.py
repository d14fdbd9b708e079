"""``FrameProcessor``: one frame in, the composed frame out — the hybrid of both models.

Every frame: the light model's person probability, smoothed in time (``AlphaSmoother``),
upsampled to the frame. When the selection needs M2FP's parts or people (anything but
``keep=people``), key frames go to a ``KeyframeWorker`` and their parsing is carried to each
frame by optical flow and clipped to the current person mask (``LabelCarrier``), with person ids
kept stable by ``PersonTracker``. The selection scales the person alpha; the border is refined
against the frame and the result composed with ``imaging.compose`` — the same compositing as
photos.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import cv2
import numpy as np

from m2fp_service import labelsets
from m2fp_service.imaging import compose
from m2fp_service.labelsets import LabelSet
from m2fp_service.outputs import ComposeSpec
from m2fp_service.video.keyframes import KeyframeWorker, KeyResult
from m2fp_service.video.propagate import (
    NO_PERSON,
    Carried,
    LabelCarrier,
    PersonTracker,
    person_id_map,
    to_gray_small,
    work_hw_for,
)
from m2fp_service.video.temporal import AlphaSmoother

KeyPolicy = Literal["bounded", "latest"]
MATTE_MAX_SIDE = 960  # frames with a longer side are refined at half size
_SOFT_LOW, _SOFT_HIGH = 0.15, 0.85
_EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)  # FrameResult.image before ``compose``


class Segmenter(Protocol):
    """The light model: a frame's person probability at the model's own (small) size."""

    def run_small(self, frame_rgb: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class VideoOptions:
    """How frames are processed.

    Attributes:
        spec: selection, effect, edges (as for photos; ``format`` is unused).
        labels: label set of ``keep=classes:...`` names.
        keyframe_interval_s: seconds between M2FP key frames (when the selection needs them).
        key_policy: ``bounded`` (files): every ``interval``-th frame is a key frame, submitted by a
            reader running ahead to an ordered ``KeyframeWorker``; the loop takes its result on
            reaching it (waiting only if M2FP is slower than the read-ahead), so parts are never
            older than one interval. ``latest`` (live): never wait; submit when the worker is free
            and use the newest parts there are.
        smoothing: temporal smoothing of the person mask.
        work_long_side: long side of the size flow and labels are computed at.
    """

    spec: ComposeSpec = field(default_factory=ComposeSpec)
    labels: LabelSet = field(default_factory=lambda: labelsets.label_set("cihp"))
    keyframe_interval_s: float = 2.0
    key_policy: KeyPolicy = "bounded"
    smoothing: bool = True
    work_long_side: int = 320

    @property
    def needs_parts(self) -> bool:
        """Whether M2FP must run: every selection but everyone needs its parts or its people."""
        return self.spec.keep.kind != "people"


@dataclass
class FrameResult:
    """One processed frame.

    Attributes:
        image: (H, W, 3) uint8 RGB, or (H, W, 4) RGBA for ``transparent`` (empty after ``matte`` alone).
        alpha: (H, W) float32 0..1, the kept region after refinement.
        parts_age: frames since the key frame whose parts are used (None: no parts yet or not needed).
        people: person ids in the carried map.
        seconds: time per step of this frame.
        sums: ``compose.border_sums`` of the frame and alpha, for ``compose``.
    """

    image: np.ndarray
    alpha: np.ndarray
    parts_age: int | None
    people: list[int]
    seconds: dict[str, float]
    sums: np.ndarray | None = None


class FrameProcessor:
    """Processes the frames of one stream, in order.

    Args:
        segmenter: the light model.
        options: what to do with each frame.
        fps: the stream's frame rate (turns the key-frame interval into frames).
        keyframes: the M2FP worker; required when ``options.needs_parts``.
        background_rgb: the backdrop of ``mode=image``, any size.
    """

    def __init__(self, segmenter: Segmenter, options: VideoOptions, fps: float,
                 keyframes: KeyframeWorker | None = None, background_rgb: np.ndarray | None = None) -> None:
        if options.needs_parts and keyframes is None:
            raise ValueError(f"keep={options.spec.keep} needs M2FP key frames: pass a KeyframeWorker")
        self.segmenter = segmenter
        self.options = options
        self.interval = max(1, round(options.keyframe_interval_s * max(fps, 1e-3)))
        self.keyframes = keyframes if options.needs_parts else None
        self.smoother = AlphaSmoother() if options.smoothing else None
        self._background = background_rgb
        self._backdrop: np.ndarray | None = None
        self._carrier: LabelCarrier | None = None
        self._tracker = PersonTracker()
        self._last_submitted: int | None = None
        self._chosen: int | None = None  # stable id kept by keep=largest|central
        self.key_frames_used = 0

    # -- the steps of one frame ---------------------------------------------------------------

    def process(self, index: int, frame_rgb: np.ndarray) -> FrameResult:
        """Composes frame ``index`` (frames must come in order)."""
        result = self.matte(index, frame_rgb)
        t = time.perf_counter()
        result.image = self.compose(frame_rgb, result.alpha, result.sums)
        _lap(result.seconds, "compose", t)
        return result

    def matte(self, index: int, frame_rgb: np.ndarray, prob: np.ndarray | None = None, *,
              border: bool = True) -> FrameResult:
        """The first stage of ``process``: frame ``index``'s alpha (frames must come in order), without
        the composed picture (``image`` is left empty for ``compose``).

        Args:
            prob: the light model's output for this frame (``segmenter.run_small``), when a reader
                thread computed it ahead; else it is computed here.
            border: also the border's colour sums ``compose`` uses (``sums``); False: the alpha alone.
        """
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        h, w = frame_rgb.shape[:2]
        if prob is None:
            prob = self.segmenter.run_small(frame_rgb)
        if self.smoother is not None:
            prob = self.smoother(prob)
        t = _lap(seconds, "segment", t)
        # The alpha is built at the matte size (half the frame above MATTE_MAX_SIDE) straight from the
        # model's small output, upsampled once at the end.
        mh, mw = (h, w) if max(h, w) <= MATTE_MAX_SIDE else (h // 2, w // 2)
        alpha: np.ndarray = cv2.resize(prob, (mw, mh), interpolation=cv2.INTER_LINEAR)
        parts_age: int | None = None
        people: list[int] = []
        if self.keyframes is not None:
            selection, parts_age, people = self._selection(index, frame_rgb, prob)
            t = _lap(seconds, "parts", t)
            alpha = alpha * cv2.resize(selection, (mw, mh), interpolation=cv2.INTER_LINEAR)
        spec = self.options.spec
        if spec.invert:
            alpha = 1.0 - alpha
        alpha = self._matte(alpha, frame_rgb)
        if spec.feather_px >= 2:
            alpha = compose.feather_alpha(alpha, spec.feather_px)
        t = _lap(seconds, "matte", t)
        if not border:
            return FrameResult(_EMPTY_IMAGE, alpha, parts_age, people, seconds)
        # The border's local colour sums belong to compositing, but are taken here: with the matte
        # and the compositing + encoding on two threads, this evens out their work (measured at
        # 640x360: 61 -> 68 frames/s, medians of 6 runs).
        sums = compose.border_sums(frame_rgb, alpha)
        _lap(seconds, "border", t)
        return FrameResult(_EMPTY_IMAGE, alpha, parts_age, people, seconds, sums)

    def compose(self, frame_rgb: np.ndarray, alpha: np.ndarray, sums: np.ndarray | None = None) -> np.ndarray:
        """The second stage of ``process``: the composed frame for ``matte``'s alpha (and ``sums``, its
        ``FrameResult.sums``). Keeps no state between frames but the backdrop, so it may run on
        another thread than ``matte``."""
        return compose.composite(frame_rgb, alpha, self.options.spec.options, self._backdrop_for(alpha.shape),
                                 sums=sums)

    def _matte(self, alpha: np.ndarray, frame_rgb: np.ndarray) -> np.ndarray:
        """The light model's soft alpha (at the matte size) sharpened — its 0.15..0.85 stretched to
        0..1, so the border is a band, not a haze — refined against the frame and brought to the frame
        size. Frames wider than ``MATTE_MAX_SIDE`` are refined at half size: the person mask comes
        from a 256-pixel model, so full-size refinement costs four times as much for detail the mask
        does not have."""
        h, w = frame_rgb.shape[:2]
        alpha = np.clip((alpha - _SOFT_LOW) * (1.0 / (_SOFT_HIGH - _SOFT_LOW)), 0.0, 1.0).astype(np.float32)
        mh, mw = alpha.shape
        if self.options.spec.refine:
            guide = frame_rgb if (mh, mw) == (h, w) else cv2.resize(frame_rgb, (mw, mh), interpolation=cv2.INTER_AREA)
            alpha = compose.refine_alpha(alpha, guide, compose.default_refine_radius((mh, mw)))
        if (mh, mw) != (h, w):
            alpha = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)
        return alpha

    def _backdrop_for(self, hw: tuple[int, int]) -> np.ndarray | None:
        """The backdrop picture covered to the frame size once, not per frame."""
        if self._background is None:
            return None
        if self._backdrop is None or self._backdrop.shape[:2] != hw:
            self._backdrop = compose.cover(self._background, hw)
        return self._backdrop

    def is_key(self, index: int) -> bool:
        """Whether frame ``index`` is a key frame in the ``bounded`` policy (the reader submits those)."""
        return self.keyframes is not None and self.options.key_policy == "bounded" and index % self.interval == 0

    def key_gray(self, frame_rgb: np.ndarray) -> np.ndarray:
        """The grey work-size frame a key frame is submitted with."""
        return to_gray_small(frame_rgb, work_hw_for(frame_rgb.shape[:2], self.options.work_long_side))

    def _selection(self, index: int, frame_rgb: np.ndarray, prob: np.ndarray
                   ) -> tuple[np.ndarray, int | None, list[int]]:
        """(h, w) float32 selection at the work size from the carried parts, their age, the people."""
        assert self.keyframes is not None
        work_hw = work_hw_for(frame_rgb.shape[:2], self.options.work_long_side)
        if self._carrier is None or self._carrier.work_hw != work_hw:
            self._carrier = LabelCarrier(work_hw)
        gray = to_gray_small(frame_rgb, work_hw)
        self._carrier.step(gray)
        done = None
        if self.options.key_policy == "bounded":
            if index % self.interval == 0:  # a key frame: the reader submitted it ahead (ordered worker)
                done = self.keyframes.wait_for(index)
        else:
            due = self._last_submitted is None or index - self._last_submitted >= self.interval
            if due and self.keyframes.idle:
                self.keyframes.submit(index, frame_rgb.copy(), gray)
                self._last_submitted = index
            done = self.keyframes.poll()
        if done is not None:
            self._adopt(done)
        person_small = cv2.resize(prob, work_hw[::-1], interpolation=cv2.INTER_LINEAR) > 0.5
        current = self._carrier.clipped(person_small)
        if current is None:  # no key frame yet (live): everyone for a person choice, nothing for parts
            fill = 0.0 if self.options.spec.keep.kind == "classes" else 1.0
            return np.full(work_hw, fill, np.float32), None, []
        people = sorted(int(i) for i in np.unique(current.person_ids) if i != NO_PERSON)
        return self._select(current, people).astype(np.float32), index - current.key_index, people

    def _adopt(self, done: KeyResult) -> None:
        """Takes a finished key frame: carried to now, its people matched to the ids carried so far."""
        assert self._carrier is not None
        work_hw = self._carrier.work_hw
        result = done.result
        labels = cv2.resize(result.label_map, work_hw[::-1], interpolation=cv2.INTER_NEAREST)
        local = person_id_map(result.person_masks, result.person_scores, work_hw)
        labels, local = self._carrier.bring((labels, local), done.gray)
        previous = self._carrier.carried.person_ids if self._carrier.carried is not None else None
        stable = self._tracker.assign(local, previous)
        self._carrier.adopt(Carried(labels, stable, done.index))
        self.key_frames_used += 1

    def _select(self, carried: Carried, people: list[int]) -> np.ndarray:
        """(h, w) bool: what ``keep`` chooses in the carried maps."""
        keep = self.options.spec.keep
        if keep.kind == "classes":
            mapped = labelsets.relabel_map(carried.labels, self.options.labels)
            ids = [self.options.labels.class_index(name) for name in keep.classes]
            return np.isin(mapped, ids)
        if keep.kind == "ids":
            return np.isin(carried.person_ids, list(keep.ids))
        if self._chosen is None or self._chosen not in people:
            self._chosen = _choose(carried.person_ids, people, keep.kind)
        if self._chosen is None:
            return np.zeros(carried.person_ids.shape, bool)
        return np.asarray(carried.person_ids == self._chosen)


def _choose(ids: np.ndarray, people: list[int], kind: str) -> int | None:
    """The stable id of the largest person, or of the one whose centre is nearest the frame's."""
    if not people:
        return None
    h, w = ids.shape
    best, best_key = None, None
    for p in people:
        ys, xs = np.nonzero(ids == p)
        if kind == "largest":
            key = -len(ys)
        else:
            key = ((ys.mean() - (h - 1) / 2) / h) ** 2 + ((xs.mean() - (w - 1) / 2) / w) ** 2
        if best_key is None or key < best_key:
            best, best_key = p, key
    return best


def _lap(seconds: dict[str, float], step: str, started: float) -> float:
    now = time.perf_counter()
    seconds[step] = now - started
    return now
