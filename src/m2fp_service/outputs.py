"""The render stage: a ``ParsingResult`` -> the outputs a request asked for, in one vocabulary.

The API (``/api/parse``, ``/api/background``), ``m2fp parse`` and video all render through
``render``; they differ only in which names they ask for and how they ship the bytes (base64 in
JSON, an image body, files). The names:

=============  ==================================================================================
``color``      colour map PNG (RGB, the label set's palette) — the seed's ``result_image``
``masks``      one binary PNG (0/255) per class present, with the class names — the seed's ``masks``
``label``      label-map PNG, 8-bit grey, pixel value = class index in the label set
``overlay``    colour map blended over the photo (RGB PNG)
``cutout``     the photo as RGBA PNG, alpha 255 on people and parts, 0 elsewhere (binary, unrefined)
``people``     per person: id, score, box, area, parts (pixels per class), optionally a mask PNG
``areas``      pixels per class present
``composite``  the composed picture (``ComposeSpec``: keep, mode, edges, format)
=============  ==================================================================================
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from m2fp_service import labelsets
from m2fp_service.imaging import compose
from m2fp_service.imaging import render as pictures
from m2fp_service.imaging.render import ImageFormat
from m2fp_service.labelsets import LabelSet
from m2fp_service.result import ParsingResult
from m2fp_service.selection import Keep, everyone, select
from m2fp_service.timings import Timings

OutputName = Literal["color", "masks", "label", "overlay", "cutout", "people", "areas", "composite"]
OUTPUT_NAMES: tuple[str, ...] = get_args(OutputName)


@dataclass(frozen=True)
class ComposeSpec:
    """Everything that decides a composed picture, beyond the photo and its parsing.

    Attributes:
        keep: the region kept as it is.
        invert: replace the kept region instead (blur only faces, remove the people).
        options: what replaces the rest (mode, blur, block, colour).
        refine: refine the border against the photo (guided filter).
        feather_px: soften the border over this many pixels.
        format: encoding of the picture; ``quality`` for WebP and JPEG.
    """

    keep: Keep = field(default_factory=Keep)
    invert: bool = False
    options: compose.ComposeOptions = field(default_factory=compose.ComposeOptions)
    refine: bool = True
    feather_px: float = 0.0
    format: ImageFormat = "png"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.options.mode == "transparent" and self.format == "jpeg":
            raise ValueError("a transparent picture cannot be JPEG (no alpha channel): use png or webp")


@dataclass(frozen=True)
class RenderRequest:
    """Which outputs to render, in which label set, and how to compose when ``composite`` is asked.

    Attributes:
        outputs: names from ``OUTPUT_NAMES``.
        labels: the label set the label map, classes, palette and masks are expressed in.
        compose: required when ``composite`` is among ``outputs``.
        person_masks: include each person's mask PNG in ``people``.
    """

    outputs: frozenset[str]
    labels: LabelSet
    compose: ComposeSpec | None = None
    person_masks: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.outputs) - set(OUTPUT_NAMES)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}")
        if "composite" in self.outputs and self.compose is None:
            raise ValueError("the composite output needs a ComposeSpec")


@dataclass(frozen=True)
class Picture:
    """An encoded picture: its bytes, media type and file suffix."""

    data: bytes
    format: ImageFormat
    width: int
    height: int
    has_alpha: bool

    @property
    def media_type(self) -> str:
        return pictures.MEDIA_TYPES[self.format]

    @property
    def suffix(self) -> str:
        return pictures.FILE_SUFFIXES[self.format]


@dataclass
class Rendered:
    """The rendered outputs of one picture (``None``: not requested).

    Attributes:
        result: the parsing in the request's label set.
        palette: RGB per class of ``result.classes``.
        classes_present: names of the classes present, ascending id (aligned with ``masks``).
    """

    result: ParsingResult
    palette: list[tuple[int, int, int]]
    classes_present: list[str]
    color: bytes | None = None
    masks: list[bytes] | None = None
    label: bytes | None = None
    overlay: bytes | None = None
    cutout: bytes | None = None
    people: list[dict[str, Any]] | None = None
    areas: dict[str, int] | None = None
    composite: Picture | None = None


def render(image_rgb: np.ndarray, result: ParsingResult, request: RenderRequest, *,
           background_rgb: np.ndarray | None = None, timings: Timings | None = None) -> Rendered:
    """Renders ``request.outputs`` for one photo and its (CIHP) parsing.

    Args:
        image_rgb: (H, W, 3) uint8, the photo the result belongs to.
        result: its parsing, in the model's CIHP classes.
        request: what to render.
        background_rgb: the ``image`` mode's backdrop, any size.
        timings: receives ``compose`` (array work) and ``encode`` (PNG/WebP/JPEG) seconds.

    Raises:
        InvalidParameter: a ``keep`` person id the result does not have.
    """
    timings = timings if timings is not None else Timings()
    t = time.perf_counter()
    result = labelsets.relabel(result, request.labels)
    palette = list(request.labels.palette)
    label_map = result.label_map
    present = pictures.present_classes(label_map)
    out = Rendered(result=result, palette=palette, classes_present=[result.classes[c] for c in present])
    wanted = request.outputs
    arrays: dict[str, np.ndarray] = {}
    if "color" in wanted or "overlay" in wanted:
        color = pictures.colorize(label_map, palette)
        if "color" in wanted:
            arrays["color"] = color
        if "overlay" in wanted:
            arrays["overlay"] = pictures.overlay(image_rgb, label_map, palette)
    if "label" in wanted:
        arrays["label"] = label_map
    if "cutout" in wanted:
        arrays["cutout"] = pictures.cutout(image_rgb, everyone(result))
    if "areas" in wanted:
        out.areas = result.class_areas()
    composed = None
    if "composite" in wanted:
        spec = request.compose
        assert spec is not None  # RenderRequest checks it
        alpha = compose.matte(select(result, spec.keep), image_rgb, refine=spec.refine, feather_px=spec.feather_px,
                              invert=spec.invert)
        composed = compose.composite(image_rgb, alpha, spec.options, background_rgb)
    t = timings.add("compose", t)

    # Every picture is encoded in one batch, on the encoding threads.
    jobs: list[Callable[[], bytes]] = [functools.partial(pictures.encode_png, array) for array in arrays.values()]
    if "masks" in wanted:
        jobs += [functools.partial(_class_png, label_map, c) for c in present]
    people = result.people_summary() if "people" in wanted else None
    if people is not None and request.person_masks:
        jobs += [functools.partial(_person_png, mask) for mask in result.person_masks]
    if composed is not None and request.compose is not None:
        jobs.append(functools.partial(pictures.encode_image, composed, request.compose.format,
                                      request.compose.quality))
    encoded = iter(pictures.encode_all(jobs))
    for name in arrays:
        setattr(out, name, next(encoded))
    if "masks" in wanted:
        out.masks = [next(encoded) for _ in present]
    if people is not None:
        if request.person_masks:
            for person in people:
                person["mask"] = next(encoded)
        out.people = people
    if composed is not None and request.compose is not None:
        h, w = composed.shape[:2]
        out.composite = Picture(next(encoded), request.compose.format, w, h, composed.shape[2] == 4)
    timings.add("encode", t)
    return out


def _class_png(label_map: np.ndarray, class_id: int) -> bytes:
    return pictures.encode_class_png(label_map, class_id)


def _person_png(mask: np.ndarray) -> bytes:
    return pictures.encode_png(mask.astype(np.uint8) * 255)


def parse_output_names(texts: Iterable[str | None], allowed: Iterable[str], field_name: str) -> frozenset[str]:
    """Comma-separated output names (several texts merged; ``all`` = every allowed one).

    Raises:
        ValueError: an unknown name; the message names the valid ones.
    """
    allowed = tuple(allowed)
    names: set[str] = set()
    for text in texts:
        names.update(part.strip(" \t").lower() for part in (text or "").split(",") if part.strip(" \t"))
    if "all" in names:
        names = set(allowed)
    unknown = sorted(names - set(allowed))
    if unknown:
        raise ValueError(f"unknown output(s) {', '.join(map(repr, unknown))} in '{field_name}'; "
                         f"valid ones: {', '.join(allowed)} (or 'all')")
    return frozenset(names)
