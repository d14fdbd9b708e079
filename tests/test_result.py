"""Tests for ``m2fp_service.result``: validators and ``ParsingResult`` on hand-written 4x4 examples."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from m2fp_service.result import ParsingResult, PartInstance, validate_label_map, validate_masks

CLASSES = ["background", "hat", "hair", "face"]

LABELS = np.array(
    [
        [0, 1, 1, 0],
        [0, 2, 2, 0],
        [0, 3, 3, 0],
        [0, 3, 0, 0],
    ],
    np.uint8,
)

# Person 0 covers the middle two columns; person 1 the left column's bottom half; person 2 nothing.
MASKS = np.zeros((3, 4, 4), bool)
MASKS[0, :, 1:3] = True
MASKS[1, 2:, 0] = True
SCORES = np.array([0.9, 0.5, 0.2], np.float32)


def _result(**overrides: object) -> ParsingResult:
    fields: dict[str, object] = {
        "label_map": LABELS,
        "classes": CLASSES,
        "person_masks": MASKS,
        "person_scores": SCORES,
    }
    fields.update(overrides)
    return ParsingResult(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# validators
# ---------------------------------------------------------------------------------------------

LABEL_MAPS = [
    # (label_map, num_classes, raises, message)
    pytest.param(LABELS, 4, None, None, id="ok"),
    pytest.param(np.zeros((0, 0), np.uint8), 1, None, None, id="empty-ok"),
    pytest.param(np.full((2, 2), 3, np.uint8), 4, None, None, id="max-class-ok"),
    pytest.param(np.full((2, 2), 4, np.uint8), 4, ValueError, r"holds class 4, expected < 4", id="class-too-high"),
    pytest.param(np.full((2, 2), 255, np.uint8), 20, ValueError, r"holds class 255, expected < 20", id="class-255"),
    pytest.param(LABELS.astype(np.int64), 4, ValueError, r"\(H, W\) uint8, got \(4, 4\) int64", id="int64"),
    pytest.param(LABELS.astype(bool), 4, ValueError, r"got \(4, 4\) bool", id="bool"),
    pytest.param(LABELS[None], 4, ValueError, r"got \(1, 4, 4\) uint8", id="3d"),
    pytest.param(LABELS[0], 4, ValueError, r"got \(4,\) uint8", id="1d"),
]


@pytest.mark.parametrize(("label_map", "num_classes", "raises", "message"), LABEL_MAPS)
def test_validate_label_map(
    label_map: np.ndarray, num_classes: int, raises: type[Exception] | None, message: str | None
) -> None:
    with pytest.raises(raises, match=message) if raises else contextlib.nullcontext():
        validate_label_map(label_map, num_classes)


MASK_CASES = [
    # (masks, hw, count, raises, message)
    pytest.param(MASKS, (4, 4), 3, None, None, id="ok"),
    pytest.param(np.zeros((0, 4, 4), bool), (4, 4), 0, None, None, id="no-people-ok"),
    pytest.param(
        MASKS,
        (4, 4),
        2,
        ValueError,
        r"person_masks must be \(2, 4, 4\) bool, got \(3, 4, 4\) bool",
        id="count-mismatch",
    ),
    pytest.param(MASKS, (4, 5), 3, ValueError, r"must be \(3, 4, 5\) bool, got \(3, 4, 4\) bool", id="hw-mismatch"),
    pytest.param(MASKS.astype(np.uint8), (4, 4), 3, ValueError, r"got \(3, 4, 4\) uint8", id="uint8"),
    pytest.param(MASKS[0], (4, 4), 1, ValueError, r"must be \(1, 4, 4\) bool, got \(4, 4\) bool", id="missing-axis"),
]


@pytest.mark.parametrize(("masks", "hw", "count", "raises", "message"), MASK_CASES)
def test_validate_masks(
    masks: np.ndarray, hw: tuple[int, int], count: int, raises: type[Exception] | None, message: str | None
) -> None:
    with pytest.raises(raises, match=message) if raises else contextlib.nullcontext():
        validate_masks(masks, hw, count, "person_masks")


# ---------------------------------------------------------------------------------------------
# ParsingResult construction
# ---------------------------------------------------------------------------------------------

CONSTRUCT = [
    # (overrides, raises, message)
    pytest.param({}, None, None, id="ok"),
    pytest.param(
        {"label_map": LABELS.astype(np.int32)},
        ValueError,
        r"label_map must be \(H, W\) uint8",
        id="int32-map",
    ),
    pytest.param({"classes": CLASSES[:3]}, ValueError, r"label_map holds class 3, expected < 3", id="too-few-classes"),
    pytest.param(
        {"person_masks": MASKS[:2]},
        ValueError,
        r"person_masks must be \(3, 4, 4\) bool, got \(2, 4, 4\)",
        id="fewer-masks-than-scores",
    ),
    pytest.param(
        {"person_scores": SCORES[:2]},
        ValueError,
        r"must be \(2, 4, 4\) bool, got \(3, 4, 4\)",
        id="fewer-scores-than-masks",
    ),
    pytest.param(
        {"person_masks": np.zeros((3, 4, 5), bool)},
        ValueError,
        r"must be \(3, 4, 4\) bool, got \(3, 4, 5\)",
        id="mask-size-differs-from-map",
    ),
    pytest.param({"person_masks": MASKS.astype(np.float32)}, ValueError, r"got \(3, 4, 4\) float32", id="float-masks"),
    pytest.param(
        {"person_masks": np.zeros((0, 4, 4), bool), "person_scores": np.zeros(0, np.float32)},
        None,
        None,
        id="no-people",
    ),
]


@pytest.mark.parametrize(("overrides", "raises", "message"), CONSTRUCT)
def test_parsing_result_validates_on_construction(
    overrides: dict[str, object], raises: type[Exception] | None, message: str | None
) -> None:
    with pytest.raises(raises, match=message) if raises else contextlib.nullcontext():
        result = _result(**overrides)
        assert result.hw == (4, 4)


def test_parsing_result_rejects_two_dimensional_scores() -> None:
    with pytest.raises(ValueError):
        _result(person_masks=MASKS[:1], person_scores=np.array([[0.9, 0.5, 0.2]], np.float32))


def test_parsing_result_basic_properties() -> None:
    result = _result(parts=[PartInstance(1, 0.8)], trained=False)
    assert result.hw == (4, 4)
    assert all(type(v) is int for v in result.hw)
    assert result.num_people == 3
    assert result.trained is False
    assert result.parts == [PartInstance(1, 0.8)]
    assert _result().parts == [] and _result().trained is True
    assert _result().parts is not _result().parts  # no shared mutable default


def test_part_instance_is_frozen() -> None:
    part = PartInstance(2, 0.5)
    with pytest.raises(AttributeError):
        part.score = 0.9  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# class_areas, person_boxes_xyxy, person_parts
# ---------------------------------------------------------------------------------------------

AREAS = [
    # (label_map, classes, expected)
    pytest.param(LABELS, CLASSES, {"background": 9, "hat": 2, "hair": 2, "face": 3}, id="4x4"),
    pytest.param(np.zeros((4, 4), np.uint8), CLASSES, {"background": 16}, id="all-background"),
    pytest.param(np.full((4, 4), 2, np.uint8), CLASSES, {"hair": 16}, id="absent-classes-omitted"),
    pytest.param(np.zeros((0, 4), np.uint8), CLASSES, {}, id="empty-map"),
]


@pytest.mark.parametrize(("label_map", "classes", "expected"), AREAS)
def test_class_areas(label_map: np.ndarray, classes: list[str], expected: dict[str, int]) -> None:
    hw = label_map.shape
    result = ParsingResult(label_map, classes, np.zeros((0, *hw), bool), np.zeros(0, np.float32))
    areas = result.class_areas()
    assert areas == expected
    assert list(areas) == [c for c in classes if c in expected]  # in class order
    assert sum(areas.values()) == label_map.size
    assert all(type(v) is int for v in areas.values())


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows], bool)


BOXES = [
    # (mask, expected (x0, y0, x1, y1) with exclusive max)
    pytest.param(_mask(["....", ".##.", ".##.", "...."]), (1, 1, 3, 3), id="centre-2x2"),
    pytest.param(_mask(["#...", "....", "....", "...."]), (0, 0, 1, 1), id="single-top-left"),
    pytest.param(_mask(["....", "....", "....", "...#"]), (3, 3, 4, 4), id="single-bottom-right"),
    pytest.param(_mask(["####", "####", "####", "####"]), (0, 0, 4, 4), id="full"),
    pytest.param(_mask(["#...", "....", "....", "..#."]), (0, 0, 3, 4), id="two-disjoint-pixels"),
    pytest.param(_mask([".#..", ".#..", "....", "...."]), (1, 0, 2, 2), id="vertical-bar"),
    pytest.param(_mask(["....", "....", "....", "...."]), (0, 0, 0, 0), id="empty-mask-zeros"),
]


@pytest.mark.parametrize(("mask", "expected"), BOXES)
def test_person_boxes_xyxy_single(mask: np.ndarray, expected: tuple[int, int, int, int]) -> None:
    result = ParsingResult(np.zeros((4, 4), np.uint8), CLASSES, mask[None], np.array([0.5], np.float32))
    boxes = result.person_boxes_xyxy()
    assert boxes.shape == (1, 4) and boxes.dtype == np.int32
    assert tuple(boxes[0].tolist()) == expected


def test_person_boxes_xyxy_all_people() -> None:
    boxes = _result().person_boxes_xyxy()
    np.testing.assert_array_equal(boxes, [[1, 0, 3, 4], [0, 2, 1, 4], [0, 0, 0, 0]])


def test_person_boxes_xyxy_no_people() -> None:
    result = _result(person_masks=np.zeros((0, 4, 4), bool), person_scores=np.zeros(0, np.float32))
    boxes = result.person_boxes_xyxy()
    assert boxes.shape == (0, 4) and boxes.dtype == np.int32


def test_person_boxes_xyxy_non_square() -> None:
    mask = np.zeros((1, 3, 7), bool)
    mask[0, 1:3, 4:6] = True
    result = ParsingResult(np.zeros((3, 7), np.uint8), CLASSES, mask, np.array([0.5], np.float32))
    np.testing.assert_array_equal(result.person_boxes_xyxy(), [[4, 1, 6, 3]])  # x from columns, y from rows


PERSON_PARTS = [
    # (index, expected)
    pytest.param(0, {"hat": 2, "hair": 2, "face": 3, "background": 1}, id="middle-person"),
    pytest.param(1, {"background": 2}, id="only-background"),
    pytest.param(2, {}, id="empty-mask"),
]


@pytest.mark.parametrize(("index", "expected"), PERSON_PARTS)
def test_person_parts(index: int, expected: dict[str, int]) -> None:
    parts = _result().person_parts(index)
    assert parts == expected
    assert list(parts) == [c for c in CLASSES if c in expected]
    assert sum(parts.values()) == int(MASKS[index].sum())


def test_person_parts_counts_only_pixels_inside_the_mask() -> None:
    label_map = np.full((4, 4), 3, np.uint8)
    label_map[0, 0] = 1
    mask = np.zeros((1, 4, 4), bool)
    mask[0, :2, :2] = True
    result = ParsingResult(label_map, CLASSES, mask, np.array([0.7], np.float32))
    assert result.person_parts(0) == {"hat": 1, "face": 3}


def test_person_parts_index_out_of_range() -> None:
    with pytest.raises(IndexError):
        _result().person_parts(3)
