"""Reading and writing video files with PyAV (FFmpeg): frames as RGB arrays, audio kept.

``VideoReader`` demuxes video and audio together, so the audio packets can be written to the
output as they are (or re-encoded when the output container cannot hold their codec).
``VideoWriter`` picks the encoder from the output name: ``.mp4``/``.mkv``/``.mov`` H.264,
``.webm`` VP9 (with an alpha channel for transparent output), ``.mov`` with alpha ProRes 4444, or
a folder of PNG frames (RGBA when transparent).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from m2fp_service.errors import InvalidParameter

log = logging.getLogger("m2fp.video")

ALPHA_SUFFIXES = (".webm", ".mov")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".mov", ".webm")


class VideoError(Exception):
    """The input cannot be read or the output cannot be written."""


@dataclass(frozen=True)
class VideoInfo:
    """What the input says about itself."""

    width: int
    height: int
    fps: float
    rate: Fraction
    frames: int  # 0 when the container does not say
    time_base: Fraction
    has_audio: bool
    audio_codec: str | None


@dataclass(frozen=True)
class Frame:
    """A decoded frame: index in decode order, (H, W, 3) uint8 RGB, presentation time stamp."""

    index: int
    rgb: np.ndarray
    pts: int | None


@dataclass(frozen=True)
class AudioPacket:
    packet: Any  # av.Packet


class VideoReader:
    """Frames (RGB) and audio packets of a video file, in file order."""

    def __init__(self, path: Path) -> None:
        try:
            self.container = av.open(str(path))
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot open {path}: {exc}") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{path} has no video stream")
        self.video = self.container.streams.video[0]
        self.video.thread_type = "AUTO"
        self.audio = self.container.streams.audio[0] if self.container.streams.audio else None
        rate = self.video.average_rate or self.video.guessed_rate or Fraction(25)
        self.info = VideoInfo(
            width=self.video.codec_context.width, height=self.video.codec_context.height, fps=float(rate),
            rate=Fraction(rate), frames=int(self.video.frames or 0),
            time_base=Fraction(self.video.time_base or Fraction(1, 90000)), has_audio=self.audio is not None,
            audio_codec=self.audio.codec_context.name if self.audio is not None else None,
        )

    def __iter__(self) -> Iterator[Frame | AudioPacket]:
        streams = [s for s in (self.video, self.audio) if s is not None]
        index = 0
        try:
            for packet in self.container.demux(*streams):
                if packet.stream is self.video:
                    for frame in packet.decode():
                        if isinstance(frame, av.VideoFrame):
                            yield Frame(index, frame.to_ndarray(format="rgb24"), frame.pts)
                            index += 1
                elif packet.dts is not None:  # the demuxer's final flush packets carry no data
                    yield AudioPacket(packet)
        except av.FFmpegError as exc:
            raise VideoError(f"the input is damaged after frame {index}: {exc}") from None

    def close(self) -> None:
        self.container.close()


def output_kind(path: Path, alpha: bool) -> str:
    """``frames`` (a folder of PNGs), or the container suffix; refuses alpha in a container without it."""
    suffix = path.suffix.lower()
    if not suffix or path.is_dir():
        return "frames"
    if suffix not in VIDEO_SUFFIXES:
        raise InvalidParameter(f"output {path.name}: use one of {', '.join(VIDEO_SUFFIXES)} or a folder for PNG frames")
    if alpha and suffix not in ALPHA_SUFFIXES:
        raise InvalidParameter(
            f"a transparent background needs an output with an alpha channel: .webm (VP9), .mov (ProRes 4444) "
            f"or a folder of PNG frames, not {suffix}"
        )
    return suffix


class VideoWriter:
    """Encodes RGB(A) frames at the input's size and frame rate, and carries its audio."""

    video: av.VideoStream

    def __init__(self, path: Path, info: VideoInfo, *, alpha: bool, audio_stream: Any | None = None,
                 crf: int = 20, preset: str = "veryfast") -> None:
        self.path = path
        self.kind = output_kind(path, alpha)
        self.alpha = alpha
        self.frames_written = 0
        self.audio_packets = 0
        self._audio_out: Any | None = None
        self._audio_transcoder: Any | None = None
        self.container: Any | None = None
        if self.kind == "frames":
            path.mkdir(parents=True, exist_ok=True)
            if audio_stream is not None:
                log.warning("PNG frames carry no audio: the input's audio is not written")
            return
        try:
            self.container = av.open(str(path), mode="w")
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot write {path}: {exc}") from None
        if self.kind == ".webm":
            codec, pix_fmt, options = "libvpx-vp9", "yuva420p" if alpha else "yuv420p", {
                "crf": str(crf + 12), "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}
        elif alpha:  # .mov with alpha
            codec, pix_fmt, options = "prores_ks", "yuva444p10le", {"profile": "4"}
        else:
            codec, pix_fmt, options = "libx264", "yuv420p", {"crf": str(crf), "preset": preset}
        stream = self.container.add_stream(codec, rate=info.rate, options=options)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = info.width, info.height, pix_fmt
        stream.time_base = info.time_base
        stream.thread_type = "AUTO"
        self.video = stream
        self._rgb_format = "rgba" if alpha else "rgb24"
        if audio_stream is not None:
            self._add_audio(audio_stream)

    def _add_audio(self, audio_stream: Any) -> None:
        """Copies the input's audio codec when the container takes it, else re-encodes (AAC / Opus)."""
        assert self.container is not None
        name = audio_stream.codec_context.name
        fits = {".webm": {"opus", "vorbis"}, ".mp4": {"aac", "mp3", "opus", "ac3", "alac"},
                ".m4v": {"aac", "mp3", "ac3"}}.get(self.kind)
        if fits is None or name in fits:
            self._audio_out = self.container.add_stream_from_template(audio_stream)
        else:
            encoder = "libopus" if self.kind == ".webm" else "aac"
            self._audio_out = self.container.add_stream(encoder, rate=audio_stream.codec_context.sample_rate or 48000)
            self._audio_transcoder = audio_stream
            log.info("re-encoding %s audio as %s for %s", name, encoder, self.kind)

    def write(self, image: np.ndarray, pts: int | None, index: int) -> None:
        """One output frame: (H, W, 3) RGB or (H, W, 4) RGBA uint8."""
        if self.kind == "frames":
            import cv2

            code = cv2.COLOR_RGBA2BGRA if image.shape[2] == 4 else cv2.COLOR_RGB2BGR
            if not cv2.imwrite(str(self.path / f"frame_{index:06d}.png"), cv2.cvtColor(image, code)):
                raise VideoError(f"cannot write frames into {self.path}")
            self.frames_written += 1
            return
        assert self.container is not None
        if self.alpha and image.shape[2] == 3:
            image = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
        frame = av.VideoFrame.from_ndarray(image[..., :4] if self.alpha else image[..., :3], format=self._rgb_format)
        frame.pts = pts if pts is not None else index
        frame.time_base = self.video.time_base
        for packet in self.video.encode(frame):
            self.container.mux(packet)
        self.frames_written += 1

    def write_audio(self, packet: Any) -> None:
        if self._audio_out is None or self.container is None:
            return
        if self._audio_transcoder is not None:
            for frame in packet.decode():
                frame.pts = None
                for out in self._audio_out.encode(frame):
                    self.container.mux(out)
        else:
            packet.stream = self._audio_out
            self.container.mux(packet)
        self.audio_packets += 1

    def close(self) -> None:
        if self.container is None:
            return
        for packet in self.video.encode(None):
            self.container.mux(packet)
        if self._audio_transcoder is not None and self._audio_out is not None:
            for packet in self._audio_out.encode(None):
                self.container.mux(packet)
        self.container.close()
        self.container = None
