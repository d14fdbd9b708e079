"""Light model export: convert the .tflite, check it against MediaPipe, embed the card, write atomically.

Order (as the M2FP exporter): convert -> run ONNX Runtime and the reference runtime on the same
inputs and refuse on a difference above the tolerance -> write the card into the ONNX metadata
-> rename into place. Nothing half-written is ever left at the output path.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from m2fp_service.lightcard import LIGHT_CARD_KEY, LightModelCard
from m2fp_service.segmenter import frame_to_input_u8

from .. import __version__
from ..errors import ExportError, ParityError
from . import reference
from .fetch import LICENSE, TfliteSource, sha256_file
from .tflite_to_onnx import CONVERTER_VERSION, OPSET, ConvertedModel, convert


@dataclass
class LightExportOptions:
    """Knobs of one light export run."""

    atol: float = 1e-3  # max |ours - MediaPipe| of the person probability (measured: < 1e-4)
    # name -> (H, W, 3) uint8 RGB photo; empty: check_photos()
    check_images: dict[str, np.ndarray] = field(default_factory=dict)
    require_reference: bool = False


def synthetic_photo(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 picture (gradients and discs) for when no photo is installed."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], -1)
    for _ in range(8):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * min(h, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return img.clip(0, 255).astype(np.uint8)


def check_photos() -> dict[str, np.ndarray]:
    """Real photographs of people that registry packages ship, where installed, plus one synthetic.

    scikit-image's astronaut (512x512) and matplotlib's Grace Hopper (512x600 portrait) are in
    the test environment; a bare export environment gets the synthetic picture only.
    """
    photos: dict[str, np.ndarray] = {}
    try:
        from skimage import data

        photos["skimage-astronaut"] = np.ascontiguousarray(data.astronaut())
    except ImportError:
        pass
    try:
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
            photos["matplotlib-grace_hopper"] = np.asarray(im.convert("RGB"))
    except (ImportError, OSError, ValueError):
        pass
    photos["synthetic"] = synthetic_photo((360, 640))
    return photos


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a > 0.5, b > 0.5).sum()
    return 1.0 if union == 0 else float(np.logical_and(a > 0.5, b > 0.5).sum() / union)


def check_parity(converted: ConvertedModel, onnx_path: Path, tflite_path: Path, opts: LightExportOptions,
                 report: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs our ONNX (ONNX Runtime) and MediaPipe on the same model-size inputs.

    Each photo is warped to the model input as at run time; MediaPipe gets that uint8 image (so
    its own resize is the identity) and we feed the same pixels / 255. Raises ParityError when
    the largest probability difference exceeds ``opts.atol``, or when our output is not a
    probability map at all (always checked, with or without the reference).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    hw = converted.input.shape[1:3]
    images = opts.check_images or check_photos()
    have_ref = reference.available()
    if not have_ref and opts.require_reference:
        raise ExportError("the parity reference `mediapipe` is not installed (pip install --no-deps "
                          "mediapipe==1.2.3 absl-py matplotlib; see the Makefile's install-dev)")
    ref = reference.MediaPipeReference(tflite_path) if have_ref else None
    per_image: dict[str, dict[str, float]] = {}
    try:
        for name, photo in images.items():
            small = frame_to_input_u8(photo, (hw[0], hw[1]))
            ours = session.run(None, {converted.input.name: small[None].astype(np.float32) / 255.0})[0]
            if ours.shape != tuple(converted.output.shape) or not np.isfinite(ours).all() \
                    or ours.min() < 0 or ours.max() > 1:
                raise ParityError(f"{name}: the converted model's output is not a probability map "
                                  f"(shape {ours.shape}, range {np.nanmin(ours):g}..{np.nanmax(ours):g})",
                                  {"range": float("inf")})
            mask = ours[0, ..., 0]
            entry = {"person_fraction": round(float((mask > 0.5).mean()), 4)}
            if ref is not None:
                want = ref.segment(small)
                entry["max_abs_diff"] = float(np.abs(mask - want).max())
                entry["iou"] = _iou(mask, want)
                report(f"  {name}: max |ours - mediapipe| {entry['max_abs_diff']:.2e}, mask IoU {entry['iou']:.5f}")
            per_image[name] = entry
    finally:
        if ref is not None:
            ref.close()
    if ref is None:
        report("  WARNING: mediapipe is not installed, so the output was NOT compared with MediaPipe's runtime "
               "(only checked to be a probability map). Install the dev extra to check parity.")
        return {"reference": None, "checked": False, "images": per_image}
    worst = max(e["max_abs_diff"] for e in per_image.values())
    result = {"reference": f"mediapipe {reference.version()} tasks ImageSegmenter (TFLite, XNNPACK)",
              "checked": True, "input": "photos warped to the model input size; same uint8 pixels to both",
              "max_abs_diff": worst, "min_iou": min(e["iou"] for e in per_image.values()),
              "atol": opts.atol, "images": per_image}
    if worst > opts.atol:
        raise ParityError(f"the converted model differs from MediaPipe's by {worst:.3e} (person probability), "
                          f"more than {opts.atol:g}; model not written", {"max_abs_diff": worst})
    return result


def build_card(source: TfliteSource, converted: ConvertedModel, parity: dict[str, Any]) -> LightModelCard:
    h, w = converted.input.shape[1:3]
    return LightModelCard(
        variant=source.variant,  # type: ignore[arg-type]
        input_name=converted.input.name,
        output_name=converted.output.name,
        input_hw=(h, w),
        license=f"{LICENSE} (MediaPipe selfie segmentation model, Google)",
        source={**source.card_fields(), "description": converted.description},
        converter={
            "name": "m2fp_export.light.tflite_to_onnx", "version": CONVERTER_VERSION, "exporter": __version__,
            "opset": OPSET, "onnx": onnx.__version__, "tflite": dist_version("tflite"),
            "tflite_ops": converted.op_counts,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        parity=parity,
    )


def _write_card(path: Path, card: LightModelCard) -> None:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = LIGHT_CARD_KEY, card.to_json()
    proto.producer_name = "m2fp-export"
    proto.doc_string = f"MediaPipe selfie segmentation ({card.variant}), Apache-2.0; person probability"
    onnx.save(proto, str(path))


def export_light(source: TfliteSource, output: Path, opts: LightExportOptions | None = None,
                 report: Callable[[str], None] = print) -> LightModelCard:
    """Converts, checks and writes ``output`` (and ``output`` with ``.json``: the card + file hash)."""
    opts = opts or LightExportOptions()
    try:
        data = source.path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read {source.path}: {exc}") from exc
    report(f"[1/3] converting {source.path.name} ({source.variant}, SHA-256 {source.sha256[:12]}...) to ONNX...")
    converted = convert(data, graph_name=f"selfie_segmentation_{source.variant}")
    report(f"      input {converted.input.name} {list(converted.input.shape)} -> output {converted.output.name} "
           f"{list(converted.output.shape)}; {sum(converted.op_counts.values())} TFLite ops")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".light-", suffix=".onnx.tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        onnx.save(converted.model, str(tmp))
        report(f"[2/3] checking ONNX Runtime against MediaPipe (tolerance {opts.atol:g})...")
        parity = check_parity(converted, tmp, source.path, opts, report)
        report("[3/3] writing model card and file...")
        card = build_card(source, converted, parity)
        _write_card(tmp, card)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp made it private; a model file is meant to be shared
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    output.with_suffix(".json").write_text(json.dumps(
        {"onnx_sha256": sha256_file(output), "card": json.loads(card.to_json())}, indent=2) + "\n")
    return card
