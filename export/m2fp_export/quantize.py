"""Static INT8 quantization (QDQ) of the exported FP32 graph, checked like the export itself.

ONNX Runtime's ``quantize_static`` calibrates activation ranges on real images and inserts
QuantizeLinear/DequantizeLinear pairs around the convolutions (per-channel weights) and the ReLUs
and max-pooling between them, and on the inputs of the weight-bearing MatMuls (their outputs stay
float, ``float_outputs``); ONNX Runtime then runs them as integer kernels. Dynamic quantization was
measured about 2x *slower* than FP32 on this model (it re-quantizes activations on every call and
leaves convolutions in float), hence static.

Kept in FP32 (``QuantizationConfig.keep_fp32``): the transformer decoder (100 queries: little
arithmetic; its class and mask heads give the outputs users see thresholded, and its masked attention
thresholds at 0.5), except its cross-attention's key and value projections of the pixel decoder's
features (up to 11520 tokens each, nine layers: most of the decoder's arithmetic). Those and the
deformable attention's sampling offsets and attention weights (an error there moves where the encoder
samples, not just how much) are quantized first; if that model falls short of the acceptance bar, the
exporter quantizes again with them in FP32 too (``fallback_keep_fp32``) and keeps whichever passes.
On an AMD EPYC (Zen 4, AVX-512 VNNI, 2 threads) the first form ran 0.91x the second's time at
736x1280. The untrained "confident" weights here cannot tell the two apart: Deformable DETR's
initialisation zeroes the sampling-offset and attention-weight projections, and the confident recipe
zeroes the decoder's residual branches, so both forms give the same outputs to the bit.

Settings live in a dataclass with presets, as optimum's ``AutoQuantizationConfig`` does:
``avx512-vnni`` (8-bit weights, VNNI's u8 x s8 dot products) and ``avx2`` (7-bit weights:
``reduce_range`` avoids the saturation of AVX2's u8 x s8 ``vpmaddubsw`` without VNNI).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m2fp_service.graphcache import cpu_flags
from m2fp_service.imaging.preprocess import pad_to_input
from m2fp_service.modelcard import MSDA_DOMAIN, InferenceSettings, InputPolicy, ModelCard

from . import check
from .errors import ExportError
from .images import builtin_calibration, check_images

log = logging.getLogger("m2fp_export")

# The transformer decoder (class/mask heads, masked attention), but for its cross-attention's key and value
# projections of the pixel decoder's features (``MatMul_1``, ``MatMul_2`` of each ``multihead_attn``: the query,
# scores, weighted sum and output projection are the others).
_KEEP_FP32 = (r"/predictor/(?!transformer_cross_attention_layers\.\d+/multihead_attn/MatMul_[12]$)",)
# Kept too when the model above falls short of the bar: the attention projections that decide where and how much
# the encoder samples, and the whole decoder.
_FALLBACK_KEEP_FP32 = (
    r"/self_attn/sampling_offsets/",  # MSDA: where to sample
    r"/self_attn/attention_weights/",  # MSDA: how much of each sample
    r"/predictor/",
)


class QuantizationError(ExportError):
    """The INT8 model does not reach the acceptance bar against FP32, or quantization failed."""


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize (see the presets).

    Attributes:
        name: preset name, recorded in the model card.
        per_channel: one scale per output channel of each weight.
        reduce_range: 7-bit weights (for CPUs without VNNI, see module docstring).
        op_types: operator types to quantize.
        float_outputs: operator types among them whose outputs are left in float.
        keep_fp32: regular expressions of node names left in FP32.
        fallback_keep_fp32: if the model quantized with ``keep_fp32`` falls short of the acceptance bar, the
            patterns of a second attempt (None: no second attempt).
        calibrate_method: ``minmax``, ``percentile`` or ``entropy``.
        calibration_count: images used when calibrating from a folder or the built-in set.
        calibration_short_edge: calibration images are resized to this short edge.
        min_label_agreement: the INT8-vs-FP32 acceptance bar on the check images.
        min_person_iou: each FP32 person matched by an INT8 person with at least this IoU.
    """

    name: str = "avx2"
    per_channel: bool = True
    reduce_range: bool = True
    # Relu and MaxPool too: then a convolution's output stays uint8 through them into the next one
    # instead of being dequantized to float and quantized again (the deep stem's three convolutions
    # at quarter resolution: DequantizeLinear + QuantizeLinear 0.40 -> 0.26 s at 640x1152, the same
    # label agreement with FP32). Not Add: quantizing the residual sums cost most of the agreement.
    op_types: tuple[str, ...] = ("Conv", "MatMul", "Relu", "MaxPool")
    # MatMul outputs stay float: quantized, each was re-quantized to uint8 only to be dequantized again
    # for its bias Add; float, ONNX Runtime runs DequantizeLinear -> MatMul as one MatMulIntegerToFloat
    # (integer products, float result): one rounding fewer, and the network's node time at 640x1152
    # 1.72 -> 1.56 s (the encoder's 24 layers: QLinearMatMul 0.18 s and DequantizeLinear 0.08 s became
    # MatMulIntegerToFloat 0.16 s; one process alternating, 5 runs).
    float_outputs: tuple[str, ...] = ("MatMul",)
    keep_fp32: tuple[str, ...] = _KEEP_FP32
    fallback_keep_fp32: tuple[str, ...] | None = _FALLBACK_KEEP_FP32
    calibrate_method: str = "minmax"
    calibration_count: int = 12
    calibration_short_edge: int = 448
    min_label_agreement: float = check.INT8_ACCEPTANCE.min_label_agreement
    min_person_iou: float = check.INT8_ACCEPTANCE.min_person_iou

    @property
    def acceptance(self) -> check.Acceptance:
        return check.Acceptance(min_label_agreement=self.min_label_agreement, min_person_iou=self.min_person_iou)

    @classmethod
    def preset(cls, name: str = "auto") -> QuantizationConfig:
        """A named preset; ``auto`` picks ``avx512-vnni`` when this CPU has VNNI, else ``avx2``."""
        if name == "auto":
            flags = cpu_flags()
            name = "avx512-vnni" if {"avx512_vnni", "avx_vnni"} & flags else "avx2"
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown quantization preset {name!r}; choose from {sorted(PRESETS)}") from None


PRESETS: dict[str, QuantizationConfig] = {
    "avx2": QuantizationConfig(name="avx2", reduce_range=True),
    "avx512-vnni": QuantizationConfig(name="avx512-vnni", reduce_range=False),
}


class _Reader:
    """``CalibrationDataReader``: the calibration images, padded as the service pads them."""

    def __init__(self, images: Sequence[np.ndarray], policy: InputPolicy) -> None:
        self._images: Iterator[np.ndarray] = iter(images)
        self._policy = policy

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        return None if image is None else {self._policy.input_name: pad_to_input(image, self._policy)}

    def rewind(self) -> None:  # pragma: no cover - only the entropy/percentile calibrators call it
        raise NotImplementedError


def excluded_nodes(model_path: Path, config: QuantizationConfig) -> list[str]:
    """Names of the nodes of ``config.op_types`` that ``config.keep_fp32`` leaves in FP32."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    patterns = [re.compile(p) for p in config.keep_fp32]
    return [n.name for n in proto.graph.node
            if n.op_type in config.op_types and any(p.search(n.name) for p in patterns)]


def quantize_graph(fp32_path: Path, out_path: Path, config: QuantizationConfig,
                   calibration: Sequence[np.ndarray]) -> dict[str, Any]:
    """Writes the static QDQ INT8 graph of ``fp32_path`` to ``out_path``; returns what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    fd, pre_name = tempfile.mkstemp(prefix=".m2fp-pre-", suffix=".onnx.tmp", dir=out_path.parent)
    os.close(fd)
    pre = Path(pre_name)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every copied bias on the root logger
    try:
        # ONNX Runtime's recommended pre-processing: constants folded into initializers (Conv
        # biases must be initializers to be quantized) and shapes inferred.
        optimized = pre.with_name(pre.name + ".opt")
        kept = _optimize_keeping_msda(fp32_path, optimized)
        quant_pre_process(str(optimized if kept else fp32_path), str(pre), skip_symbolic_shape=True,
                          skip_optimization=kept)
        exclude = excluded_nodes(pre, config)
        quantize_static(
            str(pre), str(out_path), _Reader(calibration, InputPolicy()),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(config.op_types),
            per_channel=config.per_channel, reduce_range=config.reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            calibrate_method=methods[config.calibrate_method],
            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False,
                           "OpTypesToExcludeOutputQuantization": list(config.float_outputs)},
        )
        # What the card says is read off the written graph.
        kept = kept and _calls_msda(onnx.load(str(out_path), load_external_data=False))
    except Exception as exc:  # onnxruntime.quantization raises assorted types
        raise QuantizationError(f"INT8 quantization failed: {type(exc).__name__}: {exc}") from exc
    finally:
        root.setLevel(level)
        pre.unlink(missing_ok=True)
        pre.with_name(pre.name + ".opt").unlink(missing_ok=True)
    return {"preset": asdict(config), "format": "QDQ, activations uint8 asymmetric, weights int8 symmetric",
            "kept_fp32_nodes": len(exclude), "calibration_images": len(calibration), "msda_op_kept": kept}


def _calls_msda(model: Any) -> bool:
    """Whether a ModelProto's graph has ``ai.m2fp::MSDeformAttn`` nodes."""
    return any(n.domain == MSDA_DOMAIN for n in model.graph.node)


def _optimize_keeping_msda(fp32_path: Path, out_path: Path) -> bool:
    """ONNX Runtime's basic graph optimisation (what ``quant_pre_process`` runs), with the fused
    deformable-attention kernel registered so that the ``ai.m2fp::MSDeformAttn`` nodes stay nodes:
    without it ONNX Runtime inlines their function and the INT8 graph has only standard ops.

    Returns:
        False (nothing written) when the graph has no such nodes or the kernel is not built.
    """
    import onnx
    import onnxruntime as ort

    from m2fp_service.engine import usable_msda_kernel

    model = onnx.load(str(fp32_path), load_external_data=False)
    if not _calls_msda(model):
        return False
    kernel = usable_msda_kernel("auto")
    if kernel is None:
        log.warning("the fused deformable-attention kernel is not built (`make native`): the INT8 graph "
                    "gets the standard-op form of MSDeformAttn")
        return False
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernel))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out_path)
    ort.InferenceSession(str(fp32_path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(out_path))
    if not _calls_msda(optimized):  # inlined after all
        out_path.unlink()
        return False
    if not any(f.domain == MSDA_DOMAIN for f in optimized.functions):  # keep the file runnable without the kernel
        optimized.functions.extend(f for f in model.functions if f.domain == MSDA_DOMAIN)
        onnx.save(optimized, str(out_path))
    return True


def quantize_checked(fp32_path: Path, out_path: Path, config: QuantizationConfig,
                     calibration: Sequence[np.ndarray], inference: InferenceSettings, classes: list[str], *,
                     trained: bool, calibration_source: str = "",
                     report: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantizes, then checks INT8 against FP32 on the check images (label maps, people); if that model falls short
    of the bar and ``config`` has a fallback, quantizes and checks once more keeping the fallback's nodes in FP32.

    Returns:
        The ``quantization`` entry of the model card (settings, calibration, check figures; ``first_attempt``
        when the fallback was taken).

    Raises:
        QuantizationError: quantization failed, or the INT8 model falls short of the bar.
    """

    images = list(calibration) or builtin_calibration(config.calibration_count, config.calibration_short_edge)
    source = calibration_source or ("given images" if calibration else "built-in set (scikit-image photographs)")
    weights = "trained weights" if trained else "UNTRAINED (confident random) weights, not a quality figure"
    fp32: check.Runner | None = None  # opened after the first quantization: not alive while calibrating

    def attempt(config: QuantizationConfig) -> tuple[dict[str, Any], list[str]]:
        report(f"      calibrating on {len(images)} images ({source}), {config.calibrate_method}, "
               f"per-channel={config.per_channel}, reduce_range={config.reduce_range}...")
        info = quantize_graph(fp32_path, out_path, config, images)
        report(f"      {out_path.stat().st_size / 1e6:.1f} MB; {info['kept_fp32_nodes']} sensitive nodes kept in FP32")
        report(f"      checking INT8 against FP32 ({weights}): labels >= {config.min_label_agreement:.0%}, "
               "same people...")
        nonlocal fp32
        fp32 = fp32 or check.onnx_runner(check.session(fp32_path))
        result = check.compare(check.onnx_runner(check.session(out_path)), fp32, check_images(), inference, classes,
                               report, label="INT8 vs FP32 ")
        info["check_vs_fp32"] = {"trained_weights": trained, "acceptance": asdict(config.acceptance),
                                 **result.summary()}
        return info, result.failures(config.acceptance)

    info, failures = attempt(config)
    if failures and config.fallback_keep_fp32 is not None:
        report(f"      short of the bar ({'; '.join(failures)}): quantizing again with more nodes in FP32 "
               f"({', '.join(config.fallback_keep_fp32)})...")
        first = {"keep_fp32": list(config.keep_fp32), "failures": failures,
                 "min_label_agreement": info["check_vs_fp32"]["min_label_agreement"]}
        info, failures = attempt(dataclasses.replace(config, keep_fp32=config.fallback_keep_fp32,
                                                     fallback_keep_fp32=None))
        info["first_attempt"] = first
    info["calibration_source"] = source
    if failures:
        hint = ("Untrained weights give noise-like label maps (near-ties everywhere), on which INT8 rounding flips "
                "many pixels: this is not a quality figure; --min-agreement accepts a lower bar. " if not trained
                else "Try --calibration DIR with photos like the ones you serve, or --quant-preset avx2 "
                     "(7-bit weights), or a lower --min-agreement after looking at the outputs. ")
        earlier = (f" (first, with fewer nodes in FP32: {'; '.join(info['first_attempt']['failures'])})"
                   if "first_attempt" in info else "")
        raise QuantizationError("the INT8 model's results differ from FP32's: " + "; ".join(failures) + earlier
                                + "; model not written. " + hint)
    return info


def quantize_file(fp32_path: Path, output: Path, config: QuantizationConfig, calibration: Sequence[np.ndarray],
                  *, min_agreement: float | None = None, report: Callable[[str], None] = print) -> ModelCard:
    """``m2fp export --int8 --from-onnx``: quantizes an FP32 model written by ``m2fp export``."""
    from m2fp_service.engine import read_card
    from m2fp_service.errors import ModelLoadError

    from .convert import _finish, write_sidecar

    try:
        card = read_card(fp32_path)
    except ModelLoadError as exc:
        raise QuantizationError(f"--from-onnx: {exc.message}") from exc
    if card.exporter.get("precision", "fp32") != "fp32":
        raise QuantizationError(f"--from-onnx: {fp32_path} is already {card.exporter['precision']}")
    if min_agreement is not None:
        config = dataclasses.replace(config, min_label_agreement=min_agreement)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".m2fp-", suffix=".onnx.tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        report(f"[1/2] quantizing {fp32_path} to static INT8 ({config.name})...")
        info = quantize_checked(fp32_path, tmp, config, calibration, card.inference, card.classes,
                                trained=card.trained, report=report)
        info["from_onnx"] = str(fp32_path)
        report("[2/2] writing model card and file...")
        exporter = {**card.exporter, "precision": "int8", "quantization": info}
        if not info.get("msda_op_kept"):
            exporter.pop("msda_op", None)
        new = dataclasses.replace(card, exporter=exporter,
                                  notes=[*card.notes, int8_note(info, card.trained)])
        _finish(tmp, output, new)
    finally:
        tmp.unlink(missing_ok=True)
    write_sidecar(output, new)
    return new


def int8_note(info: dict[str, Any], trained: bool) -> str:
    """The card's one-line statement of the INT8 model's measured agreement."""
    c = info["check_vs_fp32"]
    weights = "trained weights" if trained else "untrained confident weights (not a quality figure)"
    kept = tuple(info["preset"].get("keep_fp32", ()))
    attention = ("attention projections in FP32 (the model with them in INT8 fell short of the bar)"
                 if "first_attempt" in info else "attention projections in INT8" if kept == _KEEP_FP32
                 else f"kept in FP32: {', '.join(kept) or 'nothing'}")
    return (f"INT8 static quantization ({info['preset']['name']}, {attention}): label agreement with FP32 >= "
            f"{c['min_label_agreement']:.2%}, same people: {c['same_people']}, on the check images with {weights}")
