"""The exporter's acceptance check: matching people, comparing results, judging (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from m2fp_export.check import Acceptance, CheckReport, ImageCheck, compare_results, match_people, raw_rel_diff
from m2fp_service.result import ParsingResult


def _masks(*boxes: tuple[int, int, int, int], hw: tuple[int, int] = (4, 4)) -> np.ndarray:
    out = np.zeros((len(boxes), *hw), bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        out[i, y0:y1, x0:x1] = True
    return out


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        (_masks(), _masks(), 1.0),  # nobody on either side
        (_masks((0, 2, 0, 2)), _masks(), 0.0),  # someone the reference does not have
        (_masks(), _masks((0, 2, 0, 2)), 0.0),  # a reference person missed
        (_masks((0, 2, 0, 2), (2, 4, 2, 4)), _masks((2, 4, 2, 4), (0, 2, 0, 2)), 1.0),  # order does not matter
        (_masks((0, 2, 0, 2)), _masks((0, 2, 0, 1)), 0.5),  # 2 of 4 pixels shared
        (_masks((0, 4, 0, 4), (0, 2, 0, 2)), _masks((0, 2, 0, 2)), 1.0),  # best match taken, extra one ignored
    ],
)
def test_match_people(candidate: np.ndarray, reference: np.ndarray, expected: float) -> None:
    assert match_people(candidate, reference) == pytest.approx(expected)


def _result(labels: list[list[int]], people: np.ndarray) -> ParsingResult:
    return ParsingResult(label_map=np.asarray(labels, np.uint8), classes=[f"c{i}" for i in range(20)],
                         person_masks=people, person_scores=np.full(len(people), 0.9, np.float32), parts=[])


def test_compare_results() -> None:
    a = _result([[0, 1], [2, 3]], _masks((0, 1, 0, 2), hw=(2, 2)))
    b = _result([[0, 1], [2, 4]], _masks((0, 1, 0, 2), hw=(2, 2)))
    assert compare_results(a, b) == (0.75, 1.0)
    with pytest.raises(ValueError, match="different sizes"):
        compare_results(a, _result([[0]], _masks(hw=(1, 1))))


def test_raw_rel_diff() -> None:
    want = {"class_logits": np.array([[1.0, -2.0]]), "mask_logits": np.ones((1, 2, 2))}
    got = {"class_logits": np.array([[1.0, -1.9]]), "mask_logits": np.ones((1, 2, 2))}
    diff = raw_rel_diff(got, want)
    assert diff["class_logits"] == pytest.approx(0.05) and diff["mask_logits"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        raw_rel_diff({**got, "mask_logits": np.ones((1, 2, 3))}, want)


def _image(agreement: float, people: int = 2, ref_people: int = 2, iou: float = 1.0,
           raw: float = 1e-6) -> ImageCheck:
    return ImageCheck((480, 960), {"class_logits": 1e-7, "mask_logits": raw}, agreement, people, ref_people, iou, 12)


@pytest.mark.parametrize(
    ("image", "acceptance", "failure"),
    [
        (_image(0.9995), Acceptance(), None),
        (_image(0.998), Acceptance(), "labels agree on 99.8000% of pixels"),
        (_image(1.0, people=1), Acceptance(), "1 people instead of 2"),
        (_image(1.0, iou=0.8), Acceptance(), "mask IoU is 0.8000"),
        (_image(1.0, raw=2e-4), Acceptance(), None),  # raw differences are printed, not judged by default
        (_image(1.0, raw=2e-4), Acceptance(raw_rtol=1e-4), "differs by 2.000e-04 relative"),
        (_image(0.992, iou=0.93), Acceptance(min_label_agreement=0.99, min_person_iou=0.9), None),
    ],
)
def test_failures(image: ImageCheck, acceptance: Acceptance, failure: str | None) -> None:
    got = CheckReport((image,)).failures(acceptance)
    assert (got == []) if failure is None else (len(got) == 1 and failure in got[0])


def test_summary_is_the_worst_over_images() -> None:
    report = CheckReport((_image(0.9999, raw=1e-6), _image(0.9991, iou=0.995, raw=3e-5)))
    s = report.summary()
    assert s["min_label_agreement"] == 0.9991 and s["min_person_iou"] == 0.995 and s["same_people"] is True
    assert s["raw_max_rel_diff"] == {"class_logits": 1e-7, "mask_logits": 3e-5} and len(s["images"]) == 2
