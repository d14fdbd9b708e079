"""Carrying labels by optical flow, filling from the nearest label, stable person ids, smoothing, key frames."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from m2fp_service.result import ParsingResult
from m2fp_service.video.keyframes import KeyframeWorker
from m2fp_service.video.propagate import (
    NO_PERSON,
    Carried,
    LabelCarrier,
    PersonTracker,
    fill_from_nearest,
    person_id_map,
    work_hw_for,
)
from m2fp_service.video.temporal import AlphaSmoother


def textured_frame(hw: tuple[int, int], box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """(h, w) uint8 grey: a smooth gradient background and a textured square at box (y0, x0, y1, x1)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    frame = ((xx * 3 + yy * 2) % 256).astype(np.uint8) // 2
    rng = np.random.default_rng(seed)
    y0, x0, y1, x1 = box
    frame[y0:y1, x0:x1] = 128 + rng.integers(0, 120, (y1 - y0, x1 - x0), np.uint8)
    return frame


def test_work_size_keeps_aspect() -> None:
    assert work_hw_for((720, 1280)) == (180, 320)
    assert work_hw_for((1080, 1920), 320) == (180, 320)
    assert work_hw_for((100, 50)) == (100, 50)  # never upscaled


@pytest.mark.parametrize(
    ("values", "known", "holes", "expected"),
    [
        ([[1, 0, 0, 2]], [[1, 0, 0, 1]], [[0, 1, 1, 0]], [[1, 1, 2, 2]]),
        ([[5, 0, 0, 0]], [[1, 0, 0, 0]], [[0, 1, 1, 0]], [[5, 5, 5, 0]]),  # the hole-free pixel stays
        ([[0, 0]], [[0, 0]], [[1, 1]], [[0, 0]]),  # nothing known: nothing filled
    ],
)
def test_fill_from_nearest(values: list[list[int]], known: list[list[int]], holes: list[list[int]],
                           expected: list[list[int]]) -> None:
    out = fill_from_nearest(np.array(values, np.uint8), np.array(known, bool), np.array(holes, bool))
    np.testing.assert_array_equal(out, np.array(expected, np.uint8))


def test_person_id_map_higher_score_wins_overlaps() -> None:
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :, :3] = True
    masks[1, :, 2:] = True
    ids = person_id_map(masks, np.array([0.9, 0.5], np.float32), (4, 4))
    np.testing.assert_array_equal(ids[0], [0, 0, 0, 1])


def test_labels_follow_a_moving_square() -> None:
    hw = (90, 160)
    carrier = LabelCarrier(hw)
    box = (30, 40, 60, 70)
    first = textured_frame(hw, box)
    carrier.step(first)
    labels = np.zeros(hw, np.uint8)
    labels[box[0]:box[2], box[1]:box[3]] = 13
    ids = np.full(hw, NO_PERSON, np.int16)
    ids[box[0]:box[2], box[1]:box[3]] = 0
    carrier.adopt(Carried(labels, ids, key_index=0))
    dx = 0
    for step in range(1, 6):  # the square moves 4 px right per frame
        dx = 4 * step
        moved = (box[0], box[1] + dx, box[2], box[3] + dx)
        carrier.step(textured_frame(hw, moved))
    assert carrier.carried is not None and carrier.carried.key_index == 0
    now = carrier.carried.labels == 13
    truth = np.zeros(hw, bool)
    truth[box[0]:box[2], box[1] + dx:box[3] + dx] = True
    iou = (now & truth).sum() / (now | truth).sum()
    stale = np.zeros(hw, bool)
    stale[box[0]:box[2], box[1]:box[3]] = True
    stale_iou = (stale & truth).sum() / (stale | truth).sum()
    assert iou > 0.8 > stale_iou + 0.3, f"carried IoU {iou:.2f}, without flow {stale_iou:.2f}"


def test_clipping_drops_parts_outside_and_fills_new_person_pixels() -> None:
    carrier = LabelCarrier((4, 6))
    labels = np.array([[0, 2, 2, 0, 0, 0]] * 4, np.uint8)
    ids = np.where(labels > 0, 0, NO_PERSON).astype(np.int16)
    carrier.adopt(Carried(labels, ids, key_index=3))
    person = np.array([[0, 0, 1, 1, 1, 0]] * 4, bool)
    clipped = carrier.clipped(person)
    assert clipped is not None and clipped.key_index == 3
    np.testing.assert_array_equal(clipped.labels[0], [0, 0, 2, 2, 2, 0])
    np.testing.assert_array_equal(clipped.person_ids[0], [-1, -1, 0, 0, 0, -1])


def test_tracker_keeps_ids_when_people_swap_score_order() -> None:
    tracker = PersonTracker()
    left = np.full((10, 20), NO_PERSON, np.int16)
    left[:, :8] = 0
    left[:, 12:] = 1
    first = tracker.assign(left, None)
    np.testing.assert_array_equal(first, left)  # first key frame: ids in score order
    # Next key frame: the right person now scores higher (index 0), both moved a little.
    swapped = np.full((10, 20), NO_PERSON, np.int16)
    swapped[:, 1:9] = 1
    swapped[:, 13:] = 0
    second = tracker.assign(swapped, first)
    assert set(np.unique(second[:, 1:9])) == {0} and set(np.unique(second[:, 13:])) == {1}
    # A newcomer in the middle gets a new id.
    third_local = second.copy()
    third_local[:, 9:13] = 2
    third = tracker.assign(np.where(third_local == 2, 2, np.where(third_local == 0, 0, np.where(
        third_local == 1, 1, NO_PERSON))).astype(np.int16), second)
    assert set(np.unique(third[:, 9:13])) == {2}


def test_smoother_cuts_flicker_and_follows_motion() -> None:
    rng = np.random.default_rng(0)
    smoother = AlphaSmoother(rate_still=0.3, motion=0.3)
    base = np.zeros((32, 32), np.float32)
    base[8:24, 8:24] = 1.0
    raw_changes, smooth_changes = [], []
    prev_raw = prev_smooth = None
    for _ in range(30):
        noisy = np.clip(base + rng.normal(0, 0.05, base.shape).astype(np.float32), 0, 1)
        out = smoother(noisy)
        if prev_raw is not None:
            raw_changes.append(np.abs(noisy - prev_raw).mean())
            smooth_changes.append(np.abs(out - prev_smooth).mean())
        prev_raw, prev_smooth = noisy, out
    assert np.mean(smooth_changes) < 0.5 * np.mean(raw_changes)
    moved = np.roll(base, 8, axis=1)
    out = smoother(moved)
    assert out[12, 28] > 0.9 and out[12, 10] < 0.1, "a real move is followed at once, without a ghost"


def _result(value: int) -> ParsingResult:
    return ParsingResult(label_map=np.full((2, 2), value, np.uint8), classes=["a", "b", "c", "d"],
                         person_masks=np.zeros((0, 2, 2), bool), person_scores=np.zeros(0, np.float32))


def test_latest_worker_drops_stale_frames() -> None:
    release = threading.Event()
    seen: list[int] = []

    def parse(frame: np.ndarray) -> ParsingResult:
        seen.append(int(frame[0, 0, 0]))
        release.wait(5)
        return _result(int(frame[0, 0, 0]))

    worker = KeyframeWorker(parse)
    gray = np.zeros((2, 2), np.uint8)
    worker.submit(0, np.zeros((2, 2, 3), np.uint8), gray)
    time.sleep(0.1)
    assert not worker.idle
    for i in (1, 2, 3):
        worker.submit(i, np.full((2, 2, 3), i, np.uint8), gray)
    release.set()
    deadline = time.monotonic() + 5
    while not worker.idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [0, 3] and worker.replaced == 2
    done = worker.poll()
    assert done is not None and done.index == 3 and worker.poll() is None
    worker.close()


def test_ordered_worker_parses_every_frame_and_bounds_its_queue() -> None:
    worker = KeyframeWorker(lambda frame: _result(int(frame[0, 0, 0])), ordered=True, max_pending=1)
    gray = np.zeros((2, 2), np.uint8)
    for i in range(4):
        worker.submit(i * 10, np.full((2, 2, 3), i, np.uint8), gray)
    for i in range(4):
        done = worker.wait_for(i * 10, timeout_s=5)
        assert done is not None and int(done.result.label_map[0, 0]) == i
    assert worker.wait_for(99, timeout_s=0.1) is None  # never submitted: no wait for ever
    worker.close()


def test_a_failing_key_frame_does_not_stop_the_worker() -> None:
    def parse(frame: np.ndarray) -> ParsingResult:
        if frame[0, 0, 0] == 1:
            raise RuntimeError("boom")
        return _result(0)

    worker = KeyframeWorker(parse, ordered=True)
    gray = np.zeros((2, 2), np.uint8)
    worker.submit(1, np.ones((2, 2, 3), np.uint8), gray)
    worker.submit(2, np.zeros((2, 2, 3), np.uint8), gray)
    assert worker.wait_for(1, timeout_s=5) is None
    assert worker.wait_for(2, timeout_s=5) is not None
    assert isinstance(worker.last_error, RuntimeError)
    worker.close()
