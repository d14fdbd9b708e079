"""Video and live: `m2fp video` frames per second, flicker, and the live round trip on loopback.

1. ``m2fp video`` (a real child process) on generated clips — the astronaut walking across a
   striped scene, 10 s at 25 fps — at 1280x720 and 640x360 with a blurred background (the light
   model only), and at 720p keeping the largest person (M2FP key frames every 2 s, fast input
   profile). Frames per second = frames / the command's own processing time; CPU seconds per
   frame from the child's rusage; the oldest parts used, in frames.
2. Flicker on a still scene (one frame repeated with camera-like noise, sigma 3): the mean alpha
   change between consecutive frames, the light model raw vs the service's temporal smoothing.
3. Live: a real `m2fp serve`; a WebSocket client sends 640x360 JPEG frames with two in flight for
   ``--live-seconds``; round trip per answered frame (send -> picture received), p50 and p95.

Writes bench/results/video.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, BusyMeter, ensure_models, loadavg, models, stats, write_json  # noqa: E402

LIGHT = {"general": ROOT / "models" / "light.onnx", "landscape": ROOT / "models" / "light-landscape.onnx"}
FPS = 25


def ensure_light() -> None:
    for variant, path in LIGHT.items():
        if not path.is_file():
            subprocess.run([sys.executable, "-m", "m2fp_service.cli", "export-light", "--variant", variant, "-o",
                            str(path)], check=True, cwd=ROOT)


def person() -> np.ndarray:
    """The astronaut's head and shoulders, (300, 210, 3) uint8."""
    from skimage import data

    return cv2.resize(data.astronaut()[:, 60:420], (210, 300), interpolation=cv2.INTER_AREA)


def scene(index: int, figure: np.ndarray, hw: tuple[int, int] = (360, 640)) -> np.ndarray:
    """A striped backdrop and a floor, the figure moving 4 px per frame (bouncing), at ``hw``."""
    h, w = 360, 640
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.dstack([90 + 80 * ((xx // 5) % 2), (140 + yy // 6) % 256, np.full_like(xx, 170)]).astype(np.uint8)
    frame[250:] = (70, 110, 60)
    travel = w - figure.shape[1] - 80
    x0 = 40 + abs((4 * index) % (2 * travel) - travel)
    frame[h - figure.shape[0]:, x0:x0 + figure.shape[1]] = figure
    return frame if hw == (h, w) else cv2.resize(frame, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def make_clip(path: Path, hw: tuple[int, int], frames: int) -> Path:
    import av

    figure = person()
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"crf": "20", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = hw[1], hw[0], "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(scene(i, figure, hw), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def run_video(clip: Path, out: Path, *extra: str, model: Path | None = None) -> dict[str, Any]:
    """One `m2fp video` child process: its reported frames/s, CPU seconds per frame, parts age."""
    env = {**os.environ, "M2FP_LIGHT_MODEL": str(LIGHT["general"]),
           "M2FP_LIGHT_MODEL_LANDSCAPE": str(LIGHT["landscape"])}
    if model is not None:
        env["M2FP_MODEL"] = str(model)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    meter = BusyMeter()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "m2fp_service.cli", "video", str(clip), "-o", str(out), "-q", *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"m2fp video failed: {proc.stderr[-2000:]}")
    line = proc.stderr.strip().splitlines()[-1]
    frames = int(re.search(r": (\d+) frames", line).group(1))  # type: ignore[union-attr]
    fps = float(re.search(r"\(([\d.]+) frames/s\)", line).group(1))  # type: ignore[union-attr]
    age = re.search(r"parts at most (\d+) frames old", line)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"frames": frames, "fps": fps, "wall_s": round(wall, 2), "cpu_ms_per_frame": round(cpu / frames * 1000, 1),
            "max_parts_age_frames": int(age.group(1)) if age else None, "other_cores": round(meter.other_cores(), 2),
            "summary": line}


def flicker(frames: int = 40) -> dict[str, float]:
    """Mean |alpha(t) - alpha(t-1)| on a still, noisy scene: raw light model vs smoothed."""
    from m2fp_service import labelsets
    from m2fp_service.imaging.compose import ComposeOptions
    from m2fp_service.outputs import ComposeSpec
    from m2fp_service.segmenter import FrameSegmenter
    from m2fp_service.video.processor import FrameProcessor, VideoOptions

    base = scene(20, person()).astype(np.float32)
    rng = np.random.default_rng(0)
    still = [np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8) for _ in range(frames)]
    segmenter = FrameSegmenter(LIGHT["general"], LIGHT["landscape"])
    out = {}
    for smoothing in (False, True):
        spec = ComposeSpec(options=ComposeOptions(mode="blur"))
        processor = FrameProcessor(segmenter, VideoOptions(spec=spec, labels=labelsets.label_set("cihp"),
                                                           smoothing=smoothing), FPS)
        alphas = [processor.process(i, f).alpha for i, f in enumerate(still)]
        changes = [float(np.abs(a - b).mean()) for a, b in zip(alphas[:-1], alphas[1:], strict=True)]
        out["smoothed" if smoothing else "raw"] = float(np.mean(changes))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def live_round_trip(model: Path, seconds: float) -> dict[str, Any]:
    """Round trips of 640x360 JPEG frames through a real server's /api/live (two frames in flight)."""
    import requests
    from websockets.sync.client import connect

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("M2FP_")},
           "M2FP_LIGHT_MODEL": str(LIGHT["general"]), "M2FP_LIGHT_MODEL_LANDSCAPE": str(LIGHT["landscape"])}
    log = Path(tempfile.gettempdir()) / f"m2fp-live-bench-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "m2fp_service.cli", "serve", "--model", str(model), "--port",
                                 str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        figure = person()
        jpegs = []
        for i in range(50):
            buf = io.BytesIO()
            Image.fromarray(scene(i, figure)).save(buf, format="JPEG", quality=80)
            jpegs.append(buf.getvalue())
        sent: dict[int, float] = {}
        rtts: list[float] = []
        meter = BusyMeter()
        with connect(f"ws://127.0.0.1:{port}/api/live?mode=blur&format=jpeg", max_size=2**24) as ws:
            assert json.loads(ws.recv())["type"] == "ready"
            count = 0
            header: dict[str, Any] = {}
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end or sent:
                while len(sent) < 2 and time.monotonic() < t_end:
                    sent[count] = time.perf_counter()
                    ws.send(jpegs[count % len(jpegs)])
                    count += 1
                message = ws.recv()
                if isinstance(message, str):
                    header = json.loads(message)
                    continue
                answered = header["seq"] + header["dropped"]
                rtts.append((time.perf_counter() - sent[answered]) * 1000)
                for k in [k for k in sent if k <= answered]:
                    del sent[k]
            dropped = header.get("dropped", 0)
        return {"frames_sent": count, "answered": len(rtts), "dropped": dropped,
                "answered_per_s": round(len(rtts) / seconds, 1), "rtt_ms": stats(rtts),
                "p50_ms": float(np.percentile(rtts, 50)), "p95_ms": float(np.percentile(rtts, 95)),
                "other_cores": round(meter.other_cores(), 2)}
    finally:
        proc.terminate()
        proc.wait(30)
        log.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--live-seconds", type=float, default=20.0)
    args = ap.parse_args()
    ensure_light()
    m = models(args.quick)
    ensure_models(m, log=lambda s: print(s, file=sys.stderr, flush=True))
    frames = 75 if args.quick else 250
    result: dict[str, Any] = {"loadavg_before": loadavg(), "fps_in": FPS, "frames": frames, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="m2fp-video-bench-") as tmp:
        work = Path(tmp)
        for name, hw in (("720p", (720, 1280)), ("360p", (360, 640))):
            clip = make_clip(work / f"{name}.mp4", hw, frames)
            print(f"== video {name} blur", file=sys.stderr, flush=True)
            result["runs"][f"{name} blur"] = run_video(clip, work / f"{name}-blur.mp4", "--background", "blur")
        print("== video 720p keep=largest (M2FP key frames)", file=sys.stderr, flush=True)
        result["runs"]["720p largest"] = run_video(work / "720p.mp4", work / "720p-largest.mp4", "--keep", "largest",
                                                   "--background", "blur", model=m.fp32)
    print("== flicker", file=sys.stderr, flush=True)
    result["flicker"] = flicker()
    print("== live round trip", file=sys.stderr, flush=True)
    result["live"] = live_round_trip(m.fp32, 8.0 if args.quick else args.live_seconds)
    result["loadavg_after"] = loadavg()
    write_json("video", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
