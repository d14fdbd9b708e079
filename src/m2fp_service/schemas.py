"""Pydantic models for the API edge: what ``/api/parse`` and ``/api/info`` accept and return.

The parse response keeps the seed service's envelope exactly (``code``, ``message``, ``data`` with
``result_image``, ``masks``, ``classes``, ``inference_time``); richer outputs are opt-in fields of
``data`` that are absent unless requested, so the default JSON has the seed's keys and no others.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from m2fp_service import labelsets
from m2fp_service.errors import InvalidParameter
from m2fp_service.imaging.compose import ComposeOptions, Mode
from m2fp_service.imaging.render import ImageFormat
from m2fp_service.labelsets import LABEL_SET_NAMES, LabelSetName
from m2fp_service.outputs import ComposeSpec, RenderRequest, parse_output_names
from m2fp_service.selection import Keep

M = TypeVar("M", bound=BaseModel)

ParseOutputName = Literal["label", "overlay", "people", "areas", "cutout"]
OUTPUT_NAMES: tuple[str, ...] = get_args(ParseOutputName)
OUTPUT_DOCS: dict[str, str] = {
    "label": "data.label_map: base64 PNG, (H, W) 8-bit grey, pixel value = index into the label set's classes",
    "overlay": "data.overlay: base64 PNG, the colour map blended over the photo (RGB)",
    "people": "data.people: one entry per person: id, score, box_xyxy, area, parts, mask (base64 PNG 0/255)",
    "areas": "data.areas: pixel count per class present, {class name: pixels}",
    "cutout": "data.cutout: base64 PNG RGBA, the photo with alpha 255 on people and 0 elsewhere (binary; "
              "POST /api/background gives refined edges and backdrops)",
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
LABELS_DESCRIPTION = (
    "Label set the label map, classes, masks, palette and legend are expressed in: "
    + "; ".join(f"`{name}` ({labelsets.TABLES[name].description})" for name in LABEL_SET_NAMES)
    + ". Default `cihp`, the model's own."
)


def params_from(model: type[M], values: dict[str, Any]) -> M:
    """Validates request options; a ``ValidationError`` becomes ``InvalidParameter`` naming each field."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()]
        raise InvalidParameter("invalid request: " + "; ".join(problems)) from None


class ParseParams(BaseModel):
    """Options of one ``/api/parse`` request."""

    model_config = ConfigDict(frozen=True)

    outputs: frozenset[ParseOutputName] = frozenset()
    labels: LabelSetName = "cihp"

    @classmethod
    def from_texts(cls, *texts: str | None, labels: str | None = None) -> ParseParams:
        """Parses comma-separated output lists (query and form) and the label set; raises ``InvalidParameter``."""
        try:
            names = parse_output_names(texts, OUTPUT_NAMES, "outputs")
        except ValueError as exc:
            raise InvalidParameter(str(exc)) from None
        return params_from(cls, {"outputs": names, "labels": (labels or "cihp").strip().lower()})


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

    result_image: str = Field(description="Base64 PNG: colour map of the label map (RGB, the label set's palette "
                                          "from /api/info)")
    masks: list[str] = Field(description="Base64 PNG per class present: (H, W) 8-bit, 255 on the class, 0 elsewhere")
    classes: list[str] = Field(description="Names of the classes present (background included), aligned with masks; "
                                           "in the requested label set")
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


_HEX = re.compile(r"^#?([0-9a-f]{3}|[0-9a-f]{6})$")


def hex_to_rgb(text: str) -> tuple[int, int, int]:
    """``#00ff00``, ``00ff00`` or ``#0f0`` -> (0, 255, 0); ``ValueError`` otherwise."""
    match = _HEX.match(text.strip().lower())
    if not match:
        raise ValueError(f"color {text!r} is not a hex colour like #00ff00 or #0f0")
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


class BackgroundParams(BaseModel):
    """Options of ``POST /api/background`` (query parameters or multipart form fields), also used by
    ``m2fp parse --background`` and ``m2fp video``."""

    # Unknown names are refused by ``merged`` with the list of valid ones (FastAPI's own refusal of
    # extras would not name them).
    model_config = ConfigDict(extra="ignore", frozen=True)

    keep: str = Field(
        "people", description="What stays as it is: `people` (everyone), `largest` (the largest person), "
        "`central` (the person nearest the centre), `people:0,2` (ids as listed by /api/parse outputs=people), "
        "`classes:face,hair` (class names of the label set, see /api/info)",
        examples=["people", "largest", "people:0", "classes:face"])
    invert: bool = Field(False, description="Apply the effect to the kept region instead of the rest "
                                            "(`keep=classes:face&invert=true&mode=blur` blurs the faces)")
    mode: Mode | None = Field(None, description="What replaces the rest: `transparent` (alpha), `blur`, `color`, "
                                                "`image` (the `background` file, scaled to cover and centred, not "
                                                "stretched), `pixelate`. Default: `image` when a background file "
                                                "is sent, else `transparent`")
    blur: float = Field(20.0, gt=0, le=250, description="Blur strength: Gaussian sigma in output pixels")
    block: int = Field(16, ge=2, le=1024, description="Pixelate block size in output pixels")
    color: str = Field("#00ff00", description="Backdrop colour of mode `color`, hex", examples=["#00ff00", "#0f0"])
    refine: bool = Field(True, description="Refine the border against the photo (guided filter): hair and fingers "
                                           "follow the photo's own edges, and their colour is freed of the old "
                                           "background")
    feather: float = Field(0.0, ge=0, le=200, description="Soften the border over this many pixels")
    format: ImageFormat = Field("png", description="`png` or `webp` (both with alpha), or `jpeg` (not with "
                                                   "`transparent`)")
    quality: int = Field(90, ge=1, le=100, description="WebP/JPEG quality (WebP: 100 = lossless)")
    labels: LabelSetName = Field("cihp", description="Label set the `classes:` names of `keep` are taken from")

    @field_validator("color")
    @classmethod
    def _check_color(cls, value: str) -> str:
        hex_to_rgb(value)
        return value

    @field_validator("keep", "labels", "format", "mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @classmethod
    def merged(cls, query: dict[str, str], form: dict[str, str]) -> BackgroundParams:
        """Options from query parameters and form fields; an option given in both must agree.

        Raises:
            InvalidParameter: an unknown option (the message lists the valid ones), an invalid value, or
                the same option with different values.
        """
        valid = list(cls.model_fields)
        for values, where in ((query, "query parameter"), (form, "form field")):
            unknown = sorted(set(values) - set(valid))
            if unknown:
                raise InvalidParameter(f"unknown {where} {', '.join(map(repr, unknown))}; valid options: "
                                       f"{', '.join(valid)}")
        both = set(query) & set(form)
        if both:
            from_query, from_form = params_from(cls, query), params_from(cls, form)
            clash = sorted(k for k in both if getattr(from_query, k) != getattr(from_form, k))
            if clash:
                raise InvalidParameter(f"{', '.join(clash)}: given as query parameter and as form field, "
                                       "with different values")
        return params_from(cls, {**query, **form})

    def resolved_mode(self, has_background: bool) -> Mode:
        return self.mode or ("image" if has_background else "transparent")

    def precheck(self) -> None:
        """What can be checked before the upload arrives (raises ``InvalidParameter``)."""
        Keep.parse(self.keep, labelsets.TABLES[self.labels].classes)
        if self.mode == "transparent" and self.format == "jpeg":
            raise InvalidParameter("format=jpeg has no alpha channel: use png or webp for mode=transparent")

    def to_request(self, has_background: bool, cihp_palette: list[tuple[int, int, int]] | None = None
                   ) -> RenderRequest:
        """The render request for a composite; checks what only makes sense together.

        Raises:
            InvalidParameter: unknown class or bad ``keep``; ``image`` mode without a background file, or
                a background file with another mode; ``transparent`` as JPEG.
        """
        self.precheck()
        labels = labelsets.label_set(self.labels, cihp_palette)
        keep = Keep.parse(self.keep, labels.classes)
        mode = self.resolved_mode(has_background)
        if mode == "image" and not has_background:
            raise InvalidParameter("mode=image needs a picture in the multipart file field 'background'")
        if has_background and mode != "image":
            raise InvalidParameter(f"a 'background' file was sent but mode={mode}; use mode=image (or omit mode)")
        if mode == "transparent" and self.format == "jpeg":
            raise InvalidParameter("format=jpeg has no alpha channel: use png or webp for mode=transparent")
        options = ComposeOptions(mode=mode, blur_sigma_px=self.blur, block_px=self.block,
                                 color_rgb=hex_to_rgb(self.color))
        spec = ComposeSpec(keep=keep, invert=self.invert, options=options, refine=self.refine,
                           feather_px=self.feather, format=self.format, quality=self.quality)
        return RenderRequest(outputs=frozenset({"composite"}), labels=labels, compose=spec, person_masks=False)


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
    deformable_attention: Literal["fused", "standard"] = Field(
        description="How the encoder's deformable attention runs: `fused` = the service's kernel "
                    "(M2FP_MSDA_KERNEL, `make native`), `standard` = ONNX's standard ops (several times slower "
                    "on that part; the kernel is not built or is turned off, or the model predates it)")
    winograd_convolutions: int = Field(
        0, ge=0, description="How many 3x3 convolutions run as Winograd F(4x4, 3x3) (the same library; on "
                             "M2FP FP32 models the pixel decoder's, 1; 0 without the library or for INT8 models)")
    feedforward_blocks: int = Field(
        0, ge=0, description="How many feed-forward blocks (MatMul, Add, Relu, MatMul, Add) run as one fused op "
                             "(the same library; on M2FP models 25: the pixel decoder's 6 encoder layers, the 9 "
                             "decoder layers and the 10 mask-embedding MLPs; on INT8 models the encoder's 6 are "
                             "quantized and fused only on CPUs with AVX-512 VNNI or AMX-INT8, 19 elsewhere; 0 "
                             "without the library)")
    linear_layers: int = Field(
        0, ge=0, description="How many of the linear layers left (MatMul, Add: the attention's projections, the mask "
                             "MLPs' last layers) run as one fused op (the same library; on M2FP models 88; on INT8 "
                             "models the 42 quantized ones (the encoder's value, sampling, attention-weight and "
                             "output projections, the decoder's cross-attention keys and values; 12 in a model whose "
                             "export kept the attention projections in FP32) only on CPUs with AVX-512 VNNI or "
                             "AMX-INT8, the 46 float ones (76) elsewhere too; 0 without the library)")
    int8_convolutions: int = Field(
        0, ge=0, description="How many of an INT8 model's convolutions run on AMX tiles as the library's own op "
                             "instead of ONNX Runtime's (the same library; on M2FP INT8 models 105 of 112 on CPUs "
                             "with AMX-INT8, with the optimised-graph cache on; 0 elsewhere, for FP32 models or "
                             "without the library)")
    int8_group_norms: int = Field(
        0, ge=0, description="How many of an INT8 model's group normalisations (with the Add and quantization around "
                             "them) run as the library's own op on its NHWC bytes instead of ten ONNX Runtime nodes "
                             "(the same library; on M2FP INT8 models 2, the pixel decoder's at a quarter of the "
                             "input's size, on CPUs with AVX-512 VNNI or AMX-INT8, with the optimised-graph cache "
                             "on; 0 elsewhere)")
    softmax_nodes: int = Field(
        0, ge=0, description="How many Softmax nodes after an additive mask run as the library's own op, which stays "
                             "fast on rows of -inf (the same library; on M2FP models 9: the decoder's masked "
                             "cross-attentions, FP32 and INT8 alike; 0 without the library)")
    position_embeddings: int = Field(
        0, ge=0, description="How many sine position embeddings (each proved equal on the spot) run as the "
                             "library's own op instead of ~50-100 ONNX Runtime nodes (the same library; on M2FP "
                             "models 6: the pixel decoder's and the decoder's three levels, FP32 and INT8 alike; 0 "
                             "without the library)")


class LabelSetOut(BaseModel):
    """One label set: ``labels=<name>`` on /api/parse and /api/background."""

    description: str
    classes: list[str] = Field(description="Pixel value of label_map = index; background first")
    palette: list[list[int]] = Field(description="RGB colour of each class in result_image, aligned with classes")


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
    label_sets: dict[str, LabelSetOut] = Field(description="Label sets for `labels=`; `cihp` is the model's own")
    limits: dict[str, Any]
    workers: dict[str, Any]
    api_key_required: bool
    versions: dict[str, str]
