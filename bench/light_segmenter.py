"""Light model speed: PersonSegmenter (ONNX Runtime, our ONNX) vs MediaPipe's own ImageSegmenter.

Per frame, end to end (frame in, person probability at frame size out), at 640x360 and
1280x720, for both variants; plus the model alone (``run_model``). One process, pinned to one
core, ONNX Runtime with 1 intra-op thread; the two runtimes alternate in rounds and the medians
are compared, so the ratio holds on a noisy shared machine. The frame is scikit-image's
astronaut resized (a real photo). MediaPipe (the reference) must be installed: make install-dev.

    python bench/light_segmenter.py [--models models] [--rounds 5] [--frames 40] [-o bench/studies/light_segmenter.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from m2fp_export.light.fetch import obtain  # noqa: E402
from m2fp_export.light.reference import MediaPipeReference, version  # noqa: E402
from m2fp_service.segmenter import PersonSegmenter, frame_to_input_u8  # noqa: E402

SIZES = {"640x360": (360, 640), "1280x720": (720, 1280)}
FILES = {"general": "light.onnx", "landscape": "light-landscape.onnx"}


def _per_call_ms(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def measure(models: Path, rounds: int, frames: int, cache_dir: Path | None) -> dict[str, Any]:
    from skimage import data

    photo = data.astronaut()
    results: dict[str, Any] = {}
    for variant, file in FILES.items():
        seg = PersonSegmenter(models / file, intra_op_threads=1)
        ref = MediaPipeReference(obtain(variant, cache_dir=cache_dir).path)
        h, w = seg.input_hw
        x = frame_to_input_u8(photo, (h, w))[None].astype(np.float32) / 255
        cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
        for label, (fh, fw) in SIZES.items():
            frame = cv2.resize(photo, (fw, fh), interpolation=cv2.INTER_AREA)
            out = np.empty((fh, fw), np.float32)
            cases[label] = (partial(seg.run, frame, out=out), partial(ref.segment, frame))
        small = frame_to_input_u8(photo, (h, w))
        cases[f"model only {w}x{h}"] = (partial(seg.run_model, x), partial(ref.segment, small))
        for label, (ours, theirs) in cases.items():
            for fn in (ours, theirs):
                _per_call_ms(fn, 5)  # warm
            ours_ms, ref_ms = [], []
            for _ in range(rounds):
                ours_ms.append(_per_call_ms(ours, frames))
                ref_ms.append(_per_call_ms(theirs, frames))
            o, r = statistics.median(ours_ms), statistics.median(ref_ms)
            results[f"{variant} {label}"] = {"ours_ms": round(o, 2), "mediapipe_ms": round(r, 2),
                                             "speedup": round(r / o, 2)}
        ref.close()
    return results


def markdown(report: dict[str, Any]) -> str:
    lines = ["| variant, frame | ours (ORT, 1 thread) | MediaPipe 1.2 ImageSegmenter | MediaPipe / ours |",
             "|---|---:|---:|---:|"]
    for case, r in report["results"].items():
        lines.append(f"| {case} | {r['ours_ms']:.2f} ms | {r['mediapipe_ms']:.2f} ms | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="folder with light*.onnx")
    parser.add_argument("--cache-dir", type=Path, default=None, help="mediapipe wheel cache (default ~/.cache/m2fp)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=40, help="frames per timed block")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench/studies/light_segmenter.json"))
    args = parser.parse_args()
    cpu = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {cpu})  # one core for both runtimes (MediaPipe's XNNPACK may start threads)
    import onnxruntime

    report = {"what": "person mask per frame, frame in -> probability at frame size out; model only = the "
                      "network on a model-size input (MediaPipe: its pipeline at identity size)",
              "cpu_pinned": cpu, "onnxruntime": onnxruntime.__version__, "mediapipe": version(),
              "load_avg": os.getloadavg(), "rounds": args.rounds, "frames_per_round": args.frames,
              "results": measure(args.models, args.rounds, args.frames, args.cache_dir)}
    emit(report, markdown, args.output)


if __name__ == "__main__":
    main()
