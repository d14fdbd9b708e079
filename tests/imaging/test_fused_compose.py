"""Compositing's fused kernel (``native/m2fp_post.c`` via ``imaging/fused.py``) against
``compose.NumpyOps``, the OpenCV/numpy steps it replaces: each step alone on random and hostile
inputs and awkward sizes, then whole ``refine_alpha`` and ``composite`` calls both ways. The
``kernel`` fixture (``conftest.py``) is the built kernel, required in CI."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from m2fp_service.imaging import compose, fused
from m2fp_service.imaging.compose import ComposeOptions, NumpyOps

SIZES = [(720, 1280), (97, 131), (33, 8), (1, 7), (7, 1), (1, 1), (2, 3)]


def scene(hw: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A photo with edges and noise, and a coarse selection that follows them only roughly: (H, W, 3)
    uint8 and (H, W) bool."""
    h, w = hw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (yy - h / 2) ** 2 / max(h / 3, 1) ** 2 + (xx - w / 2) ** 2 / max(w / 4, 1) ** 2 < 1
    image = np.where(inside[..., None], [200, 60, 40], [30, 150, 220]) + rng.normal(0, 12, (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    coarse = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    coarse &= rng.random((h, w)) > 0.02  # holes the refinement must fill
    return image, coarse


def soft_alpha(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Solid 0 and 1 regions with a fractional band between them, and a few stray fractional pixels."""
    h, w = hw
    rng = np.random.default_rng(seed)
    x = np.linspace(-2, 2, w, dtype=np.float32)[None, :] + np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    alpha = np.clip(0.5 - x, 0, 1).astype(np.float32)
    stray = rng.random((h, w)) < 0.01
    alpha[stray] = rng.random(int(stray.sum())).astype(np.float32)
    return alpha


def _differ(a: np.ndarray, b: np.ndarray, tol: float) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64)) > tol))


def assert_snapped(alpha: np.ndarray) -> None:
    """No value within 1/255 of 0 or 1 but those: the promise of ``refine_alpha``."""
    tol = np.float32(1 / 255)
    assert not ((alpha > 0) & (alpha <= tol)).any(), "values just above 0 must be snapped to 0"
    assert not ((alpha > 1 - tol) & (alpha < 1)).any(), "values just below 1 must be snapped to 1"


# ---------------------------------------------------------------------------------------------
# each step alone


def test_bilinear_taps_are_opencvs_resize() -> None:
    rng = np.random.default_rng(0)
    for n_in, n_out in [(180, 720), (320, 1280), (7, 20), (1, 5), (5, 5), (3, 1000), (270, 1080)]:
        x = rng.normal(size=n_in).astype(np.float32)
        taps = fused.bilinear(n_in, n_out)
        ours = (taps.weight * x[taps.index]).sum(1)
        theirs = cv2.resize(x.reshape(1, -1), (n_out, 1), interpolation=cv2.INTER_LINEAR).ravel()
        np.testing.assert_allclose(ours, theirs, atol=2e-6)
    assert fused.bilinear(180, 720) is fused.bilinear(180, 720), "made once per size"
    assert not fused.bilinear(180, 720).weight.flags.writeable


@pytest.mark.parametrize("hw", [(180, 320), (1, 1), (3, 5)])
def test_guided_products_equal_numpy(kernel: fused.PostKernel, hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    guide, p = rng.random((*hw, 3), np.float32), rng.random(hw, np.float32)
    np.testing.assert_array_equal(kernel.guided_products(guide, p), NumpyOps.guided_products(guide, p))


@pytest.mark.parametrize("eps", [1e-3, 1e-1])
def test_guided_solve_equals_numpy(kernel: fused.PostKernel, eps: float) -> None:
    guide, coarse = scene((180, 320))
    g, p = guide.astype(np.float32) / 255, coarse.astype(np.float32)
    means = compose._box(NumpyOps.guided_products(g, p), 2)
    ours, theirs = kernel.guided_solve(means, eps), NumpyOps.guided_solve(means, eps)
    assert np.abs(theirs[..., :3]).max() > 0.1, "the test must see real slopes, not flat coefficients"
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)
    assert _differ(ours, theirs, 1e-4) < 0.01


@pytest.mark.parametrize("hw,small", [((720, 1280), (180, 320)), ((97, 131), (49, 66)), ((5, 3), (5, 3)),
                                      ((1, 9), (1, 3)), ((8, 1), (2, 1))])
def test_guided_apply_equals_numpy(kernel: fused.PostKernel, hw: tuple[int, int], small: tuple[int, int]) -> None:
    rng = np.random.default_rng(2)
    coef = np.empty((*small, 4), np.float32)
    coef[..., :3] = rng.normal(0, 2 / 255, (*small, 3))
    coef[..., 3] = rng.normal(0.5, 0.6, small)  # q spans below 0, 0..1 and above 1: every snap
    guide = rng.integers(0, 256, (*hw, 3), np.uint8)
    busy = (rng.random(hw) < 0.6).astype(np.uint8)
    alpha = rng.random(hw, np.float32)
    ours, theirs = kernel.guided_apply(coef, guide, busy, alpha), NumpyOps.guided_apply(coef, guide, busy, alpha)
    np.testing.assert_array_equal(ours[busy == 0], alpha[busy == 0])
    assert_snapped(ours[busy == 1])
    assert_snapped(theirs[busy == 1])
    if hw[0] * hw[1] > 100:
        assert {0.0, 1.0} <= set(np.unique(ours[busy == 1])), "snapped values must be among those checked"
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-5  # a value at a snap threshold may go either way
    assert _differ(ours, theirs, 1e-5) < 1e-3


@pytest.mark.parametrize("mode", ["blur", "color", "transparent"])
@pytest.mark.parametrize("hw", [(720, 1280), (97, 131), (33, 8), (1, 7), (1, 1)])
def test_compose_equals_numpy(kernel: fused.PostKernel, hw: tuple[int, int], mode: str) -> None:
    image, _ = scene(hw)
    alpha = soft_alpha(hw)
    back = compose.backdrop(image, alpha, ComposeOptions(mode=mode))  # type: ignore[arg-type]
    sums = compose.border_sums(image, alpha)
    ours, theirs = kernel.compose(image, alpha, back, sums), NumpyOps.compose(image, alpha, back, sums)
    assert ours.shape == theirs.shape == (*hw, 3 if back is not None else 4)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # float rounding, at most one level
    assert _differ(ours, theirs, 0) < 1e-3
    if hw == (720, 1280):
        border = (alpha > 0) & (alpha < 1)
        estimated = ours[..., :3][border] != image[border]
        assert estimated.any(axis=1).mean() > 0.5, "the border must take estimated colours, not the photo's"


def test_compose_where_one_side_has_no_solid_pixel(kernel: fused.PostKernel) -> None:
    """No solid background anywhere (alpha > 0 everywhere): the background mean falls back to the
    pixel's own colour, as numpy's NaN does; no solid anything: both means do."""
    image, _ = scene((64, 96))
    for alpha in (np.clip(soft_alpha((64, 96)), 0.3, 1.0), np.full((64, 96), 0.5, np.float32)):
        back = np.full_like(image, 17)
        sums = compose.border_sums(image, alpha)
        ours, theirs = kernel.compose(image, alpha, back, sums), NumpyOps.compose(image, alpha, back, sums)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_compose_edges_of_the_border_range(kernel: fused.PostKernel) -> None:
    """Alpha just inside and just outside "strictly between 0 and 1" (1e-7): the same pixels are border."""
    image, _ = scene((16, 16))
    alpha = soft_alpha((16, 16))
    alpha[0, :4] = [1e-8, 1e-7, 2e-7, 0.0]
    alpha[1, :4] = [1.0, np.float32(1 - 1e-7), np.float32(1 - 2e-7), np.nextafter(np.float32(1), np.float32(0))]
    back = np.zeros_like(image)
    sums = compose.border_sums(image, alpha)
    for b in (back, None):
        ours, theirs = kernel.compose(image, alpha, b, sums), NumpyOps.compose(image, alpha, b, sums)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_wrong_arrays_are_refused_before_any_read(kernel: fused.PostKernel) -> None:
    image, coarse = scene((20, 30))
    alpha = coarse.astype(np.float32)
    coef, busy = np.zeros((5, 8, 4), np.float32), np.ones((20, 30), np.uint8)
    sums = compose.border_sums(image, alpha)
    with pytest.raises(ValueError, match="coefficients"):
        kernel.guided_apply(np.zeros((5, 8, 3), np.float32), image, busy, alpha)
    with pytest.raises(ValueError, match="guide"):
        kernel.guided_apply(coef, image[:, :-1], busy, alpha)
    with pytest.raises(ValueError, match="busy"):
        kernel.guided_apply(coef, image, busy.astype(bool), alpha)
    with pytest.raises(ValueError, match="alpha"):
        kernel.guided_apply(coef, image, busy, alpha.astype(np.float64))
    with pytest.raises(ValueError, match="image"):
        kernel.compose(image[:, ::2], alpha[:, ::2], None, sums)  # not contiguous
    with pytest.raises(ValueError, match="backdrop"):
        kernel.compose(image, alpha, image[:-1], sums)
    with pytest.raises(ValueError, match="sums"):
        kernel.compose(image, alpha, None, sums[:3])
    with pytest.raises(ValueError, match="means"):
        kernel.guided_solve(np.zeros((4, 4, 12), np.float32), 1e-3)
    with pytest.raises(ValueError, match="p"):
        kernel.guided_products(np.zeros((4, 4, 3), np.float32), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="empty"):
        kernel.guided_apply(coef, image[:0], busy[:0], alpha[:0])
    with pytest.raises(ValueError, match="empty"):
        kernel.compose(image[:, :0].copy(), alpha[:, :0].copy(), None, sums)


# ---------------------------------------------------------------------------------------------
# whole calls, both ways


@pytest.mark.parametrize("hw", SIZES)
def test_refine_alpha_equals_numpy(kernel: fused.PostKernel, hw: tuple[int, int]) -> None:
    image, coarse = scene(hw)
    radius = compose.default_refine_radius(hw)
    ours = compose.refine_alpha(coarse.astype(np.float32), image, radius, kernel=kernel)
    theirs = compose.refine_alpha(coarse.astype(np.float32), image, radius, kernel=None)
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-3
    assert _differ(ours, theirs, 1e-4) < 1e-3
    changed = ours != coarse
    assert_snapped(ours[changed])
    assert_snapped(theirs[changed])
    if hw == (720, 1280):
        changed = ours != coarse
        assert 0.001 < changed.mean() < 0.2, "the refinement must move the border, and only the border"


@pytest.mark.parametrize("mode", compose.MODES)
@pytest.mark.parametrize("hw", [(720, 1280), (61, 47), (1, 1)])
def test_composite_equals_numpy(kernel: fused.PostKernel, hw: tuple[int, int], mode: str) -> None:
    image, coarse = scene(hw, seed=3)
    alpha = compose.matte(coarse, image, feather_px=4)
    options = ComposeOptions(mode=mode)  # type: ignore[arg-type]
    backdrop = image[::-1, ::-1].copy() if mode == "image" else None
    ours = compose.composite(image, alpha, options, backdrop, kernel=kernel)
    theirs = compose.composite(image, alpha, options, backdrop, kernel=None)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert _differ(ours, theirs, 0) < 1e-3


@pytest.mark.parametrize("mode", ["color", "transparent"])
def test_composite_of_alpha_outside_0_1_and_nan(kernel: fused.PostKernel, mode: str) -> None:
    """Alpha that is NaN, infinite or out of range means the same on both paths: clipped, NaN as 0."""
    image, _ = scene((8, 16))
    alpha = soft_alpha((8, 16))
    alpha[0, :8] = [np.nan, np.inf, -np.inf, -0.5, 2.0, 1e30, -1e-3, 0.4]
    options = ComposeOptions(mode=mode, color_rgb=(0, 0, 255))  # type: ignore[arg-type]
    ours = compose.composite(image, alpha, options, kernel=kernel)
    theirs = compose.composite(image, alpha, options, kernel=None)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    kept = [1, 4, 5]  # inf, 2, 1e30: the photo's pixel
    replaced = [0, 2, 3, 6]  # NaN, -inf, -0.5, -1e-3: the backdrop
    if mode == "transparent":
        assert (ours[0, kept, 3] == 255).all() and (ours[0, replaced, 3] == 0).all()
        np.testing.assert_array_equal(ours[0, kept, :3], image[0, kept])
    else:
        np.testing.assert_array_equal(ours[0, kept], image[0, kept])
        assert (ours[0, replaced] == (0, 0, 255)).all()


def test_composite_without_a_border_skips_the_sums(kernel: fused.PostKernel) -> None:
    image, coarse = scene((64, 96))
    alpha = coarse.astype(np.float32)
    assert compose.border_sums(image, alpha).shape == (4, 1, 1, 4)
    for mode in ("color", "transparent", "blur"):
        options = ComposeOptions(mode=mode)  # type: ignore[arg-type]
        ours = compose.composite(image, alpha, options, kernel=kernel)
        theirs = compose.composite(image, alpha, options, kernel=None)
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(ours[coarse][:, :3], image[coarse])
