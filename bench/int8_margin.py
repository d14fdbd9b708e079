"""Where the INT8 model's labels differ from FP32's, by how close FP32's own decision was.

The exporter's INT8 check asks >= 99% label agreement with FP32; on the untrained "confident" weights
here the bench models agree on 85-90% of the check images' pixels. The README puts that down to
near-ties: untrained weights give class probability maps that are nearly equal at most pixels, so
INT8's rounding tips many of them. This study measures it instead of saying it. For each image it
takes FP32's **margin** at every pixel: its winning class's pasted probability minus the runner-up's
(absent classes count 0), from the class maps that the post-processing (OpenCV/numpy path, ``exact``;
both models' label maps from that path) votes over, recorded as it votes them; then INT8's agreement
with FP32 per margin bin, and how the margins of all pixels and of the disagreeing pixels are spread.
With trained weights the same figures tell how much of a shortfall falls on genuinely uncertain pixels.

Images: the exporter's two check images and the benchmark photo at the size the network sees it (720p
resized to 1138x640, as the service does). Sessions as the exporter's check makes them
(``m2fp_export.check.session``: the fused kernel when built).

Usage::

    python bench/int8_margin.py [--out bench/studies/int8_margin.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PADDED_720P, emit, ensure_models, machine, models, photo_at  # noqa: E402

# Margin bins (FP32's winner minus runner-up, probabilities in [0, 1]).
EDGES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0 + 1e-6)


def class_maps(class_logits: np.ndarray, mask_logits: np.ndarray, hw: tuple[int, int], padded_hw: tuple[int, int],
               settings: Any, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the label map, (num_parsing, H, W) float32 class probability maps) of one image's raw outputs, from
    ``to_result``'s OpenCV/numpy path with its ``vote`` recorded (a class never voted is all 0). Raises
    AssertionError if the maps' argmax is not the label map (the recording missed something)."""
    from m2fp_service.imaging import postprocess
    from m2fp_service.imaging.preprocess import PreprocessMeta

    maps = np.zeros((settings.num_parsing, *hw), np.float32)
    voting = postprocess.vote

    def recorded(prob: np.ndarray, class_id: int, best: np.ndarray, label_map: np.ndarray, kernel: Any = None) -> None:
        maps[class_id] = postprocess.resize_bilinear(prob, best.shape)
        voting(prob, class_id, best, label_map, kernel)

    postprocess.vote = recorded
    try:
        result = postprocess.to_result(class_logits, mask_logits, PreprocessMeta(hw, hw, padded_hw), settings,
                                       classes, mode="exact", kernel=None)
    finally:
        postprocess.vote = voting
    assert np.array_equal(maps.argmax(0), result.label_map), "the recorded class maps do not give the label map"
    return result.label_map, maps


def margins(maps: np.ndarray) -> np.ndarray:
    """(H, W) winner minus runner-up of (C, H, W) class maps."""
    top = np.partition(maps, maps.shape[0] - 2, axis=0)[-2:]
    return top[1] - top[0]  # type: ignore[no-any-return]


def by_margin(margin: np.ndarray, agree: np.ndarray) -> list[dict[str, Any]]:
    """Per bin of ``EDGES``: its share of the pixels and the agreement inside it (None for an empty bin)."""
    rows = []
    for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
        inside = (margin >= lo) & (margin < hi)
        n = int(inside.sum())
        rows.append({"margin_from": lo, "margin_to": min(hi, 1.0), "pixels": n, "share": n / margin.size,
                     "agreement": float(agree[inside].mean()) if n else None})
    return rows


def study(images: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    from m2fp_export import check
    from m2fp_service.engine import read_card

    m = models()
    ensure_models(m, log=lambda line: print(line, file=sys.stderr))
    card = read_card(m.fp32)
    quantization = read_card(m.int8).exporter.get("quantization", {})
    settings, classes = card.inference, card.parsing_classes
    fp32, int8 = check.onnx_runner(check.session(m.fp32)), check.onnx_runner(check.session(m.int8))
    out = []
    for name, image in images:
        hw = (int(image.shape[0]), int(image.shape[1]))
        want, got = fp32(image), int8(image)
        padded_hw = (want["mask_logits"].shape[2] * 4, want["mask_logits"].shape[3] * 4)
        labels, maps = class_maps(want["class_logits"][0], want["mask_logits"][0], hw, padded_hw, settings, classes)
        int8_labels = class_maps(got["class_logits"][0], got["mask_logits"][0], hw, padded_hw, settings, classes)[0]
        agree = int8_labels == labels
        margin = margins(maps)
        out.append({
            "image": name, "hw": list(hw), "agreement": float(agree.mean()),
            "margin_quantiles": {f"p{q}": float(np.percentile(margin, q)) for q in (10, 25, 50, 75, 90)},
            "disagreeing_margin_quantiles": ({f"p{q}": float(np.percentile(margin[~agree], q)) for q in (50, 90, 99)}
                                             if (~agree).any() else {}),
            "bins": by_margin(margin, agree),
        })
        print(f"{name}: agreement {agree.mean():.2%}, median margin {np.median(margin):.4f}", file=sys.stderr)
    return {"machine": machine(), "models": {"fp32": str(m.fp32.name), "int8": str(m.int8.name)},
            "int8_keep_fp32": quantization.get("preset", {}).get("keep_fp32"),
            "int8_first_attempt": quantization.get("first_attempt"),
            "weights": "untrained confident weights (seed 0): a consistency figure, not a quality figure",
            "images": out}


def markdown(report: dict[str, Any]) -> str:
    lines = ["INT8 vs FP32 label agreement by FP32's margin (winner minus runner-up class probability); "
             + report["weights"], ""]
    head = "| image | all pixels | " + " | ".join(
        f"margin {b['margin_from']:g}–{b['margin_to']:g}" for b in report["images"][0]["bins"]) + " |"
    lines += [head, "|---|" + "---:|" * (len(report["images"][0]["bins"]) + 1)]
    for i in report["images"]:
        cells = [f"{b['agreement']:.1%} of {b['share']:.1%}" if b["share"] >= 0.001
                 else f"{b['agreement']:.1%} of {b['share']:.3%}" if b["pixels"] else "–" for b in i["bins"]]
        lines.append(f"| {i['image']} {i['hw'][1]}x{i['hw'][0]} | {i['agreement']:.1%} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: agreement inside the bin, of the share of the image's pixels in it. Median margin: "
              + ", ".join(f"{i['image']} {i['margin_quantiles']['p50']:.4f}" for i in report["images"])
              + "; median margin of the disagreeing pixels: "
              + ", ".join(f"{i['image']} {i['disagreeing_margin_quantiles'].get('p50', float('nan')):.4f}"
                          for i in report["images"]) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/studies/int8_margin.json"),
                    help="where the JSON report goes (default: %(default)s)")
    args = ap.parse_args()
    from m2fp_export.images import check_images

    landscape, portrait = check_images()
    photo = photo_at((PADDED_720P[0], 1138))
    images = [("check landscape", landscape), ("check portrait", portrait), ("bench photo", photo)]
    emit(study(images), markdown, args.out)


if __name__ == "__main__":
    main()
