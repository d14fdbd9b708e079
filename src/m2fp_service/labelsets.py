"""Label sets: CIHP's 20 classes re-expressed in the vocabularies other pipelines speak.

Each set is one data table: its class names (background first, index = pixel value of the label
map) and, for every CIHP class, the class it becomes. A CIHP class may go to a *pair* of classes
when the target set splits what CIHP keeps whole by side (ATR has no glove class, so a glove
becomes the left or right arm, whichever of the two is nearer). ``validate_tables`` checks at
import, and ``check_model_classes`` at model load, that every CIHP class is mapped exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np

from m2fp_service.labels import pascal_palette
from m2fp_service.result import ParsingResult, PartInstance

LabelSetName = Literal["cihp", "atr", "lip", "tryon", "mediapipe6", "person"]
LABEL_SET_NAMES: tuple[str, ...] = get_args(LabelSetName)

CIHP_CLASSES: tuple[str, ...] = (
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
    "torso-skin", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
    "right-shoe",
)

Target = str | tuple[str, str]


@dataclass(frozen=True)
class LabelTable:
    """One label set: its classes and where each CIHP class goes."""

    name: str
    description: str
    classes: tuple[str, ...]
    mapping: dict[str, Target]


def _identity(*names: str) -> dict[str, Target]:
    return {n: n for n in names}


TABLES: dict[str, LabelTable] = {
    "cihp": LabelTable(
        "cihp", "CIHP, the model's native 20 classes", CIHP_CLASSES, _identity(*CIHP_CLASSES),
    ),
    "atr": LabelTable(
        "atr", "ATR (18 classes). ATR has no glove, socks or torso-skin: gloves join the nearer arm, socks "
               "the nearer leg, torso skin is background as in ATR's annotation; coat is upper-clothes",
        ("background", "hat", "hair", "sunglasses", "upper-clothes", "skirt", "pants", "dress", "belt",
         "left-shoe", "right-shoe", "face", "left-leg", "right-leg", "left-arm", "right-arm", "bag", "scarf"),
        {**_identity("background", "hat", "hair", "sunglasses", "upper-clothes", "dress", "pants", "scarf", "skirt",
                     "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe", "right-shoe"),
         "glove": ("left-arm", "right-arm"), "socks": ("left-leg", "right-leg"), "coat": "upper-clothes",
         "torso-skin": "background"},
    ),
    "lip": LabelTable(
        "lip", "LIP (20 classes): CIHP's classes in LIP's order; LIP has jumpsuits where CIHP has torso-skin, "
               "so torso skin is background (LIP does not label it) and jumpsuits never occur",
        ("background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
         "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
         "right-shoe"),
        {**_identity(*(c for c in CIHP_CLASSES if c != "torso-skin")), "torso-skin": "background"},
    ),
    "tryon": LabelTable(
        "tryon", "Virtual try-on: garments by body region, and the body parts a try-on model keeps or replaces",
        ("background", "hair", "face", "headwear", "upper-clothes", "lower-clothes", "full-body", "arms", "legs",
         "shoes", "neck-torso", "accessories"),
        {"background": "background", "hat": "headwear", "hair": "hair", "glove": "arms",
         "sunglasses": "accessories", "upper-clothes": "upper-clothes", "dress": "full-body", "coat": "upper-clothes",
         "socks": "legs", "pants": "lower-clothes", "torso-skin": "neck-torso", "scarf": "accessories",
         "skirt": "lower-clothes", "face": "face", "left-arm": "arms", "right-arm": "arms", "left-leg": "legs",
         "right-leg": "legs", "left-shoe": "shoes", "right-shoe": "shoes"},
    ),
    "mediapipe6": LabelTable(
        "mediapipe6", "MediaPipe's multiclass selfie segmenter classes: hats, gloves and sunglasses are others "
                      "(accessories); shoes, socks and scarves are clothes",
        ("background", "hair", "body-skin", "face-skin", "clothes", "others"),
        {"background": "background", "hat": "others", "hair": "hair", "glove": "others", "sunglasses": "others",
         "upper-clothes": "clothes", "dress": "clothes", "coat": "clothes", "socks": "clothes", "pants": "clothes",
         "torso-skin": "body-skin", "scarf": "clothes", "skirt": "clothes", "face": "face-skin",
         "left-arm": "body-skin", "right-arm": "body-skin", "left-leg": "body-skin", "right-leg": "body-skin",
         "left-shoe": "clothes", "right-shoe": "clothes"},
    ),
    "person": LabelTable(
        "person", "Binary: background and person (every part of every person)", ("background", "person"),
        {c: ("background" if c == "background" else "person") for c in CIHP_CLASSES},
    ),
}


def validate_tables(tables: dict[str, LabelTable]) -> None:
    """Raises ``ValueError`` unless every table maps each CIHP class exactly once to its own classes."""
    for name, table in tables.items():
        if table.classes[0] != "background" or len(set(table.classes)) != len(table.classes):
            raise ValueError(f"label set {name}: classes must be unique with background first")
        if len(table.classes) > 255:
            raise ValueError(f"label set {name}: more than 255 classes")
        if sorted(table.mapping) != sorted(CIHP_CLASSES) or len(table.mapping) != len(CIHP_CLASSES):
            missing = sorted(set(CIHP_CLASSES) - set(table.mapping))
            extra = sorted(set(table.mapping) - set(CIHP_CLASSES))
            raise ValueError(f"label set {name}: CIHP classes unmapped {missing}, unknown {extra}")
        for source, target in table.mapping.items():
            targets = target if isinstance(target, tuple) else (target,)
            unknown = [t for t in targets if t not in table.classes]
            if unknown:
                raise ValueError(f"label set {name}: {source} -> {unknown}, not among its classes")
        if table.mapping["background"] != "background":
            raise ValueError(f"label set {name}: background must stay background")


validate_tables(TABLES)


def check_model_classes(parsing_classes: list[str]) -> None:
    """Raises ``ValueError`` unless the model's label-map classes are CIHP's, in CIHP's order.

    Every label set is defined on CIHP's classes; a model with other classes cannot be relabelled.
    """
    if tuple(parsing_classes) != CIHP_CLASSES:
        raise ValueError(f"the model's classes {parsing_classes} are not CIHP's {list(CIHP_CLASSES)}")


@dataclass(frozen=True, eq=False)
class LabelSet:
    """A label set ready to apply: lookup tables from CIHP ids, palette, and the side-split pairs."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    lut: np.ndarray  # (256,) uint8: CIHP id -> target id (for a pair: the first of the two)
    splits: tuple[tuple[int, int, int], ...]  # (CIHP id, target id A, target id B): nearer of A/B

    def class_index(self, name: str) -> int:
        return self.classes.index(name)


def build(table: LabelTable, palette: list[tuple[int, int, int]] | None = None) -> LabelSet:
    """A ``LabelSet`` from its table; ``palette`` (e.g. the model card's) is used for CIHP itself."""
    lut = np.zeros(256, np.uint8)
    splits = []
    for cihp_id, source in enumerate(CIHP_CLASSES):
        target = table.mapping[source]
        if isinstance(target, tuple):
            a, b = (table.classes.index(t) for t in target)
            lut[cihp_id] = a
            splits.append((cihp_id, a, b))
        else:
            lut[cihp_id] = table.classes.index(target)
    n = len(table.classes)
    colours = palette if palette is not None and len(palette) >= n else pascal_palette(n)
    rgb = tuple((int(r), int(g), int(b)) for r, g, b in colours[:n])
    return LabelSet(table.name, table.classes, rgb, lut, tuple(splits))


def label_set(name: str, cihp_palette: list[tuple[int, int, int]] | None = None) -> LabelSet:
    """The named set (``KeyError`` for an unknown name; the API validates names first)."""
    table = TABLES[name]
    return build(table, cihp_palette if name == "cihp" else None)


def relabel_map(label_map: np.ndarray, labels: LabelSet) -> np.ndarray:
    """(H, W) uint8 CIHP label map -> the same map in ``labels``' ids.

    Pixels of a CIHP class that goes to a pair (A, B) take whichever of A and B is nearer
    (Euclidean distance to the nearest pixel of each); with neither present, A.
    """
    out: np.ndarray = labels.lut[label_map]
    if not labels.splits:
        return out
    # The sides are decided by the pixels that are certainly A or B: not those being split.
    anchors = out.copy()
    anchors[np.isin(label_map, [cihp_id for cihp_id, _, _ in labels.splits])] = 255
    for cihp_id, a, b in labels.splits:
        where = label_map == cihp_id
        if not where.any():
            continue
        dist_a = _distance_to(anchors == a)
        dist_b = _distance_to(anchors == b)
        out[where & (dist_b < dist_a)] = b
    return out


def _distance_to(region: np.ndarray) -> np.ndarray:
    """(H, W) float32 distance of each pixel to the nearest ``region`` pixel (inf when none)."""
    if not region.any():
        return np.full(region.shape, np.inf, np.float32)
    return cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, 3)


def relabel(result: ParsingResult, labels: LabelSet) -> ParsingResult:
    """The result in another label set: label map, class names and part ids follow; people stay."""
    if labels.name == "cihp":
        return result
    return ParsingResult(
        label_map=relabel_map(result.label_map, labels),
        classes=list(labels.classes),
        person_masks=result.person_masks,
        person_scores=result.person_scores,
        parts=[PartInstance(int(labels.lut[p.class_id]), p.score) for p in result.parts],
        trained=result.trained,
    )
