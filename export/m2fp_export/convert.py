"""Export pipeline: trace to ONNX, check against PyTorch, optionally quantize, embed the card, write.

Order (as optimum's exporters do it): build/load -> export with named inputs/outputs and
dynamic H/W -> run ONNX Runtime and PyTorch on the same check images and refuse when the label
maps or people differ (``check.py``; raw differences printed) -> optionally quantize to static
INT8 and check it the same way against the FP32 graph (``quantize.py``) -> write the card into
the ONNX metadata -> rename into place.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2fp_service.imaging.preprocess import pad_to_input
from m2fp_service.labels import pascal_palette
from m2fp_service.modelcard import (
    CARD_KEY,
    INPUT_PROFILES,
    InferenceSettings,
    InputPolicy,
    ModelCard,
    policy_for_profile,
)

from . import __version__, check, msda
from .errors import ParityError
from .images import check_images
from .source import LoadedModel, sha256_file
from .tracing import export_patches

log = logging.getLogger("m2fp_export")

INPUT_NAME = "image"
OUTPUT_NAMES = ("class_logits", "mask_logits")


@dataclass
class ExportOptions:
    """Knobs of one export run."""

    opset: int = 17
    trace_hw: tuple[int, int] = (512, 768)
    # What the FP32 graph must reach against PyTorch on the check images (label maps, people).
    acceptance: check.Acceptance = check.FP32_ACCEPTANCE
    # Empty: ``images.check_images()``, photos of people in landscape and portrait, both sizes
    # different from the trace size (which also proves the graph is shape-generic).
    check_images: list[np.ndarray] = field(default_factory=list)
    # Static INT8 quantization after the FP32 check (None: write the FP32 graph).
    quantization: Any = None  # quantize.QuantizationConfig
    calibration_images: list[np.ndarray] = field(default_factory=list)  # empty: the built-in set
    # The card's default input profile (``modelcard.INPUT_PROFILES``); 'fast' is measured against 'default'.
    profile: str = "default"


class M2FPOnnxWrapper(torch.nn.Module):
    """The exported graph: normalise, backbone, pixel decoder, transformer decoder.

    Input ``image``: (1, 3, H, W) float32 RGB in 0..255, H and W multiples of 32 (padded with the
    mean, which normalises to the zeros ModelScope pads with). Outputs ``class_logits``
    (1, Q, C+1) and ``mask_logits`` (1, Q, H/4, W/4), the last decoder layer's predictions.
    """

    def __init__(self, m2fp: torch.nn.Module) -> None:
        super().__init__()
        self.m2fp = m2fp

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.m2fp
        x = (image - m.pixel_mean) / m.pixel_std
        out = m.sem_seg_head(m.backbone(x))
        return out["pred_logits"], out["pred_masks"]


def synthetic_image(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 test picture: gradients, blobs and edges, not noise."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], -1)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        color = rng.uniform(0, 255, 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = color
    return img.clip(0, 255).astype(np.uint8)


def export_graph(model: torch.nn.Module, path: Path, opts: ExportOptions) -> bool:
    """Traces the wrapper with dynamic H/W and writes a plain ONNX file to ``path``.

    Returns:
        Whether the graph has ``ai.m2fp::MSDeformAttn`` nodes (and their function).
    """
    wrapper = M2FPOnnxWrapper(model).eval()
    example = torch.from_numpy(pad_to_input(synthetic_image(opts.trace_hw), InputPolicy()))
    with warnings.catch_warnings(), export_patches(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about ModelScope's Python-side asserts
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {2: "height", 3: "width"},
                          "mask_logits": {2: "mask_height", 3: "mask_width"}},
            opset_version=opts.opset, do_constant_folding=True, dynamo=False,
            custom_opsets={msda.DOMAIN: msda.OP_VERSION},
        )
    return attach_msda_function(model, path, opts.opset)


def attach_msda_function(model: torch.nn.Module, path: Path, opset: int) -> bool:
    """Defines the graph's ``ai.m2fp::MSDeformAttn`` nodes in the file (``msda.attach_function``)."""
    import onnx

    attn = [m for m in model.modules() if type(m).__name__ == "MSDeformAttn"]
    if not attn:
        return False
    first = attn[0]
    if any((m.n_heads, m.d_model, m.n_levels, m.n_points) != (first.n_heads, first.d_model, first.n_levels,
                                                               first.n_points) for m in attn):
        raise RuntimeError("the encoder's deformable-attention layers differ in shape; one function cannot serve them")
    proto = onnx.load(str(path))
    if not msda.attach_function(proto, opset, first.n_levels, heads=first.n_heads,
                                head_dim=first.d_model // first.n_heads, points=first.n_points):
        return False
    onnx.save(proto, str(path))
    return True


def torch_runner(model: torch.nn.Module) -> check.Runner:
    """ModelScope's own (unpatched) forward on the unpadded image; it pads itself."""

    def run(image: np.ndarray) -> check.RawOutputs:
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        with torch.no_grad():
            ref = model.forward({"batched_inputs": [{"image": tensor}]})["outputs"]
        return {"class_logits": ref["pred_logits"].numpy(), "mask_logits": ref["pred_masks"].numpy()}

    return run


def inference_settings(model_cfg: dict[str, Any]) -> InferenceSettings:
    num_parsing = int(model_cfg["num_parsing"])
    return InferenceSettings(
        num_parsing=num_parsing,
        human_class_index=num_parsing,
        parsing_ins_score_thr=float(model_cfg.get("parsing_ins_score_thr", 0.5)),
        test_topk_per_image=100,
    )


def check_parity(loaded: LoadedModel, path: Path, opts: ExportOptions,
                 report: Callable[[str], None] = print) -> check.CheckReport:
    """Runs ONNX Runtime and ModelScope's unpatched PyTorch forward on the check images.

    Judges the post-processed label maps and people (``opts.acceptance``), prints the raw
    relative differences too, and raises ParityError when the check fails.
    """
    session = check.session(path, report)
    images = list(opts.check_images) or check_images()
    result = check.compare(check.onnx_runner(session), torch_runner(loaded.model), images,
                           inference_settings(loaded.model_cfg), [str(c) for c in loaded.model_cfg["classes"]],
                           report)
    failures = result.failures(opts.acceptance)
    if failures:
        raise ParityError("ONNX Runtime's results differ from PyTorch's: " + "; ".join(failures)
                          + "; model not written.", result.worst_raw)
    return result


def build_card(loaded: LoadedModel, opts: ExportOptions, parity: check.CheckReport,
               extra: dict[str, Any] | None = None) -> ModelCard:
    cfg = loaded.model_cfg
    classes = [str(c) for c in cfg["classes"]]
    inference = inference_settings(cfg)
    import modelscope

    return ModelCard(
        classes=classes,
        palette=pascal_palette(max(len(classes), inference.num_parsing)),
        trained=loaded.trained,
        source=loaded.source,
        input_policy=policy_for_profile(InputPolicy(), opts.profile),
        inference=inference,
        architecture={
            "name": "M2FP (Mask2Former for Parsing)",
            "backbone": cfg["backbone"], "encoder": cfg["encoder"], "decoder": cfg["decoder"],
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
        },
        exporter={
            "version": __version__, "opset": opts.opset, "torch": torch.__version__,
            "modelscope": modelscope.__version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "precision": "fp32",
            "parity_max_rel_diff": parity.worst_raw,
            "check": {"reference": "ModelScope's PyTorch forward, same weights", "trained_weights": loaded.trained,
                      "acceptance": asdict(opts.acceptance), **parity.summary()},
            **(extra or {}),
        },
        notes=list(loaded.notes),
        license="CC BY-NC 4.0 (M2FP code and weights: non-commercial use only)",
    )


def write_card(path: Path, card: ModelCard) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card.to_json()
    proto.producer_name = "m2fp-export"
    proto.doc_string = f"M2FP multi-person human parsing; trained={card.trained}; source={card.source.get('kind')}"
    onnx.save(proto, str(path))


def _profile_agreement(path: Path, loaded: LoadedModel, report: Callable[[str], None]) -> dict[str, Any]:
    """The 'fast' input profile against 'default' on the check images (same graph, ONNX Runtime)."""

    from m2fp_service.imaging.postprocess import to_result
    from m2fp_service.imaging.preprocess import prepare

    session = check.session(path)
    inference, classes = inference_settings(loaded.model_cfg), [str(c) for c in loaded.model_cfg["classes"]]
    figures = []
    for image in check_images():
        results = []
        for profile in ("default", "fast"):
            x, meta = prepare(image, policy_for_profile(InputPolicy(), profile))
            cls, masks = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
            results.append(to_result(cls[0], masks[0], meta, inference, classes, mode="exact"))
        agreement, iou = check.compare_results(results[1], results[0])
        figures.append({"hw": list(image.shape[:2]), "label_agreement": round(agreement, 6),
                        "people": results[1].num_people, "default_people": results[0].num_people,
                        "min_person_iou": round(iou, 6)})
        report(f"  fast profile vs default at {image.shape[1]}x{image.shape[0]}: labels agree on {agreement:.2%}, "
               f"people {results[1].num_people}/{results[0].num_people}"
               + ("" if loaded.trained else " (untrained weights)"))
    return {"fast": {"input": INPUT_PROFILES["fast"], "vs_default": figures, "trained_weights": loaded.trained}}


def _finish(tmp: Path, output: Path, card: ModelCard) -> None:
    write_card(tmp, card)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp made it private; a model file is meant to be shared
    tmp.replace(output)


def export_model(loaded: LoadedModel, output: Path, opts: ExportOptions | None = None,
                 report: Callable[[str], None] = print) -> ModelCard:
    """Exports, checks (and quantizes) and writes ``output`` and ``output`` with ``.json`` (card + hash)."""
    opts = opts or ExportOptions()
    output.parent.mkdir(parents=True, exist_ok=True)
    steps = 4 if opts.quantization is not None else 3
    tmps = []
    try:
        for _ in range(2 if opts.quantization is not None else 1):
            fd, tmp_name = tempfile.mkstemp(prefix=".m2fp-", suffix=".onnx.tmp", dir=output.parent)
            os.close(fd)
            tmps.append(Path(tmp_name))
        tmp = tmps[0]
        t0 = time.perf_counter()
        report(f"[1/{steps}] tracing to ONNX (opset {opts.opset}, dynamic height/width)...")
        fused = export_graph(loaded.model, tmp, opts)
        report(f"      {tmp.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        acc = opts.acceptance
        report(f"[2/{steps}] checking ONNX Runtime against PyTorch: label maps (>= {acc.min_label_agreement:.2%} "
               f"of pixels) and people (same count, mask IoU >= {acc.min_person_iou}) on the check images"
               + (f", raw outputs within {acc.raw_rtol:g} relative" if acc.raw_rtol is not None else "") + "...")
        parity = check_parity(loaded, tmp, opts, report)
        # The deformable attention's sampling as one node, run by the fused kernel where registered.
        extra: dict[str, Any] = {"msda_op": f"{msda.DOMAIN}::{msda.OP}"} if fused else {}
        if opts.profile != "default":
            extra["profiles"] = _profile_agreement(tmp, loaded, report)
        if opts.quantization is not None:
            from .quantize import quantize_checked

            report(f"[3/{steps}] quantizing to static INT8 ({opts.quantization.name})...")
            extra["quantization"] = quantize_checked(
                tmp, tmps[1], opts.quantization, opts.calibration_images, inference_settings(loaded.model_cfg),
                [str(c) for c in loaded.model_cfg["classes"]], trained=loaded.trained, report=report)
            extra["precision"] = "int8"
            if not extra["quantization"].get("msda_op_kept"):
                extra.pop("msda_op", None)
            tmp = tmps[1]
        report(f"[{steps}/{steps}] writing model card and file...")
        card = build_card(loaded, opts, parity, extra)
        if opts.quantization is not None:
            from .quantize import int8_note

            card = dataclasses.replace(card, notes=[*card.notes, int8_note(extra["quantization"], loaded.trained)])
        _finish(tmp, output, card)
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)
    write_sidecar(output, card)
    return card


def write_sidecar(output: Path, card: ModelCard) -> None:
    """``output`` with ``.json``: the card and the file's SHA-256."""
    import json

    sidecar = output.with_suffix(".json")
    sidecar.write_text(json.dumps({"onnx_sha256": sha256_file(output), "card": json.loads(card.to_json())},
                                  indent=2) + "\n")
