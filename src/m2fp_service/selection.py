"""What to keep: ``keep=people|largest|central|people:1,3|classes:face,hair`` -> an (H, W) bool mask.

The text form is the public one (API, CLI, video); ``Keep.parse`` checks its syntax and class
names before any inference runs, ``select`` resolves it on a result (person ids are checked
there, since only the result knows how many people it has).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from m2fp_service.errors import InvalidParameter
from m2fp_service.result import ParsingResult

KeepKind = Literal["people", "largest", "central", "ids", "classes"]
KEEP_SYNTAX = "people, largest, central, people:<id>,<id>... or classes:<name>,<name>..."


@dataclass(frozen=True)
class Keep:
    """A parsed ``keep`` value.

    Attributes:
        kind: ``people`` (everyone: every person's mask and every labelled part), ``largest`` /
            ``central`` (one person: the largest mask / the mask whose centre is nearest the
            picture's), ``ids`` (the listed people), ``classes`` (the listed classes, everyone's).
        ids: person ids for ``ids`` (as ``outputs=people`` lists them).
        classes: class names for ``classes``, in the request's label set.
    """

    kind: KeepKind = "people"
    ids: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, classes: tuple[str, ...] | list[str]) -> Keep:
        """Parses a ``keep`` value; class names are checked against ``classes`` (the label set's).

        Raises:
            InvalidParameter: bad syntax, a negative or non-numeric id, an unknown class name.
        """
        value = text.strip().lower()
        if value in ("people", "largest", "central"):
            return cls(kind=value)  # type: ignore[arg-type]
        head, sep, tail = value.partition(":")
        items = [item.strip() for item in tail.split(",") if item.strip()] if sep else []
        if head == "people" and sep:
            if not items or not all(item.isascii() and item.isdigit() for item in items):
                raise InvalidParameter(f"keep={text!r}: person ids must be numbers, e.g. people:0,2")
            return cls(kind="ids", ids=tuple(sorted({int(item) for item in items})))
        if head == "classes" and sep:
            unknown = [item for item in items if item not in classes]
            if not items or unknown:
                raise InvalidParameter(
                    f"keep={text!r}: unknown class {', '.join(map(repr, unknown)) or '(none given)'}; "
                    f"valid classes of this label set: {', '.join(classes)}"
                )
            return cls(kind="classes", classes=tuple(dict.fromkeys(items)))
        raise InvalidParameter(f"keep={text!r} is not understood; use {KEEP_SYNTAX}")

    def __str__(self) -> str:
        if self.kind == "ids":
            return "people:" + ",".join(map(str, self.ids))
        if self.kind == "classes":
            return "classes:" + ",".join(self.classes)
        return self.kind


def everyone(result: ParsingResult) -> np.ndarray:
    """(H, W) bool: pixels of any person or any labelled part (the virtual-background matte)."""
    fg = result.label_map > 0
    if result.num_people:
        fg |= result.person_masks.any(axis=0)
    return fg


def person_index(result: ParsingResult, kind: Literal["largest", "central"]) -> int | None:
    """The id of the largest person, or of the one whose mask centre is nearest the picture's."""
    if not result.num_people:
        return None
    areas = result.person_masks.reshape(result.num_people, -1).sum(axis=1)
    if kind == "largest":
        return int(np.argmax(areas))
    h, w = result.hw
    best, best_d = None, np.inf
    for i, mask in enumerate(result.person_masks):
        if not areas[i]:
            continue
        ys, xs = np.nonzero(mask)
        d = ((ys.mean() - (h - 1) / 2) / h) ** 2 + ((xs.mean() - (w - 1) / 2) / w) ** 2
        if d < best_d:
            best, best_d = i, d
    return best


def select(result: ParsingResult, keep: Keep) -> np.ndarray:
    """(H, W) bool: the pixels ``keep`` asks for in ``result``.

    Raises:
        InvalidParameter: a person id the result does not have.
    """
    if keep.kind == "people":
        return everyone(result)
    if keep.kind == "classes":
        ids = [result.classes.index(name) for name in keep.classes]
        return np.isin(result.label_map, ids)
    if keep.kind == "ids":
        missing = [i for i in keep.ids if i >= result.num_people]
        if missing:
            have = f"ids 0-{result.num_people - 1}" if result.num_people else "no people"
            raise InvalidParameter(
                f"keep=people:{','.join(map(str, keep.ids))}: no person {', '.join(map(str, missing))} in this "
                f"picture ({result.num_people} found: {have}; see outputs=people)"
            )
        return np.asarray(result.person_masks[list(keep.ids)].any(axis=0), dtype=bool)
    index = person_index(result, keep.kind)
    if index is None:
        return np.zeros(result.hw, bool)
    return result.person_masks[index].copy()  # type: ignore[no-any-return]
