"""Carrying a key frame's parts and people to the frames after it, and keeping people's ids stable.

M2FP labels a key frame (seconds per frame on a small CPU); the frames in between get its label
map and person-id map moved along by dense optical flow (OpenCV DIS, ~2 ms at 320 x 180), then
clipped to the light model's person mask of the current frame: parts where the person no longer
is are dropped, and person pixels the carried map does not cover take the nearest carried label.
Everything here works at a small "work" size; callers upsample the selection they derive.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

NO_PERSON = -1


def work_hw_for(frame_hw: tuple[int, int], long_side: int = 320) -> tuple[int, int]:
    """The small size labels and flow are computed at: the frame's aspect, ``long_side`` at most."""
    h, w = frame_hw
    scale = min(1.0, long_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def to_gray_small(frame_rgb: np.ndarray, work_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (h, w) uint8 grey at the work size (what the flow is computed on)."""
    small = cv2.resize(frame_rgb, work_hw[::-1], interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)


def person_id_map(person_masks: np.ndarray, person_scores: np.ndarray, work_hw: tuple[int, int]) -> np.ndarray:
    """(P, H, W) bool masks -> (h, w) int16 map of the person index at each pixel (``NO_PERSON`` elsewhere).

    Where masks overlap, the higher-scoring person wins.
    """
    ids = np.full(work_hw, NO_PERSON, np.int16)
    for i in np.argsort(person_scores, kind="stable"):  # ascending: the best is written last
        small = cv2.resize(person_masks[i].astype(np.uint8), work_hw[::-1], interpolation=cv2.INTER_NEAREST)
        ids[small > 0] = i
    return ids


def fill_from_nearest(values: np.ndarray, known: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Copies ``values`` with each ``holes`` pixel set to the value of the nearest ``known`` pixel.

    Args:
        values: (h, w) map (any integer dtype).
        known: (h, w) bool, pixels whose value is trusted.
        holes: (h, w) bool, pixels to fill (left as they are when nothing is known).
    """
    out = values.copy()
    if not holes.any() or not known.any():
        return out
    # distanceTransformWithLabels labels every zero pixel of its input (here: the known pixels) in
    # raster order and gives each pixel the label of the nearest one.
    _, nearest = cv2.distanceTransformWithLabels((~known).astype(np.uint8), cv2.DIST_L2, 3,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    ys, xs = np.nonzero(known)
    source = nearest[holes] - 1
    out[holes] = values[ys[source], xs[source]]
    return out


@dataclass
class Carried:
    """A key frame's parsing, as carried to the current frame (work size).

    Attributes:
        labels: (h, w) uint8 class ids (CIHP).
        person_ids: (h, w) int16 stable person ids, ``NO_PERSON`` outside people.
        key_index: frame index of the key frame it comes from.
    """

    labels: np.ndarray
    person_ids: np.ndarray
    key_index: int


class LabelCarrier:
    """Moves a label map and a person-id map along with the video by optical flow."""

    def __init__(self, work_hw: tuple[int, int]) -> None:
        self.work_hw = work_hw
        self._dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        gy, gx = np.mgrid[0 : work_hw[0], 0 : work_hw[1]].astype(np.float32)
        self._gx, self._gy = gx, gy
        self._gray: np.ndarray | None = None
        self.carried: Carried | None = None

    def _warp(self, maps: tuple[np.ndarray, ...], to_gray: np.ndarray, from_gray: np.ndarray,
              ) -> tuple[np.ndarray, ...]:
        """Each map (defined on ``from_gray``) resampled onto ``to_gray``'s pixels, nearest neighbour."""
        flow = self._dis.calc(to_gray, from_gray, None)  # type: ignore[call-overload]  # to(x) ~ from(x + flow(x))
        map_x, map_y = self._gx + flow[..., 0], self._gy + flow[..., 1]
        return tuple(
            np.asarray(cv2.remap(m, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)) for m in maps
        )

    def step(self, gray: np.ndarray) -> None:
        """Advances the carried maps to a new frame ((h, w) uint8 grey at the work size)."""
        if self.carried is not None and self._gray is not None:
            labels, ids = self._warp((self.carried.labels, self.carried.person_ids), gray, self._gray)
            self.carried = Carried(labels, ids, self.carried.key_index)
        self._gray = gray

    def bring(self, maps: tuple[np.ndarray, ...], key_gray: np.ndarray) -> tuple[np.ndarray, ...]:
        """Maps made on an earlier frame (``key_gray``) carried to the current frame in one flow step."""
        if self._gray is None or key_gray is self._gray:
            return maps
        return self._warp(maps, self._gray, key_gray)

    def adopt(self, carried: Carried) -> None:
        """Replaces the carried maps (already at the current frame, e.g. from ``bring``)."""
        self.carried = carried

    def clipped(self, person: np.ndarray) -> Carried | None:
        """The carried maps cut to this frame's person region ((h, w) bool at the work size):
        no parts outside it; inside it, pixels the carried map leaves uncovered take the nearest
        carried part and person."""
        if self.carried is None:
            return None
        labels, ids = self.carried.labels, self.carried.person_ids
        labelled = (labels > 0) & person
        labels = fill_from_nearest(np.where(person, labels, 0).astype(np.uint8), labelled, person & ~labelled)
        in_person = (ids != NO_PERSON) & person
        ids = fill_from_nearest(np.where(person, ids, NO_PERSON).astype(np.int16), in_person, person & ~in_person)
        return Carried(labels, ids, self.carried.key_index)


class PersonTracker:
    """Stable person ids across key frames: a new key frame's people are matched to the carried ids
    by overlap (IoU), so "keep person 1" stays on the same person while people move.

    The first key frame's people get ids 0, 1, ... in score order (as ``outputs=people`` lists
    them); people who appear later get the next unused id.
    """

    def __init__(self, min_iou: float = 0.2) -> None:
        self.min_iou = min_iou
        self._next = 0

    def assign(self, local_ids: np.ndarray, carried_ids: np.ndarray | None) -> np.ndarray:
        """Maps a key frame's per-frame person indices (score order) to stable ids.

        Args:
            local_ids: (h, w) int16 person index in the new key frame, ``NO_PERSON`` elsewhere.
            carried_ids: (h, w) int16 stable ids carried to the same frame, or None.

        Returns:
            (h, w) int16 stable ids.
        """
        local = [int(i) for i in np.unique(local_ids) if i != NO_PERSON]
        mapping: dict[int, int] = {}
        if carried_ids is not None:
            tracks = [int(t) for t in np.unique(carried_ids) if t != NO_PERSON]
            pairs = []
            for i in local:
                mine = local_ids == i
                for t in tracks:
                    theirs = carried_ids == t
                    inter = np.count_nonzero(mine & theirs)
                    if inter:
                        iou = inter / np.count_nonzero(mine | theirs)
                        if iou >= self.min_iou:
                            pairs.append((iou, i, t))
            used: set[int] = set()
            for _, i, t in sorted(pairs, reverse=True):
                if i not in mapping and t not in used:
                    mapping[i] = t
                    used.add(t)
            self._next = max([self._next, *(t + 1 for t in tracks)])
        for i in local:  # in score order
            if i not in mapping:
                mapping[i] = self._next
                self._next += 1
        out = np.full(local_ids.shape, NO_PERSON, np.int16)
        for i, t in mapping.items():
            out[local_ids == i] = t
        return out
