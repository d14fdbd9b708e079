"""The fused kernel's two-pass post-processing (``PostKernel.mask_scores``, ``paste_vote`` and a person's
mask by ``upsample_positive``, used by ``postprocess._TiledPixels``) against the one-call-per-step functions
it replaces (``upsample_squash``, ``add_instance``, ``average_vote``): the same values to the bit, so every
comparison here is exact. Then whole ``to_result`` calls through ``_TiledPixels`` and
``_FusedPixels``, and a narrower build of the library on this module's kernel tests in a child
process (which does not import torch: test_postprocess.py is imported only by the ``to_result`` tests)."""

from __future__ import annotations

import itertools
import os
import platform
from pathlib import Path

import numpy as np
import pytest

from m2fp_service.imaging import fused, postprocess
from m2fp_service.imaging.preprocess import PreprocessMeta
from m2fp_service.modelcard import InferenceSettings
from tests.imaging.conftest import LIBRARY_UNDER_TEST, assert_tests_pass_on_a_build_for, cpu_lanes

HOSTILE = np.array([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 17, -17, 87.9, -87.9, 88, -88, 89, -89, 100, -100,
                    1e30, -1e30, np.inf, -np.inf, np.nan, 3e-39, -3e-39], np.float32)  # test_fused.py's
SETTINGS, CLASSES = InferenceSettings(), [f"class{i}" for i in range(21)]  # test_postprocess.py's


def _sharpened(n_low: int, n_out: int) -> fused.Taps:
    """Catmull-Rom taps (negative lobes): the kernel's plain loops, no block skipped for its signs."""
    centre = (np.arange(n_out) + 0.5) * n_low / n_out - 0.5
    base = np.clip(np.floor(centre).astype(int) - 1, 0, n_low - 4)
    t = np.clip(centre - base - 1, 0, 1)
    weight = np.stack([-0.5 * t * (1 - t) ** 2, 1 - 2.5 * t**2 + 1.5 * t**3,
                       t * (0.5 + 2 * t - 1.5 * t**2), -0.5 * t**2 * (1 - t)], 1)
    return fused.Taps((base[:, None] + np.arange(4)).astype(np.int32), weight.astype(np.float32), n_low)


def _box(n_low: int, n_out: int, k: int) -> fused.Taps:
    """k equal taps per output (a box filter shrinking n_low to n_out): with more than 8 taps of weight > 0,
    the kernel's rows take the plain loop in the tap order (squash_rows' taps < 0)."""
    centre = (np.arange(n_out) + 0.5) * n_low / n_out - 0.5
    base = np.clip(np.floor(centre).astype(int) - k // 2, 0, n_low - k)
    return fused.Taps((base[:, None] + np.arange(k)).astype(np.int32), np.full((n_out, k), 1 / k, np.float32), n_low)


def _composite(orig: tuple[int, int], resized: tuple[int, int], padded: tuple[int, int]) -> tuple[fused.Taps, ...]:
    """(cols, rows) as ``_FusedPixels`` builds them: logits at a quarter of the padded input's size."""
    return tuple(postprocess.composite_taps(padded[i] // 4, padded[i], resized[i], orig[i]) for i in (1, 0))


# (cols, rows). The kernel pastes tiles of TILE_VALUES = 32768 pixels: 25 rows at width 1280, 161 at
# 203, 1057 at 31, 330 at 99 and 32768 at width 1 (the 40000 rows there are two tiles).
GEOMETRIES = {
    "720p": lambda: _composite((720, 1280), (640, 1138), (640, 1152)),  # 160 x 288 logits
    "odd": lambda: _composite((151, 203), (145, 209), (148, 212)),  # 37 x 53: width not a multiple of 16
    "narrow": lambda: _composite((1999, 31), (600, 40), (608, 48)),  # a whole block and a partial one
    "one-column": lambda: _composite((40000, 1), (640, 4), (640, 32)),
    # 330 rows of 99 = 32670 pixels a tile, not a multiple of 4, 8 or 16: the tiles' vector loops end
    # elsewhere than the band's
    "off-grid-tiles": lambda: _composite((400, 99), (384, 95), (384, 96)),
    "sharpened": lambda: (_sharpened(40, 176), _sharpened(40, 176)),
    "sharpened-rows": lambda: (postprocess.composite_taps(40, 160, 160, 176), _sharpened(40, 176)),
    "sharpened-cols": lambda: (_sharpened(40, 176), postprocess.composite_taps(40, 160, 160, 176)),
    "nine-row-taps": lambda: (postprocess.composite_taps(40, 160, 160, 176), _box(400, 44, 9)),
}


def _bands(n: int) -> list[slice]:
    """The whole height, its first row, and a band of a height no tile size divides."""
    return [slice(0, n), slice(0, 1), slice(5, 5 + 12 * ((n - 10) // 12) - 4)]


def _queries(cols: fused.Taps, rows: fused.Taps, n: int, seed: int) -> list[np.ndarray]:
    """n logits of mixed signs; the second all negative, the third with HOSTILE values (NaN, inf,
    1e30, subnormals) scattered over it."""
    rng = np.random.default_rng(seed)
    lows = [rng.normal(0, 4, (rows.n_in, cols.n_in)).astype(np.float32) for _ in range(n)]
    if n > 1:
        lows[1] = -np.abs(lows[1]) - 0.1
    if n > 2:
        lows[2].flat[rng.choice(lows[2].size, HOSTILE.size, replace=False)] = HOSTILE
    return lows


def _reference_scores(kernel: fused.PostKernel, lows: list[np.ndarray], cols: fused.Taps,
                      rows: fused.Taps) -> list[tuple[float, int]]:
    scratch = np.empty((rows.n_in + 1) * len(cols), np.float32)
    sig = np.empty((len(rows), len(cols)), np.float32)
    return [kernel.upsample_squash(low, cols, rows, scratch, sig) for low in lows]


def _reference_labels(kernel: fused.PostKernel, lows: list[np.ndarray], scores: np.ndarray, classes: np.ndarray,
                      cols: fused.Taps, rows: fused.Taps) -> tuple[np.ndarray, int]:
    """The label band from the one-step calls (``_FusedPixels``'s), and the most instances pasted
    on one pixel of one class."""
    shape = (len(rows), len(cols))
    scratch = np.empty((rows.n_in + 1) * len(cols), np.float32)
    sig, probs, counts = np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.uint8)
    best, labels = np.zeros(shape, np.float32), np.zeros(shape, np.uint8)
    most = 0
    for class_id, group in itertools.groupby(zip(classes.tolist(), lows, scores, strict=True), lambda i: i[0]):
        for i, (_, low, score) in enumerate(group):
            kernel.upsample_squash(low, cols, rows, scratch, sig)
            kernel.add_instance(sig, probs, counts, np.float32(score), first=i == 0)
        kernel.average_vote(probs, counts, best, labels, class_id)
        most = max(most, int(counts.max()))
    return labels, most


def _paste(kernel: fused.PostKernel, lows: list[np.ndarray], scores: np.ndarray, classes: np.ndarray,
           cols: fused.Taps, rows: fused.Taps) -> np.ndarray:
    labels = np.full((len(rows), len(cols)), 255, np.uint8)  # every value must be written
    kernel.paste_vote(lows, scores, classes, cols, rows, labels)
    return labels


# --- upsample_positive ------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_upsample_positive_is_where_upsample_squash_s_logits_are_positive(kernel: fused.PostKernel,
                                                                          geometry: str) -> None:
    """A person's mask without a sigmoid: 1 exactly where the logits ``upsample_squash`` keeps are > 0
    (NaN and 0 not), on every band, for logits of mixed signs, all negative, hostile, all positive, and
    zeros beside a positive column."""
    cols, rows = GEOMETRIES[geometry]()
    lows = _queries(cols, rows, 4, seed=len(geometry) + 7)
    lows[3] = np.abs(lows[3]) + 0.1
    edge = np.zeros_like(lows[0])  # zeros beside one positive column: exact 0s in blocks that are live
    edge[:, 0] = 1.0
    blob = np.full_like(lows[0], -1.0)  # positive in a few low rows and columns: the rest skipped
    blob[rows.n_in // 3:rows.n_in // 3 + 2, cols.n_in // 2:cols.n_in // 2 + 3] = 2.0
    lows += [edge, blob]
    for band in _bands(len(rows)):
        band_rows = rows.band(band)
        scratch = np.empty((rows.n_in + 1) * len(cols), np.float32)
        sig, logits = (np.empty((len(band_rows), len(cols)), np.float32) for _ in range(2))
        scores, counts = kernel.mask_scores(lows, cols, band_rows)
        for i, low in enumerate(lows):
            # a person's score from the first pass: the squash that kept the logits gave the same, to the bit
            assert kernel.upsample_squash(low, cols, band_rows, scratch, sig, logits) == (scores[i], counts[i])
            positive = np.full((len(band_rows), len(cols)), 7, np.uint8)  # every value must be written
            kernel.upsample_positive(low, cols, band_rows, positive)
            np.testing.assert_array_equal(positive, (logits > 0).astype(np.uint8), err_msg=f"{band} query {i}")
            mask = np.zeros(positive.shape, bool)
            kernel.upsample_positive(low, cols, band_rows, mask)
            np.testing.assert_array_equal(mask, logits > 0)


def test_upsample_positive_refuses(kernel: fused.PostKernel) -> None:
    cols, rows = GEOMETRIES["odd"]()
    low = _queries(cols, rows, 1, seed=1)[0]
    with pytest.raises(ValueError, match="uint8 or bool"):
        kernel.upsample_positive(low, cols, rows, np.zeros((len(rows), len(cols)), np.float32))
    with pytest.raises(ValueError, match="uint8 or bool"):
        kernel.upsample_positive(low, cols, rows, np.zeros((len(rows), len(cols) + 1), np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        kernel.upsample_positive(low[1:], cols, rows, np.zeros((len(rows), len(cols)), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel.upsample_positive(low, cols, rows, np.zeros((len(rows), 2 * len(cols)), np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel.upsample_positive(low, cols, rows, np.zeros((len(rows), 2 * len(cols)), bool)[:, ::2])


# --- mask_scores ------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_mask_scores_equal_upsample_squash_on_every_band(kernel: fused.PostKernel, geometry: str) -> None:
    cols, rows = GEOMETRIES[geometry]()
    lows = _queries(cols, rows, 5, seed=len(geometry))
    lows[3] = np.abs(lows[3]) + 0.1  # all positive
    for band in _bands(len(rows)):
        sums, counts = kernel.mask_scores(lows, cols, rows.band(band))
        assert sums.dtype == np.float64 and counts.dtype == np.int64 and sums.shape == counts.shape == (5,)
        want = _reference_scores(kernel, lows, cols, rows.band(band))
        assert list(zip(sums.tolist(), counts.tolist(), strict=True)) == want, band  # to the bit
    assert 0 < want[0][1] < len(rows.band(band)) * len(cols)  # both signs, so the positive-only sum is tested
    if geometry.startswith("sharpened"):
        assert want[1][1] > 0  # the lobes overshoot an all-negative query's logits above 0
    else:  # a positive resampling of all-negative logits: nothing; of all-positive ones: every pixel
        assert want[1] == (0.0, 0) and want[3][1] == len(rows.band(band)) * len(cols)


def test_mask_scores_of_no_queries(kernel: fused.PostKernel) -> None:
    cols, rows = GEOMETRIES["odd"]()
    sums, counts = kernel.mask_scores([], cols, rows)
    assert sums.shape == counts.shape == (0,) and sums.dtype == np.float64 and counts.dtype == np.int64


def test_mask_scores_refuse_logits_the_taps_do_not_fit(kernel: fused.PostKernel) -> None:
    cols, rows = GEOMETRIES["odd"]()
    good = _queries(cols, rows, 1, seed=0)[0]
    with pytest.raises(ValueError, match="do not match taps"):
        kernel.mask_scores([good, good[:, :-1].copy()], cols, rows)
    with pytest.raises(ValueError, match="low must be a C-contiguous float32"):
        kernel.mask_scores([good, good.astype(np.float64)], cols, rows)


# --- paste_vote -------------------------------------------------------------------------------

CLASS_RUNS = np.array([1, 3, 3, 4, 4, 4, 7, 7, 7, 7], np.uint8)  # classes of 1 to 4 instances
SCORES = np.array([1.0, 0.5, np.nextafter(0.5, 1), 0.99999994, 0.6, 0.75, 0.9, 1.0, 0.55, 0.8], np.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_paste_vote_equals_the_one_step_calls(kernel: fused.PostKernel, geometry: str) -> None:
    cols, rows = GEOMETRIES[geometry]()
    lows = _queries(cols, rows, len(CLASS_RUNS), seed=len(geometry) + 1)
    for band in _bands(len(rows)):
        got = _paste(kernel, lows, SCORES, CLASS_RUNS, cols, rows.band(band))
        want, _ = _reference_labels(kernel, lows, SCORES, CLASS_RUNS, cols, rows.band(band))
        np.testing.assert_array_equal(got, want, err_msg=str(band))
    assert {0, 1, 4, 7} <= set(np.unique(want).tolist())  # background and several winners


def test_paste_vote_many_instances_on_one_pixel(kernel: fused.PostKernel) -> None:
    """~100 instances pasted over one another (counts near 100), over four classes, scores across (0.5, 1]."""
    cols, rows = GEOMETRIES["odd"]()
    rng = np.random.default_rng(3)
    lows = [rng.normal(3, 2, (rows.n_in, cols.n_in)).astype(np.float32) for _ in range(104)]
    classes = np.repeat(np.array([2, 5, 6, 9], np.uint8), [1, 100, 2, 1])
    scores = rng.uniform(0.5, 1.0, classes.size).astype(np.float32)
    want, most = _reference_labels(kernel, lows, scores, classes, cols, rows)
    np.testing.assert_array_equal(_paste(kernel, lows, scores, classes, cols, rows), want)
    assert most >= 95 and len(np.unique(want)) >= 3


def test_paste_vote_of_nothing_writes_background(kernel: fused.PostKernel) -> None:
    cols, rows = GEOMETRIES["odd"]()
    got = _paste(kernel, [], np.empty(0, np.float32), np.empty(0, np.uint8), cols, rows)
    assert (got == 0).all()


def _bad_calls(lows: list[np.ndarray], labels: np.ndarray) -> dict[str, tuple]:
    """paste_vote's arguments (lows, scores, classes, labels), each set wrong in one way."""
    wide = np.zeros((labels.shape[0], 2 * labels.shape[1]), np.uint8)
    frozen = labels.copy()
    frozen.flags.writeable = False
    scores, classes = SCORES[:3], CLASS_RUNS[:3]

    def score(value: float) -> np.ndarray:
        return np.array([1.0, value, 0.7], np.float32)

    return {
        "score-above-1": (lows, score(1.0000001), classes, labels),
        "score-below-0": (lows, score(-1e-7), classes, labels),
        "score-nan": (lows, score(np.nan), classes, labels),
        "classes-decrease": (lows, scores, np.array([1, 3, 2], np.uint8), labels),
        "class-above-255": (lows, scores, np.array([1, 2, 300]), labels),  # would wrap to 44 as uint8
        "class-negative": (lows, scores, np.array([-1, 2, 3]), labels),
        "fewer-scores": (lows, scores[:2], classes, labels),
        "fewer-classes": (lows, scores, classes[:2], labels),
        "fewer-lows": (lows[:2], scores, classes, labels),
        "labels-short": (lows, scores, classes, labels[:-1]),
        "labels-int8": (lows, scores, classes, labels.view(np.int8)),
        "labels-uint16": (lows, scores, classes, np.zeros(labels.shape, np.uint16)),
        "labels-strided": (lows, scores, classes, wide[:, ::2]),
        "labels-read-only": (lows, scores, classes, frozen),
        "low-shape": ([lows[0], lows[1][:-1].copy(), lows[2]], scores, classes, labels),
        "low-float64": ([lows[0], lows[1].astype(np.float64), lows[2]], scores, classes, labels),
    }


BAD = list(_bad_calls([np.empty((1, 1))] * 3, np.empty((1, 1), np.uint8)))


@pytest.mark.parametrize("case", BAD)
def test_paste_vote_refuses_wrong_arguments_and_writes_nothing(kernel: fused.PostKernel, case: str) -> None:
    cols, rows = GEOMETRIES["odd"]()
    labels = np.full((len(rows), len(cols)), 77, np.uint8)
    lows, scores, classes, target = _bad_calls(_queries(cols, rows, 3, seed=4), labels)[case]
    before = target.base.copy() if target.base is not None else target.copy()
    with pytest.raises(ValueError):
        kernel.paste_vote(lows, scores, classes, cols, rows, target)
    assert (labels == 77).all()
    np.testing.assert_array_equal(target.base if target.base is not None else target, before)


def test_paste_vote_takes_the_bounds_and_other_integer_classes(kernel: fused.PostKernel) -> None:
    """Next to the refusals: scores of exactly 0 and 1 and classes given as int64 are taken."""
    cols, rows = GEOMETRIES["odd"]()
    lows = _queries(cols, rows, 3, seed=4)
    scores, classes = np.array([1.0, 0.0, 1.0], np.float32), np.array([1, 3, 3])
    want, _ = _reference_labels(kernel, lows, scores, classes, cols, rows)
    np.testing.assert_array_equal(_paste(kernel, lows, scores, classes, cols, rows), want)
    assert set(np.unique(want).tolist()) == {0, 1, 3}


# --- to_result --------------------------------------------------------------------------------


def _outputs(orig: tuple[int, int], seed: int) -> tuple[PreprocessMeta, np.ndarray, np.ndarray]:
    """test_postprocess.py's synthetic confident outputs: 3 people, 16 confident parts (classes repeat)."""
    from tests.imaging.test_postprocess import _meta, synthetic_outputs  # imports torch: only here

    meta = _meta(orig)
    return (meta, *synthetic_outputs(meta, seed=seed))


def _both_paths(kernel: fused.PostKernel, orig: tuple[int, int], monkeypatch: pytest.MonkeyPatch,
                seed: int) -> tuple:
    meta, class_logits, mask_logits = _outputs(orig, seed)
    class_logits[class_logits.argmax(1) == 19, 18] += 20  # nobody else in class 19
    class_logits[0, :] = -10
    class_logits[0, [19, 20]] = 10  # query 0: the last part class, then a person (its mask taken after)
    args = (class_logits, mask_logits, meta, SETTINGS, CLASSES)
    tiled = postprocess.to_result(*args, mode="exact", kernel=kernel)
    monkeypatch.setattr(postprocess, "_TiledPixels", postprocess._FusedPixels)
    return tiled, postprocess.to_result(*args, mode="exact", kernel=kernel)


@pytest.mark.parametrize("orig", [(150, 200), (333, 517), (720, 1280)])
def test_to_result_tiled_equals_the_full_size_kernel_path(kernel: fused.PostKernel, orig: tuple[int, int],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tiled, whole = _both_paths(kernel, orig, monkeypatch, seed=sum(orig))
    assert len(np.unique(whole.label_map)) >= 4 and whole.num_people >= 2  # something to disagree about
    np.testing.assert_array_equal(tiled.label_map, whole.label_map)
    np.testing.assert_array_equal(tiled.person_masks, whole.person_masks)
    assert tiled.person_scores.tolist() == whole.person_scores.tolist()
    assert [(p.class_id, p.score) for p in tiled.parts] == [(p.class_id, p.score) for p in whole.parts]
    assert 19 in [p.class_id for p in tiled.parts]


@pytest.mark.parametrize(("mode", "orig", "tiled"), [("exact", (333, 517), True), ("exact", (720, 1280), True),
                                                     ("fast", (150, 200), True), ("fast", (720, 1280), True),
                                                     ("fast", (1000, 1500), False)])
def test_to_result_tiles_only_at_the_original_size(kernel: fused.PostKernel, monkeypatch: pytest.MonkeyPatch,
                                                   mode: str, orig: tuple[int, int], tiled: bool) -> None:
    """``paste_vote`` writes the label map, band by band, exactly when the work size is the original
    size; smaller work goes through ``_FusedPixels`` (its maps are resized before the vote)."""
    bands: list[tuple[int, int]] = []
    paste_vote = fused.PostKernel.paste_vote

    def spy(self: fused.PostKernel, *args: np.ndarray) -> None:
        bands.append(args[-1].shape)
        paste_vote(self, *args)

    monkeypatch.setattr(fused.PostKernel, "paste_vote", spy)
    meta, class_logits, mask_logits = _outputs(orig, seed=2)
    result = postprocess.to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode=mode, kernel=kernel)
    assert (postprocess.work_hw_for(meta, mode) == meta.orig_hw) == tiled
    assert len(np.unique(result.label_map)) >= 4
    if tiled:  # the bands cover the label map once
        assert sum(h for h, _ in bands) == orig[0] and {w for _, w in bands} == {orig[1]}
    else:
        assert not bands


# --- the narrower builds ----------------------------------------------------------------------


def test_the_narrower_build_passes_these_tests_too(tmp_path: Path) -> None:
    """As test_fused.py does for its tests: this module's kernel tests pass on a build for one x86-64
    level alone (``-DM2FP_CLONES= -march=...``), in a child process. The level just below the one the
    package's build runs here (x86-64-v3 on an AVX-512 CPU, else x86-64): with FMA the compiler
    contracts each exported function's inlined copy of the loops on its own, and the copies must agree
    to the bit. One level only: a build and a run take ~12 s."""
    if os.environ.get(LIBRARY_UNDER_TEST):
        pytest.skip("already a child")
    if platform.machine() != "x86_64":
        pytest.skip("the narrower builds are x86-64 levels")
    march = "x86-64-v3" if cpu_lanes() == 16 else "x86-64"
    assert_tests_pass_on_a_build_for(march, tmp_path, __file__, "-k", "not to_result")
