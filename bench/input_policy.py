"""Input-size policy: dynamic reference sizes vs fixed canvases, speed and agreement.

Times ONNX Runtime on the same 720p photo prepared three ways and compares each label map with
the one from the reference policy (short edge 640, long edge <= 1333, pad to 32):
- dynamic: the reference size itself (640x1138 -> 640x1152 padded);
- fixed 1344x1344 canvas: holds any aspect ratio at the reference scale;
- fixed 640x640 canvas: letterbox with the long edge at 640 (what a single small canvas gives).

Usage: python bench/input_policy.py --model models/m2fp-bench.onnx [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from m2fp_service.engine import ParsingEngine
from m2fp_service.imaging import postprocess
from m2fp_service.imaging.preprocess import PreprocessMeta, prepare


def photo_720p() -> np.ndarray:
    from skimage import data

    a = data.astronaut()
    pair = np.concatenate([a, a[:, ::-1]], axis=1)
    return np.asarray(Image.fromarray(pair).resize((1280, 720), Image.Resampling.BILINEAR))


def fixed_canvas(image: np.ndarray, canvas: int, pad: tuple[float, float, float]) -> tuple[np.ndarray, PreprocessMeta]:
    """Letterbox into a canvas x canvas input, long edge = min(canvas, reference long edge)."""
    h, w = image.shape[:2]
    scale = min(canvas / max(h, w), 1333 / max(h, w), 640 / min(h, w))
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BILINEAR))
    x = np.empty((1, 3, canvas, canvas), np.float32)
    x[0] = np.asarray(pad, np.float32)[:, None, None]
    x[0, :, :rh, :rw] = resized.transpose(2, 0, 1)
    return x, PreprocessMeta((h, w), (rh, rw), (canvas, canvas))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/input_policy.json"))
    args = ap.parse_args()
    engine = ParsingEngine(args.model, intra_op_threads=2)
    card = engine.card
    image = photo_720p()
    policies = {
        "dynamic (reference size)": prepare(image, card.input_policy),
        "fixed 1344x1344 canvas": fixed_canvas(image, 1344, card.input_policy.pad_rgb),
        "fixed 640x640 canvas": fixed_canvas(image, 640, card.input_policy.pad_rgb),
    }
    rows, reference_labels = [], None
    for name, (x, meta) in policies.items():
        engine.run(x)  # warm this shape
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            raw = engine.run(x)
            times.append(time.perf_counter() - t)
        result = postprocess.to_result(raw.class_logits, raw.mask_logits, meta, replace(card.inference),
                                       card.classes, mode="exact")
        if reference_labels is None:
            reference_labels = result.label_map
        rows.append({"policy": name, "input_hw": list(x.shape[2:]), "infer_s": statistics.median(times),
                     "agreement_with_reference_policy": float((result.label_map == reference_labels).mean()),
                     "people": result.num_people, "classes": len(result.class_areas())})
    base = rows[0]["infer_s"]
    print("| policy | input | infer (s) | vs dynamic | label agreement with reference policy |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['input_hw'][1]}x{r['input_hw'][0]} | {r['infer_s']:.2f} | "
              f"{r['infer_s'] / base:.2f}x | {r['agreement_with_reference_policy']:.4f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"trained": card.trained, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
