"""``process_video``'s pipeline (reader -> frame loop -> composer): an error in any stage ends the run
with that error, no thread left running and nothing written under either output name."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
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


def decode(path: Path) -> tuple[list[np.ndarray], int]:
    """The frames (RGB) and the number of audio packets of a file."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = sum(1 for p in container.demux(audio=0) if p.size)
    return frames, audio


def test_every_frame_goes_through_in_order(clip_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    report = process_video(clip_path, out, FailingSegmenter(None), options("blur"), progress=False)
    assert report.frames == CLIP_FRAMES and out.is_file()
    assert report.step_seconds["compose"] > 0 and report.step_seconds["matte"] > 0
    assert pipeline_threads() == []
    source, source_audio = decode(clip_path)
    written, written_audio = decode(out)
    assert len(written) == len(source) == CLIP_FRAMES
    assert source_audio > 0 and written_audio == report.audio_packets >= source_audio - 2
    # The kept box (the segmenter's centre square) shows the frame's own pixels, the walking figure
    # included: each written frame matches its own source frame, not a neighbour.
    crop = (slice(110, 250), slice(200, 440))
    def diff(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a[crop].astype(int) - b[crop]).mean())
    assert all(diff(w, s) < 4 for w, s in zip(written, source, strict=True))
    shifted = [diff(written[i], source[i + 3]) for i in range(CLIP_FRAMES - 3)]
    assert max(shifted) > 8, "the figure must cross the box, or the order could not be told"


def test_a_reader_stage_error_ends_the_run(clip_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="segmenter failed on frame 7"):
        process_video(clip_path, out, FailingSegmenter(7), options("blur"), progress=False)
    assert list(tmp_path.iterdir()) == []
    assert pipeline_threads() == []


class BrokenSegmenter(FailingSegmenter):
    """Gives a probability map of no size on frame 5: the frame loop's matte step fails on it."""

    def run_small(self, frame_rgb: np.ndarray) -> np.ndarray:
        prob = super().run_small(frame_rgb)
        return prob[:0] if self.calls == 6 else prob


def test_a_frame_loop_error_ends_the_run(clip_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(cv2.error):
        process_video(clip_path, out, BrokenSegmenter(None), options("blur"), progress=False)
    assert list(tmp_path.iterdir()) == []
    assert pipeline_threads() == []


def test_a_composer_error_ends_the_run(clip_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    empty_backdrop = np.zeros((0, 0, 3), np.uint8)  # cannot be scaled to cover a frame (in the composer)
    with pytest.raises(ZeroDivisionError):
        process_video(clip_path, out, FailingSegmenter(None), options("image"), background_rgb=empty_backdrop,
                      progress=False)
    assert list(tmp_path.iterdir()) == []
    assert pipeline_threads() == []
