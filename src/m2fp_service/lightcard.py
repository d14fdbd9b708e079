"""The light model's card, embedded in its ONNX file under the metadata key ``m2fp.light_card``.

``m2fp export-light`` writes it; ``segmenter.PersonSegmenter`` reads the input/output names, the
input size and the preprocessing from it, so the runtime holds no constants about the model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

LIGHT_CARD_KEY = "m2fp.light_card"
LIGHT_CARD_FORMAT: Literal[1] = 1


class LightCardError(ValueError):
    """The ONNX file carries no light-model card, or one this version cannot read."""


class LightPreprocessing(BaseModel):
    """How a frame becomes the model input (what MediaPipe's ImageToTensorCalculator does).

    The whole frame is stretched to the input size (no letterbox, no crop) by an affine warp that
    maps the frame's top-left corner to the input's and scales by input/frame size, bilinear
    (OpenCV ``INTER_LINEAR``); then ``value = pixel * scale + offset`` (RGB order).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize: Literal["stretch"] = "stretch"
    warp: str = "corner-aligned affine scale, bilinear (cv::warpPerspective INTER_LINEAR as MediaPipe)"
    color: Literal["RGB"] = "RGB"
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    output_upsample: str = "bilinear (cv::resize INTER_LINEAR) to the frame size"


class LightModelCard(BaseModel):
    """Everything the runtime needs to know about an exported light model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = LIGHT_CARD_FORMAT
    name: str = "MediaPipe selfie segmentation"
    variant: Literal["general", "landscape"]
    input_name: str
    output_name: str
    input_hw: tuple[int, int] = Field(description="model input (height, width)")
    layout: str = "input (1, H, W, 3) float32 NHWC; output (1, H, W, 1) float32"
    preprocessing: LightPreprocessing = Field(default_factory=LightPreprocessing)
    output: str = "person probability 0..1 per pixel (the graph ends in a sigmoid)"
    license: str = "Apache-2.0"
    source: dict[str, Any] = Field(default_factory=dict)
    converter: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> LightModelCard:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "card"
            raise LightCardError(f"light model card is invalid ({where}: {first['msg']})") from exc
