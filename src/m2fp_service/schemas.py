"""Pydantic models for the API edge: what ``/api/parse`` and ``/api/info`` accept and return.

The parse response keeps the seed service's envelope exactly (``code``, ``message``, ``data`` with
``result_image``, ``masks``, ``classes``, ``inference_time``); richer outputs are opt-in fields of
``data`` that are absent unless requested, so the default JSON has the seed's keys and no others.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from m2fp_service.errors import InvalidParameter

OutputName = Literal["label", "overlay", "people", "areas", "cutout"]
OUTPUT_NAMES: tuple[str, ...] = get_args(OutputName)
OUTPUT_DOCS: dict[str, str] = {
    "label": "data.label_map: base64 PNG, (H, W) 8-bit grey, pixel value = index into /api/info classes",
    "overlay": "data.overlay: base64 PNG, the colour map blended over the photo (RGB)",
    "people": "data.people: one entry per person: id, score, box_xyxy, area, parts, mask (base64 PNG 0/255)",
    "areas": "data.areas: pixel count per class present, {class name: pixels}",
    "cutout": "data.cutout: base64 PNG RGBA, the photo with alpha 255 on people and 0 elsewhere "
              "(virtual backgrounds)",
}
# What ``ParseParams.from_texts`` accepts, as a JSON-Schema (ECMA-262) pattern for the published
# contract: names in any case, spaces/tabs around them, empty items.
_NAME = "|".join("".join(f"[{c}{c.upper()}]" for c in name) for name in (*OUTPUT_NAMES, "all"))
OUTPUTS_PATTERN = rf"^[ \t]*({_NAME})?[ \t]*(,[ \t]*({_NAME})?[ \t]*)*$"
OUTPUTS_DESCRIPTION = (
    "Comma-separated extra outputs, as a query parameter or a multipart form field (both are merged). "
    "`all` selects every one. Valid names: "
    + "; ".join(f"`{name}` -> {OUTPUT_DOCS[name]}" for name in OUTPUT_NAMES)
    + ". Without it the response has exactly the seed's fields."
)


class ParseParams(BaseModel):
    """Options of one ``/api/parse`` request."""

    model_config = ConfigDict(frozen=True)

    outputs: frozenset[OutputName] = frozenset()

    @classmethod
    def from_texts(cls, *texts: str | None) -> ParseParams:
        """Parses comma-separated output lists (query and form); raises ``InvalidParameter``."""
        names: set[str] = set()
        for text in texts:
            names.update(part.strip(" \t").lower() for part in (text or "").split(",") if part.strip(" \t"))
        if "all" in names:
            names = set(OUTPUT_NAMES)
        unknown = sorted(names - set(OUTPUT_NAMES))
        if unknown:
            raise InvalidParameter(
                f"unknown output(s) {', '.join(map(repr, unknown))} in 'outputs'; "
                f"valid ones: {', '.join(OUTPUT_NAMES)} (or 'all')"
            )
        return cls(outputs=frozenset(names))


class PersonOut(BaseModel):
    """One detected person."""

    id: int = Field(description="0-based, highest score first")
    score: float = Field(description="Person confidence, 0..1")
    box_xyxy: list[int] = Field(min_length=4, max_length=4,
                                description="[x0, y0, x1, y1] in image pixels, x1/y1 exclusive")
    area: int = Field(description="Pixels in the person's mask")
    parts: dict[str, int] = Field(description="Pixels per class inside the person's mask")
    mask: str = Field(description="Base64 PNG, (H, W) 8-bit, 255 on the person, 0 elsewhere")


class ParseData(BaseModel):
    """The ``data`` of a successful parse. The first four fields are the seed's; the rest are opt-in."""

    result_image: str = Field(description="Base64 PNG: colour map of the label map (RGB, palette from /api/info)")
    masks: list[str] = Field(description="Base64 PNG per class present: (H, W) 8-bit, 255 on the class, 0 elsewhere")
    classes: list[str] = Field(description="Names of the classes present (background included), aligned with masks")
    inference_time: float = Field(description="Seconds spent on this image (decode to encode), queue wait excluded")
    label_map: str | None = Field(None, description=OUTPUT_DOCS["label"])
    overlay: str | None = Field(None, description=OUTPUT_DOCS["overlay"])
    people: list[PersonOut] | None = Field(None, description=OUTPUT_DOCS["people"])
    areas: dict[str, int] | None = Field(None, description=OUTPUT_DOCS["areas"])
    cutout: str | None = Field(None, description=OUTPUT_DOCS["cutout"])


_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4AWNgAAAAAgABc3UBGAAAAABJRU5ErkJggg=="


class ParseResponse(BaseModel):
    """The seed's success envelope."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "code": 0, "message": "success",
        "data": {"result_image": _PNG, "masks": [_PNG, _PNG], "classes": ["background", "hair"],
                 "inference_time": 1.23},
    }]})

    code: Literal[0] = 0
    message: str = "success"
    data: ParseData


class ErrorResponse(BaseModel):
    """Every error: the same envelope, ``code`` != 0 (stable per error kind), ``data`` null."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "code": 1008, "message": "server busy: 1 running, 4 waiting; retry in 2 s", "data": None,
    }]})

    code: int = Field(description="Stable error code, never 0 (see errors.py)")
    message: str = Field(description="What went wrong and how to fix it, for a person")
    data: None = None


class HealthResponse(BaseModel):
    status: Literal["alive", "ready", "loading", "failed"]
    detail: str | None = None


class ModelInfo(BaseModel):
    file: str = Field(description="Model file name")
    trained: bool = Field(description="False: an untrained demo model, its results are meaningless")
    license: str
    source: dict[str, Any]
    architecture: dict[str, Any]
    exporter: dict[str, Any]
    notes: list[str]
    load_seconds: float


class InfoResponse(BaseModel):
    """Model card and serving configuration."""

    service: str
    version: str
    status: Literal["ready", "loading", "failed"]
    detail: str | None = Field(None, description="Why the model is not ready, and how to get one")
    warnings: list[str] = Field(description="Things a user must know, e.g. an untrained demo model")
    trained: bool | None = Field(description="Model trained? null while no model is loaded")
    model: ModelInfo | None
    classes: list[str] = Field(description="Label-map classes; pixel value of label_map = index")
    palette: list[list[int]] = Field(description="RGB colour of each class in result_image, aligned with classes")
    input_policy: dict[str, Any] | None
    inference: dict[str, Any] | None
    outputs: dict[str, str] = Field(description="Opt-in outputs of /api/parse")
    limits: dict[str, Any]
    workers: dict[str, Any]
    api_key_required: bool
    versions: dict[str, str]
