"""``m2fp video`` as users run it: frame count, size, rate and audio kept; the kept region follows the figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from tests.video.conftest import CLIP_FPS, CLIP_FRAMES, CLIP_HW, figure_x


def run_video(*args: str, model: Path | None = None, light: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if model is not None:
        env["M2FP_MODEL"] = str(model)
    if light is not None:
        env["M2FP_LIGHT_MODEL"] = str(light)
    return subprocess.run([sys.executable, "-m", "m2fp_service.cli", "video", *args, "-q"], capture_output=True,
                          text=True, timeout=600, env=env)


def decoded(path: Path) -> tuple[list[np.ndarray], av.container.InputContainer]:
    container = av.open(str(path))
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    container.seek(0)
    return frames, container


def test_blurred_background_keeps_size_rate_frames_audio_and_the_person(
        clip_path: Path, tmp_path: Path, light_models: dict[str, Path]) -> None:
    out = tmp_path / "blurred.mp4"
    proc = run_video(str(clip_path), "-o", str(out), "--background", "blur", "--blur", "15",
                     light=light_models["landscape"])
    assert proc.returncode == 0, proc.stderr
    assert f"{CLIP_FRAMES} frames 640x360 at {CLIP_FPS:g} fps" in proc.stderr
    frames, container = decoded(out)
    with container:
        stream = container.streams.video[0]
        assert len(frames) == CLIP_FRAMES and frames[0].shape == (*CLIP_HW, 3)
        assert float(stream.average_rate) == pytest.approx(CLIP_FPS, rel=0.01)
        assert container.streams.audio and container.streams.audio[0].codec_context.name == "aac"
        audio_s = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
        assert audio_s == pytest.approx(CLIP_FRAMES / CLIP_FPS, abs=0.15)
    source, src_container = decoded(clip_path)
    src_container.close()
    for i in (0, CLIP_FRAMES // 2, CLIP_FRAMES - 1):
        diff = np.abs(frames[i].astype(int) - source[i]).mean(axis=2)
        x0 = figure_x(i)
        person = diff[CLIP_HW[0] - 260:CLIP_HW[0] - 40, x0 + 60:x0 + 160]
        assert np.median(person) < 6, f"frame {i}: the person is kept as she is"
        # The backdrop's horizontal stripes (x // 8) are blurred away everywhere far from her.
        far = diff[:200, x0 + 300:] if x0 + 300 < CLIP_HW[1] - 20 else diff[:200, :max(20, x0 - 80)]
        assert np.mean(far) > 3, f"frame {i}: the background changed"


def test_transparent_webm_has_alpha(clip_path: Path, tmp_path: Path, light_models: dict[str, Path]) -> None:
    out = tmp_path / "cutout.webm"
    proc = run_video(str(clip_path), "-o", str(out), "--background", "transparent",
                     light=light_models["landscape"])
    assert proc.returncode == 0, proc.stderr
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.metadata.get("alpha_mode") == "1"
        decoder = av.CodecContext.create("libvpx-vp9", "r")
        rgba = next(f for packet in container.demux(stream) for f in decoder.decode(packet)).to_ndarray(format="rgba")
    x0 = figure_x(0)
    assert rgba[CLIP_HW[0] - 200, x0 + 105, 3] > 200, "the person is opaque"
    assert rgba[20, -20, 3] < 30, "the scene is transparent"


def test_parts_selection_uses_key_frames(clip_path: Path, tmp_path: Path, light_models: dict[str, Path],
                                         tiny_model_path: Path) -> None:
    out = tmp_path / "largest.mp4"
    proc = run_video(str(clip_path), "-o", str(out), "--keep", "largest", "--background", "#0000ff",
                     "--keyframe-interval", "0.8", model=tiny_model_path, light=light_models["landscape"])
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stderr
    assert "M2FP key frames, parts at most" in proc.stderr
    age = int(proc.stderr.split("parts at most ")[1].split()[0])
    assert age < round(0.8 * CLIP_FPS), "parts are never older than one key-frame interval"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["-o", "{tmp}/x.mp4", "--background", "transparent"], 2, "alpha channel"),
    (["-o", "{tmp}/x.mp4", "--keep", "classes:nose"], 2, "unknown class"),
    (["-o", "{tmp}/x.mp4", "--background", "{tmp}/missing.jpg"], 2, "missing.jpg"),
    (["-o", "{tmp}/x.gif"], 2, "use one of"),
])
def test_bad_options(clip_path: Path, tmp_path: Path, light_models: dict[str, Path], args: list[str], code: int,
                     message: str) -> None:
    proc = run_video(str(clip_path), *[a.format(tmp=tmp_path) for a in args], light=light_models["landscape"])
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*partial*")), "nothing half-written"


def test_unreadable_input_and_missing_light_model(tmp_path: Path, light_models: dict[str, Path]) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"junk" * 100)
    proc = run_video(str(bad), "-o", str(tmp_path / "o.mp4"), light=light_models["landscape"])
    assert proc.returncode == 1 and "cannot open" in proc.stderr
    proc = run_video(str(bad), "-o", str(tmp_path / "o.mp4"), light=tmp_path / "none.onnx")
    assert proc.returncode == 1 and "export-light" in proc.stderr
