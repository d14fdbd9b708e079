"""``ParsingResult``: the one internal result type, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def validate_label_map(label_map: np.ndarray, num_classes: int) -> None:
    if label_map.ndim != 2 or label_map.dtype != np.uint8:
        raise ValueError(f"label_map must be (H, W) uint8, got {label_map.shape} {label_map.dtype}")
    if label_map.size and int(label_map.max()) >= num_classes:
        raise ValueError(f"label_map holds class {int(label_map.max())}, expected < {num_classes}")


def validate_masks(masks: np.ndarray, hw: tuple[int, int], count: int, name: str) -> None:
    expected = (count, *hw)
    if masks.dtype != np.bool_ or masks.shape != expected:
        raise ValueError(f"{name} must be {expected} bool, got {masks.shape} {masks.dtype}")


@dataclass(frozen=True)
class PartInstance:
    """One body-part instance found by the model (no mask kept; the label map has the pixels)."""

    class_id: int
    score: float


@dataclass
class ParsingResult:
    """Multi-person parsing of one image, at the image's own resolution.

    Attributes:
        label_map: (H, W) uint8, pixel value = index into ``classes``.
        classes: parsing class names (background first), from the model card.
        person_masks: (P, H, W) bool, one mask per detected person, highest score first.
        person_scores: (P,) float32 in 0..1.
        parts: part instances scoring at least the part threshold.
        trained: False when the model's weights are untrained (results are meaningless).
    """

    label_map: np.ndarray
    classes: list[str]
    person_masks: np.ndarray
    person_scores: np.ndarray
    parts: list[PartInstance] = field(default_factory=list)
    trained: bool = True

    def __post_init__(self) -> None:
        validate_label_map(self.label_map, len(self.classes))
        if self.person_scores.ndim != 1:
            raise ValueError(f"person_scores must be (P,), got {self.person_scores.shape}")
        validate_masks(self.person_masks, self.hw, len(self.person_scores), "person_masks")

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.label_map.shape[0]), int(self.label_map.shape[1])

    @property
    def num_people(self) -> int:
        return len(self.person_scores)

    def class_areas(self) -> dict[str, int]:
        """Pixel count of each class present in the label map."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.classes))
        return {self.classes[i]: int(c) for i, c in enumerate(counts) if c}

    def person_boxes_xyxy(self) -> np.ndarray:
        """(P, 4) int32 boxes (x0, y0, x1, y1), exclusive max; zeros for an empty mask."""
        boxes = np.zeros((self.num_people, 4), np.int32)
        for i, mask in enumerate(self.person_masks):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if rows.size:
                boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        return boxes

    def people_summary(self) -> list[dict[str, object]]:
        """Per person, highest score first: id, score, box_xyxy (exclusive max), area, parts (pixels per class)."""
        boxes = self.person_boxes_xyxy()
        return [
            {
                "id": i,
                "score": round(float(self.person_scores[i]), 4),
                "box_xyxy": [int(v) for v in boxes[i]],
                "area": int(self.person_masks[i].sum()),
                "parts": self.person_parts(i),
            }
            for i in range(self.num_people)
        ]

    def person_parts(self, index: int) -> dict[str, int]:
        """Pixel count per class inside one person's mask."""
        counts = np.bincount(self.label_map[self.person_masks[index]], minlength=len(self.classes))
        return {self.classes[i]: int(c) for i, c in enumerate(counts) if c}
