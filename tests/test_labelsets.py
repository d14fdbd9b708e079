"""Label sets: every table maps every CIHP class once; relabelling on hand-written maps, pixel by pixel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from m2fp_service import labelsets
from m2fp_service.labels import pascal_palette
from m2fp_service.labelsets import (
    CIHP_CLASSES,
    LABEL_SET_NAMES,
    TABLES,
    LabelTable,
    check_model_classes,
    label_set,
    relabel,
    relabel_map,
    validate_tables,
)
from m2fp_service.result import ParsingResult, PartInstance

# CIHP ids, for reading the hand-written maps below.
BG, HAT, HAIR, GLOVE, SUNGLASSES, UPPER, DRESS, COAT, SOCKS, PANTS = range(10)
TORSO, SCARF, SKIRT, FACE, L_ARM, R_ARM, L_LEG, R_LEG, L_SHOE, R_SHOE = range(10, 20)

# Every CIHP class once, in id order.
ALL_CIHP = np.arange(20, dtype=np.uint8).reshape(4, 5)

# ALL_CIHP in each set, written out by hand from the tables' documented meaning.
# ATR: glove at (0, 3) is nearer the left arm (2, 4) than the right arm (3, 0); socks at (1, 3)
# is nearer the right leg (3, 2) than the left leg (3, 1).
EXPECTED_ALL = {
    "cihp": ALL_CIHP.tolist(),
    "atr": [[0, 1, 2, 14, 3],
            [4, 7, 4, 13, 6],
            [0, 17, 5, 11, 14],
            [15, 12, 13, 9, 10]],
    "lip": [[0, 1, 2, 3, 4],
            [5, 6, 7, 8, 9],
            [0, 11, 12, 13, 14],
            [15, 16, 17, 18, 19]],
    "tryon": [[0, 3, 1, 7, 11],
              [4, 6, 4, 8, 5],
              [10, 11, 5, 2, 7],
              [7, 8, 8, 9, 9]],
    "mediapipe6": [[0, 5, 1, 5, 5],
                   [4, 4, 4, 4, 4],
                   [2, 4, 4, 3, 2],
                   [2, 2, 2, 4, 4]],
    "person": [[0, 1, 1, 1, 1],
               [1, 1, 1, 1, 1],
               [1, 1, 1, 1, 1],
               [1, 1, 1, 1, 1]],
}


def test_every_set_has_a_table_named_after_it() -> None:
    assert set(TABLES) == set(LABEL_SET_NAMES)
    for name, table in TABLES.items():
        assert table.name == name and table.description
        assert table.classes[0] == "background"


@pytest.mark.parametrize("name", LABEL_SET_NAMES)
def test_every_table_maps_every_cihp_class_exactly_once(name: str) -> None:
    table = TABLES[name]
    validate_tables({name: table})
    assert sorted(table.mapping) == sorted(CIHP_CLASSES)
    assert len(set(table.classes)) == len(table.classes)
    for target in table.mapping.values():
        for t in target if isinstance(target, tuple) else (target,):
            assert t in table.classes


def _broken(base: str = "atr", **changes: object) -> LabelTable:
    return dataclasses.replace(TABLES[base], **changes)  # type: ignore[arg-type]


_ATR = TABLES["atr"]


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (_broken(mapping={k: v for k, v in _ATR.mapping.items() if k != "glove"}), r"unmapped \['glove'\]"),
        (_broken(mapping={**_ATR.mapping, "nose": "face"}), r"unknown \['nose'\]"),
        (_broken(mapping={**_ATR.mapping, "hat": "cap"}), r"hat -> \['cap'\], not among its classes"),
        (_broken(mapping={**_ATR.mapping, "glove": ("left-arm", "left-hand")}), r"glove -> \['left-hand'\]"),
        (_broken(mapping={**_ATR.mapping, "background": "hair"}), "background must stay background"),
        (_broken(classes=(*_ATR.classes, "hair")), "unique"),
        (_broken(classes=("hat", "background", *_ATR.classes[2:])), "background first"),
        (_broken("person", classes=("background", "person", *(f"c{i}" for i in range(300)))), "more than 255"),
    ],
    ids=["missing-class", "unknown-source", "unknown-target", "unknown-pair-target", "background-not-background",
         "duplicate-class", "background-not-first", "too-many-classes"],
)
def test_validate_tables_refuses_broken_tables(table: LabelTable, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        validate_tables({"broken": table})
    assert "label set broken" in str(info.value)


@pytest.mark.parametrize("name", LABEL_SET_NAMES)
def test_relabel_map_every_class(name: str) -> None:
    labels = label_set(name)
    out = relabel_map(ALL_CIHP, labels)
    assert out.dtype == np.uint8 and out.shape == ALL_CIHP.shape
    assert out.tolist() == EXPECTED_ALL[name]
    assert int(out.max()) < len(labels.classes)


def test_relabel_map_leaves_its_input_alone() -> None:
    before = ALL_CIHP.copy()
    relabel_map(ALL_CIHP, label_set("atr"))
    assert np.array_equal(ALL_CIHP, before)


# ATR ids
A_BG, A_L_LEG, A_R_LEG, A_L_ARM, A_R_ARM = 0, 12, 13, 14, 15


@pytest.mark.parametrize(
    ("cihp", "expected"),
    [
        # each glove pixel joins the arm nearest to it
        ([[L_ARM, BG, BG, BG, BG, R_ARM],
          [L_ARM, BG, BG, BG, GLOVE, R_ARM],
          [L_ARM, GLOVE, BG, BG, BG, R_ARM],
          [BG, BG, BG, BG, BG, BG]],
         [[A_L_ARM, 0, 0, 0, 0, A_R_ARM],
          [A_L_ARM, 0, 0, 0, A_R_ARM, A_R_ARM],
          [A_L_ARM, A_L_ARM, 0, 0, 0, A_R_ARM],
          [0, 0, 0, 0, 0, 0]]),
        # one glove region between the two arms is split down the middle
        ([[L_ARM, GLOVE, GLOVE, GLOVE, GLOVE, R_ARM]] * 2,
         [[A_L_ARM, A_L_ARM, A_L_ARM, A_R_ARM, A_R_ARM, A_R_ARM]] * 2),
        # socks follow the nearest leg
        ([[L_LEG, BG, BG, BG, BG, R_LEG],
          [L_LEG, SOCKS, BG, BG, BG, R_LEG],
          [BG, BG, BG, BG, SOCKS, R_LEG],
          [BG, BG, BG, BG, BG, BG]],
         [[A_L_LEG, 0, 0, 0, 0, A_R_LEG],
          [A_L_LEG, A_L_LEG, 0, 0, 0, A_R_LEG],
          [0, 0, 0, 0, A_R_LEG, A_R_LEG],
          [0, 0, 0, 0, 0, 0]]),
        # only the right arm is there: the glove is on it
        ([[GLOVE, GLOVE, BG, R_ARM]], [[A_R_ARM, A_R_ARM, 0, A_R_ARM]]),
        # only the right leg is there: so are the socks
        ([[R_LEG, BG, SOCKS, SOCKS]], [[A_R_LEG, 0, A_R_LEG, A_R_LEG]]),
        # no arm at all: the documented fallback, the left arm
        ([[GLOVE, GLOVE, BG], [BG, BG, HAIR]], [[A_L_ARM, A_L_ARM, 0], [0, 0, 2]]),
        # no leg at all: the left leg
        ([[SOCKS, BG], [BG, SOCKS]], [[A_L_LEG, 0], [0, A_L_LEG]]),
        # equally near both arms: the first of the pair (left)
        ([[L_ARM, GLOVE, R_ARM]], [[A_L_ARM, A_L_ARM, A_R_ARM]]),
        # gloves and socks in one picture, each split on its own
        ([[L_ARM, GLOVE, BG, GLOVE, R_ARM],
          [BG, BG, BG, BG, BG],
          [L_LEG, SOCKS, BG, SOCKS, R_LEG]],
         [[A_L_ARM, A_L_ARM, 0, A_R_ARM, A_R_ARM],
          [0, 0, 0, 0, 0],
          [A_L_LEG, A_L_LEG, 0, A_R_LEG, A_R_LEG]]),
    ],
    ids=["glove-nearest-arm", "glove-split", "socks-nearest-leg", "glove-only-right-arm", "socks-only-right-leg",
         "glove-no-arm", "socks-no-leg", "glove-tie", "gloves-and-socks"],
)
def test_atr_side_split(cihp: list[list[int]], expected: list[list[int]]) -> None:
    out = relabel_map(np.array(cihp, np.uint8), label_set("atr"))
    assert out.tolist() == expected


def _result(label_map: np.ndarray, classes: list[str] | None = None) -> ParsingResult:
    h, w = label_map.shape
    masks = np.zeros((2, h, w), bool)
    masks[0, :, :2] = True
    masks[1, 1:, 3:] = True
    return ParsingResult(label_map=label_map, classes=list(classes or CIHP_CLASSES), person_masks=masks,
                         person_scores=np.array([0.9, 0.6], np.float32),
                         parts=[PartInstance(GLOVE, 0.8), PartInstance(FACE, 0.7), PartInstance(COAT, 0.6)],
                         trained=False)


@pytest.mark.parametrize("name", [n for n in LABEL_SET_NAMES if n != "cihp"])
def test_relabel_keeps_people_and_moves_classes(name: str) -> None:
    result = _result(ALL_CIHP.copy())
    labels = label_set(name)
    out = relabel(result, labels)
    assert out.classes == list(TABLES[name].classes)
    assert out.label_map.tolist() == EXPECTED_ALL[name]
    assert out.person_masks is result.person_masks
    assert out.person_scores is result.person_scores
    assert out.trained is False
    table = TABLES[name]
    for before, after in zip(result.parts, out.parts, strict=True):
        target = table.mapping[CIHP_CLASSES[before.class_id]]
        first = target[0] if isinstance(target, tuple) else target
        assert after == PartInstance(table.classes.index(first), before.score)
    # the input is untouched
    assert result.label_map.tolist() == ALL_CIHP.tolist() and result.classes == list(CIHP_CLASSES)


def test_relabel_cihp_is_the_result_itself() -> None:
    result = _result(ALL_CIHP.copy())
    assert relabel(result, label_set("cihp")) is result


def test_relabel_atr_parts_and_areas() -> None:
    out = relabel(_result(ALL_CIHP.copy()), label_set("atr"))
    atr = TABLES["atr"].classes
    assert [atr[p.class_id] for p in out.parts] == ["left-arm", "face", "upper-clothes"]
    # coat and upper-clothes are one ATR class; torso-skin is background
    assert out.class_areas()["upper-clothes"] == 2 and out.class_areas()["background"] == 2


def test_check_model_classes() -> None:
    check_model_classes(list(CIHP_CLASSES))
    bad = [list(reversed(CIHP_CLASSES)), list(CIHP_CLASSES[:-1]), [*CIHP_CLASSES, "bag"],
           list(TABLES["atr"].classes), []]
    for classes in bad:
        with pytest.raises(ValueError, match="not CIHP's"):
            check_model_classes(classes)


CARD_PALETTE = [(i * 10 % 256, 255 - i, i * 3) for i in range(21)]  # deliberately not the pascal palette


def test_cihp_uses_the_card_palette() -> None:
    labels = label_set("cihp", CARD_PALETTE)
    assert labels.palette == tuple(CARD_PALETTE[:20])
    assert labels.classes == CIHP_CLASSES


@pytest.mark.parametrize("palette", [None, CARD_PALETTE[:5]], ids=["no-palette", "too-short"])
def test_cihp_without_a_usable_card_palette_is_pascal(palette: list[tuple[int, int, int]] | None) -> None:
    assert label_set("cihp", palette).palette == tuple(pascal_palette(20))


@pytest.mark.parametrize("name", [n for n in LABEL_SET_NAMES if n != "cihp"])
def test_other_sets_use_the_pascal_palette_of_their_length(name: str) -> None:
    labels = label_set(name, CARD_PALETTE)
    n = len(TABLES[name].classes)
    assert labels.palette == tuple(pascal_palette(n))
    assert len(set(labels.palette)) == n, "two classes of one set share a colour"
    assert labels.palette[0] == (0, 0, 0)


def test_unknown_label_set_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        label_set("pascal")


def test_lookup_table_and_class_index() -> None:
    atr = label_set("atr")
    assert atr.lut.dtype == np.uint8 and atr.lut.shape == (256,)
    assert atr.class_index("left-arm") == 14
    assert {(c, a, b) for c, a, b in atr.splits} == {(GLOVE, 14, 15), (SOCKS, 12, 13)}
    assert labelsets.label_set("person").splits == ()
