"""Post-processing's fused kernel (``native/m2fp_post.c`` via ``imaging/fused.py``) against the
OpenCV/numpy path it replaces: each function on hostile values and awkward lengths, then whole
``to_result`` calls on synthetic confident outputs."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from m2fp_service.imaging import fused, postprocess
from m2fp_service.imaging.postprocess import to_result
from m2fp_service.imaging.preprocess import PreprocessMeta
from tests.imaging.conftest import LIBRARY_UNDER_TEST, assert_tests_pass_on_a_build_for, cpu_lanes
from tests.imaging.test_postprocess import CLASSES, SETTINGS, _meta, argmax_label_map, synthetic_outputs

HOSTILE = np.array([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 17, -17, 87.9, -87.9, 88, -88, 89, -89, 100, -100,
                    1e30, -1e30, np.inf, -np.inf, np.nan, 3e-39, -3e-39], np.float32)


def _numpy_squash(logits: np.ndarray) -> tuple[np.ndarray, float, int]:
    """The OpenCV/numpy path (which works on 2-D bands) on a 1-D array, its sigmoid kept where the
    logits are > 0 and 0 elsewhere, as the kernel writes it (the only values ever read)."""
    row = logits.reshape(1, -1)
    sig = np.empty_like(row)
    total, count = postprocess._squash_band(row, sig, np.empty_like(row))
    return _where_positive(logits, sig).ravel(), total, count


def _where_positive(logits: np.ndarray, sig: np.ndarray) -> np.ndarray:
    return np.where(logits.reshape(sig.shape) > 0, sig, np.float32(0))


def _identity(n: int) -> fused.Taps:
    return fused.Taps(np.arange(n, dtype=np.int32)[:, None].copy(), np.ones((n, 1), np.float32), n)


def _squash(kernel: fused.PostKernel, logits: np.ndarray, sig: np.ndarray) -> tuple[float, int]:
    """The kernel's squash alone: a 1-D array as one row, resampled by identity taps."""
    n = logits.size
    return kernel.upsample_squash(logits.reshape(1, n), _identity(n), _identity(1), np.empty(2 * n + 1, np.float32),
                                  sig.reshape(1, n))


def _logits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 6, n).astype(np.float32)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4095, 4096, 4097, 3 * 4096 + 5, 720 * 1280])
def test_squash_matches_numpy_at_every_length(kernel: fused.PostKernel, n: int) -> None:
    logits = _logits(n, seed=n)
    sig = np.full(n, -1.0, np.float32)  # every value must be written
    total, count = _squash(kernel, logits, sig)
    want_sig, want_total, want_count = _numpy_squash(logits)
    np.testing.assert_allclose(sig, want_sig, rtol=3e-7, atol=1e-38)
    assert count == want_count == int((logits > 0).sum())
    assert total == pytest.approx(want_total, rel=1e-6)
    assert 0 < count < n or n < 10  # both signs present, so the positive-only sum is tested


def test_squash_hostile_values(kernel: fused.PostKernel) -> None:
    sig = np.empty_like(HOSTILE)
    total, count = _squash(kernel, HOSTILE, sig)
    want = postprocess.sigmoid(HOSTILE)
    positive = HOSTILE > 0  # NaN is not positive: it counts nowhere
    np.testing.assert_allclose(sig[positive], want[positive], rtol=3e-7)
    assert (sig[~positive] == 0).all()  # 0, NaN included
    assert ((sig[positive] >= 0.5) & (sig[positive] <= 1)).all()
    assert count == int(positive.sum())
    assert total == pytest.approx(float(want[positive].astype(np.float64).sum()), rel=1e-6)


def test_squash_of_nothing(kernel: fused.PostKernel) -> None:
    empty = np.empty(0, np.float32)
    assert _squash(kernel, empty, np.empty(0, np.float32)) == (0.0, 0)


# (orig_hw, resized_hw, padded_hw): the 720p photo; a small photo (the second resize shrinks); the
# fast profile's geometry (no second resize); logits already at the padded size; a 1-pixel photo.
RESAMPLINGS = [
    pytest.param((720, 1280), (640, 1138), (640, 1152), (160, 288), id="720p"),
    pytest.param((150, 200), (640, 853), (640, 864), (160, 216), id="small-photo"),
    pytest.param((640, 1138), (640, 1138), (640, 1152), (160, 288), id="work-is-resized"),
    pytest.param((333, 517), (256, 397), (256, 416), (256, 416), id="logits-at-padded-size"),
    pytest.param((1, 1), (640, 640), (640, 640), (160, 160), id="one-pixel"),
    pytest.param((97, 1301), (32, 429), (32, 448), (8, 112), id="odd-sizes"),
    pytest.param((9, 1280), (640, 1138), (640, 1152), (160, 288), id="rows-of-many-taps"),
]


def _resampling(orig: tuple[int, int], resized: tuple[int, int], padded: tuple[int, int],
                low_hw: tuple[int, int]) -> tuple[PreprocessMeta, fused.Taps, fused.Taps]:
    meta = PreprocessMeta(orig_hw=orig, resized_hw=resized, padded_hw=padded)
    cols = postprocess.composite_taps(low_hw[1], padded[1], resized[1], orig[1])
    rows = postprocess.composite_taps(low_hw[0], padded[0], resized[0], orig[0])
    return meta, cols, rows


@pytest.mark.parametrize(("orig", "resized", "padded", "low_hw"), RESAMPLINGS)
def test_upsample_squash_equals_opencv_resizes_then_squash(kernel: fused.PostKernel, orig: tuple[int, int],
                                                           resized: tuple[int, int], padded: tuple[int, int],
                                                           low_hw: tuple[int, int]) -> None:
    meta, cols, rows = _resampling(orig, resized, padded, low_hw)
    low = np.random.default_rng(sum(orig)).normal(0, 4, low_hw).astype(np.float32)
    want = postprocess.query_logits_at(low, meta, orig)  # OpenCV's two resizes
    want_sig, want_total, want_count = _numpy_squash(want)
    logits = np.full(orig, np.nan, np.float32)  # every value must be written
    sig = np.full(orig, np.nan, np.float32)
    scratch = np.full((low_hw[0] + 1) * orig[1], np.nan, np.float32)  # stale values must not leak in
    total, count = kernel.upsample_squash(low, cols, rows, scratch, sig, logits)
    np.testing.assert_allclose(logits, want, rtol=0, atol=4e-6)  # |logits| < ~20: float rounding
    # sigmoid' <= 1/4 of the logits' bound; kept where the kernel's own logit is > 0 (a logit rounding
    # across 0 has a sigmoid of ~0.5 either way)
    np.testing.assert_allclose(sig, _where_positive(logits, want_sig.reshape(orig)), rtol=0, atol=1e-6)
    assert abs(count - want_count) <= max(1, want_count // 100_000)  # a logit rounding across 0 at most
    assert total == pytest.approx(want_total, rel=1e-5, abs=1e-5)
    if orig[0] * orig[1] > 1:
        assert 0 < want_count < orig[0] * orig[1]  # both signs, so the positive-only sum is tested
    sig_only = np.empty_like(sig)
    assert kernel.upsample_squash(low, cols, rows, scratch, sig_only) == (total, count)  # logits not kept
    np.testing.assert_array_equal(sig_only, sig)


def _dense(taps: fused.Taps) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of a resampling."""
    matrix = np.zeros((len(taps), taps.n_in))
    for k in range(taps.index.shape[1]):
        np.add.at(matrix, (np.arange(len(taps)), taps.index[:, k]), taps.weight[:, k].astype(np.float64))
    return matrix


def _check_against_dense(kernel: fused.PostKernel, low: np.ndarray, cols: fused.Taps,
                         rows: fused.Taps) -> np.ndarray:
    """The kernel's logits and sig against float64 matrix products, its sig without logits kept the
    same; returns the logits."""
    want = _dense(rows) @ low.astype(np.float64) @ _dense(cols).T
    out_hw = want.shape
    logits, sig = np.full(out_hw, np.nan, np.float32), np.full(out_hw, np.nan, np.float32)
    scratch = np.full((low.shape[0] + 1) * out_hw[1], np.nan, np.float32)
    total, count = kernel.upsample_squash(low, cols, rows, scratch, sig, logits)
    np.testing.assert_allclose(logits, want, rtol=0, atol=2e-5)
    exact = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(sig, np.where(logits > 0, exact, 0), rtol=0, atol=3e-7)
    assert count == int((logits > 0).sum())
    assert total == pytest.approx(float(exact[logits > 0].sum()), rel=1e-5)
    sig_only = np.full(out_hw, np.nan, np.float32)
    assert kernel.upsample_squash(low, cols, rows, scratch, sig_only) == (total, count)
    np.testing.assert_array_equal(sig_only, sig)
    return logits


def test_upsample_squash_of_a_sparse_mask(kernel: fused.PostKernel) -> None:
    """Most blocks of a trained mask have no positive input and are not squashed: lone positive
    logits anywhere (every column of the photo's part of the low map once, edges and corners
    included) still reach every output they weigh on."""
    _, cols, rows = _resampling((720, 1280), (640, 1138), (640, 1152), (160, 288))
    rng = np.random.default_rng(7)
    low = -rng.uniform(0.5, 2.0, (160, 288)).astype(np.float32)
    spikes = (rng.integers(0, 160, 284), np.arange(284))  # columns from 285 on hold padding, never read
    low[spikes] = 6.0
    low[[0, 0, 159, 159], [0, 283, 0, 283]] = 6.0
    low[60:70, 100:120] = 2.0  # and one solid patch
    logits = _check_against_dense(kernel, low, cols, rows)
    positive = logits > 0
    assert 0.005 < positive.mean() < 0.2  # sparse, yet every spike shows
    for r, c in zip(*spikes, strict=True):
        near_rows = ((rows.index == r) & (rows.weight > 0.3)).any(1)
        near_cols = ((cols.index == c) & (cols.weight > 0.3)).any(1)
        assert positive[np.ix_(near_rows, near_cols)].any(), (r, c)


@pytest.mark.parametrize("band", [slice(0, 720), slice(0, 1), slice(301, 719)])
def test_upsample_squash_skips_rows_without_a_positive_logit(kernel: fused.PostKernel, band: slice) -> None:
    """Without logits kept, output rows whose low rows hold no value > 0 are not resampled: their sig
    is 0 and they add nothing, as computed. Positive logits in a few low rows only (one at the map's
    edge), dead rows of -inf, NaN and -0.0 beside them: the same sig and sums as with the logits kept,
    and as a dense product."""
    _, cols, full_rows = _resampling((720, 1280), (640, 1138), (640, 1152), (160, 288))
    rows = full_rows.band(band)
    low = -np.random.default_rng(5).uniform(0.1, 3.0, (160, 288)).astype(np.float32)
    low[80, 40:60] = 5.0
    low[81, 200] = 0.5
    low[159, 7] = 9.0  # the last row: read by the last output rows only
    low[79] = -np.inf
    low[82] = np.nan
    low[120] = -0.0
    out_hw = (len(rows), len(cols))
    logits, sig = np.full(out_hw, np.nan, np.float32), np.full(out_hw, np.nan, np.float32)
    scratch = np.full(161 * 1280, np.nan, np.float32)
    total, count = kernel.upsample_squash(low, cols, rows, scratch, sig, logits)
    sig_only = np.full(out_hw, np.nan, np.float32)  # every value must be written, skipped rows too
    scratch.fill(np.nan)  # a low row a kept output row reads must be resampled again, not found there
    assert kernel.upsample_squash(low, cols, rows, scratch, sig_only) == (total, count)
    np.testing.assert_array_equal(sig_only, sig)
    if band == slice(0, 720):
        assert count > 0 and (sig > 0).any(1).mean() < 0.1  # most output rows are skipped
        clean = np.where(np.isfinite(low), low, -1.0).astype(np.float32)  # the dense product has no inf/NaN
        _check_against_dense(kernel, clean, cols, rows)


def test_upsample_squash_adds_taps_on_one_input(kernel: fused.PostKernel) -> None:
    """Taps may name one input twice (their weights add up, as a resampling's definition says): the
    block columns give what the plain loops and a dense product give."""
    n_low, n_out = 40, 176
    base = np.minimum(np.arange(n_out) * n_low // n_out, n_low - 2)
    index = np.stack([base, base, base + 1], 1).astype(np.int32)
    weight = np.tile(np.array([0.25, 0.5, 0.25], np.float32), (n_out, 1))
    taps = fused.Taps(index, weight, n_low)
    low = np.random.default_rng(11).normal(0, 3, (n_low, n_low)).astype(np.float32)
    _check_against_dense(kernel, low, taps, taps)


def test_upsample_squash_a_row_without_weights_gets_logits_of_0(kernel: fused.PostKernel) -> None:
    """An output row whose taps all weigh 0 (a resampling may say so) takes no input: its logits are
    0 and its sig 0, written in every block, with the logits kept and without."""
    _, cols, rows = _resampling((720, 1280), (640, 1138), (640, 1152), (160, 288))
    weight = rows.weight.copy()
    weight[[0, 5, 719]] = 0
    rows = fused.Taps(rows.index.copy(), weight, rows.n_in)
    low = np.random.default_rng(12).normal(0, 3, (160, 288)).astype(np.float32)
    logits = _check_against_dense(kernel, low, cols, rows)
    assert (logits[[0, 5, 719]] == 0).all()


@pytest.mark.parametrize("sharpened", ["cols", "rows", "both"])
def test_upsample_squash_with_negative_weights(kernel: fused.PostKernel, sharpened: str) -> None:
    """Negative weights (a sharpening resampling) on either axis turn all-negative inputs into positive
    outputs, so no block may be skipped for its inputs' signs."""
    n_low, n_out = 40, 176
    centre = (np.arange(n_out) + 0.5) * n_low / n_out - 0.5
    base = np.clip(np.floor(centre).astype(int) - 1, 0, n_low - 4)
    index = (base[:, None] + np.arange(4)).astype(np.int32)
    t = np.clip(centre - base - 1, 0, 1)
    weight = np.stack([-0.5 * t * (1 - t) ** 2, 1 - 2.5 * t**2 + 1.5 * t**3,
                       t * (0.5 + 2 * t - 1.5 * t**2), -0.5 * t**2 * (1 - t)], 1)  # Catmull-Rom
    taps = fused.Taps(index, weight.astype(np.float32), n_low)
    low = np.full((n_low, n_low), -0.5, np.float32)
    low[::7] = -100.0  # deep rows and columns between shallow ones: the lobes overshoot above 0
    low[:, ::9] = -100.0
    smooth = postprocess.composite_taps(n_low, 4 * n_low, 4 * n_low, n_out)
    logits = _check_against_dense(kernel, low, smooth if sharpened == "rows" else taps,
                                  smooth if sharpened == "cols" else taps)
    assert (logits > 0).any() and (low <= 0).all()


def test_composite_taps_are_a_resampling() -> None:
    """Weights sum to 1 (bilinear of bilinear), indices in range, at most 4 taps; cached and read-only."""
    for n_low, n_padded, n_resized, n_work in [(160, 640, 640, 720), (288, 1152, 1138, 1280), (216, 864, 853, 200),
                                               (1, 4, 4, 3), (112, 448, 429, 1301)]:
        taps = postprocess.composite_taps(n_low, n_padded, n_resized, n_work)
        assert len(taps) == n_work and taps.n_in == n_low
        assert 1 <= taps.index.shape[1] <= 4
        np.testing.assert_allclose(taps.weight.sum(1), 1.0, rtol=1e-6)
        assert (taps.weight >= 0).all()
        assert postprocess.composite_taps(n_low, n_padded, n_resized, n_work) is taps
        with pytest.raises(ValueError):
            taps.weight[0, 0] = 2.0


def test_upsample_squash_on_bands_equals_one_call(kernel: fused.PostKernel) -> None:
    meta, cols, rows = _resampling((720, 1280), (640, 1138), (640, 1152), (160, 288))
    low = np.random.default_rng(1).normal(0, 4, (160, 288)).astype(np.float32)
    whole_sig, whole_logits = np.empty((720, 1280), np.float32), np.empty((720, 1280), np.float32)
    whole = kernel.upsample_squash(low, cols, rows, np.empty(161 * 1280, np.float32), whole_sig, whole_logits)
    sig, logits = np.empty_like(whole_sig), np.empty_like(whole_logits)
    sums = []
    for band in [slice(0, 1), slice(1, 300), slice(300, 719), slice(719, 720)]:
        sums.append(kernel.upsample_squash(low, cols, rows.band(band), np.empty(161 * 1280, np.float32), sig[band],
                                           logits[band]))
    np.testing.assert_array_equal(sig, whole_sig)  # every pixel: the same operations in the same order
    np.testing.assert_array_equal(logits, whole_logits)
    assert sum(n for _, n in sums) == whole[1]
    assert sum(t for t, _ in sums) == pytest.approx(whole[0], rel=1e-9)


@pytest.mark.parametrize("work_hw", [(720, 1280), (640, 1138)])  # the photo; the fast profile (read to row ends)
@pytest.mark.parametrize("column", [144, 0])  # mid-row; a row's start (the row before reads up to its end)
@pytest.mark.parametrize("background", ["noise", "negative"])  # a negative one leaves only the bad value live
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_upsample_squash_a_non_finite_logit_reaches_only_what_it_weighs_on(kernel: fused.PostKernel,
                                                                           bad: float, background: str,
                                                                           column: int,
                                                                           work_hw: tuple[int, int]) -> None:
    """Zero weights are skipped, not multiplied (0 x inf is NaN): the bad value spoils exactly the
    outputs whose composite weight on it is not 0, and the rest equal a run without it (to float
    rounding in the rows drawn from the bad value's row, which takes the kernel's careful loop)."""
    _, cols, rows = _resampling(work_hw, (640, 1138), (640, 1152), (160, 288))
    low = np.random.default_rng(2).normal(0, 4, (160, 288)).astype(np.float32)
    if background == "negative":
        low = -np.abs(low) - 0.1
    clean_sig = np.empty(work_hw, np.float32)
    kernel.upsample_squash(low, cols, rows, np.empty(161 * work_hw[1], np.float32), clean_sig)
    low[80, column] = bad
    logits, sig = np.empty(work_hw, np.float32), np.empty(work_hw, np.float32)
    kernel.upsample_squash(low, cols, rows, np.empty(161 * work_hw[1], np.float32), sig, logits)
    touched_rows = ((rows.index == 80) & (rows.weight != 0)).any(1)
    touched_cols = ((cols.index == column) & (cols.weight != 0)).any(1)
    spoiled = touched_rows[:, None] & touched_cols[None, :]
    assert 4 <= spoiled.sum() <= 12 * 12  # the pixels around the bad one's place (a ~4x upsampling)
    assert not np.isfinite(logits[spoiled]).any()
    np.testing.assert_array_equal(sig[~touched_rows], clean_sig[~touched_rows])
    np.testing.assert_allclose(sig[~spoiled], clean_sig[~spoiled], rtol=0, atol=3e-7)
    if bad > 0:
        assert (sig[spoiled] == 1.0).all()
    else:  # NaN or -inf: not positive, so 0 (never read)
        assert (sig[spoiled] == 0).all()


@pytest.mark.parametrize("score", [0.0, 0.3, 0.5, 0.51, 0.9, 1.0])
def test_add_instance_matches_numpy(kernel: fused.PostKernel, score: float) -> None:
    sig = postprocess.sigmoid(_logits(4097 * 3 + 1, seed=3))
    sig[:3] = [0.5, 1.0, 0.0]
    start = np.random.default_rng(4).uniform(0, 2, sig.size).astype(np.float32)
    counts_start = np.random.default_rng(5).integers(0, 50, sig.size).astype(np.uint8)
    probs, counts = start.copy(), counts_start.copy()
    want_probs, want_counts = start.copy(), counts_start.copy()
    kernel.add_instance(sig, probs, counts, np.float32(score))
    postprocess._add_instance_band(sig[None], want_probs[None], want_counts[None], np.empty_like(sig[None]),
                                   np.float32(score))
    np.testing.assert_array_equal(probs, want_probs)  # the same one multiply and one add per pixel
    np.testing.assert_array_equal(counts, want_counts)
    assert (counts != counts_start).any() == (score > 0.5)


def test_add_instance_never_adds_nan(kernel: fused.PostKernel) -> None:
    """A NaN probability is not above 0.5, so it is not pasted (as ModelScope's ``probs > 0.5`` mask)."""
    sig = np.array([np.nan, 0.9, np.nan], np.float32)
    probs, counts = np.zeros(3, np.float32), np.zeros(3, np.uint8)
    kernel.add_instance(sig, probs, counts, np.float32(1.0))
    np.testing.assert_array_equal(probs, np.array([0.0, 0.9, 0.0], np.float32))
    np.testing.assert_array_equal(counts, [0, 1, 0])


def test_average_matches_numpy(kernel: fused.PostKernel) -> None:
    rng = np.random.default_rng(6)
    probs = rng.uniform(0, 40, 10_001).astype(np.float32)
    counts = rng.integers(0, 100, probs.size).astype(np.uint8)
    counts[:3] = [0, 1, 255]
    want = probs / np.maximum(counts, 1).astype(np.float32)
    kernel.average(probs, counts)
    np.testing.assert_array_equal(probs, want)  # the same single division


@pytest.mark.parametrize("out_hw", [(97, 131), (720, 1280)])
def test_argmax_by_votes_equals_opencv(kernel: fused.PostKernel, out_hw: tuple[int, int]) -> None:
    """Ties (equal maps, zeros everywhere) go to the lower class, as torch.argmax; resized maps too."""
    rng = np.random.default_rng(sum(out_hw))
    small = (out_hw[0] // 2 + 1, out_hw[1] // 2 + 3)
    probs = {c: rng.uniform(0, 1, small).astype(np.float32) * (rng.uniform(0, 1, small) > 0.5) for c in
             (1, 2, 5, 13, 19)}
    probs[7] = probs[5].copy()  # a tie everywhere: 5 must keep it
    for hw in (small, out_hw):
        want = argmax_label_map(probs, hw)
        got = argmax_label_map(probs, hw, kernel)
        np.testing.assert_array_equal(got, want)
        assert set(np.unique(got)) - {0} == {1, 2, 5, 13, 19}  # 7 never wins
    assert (argmax_label_map(probs, small, kernel) == 0).any()  # 0 where every class is 0


def test_average_vote_equals_average_then_vote(kernel: fused.PostKernel) -> None:
    rng = np.random.default_rng(11)
    probs = rng.uniform(0, 3, 20_011).astype(np.float32)
    counts = rng.integers(0, 4, probs.size).astype(np.uint8)
    counts[:2] = [0, 255]
    best = rng.uniform(0, 1, probs.size).astype(np.float32)
    labels = rng.integers(0, 7, probs.size).astype(np.uint8)
    want_probs, want_best, want_labels = probs.copy(), best.copy(), labels.copy()
    kernel.average(want_probs, counts)
    kernel.vote(want_probs, 7, want_best, want_labels)
    kept = probs.copy()
    kernel.average_vote(probs, counts, best, labels, 7)
    np.testing.assert_array_equal(best, want_best)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(probs, kept)  # left as it was
    assert 0 < (labels == 7).mean() < 1
    with pytest.raises(ValueError, match="differ"):
        kernel.average_vote(probs, counts[:-1], best, labels, 7)
    with pytest.raises(ValueError, match="uint8"):
        kernel.average_vote(probs, counts, best, labels, 256)


def test_vote_refuses_a_class_beyond_uint8(kernel: fused.PostKernel) -> None:
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="uint8"):
        kernel.vote(a, 256, a.copy(), np.zeros(4, np.uint8))


def test_add_instance_first_writes_what_adding_to_zeros_gives(kernel: fused.PostKernel) -> None:
    sig = postprocess.sigmoid(_logits(10_007, seed=8))
    probs = np.random.default_rng(9).uniform(0, 2, sig.size).astype(np.float32)  # stale: overwritten
    counts = np.random.default_rng(10).integers(0, 50, sig.size).astype(np.uint8)
    want_probs, want_counts = np.zeros_like(probs), np.zeros_like(counts)
    kernel.add_instance(sig, probs, counts, np.float32(0.8), first=True)
    kernel.add_instance(sig, want_probs, want_counts, np.float32(0.8))
    np.testing.assert_array_equal(probs, want_probs)
    np.testing.assert_array_equal(counts, want_counts)
    assert 0 < counts.sum() < sig.size


@pytest.mark.parametrize("score", [-0.1, 1.01, float("nan"), float("inf")])
def test_add_instance_refuses_a_score_outside_0_1(kernel: fused.PostKernel, score: float) -> None:
    """sig is 0 where the logit is <= 0, which is exact only for scores <= 1 (sigmoid <= 0.5 there)."""
    with pytest.raises(ValueError, match="score"):
        kernel.add_instance(np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.uint8), np.float32(score))


def test_wrong_arrays_are_refused_not_read(kernel: fused.PostKernel) -> None:
    logits = _logits(64)
    with pytest.raises(ValueError, match="differ"):
        kernel.add_instance(logits, np.empty(64, np.float32), np.empty(32, np.uint8), np.float32(0.9))
    with pytest.raises(ValueError, match="counts must be a C-contiguous uint8"):
        kernel.add_instance(logits, np.empty(64, np.float32), np.empty(64, np.int8), np.float32(0.9))
    with pytest.raises(ValueError, match="sig must be a C-contiguous float32"):
        kernel.add_instance(np.empty(128, np.float32)[::2], np.empty(64, np.float32), np.empty(64, np.uint8),
                            np.float32(0.9))
    frozen_probs = np.zeros(64, np.float32)
    frozen_probs.flags.writeable = False
    with pytest.raises(ValueError, match="probs must be writeable"):
        kernel.add_instance(logits, frozen_probs, np.empty(64, np.uint8), np.float32(0.9))
    _, cols, rows = _resampling((97, 131), (32, 43), (32, 64), (8, 16))
    low, sig, scratch = np.zeros((8, 16), np.float32), np.empty((97, 131), np.float32), np.empty(9 * 131, np.float32)
    kernel.upsample_squash(low, cols, rows, scratch, sig)  # right: no error
    with pytest.raises(ValueError, match="do not match taps"):
        kernel.upsample_squash(np.zeros((8, 15), np.float32), cols, rows, scratch, sig)
    with pytest.raises(ValueError, match="expected"):
        kernel.upsample_squash(low, cols, rows, scratch, sig[:96])
    with pytest.raises(ValueError, match="expected"):
        kernel.upsample_squash(low, cols, rows, scratch, sig, np.empty((97, 130), np.float32))
    with pytest.raises(ValueError, match="scratch"):
        kernel.upsample_squash(low, cols, rows, scratch[:-1], sig)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        kernel.upsample_squash(low, cols, rows, scratch, sig, np.empty((97, 131), np.float64))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        kernel.upsample_squash(low, cols, rows, scratch, sig, np.empty((97, 262), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="overlap"):
        kernel.upsample_squash(low, cols, rows, scratch, sig, sig)
    with pytest.raises(ValueError, match="overlap"):
        kernel.upsample_squash(low, cols, rows, sig.ravel(), sig)
    frozen = sig.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        kernel.upsample_squash(low, cols, rows, scratch, frozen)
    with pytest.raises(ValueError, match="low must be a C-contiguous float32"):
        kernel.upsample_squash(low.astype(np.float64), cols, rows, scratch, sig)
    with pytest.raises(ValueError, match="low must be a C-contiguous float32"):
        kernel.upsample_squash(np.zeros((8, 32), np.float32)[:, ::2], cols, rows, scratch, sig)  # not contiguous
    with pytest.raises(ValueError, match="scratch must be a C-contiguous float32"):
        kernel.upsample_squash(low, cols, rows, scratch.astype(np.float64), sig)
    with pytest.raises(ValueError, match="sig must be a C-contiguous float32"):
        kernel.upsample_squash(low, cols, rows, scratch, np.empty((97, 262), np.float32)[:, ::2])


def test_taps_are_checked_when_made() -> None:
    index, weight = np.zeros((5, 2), np.int32), np.full((5, 2), 0.5, np.float32)
    assert len(fused.Taps(index, weight, 1)) == 5
    with pytest.raises(ValueError, match=r"lie in \[0, 1\)"):
        fused.Taps(index + 1, weight, 1)  # would read past the row
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        fused.Taps(index - 1, weight, 3)
    with pytest.raises(ValueError, match="int32"):
        fused.Taps(index.astype(np.int64), weight, 1)
    with pytest.raises(ValueError, match="alike"):
        fused.Taps(index, weight[:4], 1)
    source = np.zeros((5, 4), np.int32)
    taps = fused.Taps(source[:, ::2], weight, 1)  # kept as its own C-contiguous copy ...
    assert taps.index.flags.c_contiguous
    source[:] = 10**6  # ... so changing the caller's array afterwards cannot send the kernel out of bounds
    assert taps.index.max() == 0
    with pytest.raises(ValueError, match="read-only"):
        taps.index[0, 0] = 10**6
    assert not taps.band(slice(1, 3)).weight.flags.writeable


def test_calls_from_threads_equal_serial_calls(kernel: fused.PostKernel) -> None:
    _, cols, rows = _resampling((720, 1280), (640, 1138), (640, 1152), (160, 288))
    lows = [np.random.default_rng(s).normal(0, 4, (160, 288)).astype(np.float32) for s in range(8)]

    def squash(low: np.ndarray) -> tuple[float, int]:
        sig = np.empty((720, 1280), np.float32)
        return kernel.upsample_squash(low, cols, rows, np.empty(161 * 1280, np.float32), sig)

    serial = [squash(low) for low in lows]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(squash, lows))
    assert threaded == serial


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("orig", [(720, 1280), (333, 517), (1000, 1000)])
def test_to_result_with_the_kernel_equals_the_numpy_path(kernel: fused.PostKernel, mode: str,
                                                         orig: tuple[int, int]) -> None:
    meta = _meta(orig)
    class_logits, mask_logits = synthetic_outputs(meta, seed=sum(orig))
    ours = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode=mode, kernel=kernel)  # type: ignore[arg-type]
    plain = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode=mode, kernel=None)  # type: ignore[arg-type]
    assert len(np.unique(plain.label_map)) >= 4 and plain.num_people >= 2  # something to disagree about
    agreement = float((ours.label_map == plain.label_map).mean())
    assert agreement >= 0.99999, agreement  # ties broken by the last bit may differ, nothing more
    np.testing.assert_array_equal(ours.person_masks, plain.person_masks)  # thresholded logits, not sig
    np.testing.assert_allclose(ours.person_scores, plain.person_scores, rtol=1e-6)
    assert [p.class_id for p in ours.parts] == [p.class_id for p in plain.parts]
    np.testing.assert_allclose([p.score for p in ours.parts], [p.score for p in plain.parts], rtol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_query_both_part_and_person_gets_its_person_mask_from_its_logits(kernel: fused.PostKernel,
                                                                          mode: str) -> None:
    """The kernel keeps a query's logits only for a person: a query whose part pair comes just before
    its person pair (the last part class, then the human class) is squashed again with its logits."""
    assert SETTINGS.human_class_index == SETTINGS.num_parsing == 20
    meta = _meta((333, 517))
    class_logits, mask_logits = synthetic_outputs(meta, seed=5)
    class_logits[class_logits.argmax(1) == 19, 18] += 20  # nobody else in class 19
    class_logits[0, :] = -10
    class_logits[0, [19, 20]] = 10  # query 0: half class 19, half a person, in that order
    class_logits[1, :] = -10
    class_logits[1, [3, 20]] = 10  # query 1: class 3 and a person, far apart
    ours = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode=mode, kernel=kernel)  # type: ignore[arg-type]
    plain = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode=mode, kernel=None)  # type: ignore[arg-type]
    assert 19 in [p.class_id for p in ours.parts] and 3 in [p.class_id for p in ours.parts]
    np.testing.assert_array_equal(ours.person_masks, plain.person_masks)
    np.testing.assert_allclose(ours.person_scores, plain.person_scores, rtol=1e-6)
    work = postprocess.work_hw_for(meta, mode)
    own = postprocess.resize_bilinear(postprocess.query_logits_at(mask_logits[0], meta, work), meta.orig_hw) > 0
    assert any(np.array_equal(mask, own) for mask in ours.person_masks)  # query 0's own mask, not a neighbour's


def test_to_result_uses_the_built_kernel_by_default(kernel: fused.PostKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def no_scores(self: fused.PostKernel, lows: list[np.ndarray], *taps: fused.Taps) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(lows))
        return np.zeros(len(lows)), np.zeros(len(lows), np.int64)

    monkeypatch.setattr(fused.PostKernel, "mask_scores", no_scores)  # the exact mode's first pass
    meta = _meta((150, 200))
    class_logits, mask_logits = synthetic_outputs(meta, seed=1)
    result = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES)
    assert calls  # the default went through the kernel (whose stand-in scored every mask 0) ...
    assert not result.parts and result.label_map.max() == 0  # ... and its answers were used (a person's
    # score comes from the full squash of its mask)


# --- loading ----------------------------------------------------------------------------------


def test_a_file_that_is_not_a_library_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "libm2fp_post.so"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(OSError):
        fused.PostKernel(junk)


def test_a_foreign_library_is_refused() -> None:
    libm = ctypes.util.find_library("m")
    assert libm is not None
    with pytest.raises(OSError, match="not m2fp's post-processing library"):
        fused.PostKernel(Path(libm))


def test_built_is_none_when_missing_and_warns_when_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fused, "BUILT", tmp_path / "libm2fp_post.so")
    fused.built.cache_clear()
    try:
        assert fused.built() is None  # not built: the numpy path, no warning
        assert not caplog.records
        fused.built.cache_clear()
        (tmp_path / "libm2fp_post.so").write_bytes(b"\x7fELF broken")
        with caplog.at_level(logging.WARNING):
            assert fused.built() is None
        assert "does not load" in caplog.text
        meta = _meta((150, 200))
        class_logits, mask_logits = synthetic_outputs(meta, seed=2)
        assert to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES).num_people >= 2  # still works
    finally:
        fused.built.cache_clear()


def test_the_package_build_runs_the_cpus_widest_kernels(kernel: fused.PostKernel) -> None:
    """A build for x86-64's levels (GCC >= 11, as ``make native`` makes it here) has every width; the
    CPU's widest is the one bound."""
    library = ctypes.CDLL(str(kernel.path))
    if os.environ.get(LIBRARY_UNDER_TEST) or not all(hasattr(library, f"m2fp_paste_vote_w{n}") for n in (4, 8, 16)):
        pytest.skip("a build for one level has one width")
    assert kernel.lanes == cpu_lanes()


@pytest.mark.parametrize("lanes", [4, 8])
def test_each_narrower_width_gives_the_widest_ones_results(kernel: fused.PostKernel, lanes: int) -> None:
    """The per-pixel kernels are built once per x86-64 level, each with its own vector width (a vector
    wider than the registers had its comparisons done lane by lane: 6x slower with AVX2). Asked for by
    width, the narrower ones in the same library give the same results: the squash within float
    rounding of numpy's, and whole ``to_result`` calls as the widest's."""
    if os.environ.get(LIBRARY_UNDER_TEST) or lanes >= kernel.lanes:
        pytest.skip(f"a build for one level has one width; this library's widest here: {kernel.lanes} lanes")
    narrow = fused.PostKernel(kernel.path, lanes=lanes)
    assert narrow.lanes == lanes
    logits = _logits(3 * 4096 + 5, seed=lanes)
    sig = np.full(logits.size, -1.0, np.float32)
    total, count = _squash(narrow, logits, sig)
    want_sig, want_total, want_count = _numpy_squash(logits)
    np.testing.assert_allclose(sig, want_sig, rtol=3e-7, atol=1e-38)
    assert count == want_count and total == pytest.approx(want_total, rel=1e-6)
    meta = _meta((333, 517))
    class_logits, mask_logits = synthetic_outputs(meta, seed=lanes)
    ours = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, kernel=narrow)  # type: ignore[arg-type]
    wide = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, kernel=kernel)  # type: ignore[arg-type]
    assert len(np.unique(wide.label_map)) >= 4 and wide.num_people >= 2
    assert float((ours.label_map == wide.label_map).mean()) >= 0.99999
    np.testing.assert_array_equal(ours.person_masks, wide.person_masks)
    np.testing.assert_allclose(ours.person_scores, wide.person_scores, rtol=1e-6)


@pytest.mark.parametrize("lanes", [3, 32])
def test_a_width_the_library_lacks_is_refused(kernel: fused.PostKernel, lanes: int) -> None:
    with pytest.raises(OSError, match=f"no {lanes}-lane kernels"):
        fused.PostKernel(kernel.path, lanes=lanes)


def test_a_copy_of_the_built_library_loads(kernel: fused.PostKernel, tmp_path: Path) -> None:
    copy = tmp_path / "copy.so"
    shutil.copy(kernel.path, copy)
    logits = _logits(1000)
    got = _squash(fused.PostKernel(copy), logits, np.empty_like(logits))
    assert got == _squash(kernel, logits, np.empty_like(logits))


def test_the_library_under_test_is_the_one_asked_for(kernel: fused.PostKernel) -> None:
    asked = os.environ.get(LIBRARY_UNDER_TEST)
    assert kernel.path == (Path(asked) if asked else fused.BUILT)


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_every_narrower_build_passes_these_tests(march: str, tmp_path: Path) -> None:
    """The package's library runs the CPU's widest build of each loop (target clones, and the per-pixel
    kernels built per level); each level built alone (``-DM2FP_CLONES= -march=...``: one width, from
    the command line's target, the per-level files empty) passes this module's tests too, in a child
    process. (x86-64-v3: on a CPU with AVX2 and FMA; v4: with AVX-512.)"""
    if os.environ.get(LIBRARY_UNDER_TEST):
        pytest.skip("already a child")
    if platform.machine() != "x86_64" or cpu_lanes() < {"x86-64": 4, "x86-64-v3": 8, "x86-64-v4": 16}[march]:
        pytest.skip(f"this CPU does not run {march}")
    assert_tests_pass_on_a_build_for(march, tmp_path, __file__)
