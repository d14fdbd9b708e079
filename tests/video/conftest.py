"""A generated clip: the astronaut (a real person) walking across a scene, with a sine-tone soundtrack."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

CLIP_HW = (360, 640)
CLIP_FPS = 25
CLIP_FRAMES = 40


def figure_x(index: int) -> int:
    """Left edge of the figure in frame ``index`` (it moves 6 px per frame)."""
    return 40 + 6 * index


def scene(index: int, person: np.ndarray) -> np.ndarray:
    """(360, 640, 3) uint8: a still backdrop with the person pasted at ``figure_x(index)``."""
    h, w = CLIP_HW
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = 80 * ((xx // 5) % 2)  # fine vertical stripes: a blur visibly removes them
    frame = np.dstack([90 + stripes, (140 + yy // 6) % 256, np.full_like(xx, 170)]).astype(np.uint8)
    frame[250:, :] = (70, 110, 60)  # a floor
    ph, pw = person.shape[:2]
    x0 = figure_x(index)
    frame[h - ph:, x0:x0 + pw] = person
    return frame


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory: pytest.TempPathFactory, person_cutout: np.ndarray) -> Path:
    """An H.264 + AAC .mp4 of CLIP_FRAMES frames at CLIP_FPS, 640 x 360, with a 440 Hz tone."""
    import av

    path = tmp_path_factory.mktemp("clips") / "walk.mp4"
    with av.open(str(path), mode="w") as out:
        video = out.add_stream("libx264", rate=CLIP_FPS, options={"crf": "18", "preset": "veryfast"})
        video.width, video.height, video.pix_fmt = CLIP_HW[1], CLIP_HW[0], "yuv420p"
        audio = out.add_stream("aac", rate=48000)
        audio.layout = "stereo"  # type: ignore[union-attr]
        for i in range(CLIP_FRAMES):
            frame = av.VideoFrame.from_ndarray(scene(i, person_cutout), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
        samples = 48000 * CLIP_FRAMES // CLIP_FPS
        t = np.arange(samples) / 48000
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = tone[start:start + 1024]
            frame = av.AudioFrame.from_ndarray(np.stack([chunk, chunk]), format="fltp", layout="stereo")
            frame.sample_rate = 48000
            frame.pts = start
            frame.time_base = Fraction(1, 48000)
            for packet in audio.encode(frame):
                out.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                out.mux(packet)
    return path
