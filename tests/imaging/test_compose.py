"""Pixel-exact tests of ``m2fp_service.imaging.compose`` on synthetic pictures and masks, each run
both with the fused kernel and with the OpenCV/numpy steps it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from m2fp_service.imaging import compose, fused
from m2fp_service.imaging.compose import ComposeOptions
from tests.imaging.conftest import require_kernel


@pytest.fixture(autouse=True, params=["kernel", "numpy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the built kernel (a failure in CI when it is missing), then OpenCV/numpy."""
    if request.param == "numpy":
        monkeypatch.setattr(fused, "built", lambda: None)
    else:
        require_kernel()
    return str(request.param)


RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (20, 40, 230)


def two_tone(hw: tuple[int, int], split_x: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8: ``left`` colour for x < split_x, ``right`` elsewhere."""
    image = np.empty((*hw, 3), np.uint8)
    image[:, :split_x] = left
    image[:, split_x:] = right
    return image


def half_mask(hw: tuple[int, int], split_x: int) -> np.ndarray:
    mask = np.zeros(hw, bool)
    mask[:, :split_x] = True
    return mask


def square(hw: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(hw, bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------------------------------
# matte: selection -> alpha


def test_matte_without_refinement_is_the_selection_exactly() -> None:
    sel = square((6, 8), 1, 4, 2, 7)
    image = np.zeros((6, 8, 3), np.uint8)
    alpha = compose.matte(sel, image, refine=False)
    assert alpha.dtype == np.float32 and alpha.shape == (6, 8)
    np.testing.assert_array_equal(alpha, sel.astype(np.float32))
    np.testing.assert_array_equal(compose.matte(sel, image, refine=False, invert=True), (~sel).astype(np.float32))


@pytest.mark.parametrize("width", [2, 4, 6, 9])
def test_feather_ramp_stays_within_half_its_width_of_the_border(width: int) -> None:
    hw, split = (10, 40), 20
    alpha = compose.matte(half_mask(hw, split), np.zeros((*hw, 3), np.uint8), refine=False, feather_px=width)
    row = alpha[5]
    half = width / 2
    x = np.arange(hw[1]) + 0.5  # pixel centres; the border lies at x = 20
    assert np.all(row[x < split - half] == 1.0), row
    assert np.all(row[x > split + half] == 0.0), row
    ramp = row[(x > split - half + 1) & (x < split + half - 1)]
    assert np.all((ramp > 0) & (ramp < 1)), row
    assert np.all(np.diff(row) <= 0), "alpha must fall monotonically across the border"
    assert np.all(alpha == alpha[:1]), "a straight border gives the same ramp on every row"


def test_feather_below_two_pixels_changes_nothing() -> None:
    sel = square((8, 8), 2, 6, 2, 6)
    alpha = compose.matte(sel, np.zeros((8, 8, 3), np.uint8), refine=False, feather_px=1)
    np.testing.assert_array_equal(alpha, sel.astype(np.float32))


def test_refinement_moves_the_border_to_the_photo_edge_and_nowhere_else() -> None:
    # The photo's true edge is at x = 40 (red | green); the model's coarse mask stops 3 px short.
    hw = (48, 96)
    image = two_tone(hw, 40, RED, GREEN)
    coarse = half_mask(hw, 37)
    radius = 6
    alpha = compose.matte(coarse, image, refine=True, refine_radius=radius)
    row = alpha[24]
    assert np.all(row[37:40] > 0.6), f"red pixels the mask missed are kept: {row[34:44]}"
    assert np.all(row[40:] == 0.0), f"green pixels stay out: {row[38:48]}"
    assert np.argmax(-np.diff(row)) == 39, "the sharpest fall of alpha is at the photo's edge"
    far = radius + 2 * (radius // 2) + 1
    np.testing.assert_array_equal(alpha[:, : 37 - far], 1.0)
    np.testing.assert_array_equal(alpha[:, 40 + far :], 0.0)
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0


def test_refinement_of_an_all_or_nothing_selection_is_a_no_op() -> None:
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    for value in (False, True):
        sel = np.full((16, 16), value)
        np.testing.assert_array_equal(compose.matte(sel, image), sel.astype(np.float32))


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (3, 1), (5, 200)])
def test_tiny_and_thin_pictures(hw: tuple[int, int]) -> None:
    image = np.random.default_rng(1).integers(0, 256, (*hw, 3), np.uint8)
    sel = np.zeros(hw, bool)
    sel.flat[0] = True
    alpha = compose.matte(sel, image, feather_px=3)
    assert alpha.shape == hw and np.all((alpha >= 0) & (alpha <= 1))
    for mode in compose.MODES:
        out = compose.composite(image, alpha, ComposeOptions(mode=mode), image if mode == "image" else None)
        assert out.shape[:2] == hw and out.dtype == np.uint8


def test_default_refine_radius() -> None:
    assert compose.default_refine_radius((720, 1280)) == 8
    assert compose.default_refine_radius((1080, 1920)) == 12
    assert compose.default_refine_radius((10, 10)) == 2


# ---------------------------------------------------------------------------------------------
# foreground colour estimation: no halo of the old background


def blended_border(hw: tuple[int, int], edge: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A red subject (x < edge) on green, with a ``width``-px linear alpha ramp blended into the photo."""
    x = np.arange(hw[1], dtype=np.float32)
    ramp = np.clip((edge + width / 2 - x) / width, 0, 1)
    alpha = np.broadcast_to(ramp, hw).astype(np.float32).copy()
    fg, bg = np.asarray(RED, np.float32), np.asarray(GREEN, np.float32)
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), alpha


def test_foreground_estimate_removes_the_old_background_from_the_border() -> None:
    image, alpha = blended_border((32, 80), 40, 8)
    band = (alpha > 0.05) & (alpha < 1)
    assert band.sum() >= 32 * 6
    estimate = compose.estimate_foreground(image, alpha)
    np.testing.assert_array_equal(estimate[alpha == 1], image[alpha == 1])
    np.testing.assert_array_equal(estimate[alpha == 0], image[alpha == 0])
    err = np.abs(estimate[band].astype(int) - np.asarray(RED)).max()
    raw = np.abs(image[band].astype(int) - np.asarray(RED)).max()
    assert err <= 12 < raw, f"estimated subject colour is off by {err} (the blend itself by {raw})"


def test_no_background_colour_inside_the_subject_border_over_a_new_backdrop() -> None:
    image, alpha = blended_border((32, 80), 40, 8)
    out = compose.composite(image, alpha, ComposeOptions(mode="color", color_rgb=BLUE))
    border = (alpha > 0) & (alpha < 1)
    # Old background green must not show: over blue, a border pixel mixes red and blue only.
    assert out[border][:, 1].max() <= 45, out[border][:, 1].max()
    naive = alpha[..., None] * image + (1 - alpha[..., None]) * np.asarray(BLUE)
    assert naive[border][:, 1].max() > 70, "the test must be able to fail: a naive blend keeps the green"


# ---------------------------------------------------------------------------------------------
# halo-free backdrops: normalised blur and pixelate


def subject_on_black(hw: tuple[int, int] = (96, 96)) -> tuple[np.ndarray, np.ndarray]:
    sel = square(hw, 32, 64, 32, 64)
    image = np.zeros((*hw, 3), np.uint8)
    image[sel] = (255, 255, 255)
    return image, sel


def test_normalized_blur_does_not_bleed_the_subject_into_the_background() -> None:
    image, sel = subject_on_black()
    weight = (~sel).astype(np.float32)
    blurred = compose.normalized_blur(image, weight, sigma_px=8)
    ring = square(sel.shape, 24, 72, 24, 72) & ~sel
    assert blurred[ring].max() <= 3, blurred[ring].max()
    import cv2

    plain = cv2.GaussianBlur(image, (0, 0), 8)
    assert plain[ring].max() >= 60, "a plain blur smears the white subject over its surroundings"


def test_normalized_blur_blurs_the_background() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (64, 64, 3), np.uint8)
    blurred = compose.normalized_blur(image, np.ones((64, 64), np.float32), sigma_px=6)
    assert blurred.shape == image.shape and blurred.dtype == np.uint8
    assert blurred.astype(float).std() < image.astype(float).std() / 4


def test_normalized_pixelate_blocks_use_background_pixels_only() -> None:
    image, sel = subject_on_black()
    sel_shifted = np.roll(sel, 4, axis=1)  # the subject cuts through blocks of 16
    image = np.zeros_like(image)
    image[sel_shifted] = (255, 255, 255)
    out = compose.normalized_pixelate(image, (~sel_shifted).astype(np.float32), block_px=16)
    assert out.shape == image.shape
    np.testing.assert_array_equal(out[~sel_shifted], 0)
    # Blocks are constant.
    block = out[:16, :16].reshape(-1, 3)
    assert (block == block[0]).all()


def test_pixelate_blocks_of_plain_background_are_its_mean() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    image[:16, :16] = (200, 100, 0)
    image[:16, :8] = (100, 100, 100)
    out = compose.normalized_pixelate(image, np.ones((32, 32), np.float32), block_px=16)
    np.testing.assert_array_equal(out[:16, :16], np.broadcast_to((150, 100, 50), (16, 16, 3)))
    np.testing.assert_array_equal(out[16:, 16:], 0)


# ---------------------------------------------------------------------------------------------
# backdrops and the composite


def test_cover_keeps_the_aspect_ratio_and_crops_the_centre() -> None:
    # A 10 x 40 backdrop with a unique colour per column, onto a 20 x 20 picture: scale 2, crop 20 of 80 columns.
    background = np.zeros((10, 40, 3), np.uint8)
    background[..., 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    background[..., 1] = 77
    out = compose.cover(background, (20, 20))
    assert out.shape == (20, 20, 3)
    assert (out[..., 1] == 77).all()
    columns = out[0, :, 0].astype(int)
    # Columns 15..24 of the backdrop (its centre), each 2 px wide: not squeezed 40 -> 20.
    assert columns[0] >= 15 * 6 - 6 and columns[-1] <= 24 * 6 + 6
    assert np.all(np.diff(columns) >= 0) and np.ptp(columns) <= 11 * 6


@pytest.mark.parametrize("mode", ["color", "image", "blur", "pixelate"])
def test_composite_keeps_the_photo_where_alpha_is_one(mode: str) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 60, 3), np.uint8)
    sel = square((40, 60), 10, 30, 15, 45)
    alpha = compose.matte(sel, image, feather_px=4, refine=False)
    background = rng.integers(0, 256, (30, 30, 3), np.uint8)
    out = compose.composite(image, alpha, ComposeOptions(mode=mode, color_rgb=BLUE),  # type: ignore[arg-type]
                            background if mode == "image" else None)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[alpha == 1], image[alpha == 1])
    assert (alpha == 0).sum() > 0 and (alpha == 1).sum() > 0
    if mode == "color":
        np.testing.assert_array_equal(out[alpha == 0], np.broadcast_to(BLUE, out[alpha == 0].shape))
    if mode == "image":
        backdrop = compose.cover(background, (40, 60))
        np.testing.assert_array_equal(out[alpha == 0], backdrop[alpha == 0])


def test_transparent_composite_is_rgba_with_the_matte_as_alpha() -> None:
    image, alpha = blended_border((16, 40), 20, 6)
    out = compose.composite(image, alpha, ComposeOptions(mode="transparent"))
    assert out.shape == (16, 40, 4)
    expected = np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(out[..., 3].astype(int) - expected).max() <= 1  # rounded (half to even)
    np.testing.assert_array_equal(out[..., 3][alpha == 1], 255)
    np.testing.assert_array_equal(out[..., 3][alpha == 0], 0)
    np.testing.assert_array_equal(out[alpha == 1][:, :3], image[alpha == 1])
    border = (alpha > 0) & (alpha < 1)
    assert np.abs(out[border][:, :3].astype(int) - RED).max() <= 12, "border colour is the subject's"


def test_blurred_backdrop_next_to_the_subject_carries_no_subject_colour() -> None:
    image, sel = subject_on_black()
    alpha = compose.matte(sel, image, refine=False)
    out = compose.composite(image, alpha, ComposeOptions(mode="blur", blur_sigma_px=10))
    ring = square(sel.shape, 26, 70, 26, 70) & ~sel
    assert out[ring].max() <= 3
    np.testing.assert_array_equal(out[sel], 255)


def test_image_mode_without_a_backdrop_is_refused() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="background picture"):
        compose.composite(image, np.zeros((4, 4), np.float32), ComposeOptions(mode="image"))


def test_border_sums_computed_ahead_give_the_same_picture() -> None:
    image, alpha = blended_border((24, 48), 24, 8)
    options = ComposeOptions(mode="blur", blur_sigma_px=6)
    sums = compose.border_sums(image, alpha)
    alone = compose.composite(image, alpha, options)
    np.testing.assert_array_equal(compose.composite(image, alpha, options, sums=sums), alone)
    # The sums are used: other sums give another border colour.
    other = compose.composite(image, alpha, options, sums=compose.border_sums(image[:, ::-1].copy(), alpha))
    border = (alpha > 0) & (alpha < 1)
    assert border.any() and not np.array_equal(other[border], alone[border])


def test_border_sums_computed_ahead_are_not_used_for_an_alpha_outside_0_1() -> None:
    image, alpha = blended_border((24, 48), 24, 8)
    stretched = alpha * 1.5 - 0.25  # clipped to 0..1 inside: its sums are the clipped alpha's own
    wrong = compose.border_sums(image, alpha)
    options = ComposeOptions(mode="blur", blur_sigma_px=6)
    right = compose.composite(image, stretched, options)
    np.testing.assert_array_equal(compose.composite(image, stretched, options, sums=wrong), right)
    # Used, these sums would give another picture.
    assert not np.array_equal(compose.composite(image, np.clip(stretched, 0, 1), options, sums=wrong), right)


def test_border_sums_of_the_wrong_shape_are_refused() -> None:
    image, alpha = blended_border((8, 16), 8, 4)
    with pytest.raises(ValueError, match="border sums"):
        compose.composite(image, alpha, ComposeOptions(mode="blur"), sums=np.zeros((4, 2, 2), np.float32))
