"""Export pipeline: trace to ONNX, check against PyTorch, embed the model card, write atomically.

Order (as optimum's exporters do it): build/load -> export with named inputs/outputs and
dynamic H/W -> run ONNX Runtime and PyTorch on the same inputs and refuse on a relative
difference above the tolerance -> write the card into the ONNX metadata -> rename into place.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from m2fp_service.imaging.preprocess import pad_to_input
from m2fp_service.labels import pascal_palette
from m2fp_service.modelcard import CARD_KEY, InferenceSettings, InputPolicy, ModelCard

from . import __version__
from .errors import ParityError
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
    # Landscape and portrait, both different from the trace size: proves the graph is shape-generic.
    check_hws: tuple[tuple[int, int], ...] = ((480, 736), (736, 480))
    rtol: float = 1e-4
    check_images: list[np.ndarray] = field(default_factory=list)


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


def export_graph(model: torch.nn.Module, path: Path, opts: ExportOptions) -> None:
    """Traces the wrapper with dynamic H/W and writes a plain ONNX file to ``path``."""
    wrapper = M2FPOnnxWrapper(model).eval()
    example = torch.from_numpy(pad_to_input(synthetic_image(opts.trace_hw), InputPolicy()))
    with warnings.catch_warnings(), export_patches(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about ModelScope's Python-side asserts
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {2: "height", 3: "width"},
                          "mask_logits": {2: "mask_height", 3: "mask_width"}},
            opset_version=opts.opset, do_constant_folding=True, dynamo=False,
        )


def check_parity(model: torch.nn.Module, path: Path, opts: ExportOptions,
                 report: Callable[[str], None] = print) -> dict[str, float]:
    """Runs ONNX Runtime and ModelScope's unpatched PyTorch forward on the same inputs.

    Returns the worst relative difference per output (max |ort - torch| / max |torch|) and
    raises ParityError when any exceeds ``opts.rtol``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = list(opts.check_images) or [synthetic_image(hw, seed=i) for i, hw in enumerate(opts.check_hws)]
    worst = dict.fromkeys(OUTPUT_NAMES, 0.0)
    for img in images:
        x = pad_to_input(img, InputPolicy())
        got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: x}), strict=True))
        with torch.no_grad():  # ModelScope's own forward, on the unpadded image, padding itself.
            ref = model.forward({"batched_inputs": [{"image": torch.from_numpy(
                np.ascontiguousarray(img.transpose(2, 0, 1))).float()}]})["outputs"]
        want = {"class_logits": ref["pred_logits"].numpy(), "mask_logits": ref["pred_masks"].numpy()}
        here = {}
        for name in OUTPUT_NAMES:
            if got[name].shape != want[name].shape:
                raise ParityError(f"{name}: ONNX shape {got[name].shape} != PyTorch shape {want[name].shape}",
                                  {name: float("inf")})
            here[name] = float(np.abs(got[name] - want[name]).max() / max(np.abs(want[name]).max(), 1e-12))
            worst[name] = max(worst[name], here[name])
        report(f"  parity at {img.shape[1]}x{img.shape[0]}: " +
               ", ".join(f"{n} max rel diff {here[n]:.2e}" for n in OUTPUT_NAMES))
    bad = {n: d for n, d in worst.items() if d > opts.rtol}
    if bad:
        detail = ", ".join(f"{n}: {d:.3e}" for n, d in bad.items())
        raise ParityError(f"ONNX output differs from PyTorch by more than {opts.rtol:g} relative ({detail}); "
                          "model not written. (The decoder's masked attention thresholds mask logits at 0, so "
                          "logits within rounding of 0 can flip between runtimes; a difference just above the "
                          "tolerance can be accepted with --rtol after checking the outputs.)", worst)
    return worst


def build_card(loaded: LoadedModel, opts: ExportOptions, parity: dict[str, float]) -> ModelCard:
    cfg = loaded.model_cfg
    num_parsing = int(cfg["num_parsing"])
    classes = [str(c) for c in cfg["classes"]]
    import modelscope

    return ModelCard(
        classes=classes,
        palette=pascal_palette(max(len(classes), num_parsing)),
        trained=loaded.trained,
        source=loaded.source,
        input_policy=InputPolicy(),
        inference=InferenceSettings(
            num_parsing=num_parsing,
            human_class_index=num_parsing,
            parsing_ins_score_thr=float(cfg.get("parsing_ins_score_thr", 0.5)),
            test_topk_per_image=100,
        ),
        architecture={
            "name": "M2FP (Mask2Former for Parsing)",
            "backbone": cfg["backbone"], "encoder": cfg["encoder"], "decoder": cfg["decoder"],
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
        },
        exporter={
            "version": __version__, "opset": opts.opset, "torch": torch.__version__,
            "modelscope": modelscope.__version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "parity_max_rel_diff": parity, "parity_rtol": opts.rtol,
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


def export_model(loaded: LoadedModel, output: Path, opts: ExportOptions | None = None,
                 report: Callable[[str], None] = print) -> ModelCard:
    """Exports, checks and writes ``output`` (and ``output`` with ``.json``: the card + file hash)."""
    opts = opts or ExportOptions()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".m2fp-", suffix=".onnx.tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        t0 = time.perf_counter()
        report(f"[1/3] tracing to ONNX (opset {opts.opset}, dynamic height/width)...")
        export_graph(loaded.model, tmp, opts)
        report(f"      {tmp.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        report(f"[2/3] checking ONNX Runtime against PyTorch (tolerance {opts.rtol:g} relative)...")
        parity = check_parity(loaded.model, tmp, opts, report)
        report("[3/3] writing model card and file...")
        card = build_card(loaded, opts, parity)
        write_card(tmp, card)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp made it private; a model file is meant to be shared
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = output.with_suffix(".json")
    import json

    sidecar.write_text(json.dumps({"onnx_sha256": sha256_file(output), "card": json.loads(card.to_json())},
                                  indent=2) + "\n")
    return card
