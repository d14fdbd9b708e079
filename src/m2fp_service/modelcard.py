"""The model card embedded in every exported ONNX file (metadata key ``m2fp.card``).

The exporter writes it; the engine reads everything model-specific from it (class names,
palette, thresholds, input policy), so the serving side holds no constants about the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

CARD_KEY = "m2fp.card"
# The exported graph's deformable-attention node (export/m2fp_export/msda.py; run by the fused kernel
# native/m2fp_msda.cc where registered). Here, not in the exporter, so that reading it needs no torch.
MSDA_DOMAIN = "ai.m2fp"
MSDA_OP = "MSDeformAttn"
CARD_FORMAT = 1


UNTRAINED_WARNING = (
    "UNTRAINED DEMO MODEL: these weights were never trained, so the parts and people it returns are "
    "meaningless. Get the real M2FP model with `m2fp export -o models/m2fp.onnx` (downloads "
    "damo/cv_resnet101_image-multiple-human-parsing from ModelScope) or `m2fp export --checkpoint DIR "
    "-o models/m2fp.onnx` from a local copy, then restart (M2FP_MODEL points at the file)."
)


class ModelCardError(ValueError):
    """The ONNX file carries no card, or one this version cannot read."""


@dataclass(frozen=True)
class InputPolicy:
    """How an image becomes the model input.

    Reference (ModelScope) test-time policy: resize so the short edge is ``short_edge`` unless
    the long edge would exceed ``max_long_edge``; then pad bottom/right to a multiple of
    ``size_divisibility``. The graph normalises, so padding with ``pad_rgb`` (the mean) gives
    exactly the zeros ModelScope pads with after normalising.
    """

    short_edge: int = 640
    max_long_edge: int = 1333
    size_divisibility: int = 32
    resample: str = "bilinear-antialias"
    pad_rgb: tuple[float, float, float] = (123.675, 116.28, 103.53)
    input_name: str = "image"
    layout: str = "NCHW float32 RGB 0..255, H and W multiples of size_divisibility"
    profile: str = "default"


# Input profiles: (short edge, longest long edge). 'default' is the reference's test-time size;
# 'fast' is a smaller input for live use (about 0.4x the pixels, so the network runs ~2.5x faster)
# whose label agreement with 'default' the exporter and the benchmarks measure.
INPUT_PROFILES: dict[str, tuple[int, int]] = {"default": (640, 1333), "fast": (384, 800)}


def policy_for_profile(policy: InputPolicy, profile: str) -> InputPolicy:
    """``policy`` with the short/long edge of ``profile`` (one of ``INPUT_PROFILES``)."""
    if profile not in INPUT_PROFILES:
        raise ModelCardError(f"unknown input profile {profile!r}; choose from {sorted(INPUT_PROFILES)}")
    short_edge, max_long_edge = INPUT_PROFILES[profile]
    return replace(policy, short_edge=short_edge, max_long_edge=max_long_edge, profile=profile)


@dataclass(frozen=True)
class InferenceSettings:
    """Post-processing settings of ``M2FP.instance_parsing_inference``."""

    num_parsing: int = 20
    human_class_index: int = 20
    parsing_ins_score_thr: float = 0.5
    test_topk_per_image: int = 100
    part_score_thr: float = 0.1
    human_score_thr: float = 0.1


@dataclass(frozen=True)
class ModelCard:
    """Everything the server needs to know about an exported model."""

    classes: list[str]
    palette: list[tuple[int, int, int]]
    trained: bool
    source: dict[str, Any]
    input_policy: InputPolicy = field(default_factory=InputPolicy)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    normalization: dict[str, list[float]] = field(
        default_factory=lambda: {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    )
    outputs: dict[str, str] = field(
        default_factory=lambda: {
            "class_logits": "(1, Q, C+1) class logits per query; last column is 'no object'",
            "mask_logits": "(1, Q, H/4, W/4) mask logits per query on the padded input",
        }
    )
    architecture: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    license: str = "CC BY-NC 4.0"
    format: int = CARD_FORMAT

    def __post_init__(self) -> None:
        n = self.inference.num_parsing
        if len(self.classes) < n + 1:
            raise ModelCardError(f"card lists {len(self.classes)} classes, expected at least {n + 1}")
        if len(self.palette) < n:
            raise ModelCardError(f"card palette has {len(self.palette)} colours, expected at least {n}")

    @property
    def parsing_classes(self) -> list[str]:
        """The label-map classes, index = pixel value of the label map (background first)."""
        return self.classes[: self.inference.num_parsing]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"model card is not valid JSON: {exc}") from exc
        if raw.get("format") != CARD_FORMAT:
            raise ModelCardError(f"model card format {raw.get('format')!r} is not {CARD_FORMAT}")
        try:
            return cls(
                classes=list(raw["classes"]),
                palette=[tuple(c) for c in raw["palette"]],
                trained=bool(raw["trained"]),
                source=dict(raw["source"]),
                input_policy=InputPolicy(**{**raw["input_policy"], "pad_rgb": tuple(raw["input_policy"]["pad_rgb"])}),
                inference=InferenceSettings(**raw["inference"]),
                normalization=raw["normalization"],
                outputs=raw["outputs"],
                architecture=raw.get("architecture", {}),
                exporter=raw.get("exporter", {}),
                notes=list(raw.get("notes", [])),
                license=str(raw.get("license", "CC BY-NC 4.0")),
                format=raw["format"],
            )
        except (KeyError, TypeError) as exc:
            raise ModelCardError(f"model card is missing or has a malformed field: {exc}") from exc
