"""Reading and writing video with PyAV: size, frame rate, frame count and audio survive a round trip."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from m2fp_service.errors import InvalidParameter
from m2fp_service.video.io import AudioPacket, Frame, VideoError, VideoReader, VideoWriter, output_kind
from tests.video.conftest import CLIP_FPS, CLIP_FRAMES, CLIP_HW


def copy_through(source: Path, target: Path, alpha: bool = False) -> tuple[int, int]:
    reader = VideoReader(source)
    writer = VideoWriter(target, reader.info, alpha=alpha, audio_stream=reader.audio)
    frames = audio = 0
    for item in reader:
        if isinstance(item, Frame):
            image = item.rgb if not alpha else np.dstack([item.rgb, np.full(item.rgb.shape[:2], 128, np.uint8)])
            writer.write(image, item.pts, item.index)
            frames += 1
        elif isinstance(item, AudioPacket):
            writer.write_audio(item.packet)
            audio += 1
    writer.close()
    reader.close()
    return frames, audio


def test_reader_sees_the_clip(clip_path: Path) -> None:
    reader = VideoReader(clip_path)
    info = reader.info
    assert (info.height, info.width) == CLIP_HW and info.fps == CLIP_FPS and info.has_audio
    items = list(reader)
    reader.close()
    frames = [i for i in items if isinstance(i, Frame)]
    assert len(frames) == CLIP_FRAMES and [f.index for f in frames] == list(range(CLIP_FRAMES))
    assert frames[0].rgb.shape == (*CLIP_HW, 3) and frames[0].rgb.dtype == np.uint8
    assert sum(isinstance(i, AudioPacket) for i in items) > 10


@pytest.mark.parametrize(("suffix", "alpha", "codec", "audio_codec"), [
    (".mp4", False, "h264", "aac"),
    (".mkv", False, "h264", "aac"),
    (".webm", False, "vp9", "opus"),  # AAC does not go in WebM: re-encoded
    (".webm", True, "vp9", "opus"),
    (".mov", True, "prores", "aac"),
])
def test_round_trip_keeps_size_rate_frames_and_audio(clip_path: Path, tmp_path: Path, suffix: str, alpha: bool,
                                                     codec: str, audio_codec: str) -> None:
    target = tmp_path / f"out{suffix}"
    frames, audio = copy_through(clip_path, target, alpha)
    assert frames == CLIP_FRAMES and audio > 10
    with av.open(str(target)) as c:
        v = c.streams.video[0]
        assert v.codec_context.name == codec
        assert (v.codec_context.height, v.codec_context.width) == CLIP_HW
        assert float(v.average_rate or v.guessed_rate) == pytest.approx(CLIP_FPS, rel=0.01)
        assert c.streams.audio and c.streams.audio[0].codec_context.name == audio_codec
        if suffix == ".webm":  # FFmpeg's own VP9 decoder ignores the alpha side channel; libvpx reads it
            assert v.metadata.get("alpha_mode") == ("1" if alpha else None)
            decoder = av.CodecContext.create("libvpx-vp9", "r")
            decoded = [f for packet in c.demux(v) for f in decoder.decode(packet)]
        else:
            decoded = [f for f in c.decode(video=0)]
        assert len(decoded) == CLIP_FRAMES
        if alpha:
            rgba = decoded[5].to_ndarray(format="rgba")
            assert abs(int(np.median(rgba[..., 3])) - 128) <= 3, "the alpha channel survives"


def test_png_frames_folder(clip_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "frames"
    frames, _ = copy_through(clip_path, target, alpha=True)
    files = sorted(target.glob("frame_*.png"))
    assert len(files) == frames == CLIP_FRAMES
    from PIL import Image

    with Image.open(files[0]) as im:
        assert im.mode == "RGBA" and im.size == (CLIP_HW[1], CLIP_HW[0])


def test_alpha_needs_a_container_with_alpha(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameter, match="alpha channel"):
        output_kind(tmp_path / "x.mp4", alpha=True)
    with pytest.raises(InvalidParameter, match="use one of"):
        output_kind(tmp_path / "x.gif", alpha=False)
    assert output_kind(tmp_path / "x.webm", alpha=True) == ".webm"
    assert output_kind(tmp_path / "folder", alpha=False) == "frames"


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100])
def test_unreadable_input(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match="cannot open"):
        VideoReader(path)


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="cannot open"):
        VideoReader(tmp_path / "nope.mp4")
