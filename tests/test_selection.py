"""``keep=``: parsing the text form, and resolving it on hand-built 4x6 results."""

from __future__ import annotations

import numpy as np
import pytest

from m2fp_service.errors import InvalidParameter
from m2fp_service.labelsets import CIHP_CLASSES, TABLES
from m2fp_service.result import ParsingResult
from m2fp_service.selection import KEEP_SYNTAX, Keep, everyone, person_index, select

CLASSES = CIHP_CLASSES
HAIR, UPPER, FACE = 2, 5, 13


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("people", Keep("people")),
        ("largest", Keep("largest")),
        ("central", Keep("central")),
        ("people:1,3", Keep("ids", ids=(1, 3))),
        ("people:0", Keep("ids", ids=(0,))),
        ("people:3,1,3", Keep("ids", ids=(1, 3))),
        ("classes:face,hair", Keep("classes", classes=("face", "hair"))),
        ("classes:hair,face,hair", Keep("classes", classes=("hair", "face"))),
        ("classes:left-arm", Keep("classes", classes=("left-arm",))),
        # case and spaces
        ("  LARGEST ", Keep("largest")),
        ("People", Keep("people")),
        ("People:1, 3", Keep("ids", ids=(1, 3))),
        ("CLASSES: Face , HAIR", Keep("classes", classes=("face", "hair"))),
    ],
)
def test_keep_parse(text: str, expected: Keep) -> None:
    assert Keep.parse(text, CLASSES) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("people:", ["person ids must be numbers"]),
        ("people:a", ["person ids must be numbers", "people:0,2"]),
        ("people:-1", ["person ids must be numbers"]),
        ("people:1.5", ["person ids must be numbers"]),
        ("people:1;2", ["person ids must be numbers"]),
        ("people:\u00b2", ["person ids must be numbers"]),  # '²'.isdigit() is True but int('²') fails
        ("classes:nose", ["unknown class 'nose'", "valid classes of this label set", "face", "right-shoe"]),
        ("classes:face,nose,ear", ["'nose', 'ear'"]),
        ("classes:", ["(none given)", "valid classes"]),
        ("classes:,", ["(none given)"]),
        ("everyone", ["not understood", KEEP_SYNTAX]),
        ("", ["not understood", KEEP_SYNTAX]),
        ("largest:1", ["not understood"]),
        ("person:1", ["not understood"]),
        ("people1", ["not understood"]),
    ],
)
def test_keep_parse_refuses(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidParameter) as info:
        Keep.parse(text, CLASSES)
    assert info.value.status == 400
    for word in words:
        assert word in info.value.message
    assert repr(text) in info.value.message or not text.strip()


def test_keep_classes_are_checked_against_the_label_set() -> None:
    atr = TABLES["atr"].classes
    assert Keep.parse("classes:belt", atr) == Keep("classes", classes=("belt",))
    with pytest.raises(InvalidParameter, match="unknown class 'glove'.*belt"):
        Keep.parse("classes:glove", atr)  # ATR has no glove
    with pytest.raises(InvalidParameter, match="unknown class 'belt'"):
        Keep.parse("classes:belt", CLASSES)


@pytest.mark.parametrize(
    ("text", "shown"),
    [("people", "people"), (" Largest", "largest"), ("central", "central"), ("people:3, 1", "people:1,3"),
     ("classes:Face,hair", "classes:face,hair")],
)
def test_keep_str_round_trip(text: str, shown: str) -> None:
    keep = Keep.parse(text, CLASSES)
    assert str(keep) == shown
    assert Keep.parse(str(keep), CLASSES) == keep


def test_default_keep_is_everyone() -> None:
    assert Keep() == Keep.parse("people", CLASSES) and str(Keep()) == "people"


# A 4x6 picture: person 0 is the left half-block (12 px), person 1 a 2x2 block right of the
# centre (4 px), overlapping nothing; a face pixel at (3, 5) belongs to no person.
LABEL_MAP = np.array([
    [0, 0, 0, 0, 0, 0],
    [0, HAIR, FACE, 0, 0, 0],
    [0, UPPER, UPPER, 0, 0, 0],
    [0, 0, 0, 0, 0, FACE],
], np.uint8)
P0 = np.array([
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
], bool)
P1 = np.array([
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 0],
    [0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 0],
], bool)


def _result(masks: list[np.ndarray], label_map: np.ndarray = LABEL_MAP) -> ParsingResult:
    stack = np.stack(masks) if masks else np.zeros((0, *label_map.shape), bool)
    return ParsingResult(label_map=label_map.copy(), classes=list(CLASSES), person_masks=stack,
                         person_scores=np.linspace(0.9, 0.5, len(masks)).astype(np.float32))


TWO = _result([P0, P1])


def _m(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows], bool)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # everyone: the union of people's masks and of every labelled part (the face at (3, 5) too)
        ("people", _m(["###...",
                       "#####.",
                       "#####.",
                       "###..#"])),
        ("largest", P0),
        # person 1's centroid (1.5, 3.5) is nearer the centre (1.5, 2.5) than person 0's (1.5, 1.0)
        ("central", P1),
        ("people:1", P1),
        ("people:0,1", P0 | P1),
        ("classes:face", _m(["......",
                             "..#...",
                             "......",
                             ".....#"])),
        ("classes:face,hair", _m(["......",
                                  ".##...",
                                  "......",
                                  ".....#"])),
        ("classes:hat", np.zeros((4, 6), bool)),  # a valid class that is not in the picture
    ],
)
def test_select(text: str, expected: np.ndarray) -> None:
    mask = select(TWO, Keep.parse(text, CLASSES))
    assert mask.dtype == np.bool_ and mask.shape == (4, 6)
    assert mask.tolist() == expected.tolist()


@pytest.mark.parametrize("text", ["people", "largest", "central", "people:0", "people:0,1", "classes:face"])
def test_select_returns_a_fresh_writable_mask(text: str) -> None:
    result = _result([P0, P1])
    for array in (result.label_map, result.person_masks):  # as the result cache leaves them
        array.flags.writeable = False
    mask = select(result, Keep.parse(text, CLASSES))
    assert mask.flags.writeable
    assert not np.shares_memory(mask, result.person_masks) and not np.shares_memory(mask, result.label_map)
    mask[:] = True
    assert result.person_masks.tolist() == [P0.tolist(), P1.tolist()]


def test_largest_and_central_follow_the_masks_not_the_order() -> None:
    swapped = _result([P1, P0])
    assert select(swapped, Keep("largest")).tolist() == P0.tolist()
    assert select(swapped, Keep("central")).tolist() == P1.tolist()
    assert person_index(swapped, "largest") == 1 and person_index(swapped, "central") == 0


def test_central_skips_people_with_empty_masks() -> None:
    empty = np.zeros((4, 6), bool)
    result = _result([empty, P0])
    assert person_index(result, "central") == 1
    assert select(result, Keep("central")).tolist() == P0.tolist()


def test_central_is_measured_relative_to_the_picture_size() -> None:
    # 4 rows x 6 columns: a person one column off centre beats one a row and a half off
    label_map = np.zeros((4, 6), np.uint8)
    row_off = _m(["..##..", "......", "......", "......"])  # centroid (0, 2.5): 1.5 rows = 0.375 h off
    col_off = _m(["......", "....#.", "....#.", "......"])  # centroid (1.5, 4): 1.5 cols = 0.25 w off
    result = _result([row_off, col_off], label_map)
    assert person_index(result, "central") == 1


@pytest.mark.parametrize(("ids", "missing"), [("people:2", "2"), ("people:0,5,7", "5, 7")])
def test_unknown_person_id_names_how_many_people_there_are(ids: str, missing: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        select(TWO, Keep.parse(ids, CLASSES))
    message = info.value.message
    assert f"no person {missing}" in message
    assert "2 found" in message and "ids 0-1" in message and "outputs=people" in message


NOBODY = _result([], np.zeros((4, 6), np.uint8))


@pytest.mark.parametrize("kind", ["largest", "central"])
def test_no_people_selects_nothing(kind: str) -> None:
    mask = select(NOBODY, Keep(kind))  # type: ignore[arg-type]
    assert mask.shape == (4, 6) and mask.dtype == np.bool_ and not mask.any()
    assert person_index(NOBODY, kind) is None  # type: ignore[arg-type]


def test_no_people_but_labelled_parts() -> None:
    parts_only = _result([], LABEL_MAP)
    assert select(parts_only, Keep("people")).tolist() == (LABEL_MAP > 0).tolist()
    assert everyone(parts_only).tolist() == (LABEL_MAP > 0).tolist()
    assert not select(parts_only, Keep("largest")).any()


def test_no_people_and_an_id() -> None:
    with pytest.raises(InvalidParameter, match=r"0 found: no people"):
        select(NOBODY, Keep.parse("people:0", CLASSES))


def test_nothing_labelled_nobody_kept() -> None:
    assert not select(NOBODY, Keep("people")).any()
