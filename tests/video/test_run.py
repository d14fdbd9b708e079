"""``process_video``'s pipeline (reader -> frame loop -> composer): an error in any stage ends the run
with that error, no thread left running and nothing written under either output name."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from m2fp_service.imaging.compose import ComposeOptions
from m2fp_service.outputs import ComposeSpec
from m2fp_service.video.processor import VideoOptions
from m2fp_service.video.run import process_video
from tests.video.conftest import CLIP_FRAMES


class FailingSegmenter:
    """Person probability of a centred box; raises on frame ``fail_at`` (counted from 0)."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at, self.calls = fail_at, 0

    def run_small(self, frame_rgb: np.ndarray) -> np.ndarray:
        if self.calls == self.fail_at:
            raise RuntimeError(f"segmenter failed on frame {self.calls}")
        self.calls += 1
        prob = np.zeros((64, 64), np.float32)
        prob[16:48, 16:48] = 1.0
        return prob


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("m2fp-video")]


def options(mode: str) -> VideoOptions:
    return VideoOptions(spec=ComposeSpec(options=ComposeOptions(mode=mode)))  # type: ignore[arg-type]


def test_every_frame_goes_through_in_order(clip_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    report = process_video(clip_path, out, FailingSegmenter(None), options("blur"), progress=False)
    assert report.frames == CLIP_FRAMES and out.is_file()
    assert report.step_seconds["compose"] > 0 and report.step_seconds["matte"] > 0
    assert pipeline_threads() == []


def test_a_reader_stage_error_ends_the_run(clip_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="segmenter failed on frame 7"):
        process_video(clip_path, out, FailingSegmenter(7), options("blur"), progress=False)
    assert list(tmp_path.iterdir()) == []
    assert pipeline_threads() == []


def test_a_composer_error_ends_the_run(clip_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    empty_backdrop = np.zeros((0, 0, 3), np.uint8)  # cannot be scaled to cover a frame
    with pytest.raises(Exception):  # noqa: B017 - OpenCV's own error type
        process_video(clip_path, out, FailingSegmenter(None), options("image"), background_rgb=empty_backdrop,
                      progress=False)
    assert list(tmp_path.iterdir()) == []
    assert pipeline_threads() == []
