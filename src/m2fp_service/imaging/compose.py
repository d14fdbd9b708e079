"""Compositing: a kept region's alpha, refined against the photo, over a new backdrop.

Pure functions on arrays. The flow for one picture::

    alpha = matte(selected_hw, image_rgb, refine=..., feather_px=...)      # (H, W) float32 0..1
    out = composite(image_rgb, alpha, options, background_rgb)              # (H, W, 3|4) uint8

* ``refine_alpha`` is a fast guided filter (He & Sun, 2015): coefficients computed at a reduced
  scale with the colour photo as guide, applied at full scale, so the border follows the photo's
  own edges (hair, fingers) instead of the model's coarse mask.
* ``estimate_foreground`` removes the old background's colour from semi-transparent border
  pixels (blur-fusion, Forte & Pitié 2021), so hair carries no halo of it over a new backdrop.
* Blurring and pixelating the backdrop are normalised convolutions over the *backdrop's own*
  pixels — blur(image · w) / blur(w) with w = 1 − alpha — so the subject's colours never bleed
  into the blurred background around it (the halo users report against other tools).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import cv2
import numpy as np

from m2fp_service.imaging import fused

Mode = Literal["transparent", "blur", "color", "image", "pixelate"]
MODES: tuple[str, ...] = get_args(Mode)

# Alpha below/above these is snapped to exactly 0/1: the guided filter's float noise must not
# turn a fully kept or fully replaced pixel into a blend.
_ALPHA_SNAP = 1.0 / 255.0
_REFINE_CONTRAST = 2.0
_TINY = 1e-7  # "strictly between 0 and 1" for float32 alpha
_REFINE_MIN_SLOPE = 0.02  # |d alpha / d guide| (guide in 0..1) below which the guide explains nothing


@dataclass(frozen=True)
class ComposeOptions:
    """What replaces the pixels outside the kept region.

    Attributes:
        mode: ``transparent`` (RGBA out), ``blur``, ``color``, ``image`` (a background picture),
            ``pixelate``.
        blur_sigma_px: Gaussian sigma of ``blur``, in output pixels.
        block_px: square block size of ``pixelate``, in output pixels.
        color_rgb: the ``color`` backdrop.
    """

    mode: Mode = "transparent"
    blur_sigma_px: float = 20.0
    block_px: int = 16
    color_rgb: tuple[int, int, int] = (0, 255, 0)


def default_refine_radius(hw: tuple[int, int]) -> int:
    """Guided-filter radius for an image: ~0.6% of the long side (8 px at 1280 x 720), at least 2."""
    return max(2, round(max(hw) / 160))


def matte(selected: np.ndarray, image_rgb: np.ndarray, *, refine: bool = True, feather_px: float = 0.0,
          invert: bool = False, refine_radius: int | None = None) -> np.ndarray:
    """(H, W) bool selection -> (H, W) float32 alpha in 0..1 (1 = keep the photo's pixel).

    Args:
        selected: (H, W) bool, the region chosen by the user.
        image_rgb: (H, W, 3) uint8, the photo (guide of the refinement).
        refine: follow the photo's edges with a guided filter (radius ``refine_radius``, default
            ``default_refine_radius``); alpha changes only within that radius of the border.
        feather_px: then soften the border over this many pixels (a box blur of that width).
        invert: keep what was not selected (applied before refining, so both sides are refined).
    """
    alpha = (~selected if invert else selected).astype(np.float32)
    if refine and 0 < alpha.sum() < alpha.size:
        radius = refine_radius if refine_radius is not None else default_refine_radius(alpha.shape)
        alpha = refine_alpha(alpha, image_rgb, radius)
    if feather_px >= 1:
        alpha = feather_alpha(alpha, feather_px)
    return alpha


def refine_alpha(alpha: np.ndarray, guide_rgb: np.ndarray, radius: int, eps: float = 1e-3,
                 scale: int | None = None, *, kernel: fused.Choice = "built") -> np.ndarray:
    """Fast colour guided filter of ``alpha`` with ``guide_rgb`` as guide.

    The filter's linear coefficients are computed at ``1/scale`` of the size, upsampled and
    applied at full size; the output replaces ``alpha`` only where they are not flat (near the
    border), since elsewhere the filter would only blur it.

    Args:
        alpha: (H, W) float32 in 0..1.
        guide_rgb: (H, W, 3) uint8.
        radius: box radius in full-resolution pixels; the output differs from ``alpha`` only
            within about ``radius + 2 * scale`` pixels of a place where ``alpha`` changes.
        eps: regularisation (guide in 0..1 units): larger keeps more of ``alpha``'s own shape.
        scale: subsampling of the coefficients (default: radius // 2, at least 1).
        kernel: the per-pixel steps in the fused kernel: "built" (the package's build when it loads),
            a ``fused.PostKernel``, or None (OpenCV/numpy, ``NumpyOps``). Same results within float
            rounding.

    Returns:
        (H, W) float32 in 0..1, values within 1/255 of 0 or 1 snapped to them.
    """
    alpha = np.ascontiguousarray(alpha, np.float32)
    h, w = alpha.shape
    s = max(1, radius // 2) if scale is None else max(1, scale)
    small_hw = (max(1, round(h / s)), max(1, round(w / s)))
    if small_hw != (h, w):
        g = shrink(guide_rgb, small_hw).astype(np.float32) / 255.0
        p = shrink(alpha, small_hw)
    else:
        g, p = guide_rgb.astype(np.float32) / 255.0, alpha
    r = max(1, round(radius / max(h / small_hw[0], w / small_hw[1])))
    ops = _ops(kernel)
    # The linear model q = a . I + b per pixel from the box means of the guide's products, box-averaged.
    coef = _box(ops.guided_solve(_box(ops.guided_products(g, p), r), eps), r)  # (hs, ws, 4): a0, a1, a2, b
    # Where the guide explains nothing (a ~ 0 over the whole bilinear footprint) the filter would only
    # blur alpha; refinement is about following the photo's edges, so those pixels keep their alpha.
    slope = (cv2.transform(np.abs(coef), _SUM_A) > _REFINE_MIN_SLOPE).astype(np.uint8)
    if not slope.any():
        return alpha.copy()
    busy = cv2.resize(cv2.dilate(slope, np.ones((3, 3), np.uint8)), (w, h), interpolation=cv2.INTER_NEAREST)
    # q = a . I / 255 + b, then a contrast of 2 about 0.5: the filter spreads the mask's own error
    # over its window, the contrast keeps the border where the photo's edge is while solid regions
    # return to 0 and 1. Both folded into the coefficients before they are upsampled.
    k = np.float32(_REFINE_CONTRAST)
    coef *= np.array([k / 255.0, k / 255.0, k / 255.0, k], np.float32)
    coef[..., 3] += np.float32(0.5 - 0.5 * _REFINE_CONTRAST)
    return ops.guided_apply(coef, np.ascontiguousarray(guide_rgb), busy, alpha)


_SUM_A = np.array([[1, 1, 1, 0]], np.float32)  # cv2.transform matrix: the sum of a's three channels


def _nonzero(mask_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) int32 of the non-zero pixels of an (H, W) uint8 mask, in raster order (SIMD in OpenCV)."""
    points = cv2.findNonZero(mask_u8)
    if points is None:
        empty = np.zeros(0, np.int32)
        return empty, empty
    xy = points.reshape(-1, 2)
    return xy[:, 1], xy[:, 0]


def _sample(small: np.ndarray, ys: np.ndarray, xs: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear samples of a low-resolution (h, w, C) map at full-resolution pixels (ys, xs), half-pixel
    centres, as ``cv2.resize(small, hw[::-1], INTER_LINEAR)`` gives them there (the kernel's taps,
    ``fused.bilinear``, in float32). Returns (N, C) float32."""
    rows, cols = fused.bilinear(small.shape[0], hw[0]), fused.bilinear(small.shape[1], hw[1])
    r, v = rows.index[ys], rows.weight[ys][..., None]  # (N, 2), (N, 2, 1)
    c, u = cols.index[xs], cols.weight[xs][..., None]
    top = u[:, 0] * small[r[:, 0], c[:, 0]] + u[:, 1] * small[r[:, 0], c[:, 1]]
    bottom = u[:, 0] * small[r[:, 1], c[:, 0]] + u[:, 1] * small[r[:, 1], c[:, 1]]
    sampled: np.ndarray = v[:, 0] * top + v[:, 1] * bottom
    return sampled


def shrink(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(x, hw[::-1], interpolation=INTER_AREA)``; when ``x`` is exactly ``hw`` times a power
    of two, taken as halvings: OpenCV's area path is SIMD only for a factor of 2 (3x faster at 720p
    for a factor of 4). The same averages but for the halvings' rounding: uint8 ties round up at
    each halving (+0.25 of a level on average at a factor of 4), so callers that divide by small
    weights (pixelate) resize directly."""
    h, w = x.shape[:2]
    while (h, w) != tuple(hw) and h % 2 == 0 and w % 2 == 0 and (h // 2) % hw[0] == 0 and (w // 2) % hw[1] == 0:
        h, w = h // 2, w // 2
        x = cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA)
    return x if (h, w) == tuple(hw) else cv2.resize(x, hw[::-1], interpolation=cv2.INTER_AREA)


def _shrink_by(x: np.ndarray, f: int) -> np.ndarray:
    """Area average over ``f`` x ``f`` blocks (``fx = 1/f``, OpenCV's integer-factor area path, not a
    computed size: 3x faster), halving first while ``f`` is even (its SIMD path; uint8 ties round up,
    as in ``shrink``). ``f`` must not exceed the picture's sides."""
    while f % 2 == 0:
        x = cv2.resize(x, (0, 0), fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        f //= 2
    return x if f == 1 else cv2.resize(x, (0, 0), fx=1.0 / f, fy=1.0 / f, interpolation=cv2.INTER_AREA)


def _box(x: np.ndarray, r: int) -> np.ndarray:
    return cv2.blur(x, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


def _snap(alpha: np.ndarray) -> np.ndarray:
    """float32 alpha clipped to 0..1, values within 1/255 of 0 or 1 set to them (four SIMD passes)."""
    low = cv2.threshold(np.asarray(alpha, np.float32), _ALPHA_SNAP, 0.0, cv2.THRESH_TOZERO)[1]  # <= 1/255 -> 0
    np.minimum(low, np.float32(1.0), out=low)
    high = cv2.threshold(low, 1.0 - _ALPHA_SNAP, 1.0, cv2.THRESH_BINARY)[1]  # > 1 - 1/255 -> 1, else 0
    out: np.ndarray = np.maximum(low, high, out=low)
    return out


def feather_alpha(alpha: np.ndarray, width_px: float) -> np.ndarray:
    """Softens the border over ``width_px`` pixels (box blur of that width, then snapped).

    A binary alpha becomes a ramp across its border: alpha is unchanged farther than
    ``width_px / 2`` from it.
    """
    k = max(1, int(round(width_px)))
    if k < 2:
        return alpha
    return _snap(cv2.blur(alpha, (k, k), borderType=cv2.BORDER_REPLICATE))


def estimate_foreground(image_rgb: np.ndarray, alpha: np.ndarray, radius_px: int | None = None) -> np.ndarray:
    """The subject's own colours where alpha is fractional (blur-fusion foreground estimation).

    A border pixel is a blend ``I = a F + (1 - a) B`` of subject F and old background B;
    compositing ``I`` itself over a new backdrop drags the old background along (a halo). With
    F^ and B^ the local mean colours of the solid subject and solid background nearby (normalised
    box filters), blur-fusion (Forte & Pitie) estimates ``F = F^ + a (I - a F^ - (1 - a) B^)``.
    The local means are computed at a reduced scale and the formula only on the border pixels.

    Args:
        image_rgb: (H, W, 3) uint8.
        alpha: (H, W) float32 0..1.
        radius_px: neighbourhood of the local means, full-resolution pixels (default: twice the
            refinement radius plus 4).

    Returns:
        (H, W, 3) uint8: ``image_rgb`` where alpha is 0 or 1, the estimate elsewhere.
    """
    return _subject(image_rgb, alpha, border_sums(image_rgb, alpha, radius_px))


def _subject(image_rgb: np.ndarray, alpha: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """``estimate_foreground`` from the local sums ``border_sums`` gives."""
    ys, xs = border_pixels(alpha)
    out = image_rgb.copy()
    out.reshape(-1, 3)[ys * alpha.shape[1] + xs] = _foreground_at(image_rgb, alpha, ys, xs, sums)
    return out


def border_pixels(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels whose alpha is strictly between 0 and 1, in raster order."""
    return _nonzero(cv2.inRange(alpha, _TINY, 1.0 - _TINY))


def _foreground_at(image_rgb: np.ndarray, alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                   sums: np.ndarray) -> np.ndarray:
    """``estimate_foreground``'s values at the pixels (ys, xs): (N, 3) uint8.

    F^ and B^ are the mean colours of the nearby *solid* subject (alpha = 1) and background
    (alpha = 0) pixels, from ``border_sums``; where none is within its radius, a four times wider
    neighbourhood is used. The sums are sampled, and divided, only at the pixels asked for.
    """
    if not len(ys):
        return np.zeros((0, 3), np.uint8)
    h, w = alpha.shape
    f_hat = _mean_at(sums[0], sums[1], ys, xs, (h, w))
    b_hat = _mean_at(sums[2], sums[3], ys, xs, (h, w))
    flat = ys * w + xs
    a = np.take(alpha.reshape(-1), flat)[:, None]
    i = np.take(image_rgb.reshape(-1, 3), flat, axis=0).astype(np.float32) * np.float32(1.0 / 255.0)
    # Where no solid pixel of a side is near, its mean is NaN: fall back to the pixel itself.
    f_hat = np.where(np.isnan(f_hat), i, f_hat)
    b_hat = np.where(np.isnan(b_hat), i, b_hat)
    fg = f_hat + a * (i - a * f_hat - (1.0 - a) * b_hat)
    values: np.ndarray = np.clip(fg * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return values


def border_sums(image_rgb: np.ndarray, alpha: np.ndarray, radius_px: int | None = None) -> np.ndarray:
    """The local sums blur-fusion's means come from, at a reduced scale: (4, h, w, 4) float32.

    For the solid subject (alpha = 1), then the solid background (alpha = 0), each over a
    (2r+1)^2 box and a four times wider one: the sums of colour (0..1) times weight, and of weight.
    Zeros of (4, 1, 1, 4) when every pixel is solid (no border pixel samples them).

    Args:
        radius_px: ``r`` in full-resolution pixels (default: twice the refinement radius plus 4).
    """
    h, w = alpha.shape
    radius = radius_px if radius_px is not None else 2 * default_refine_radius((h, w)) + 4
    s = max(1, min(4, min(h, w) // 160))
    small_wh = (max(1, w // s), max(1, h // s))
    solids = (cv2.inRange(alpha, 1.0, np.inf), cv2.inRange(alpha, -np.inf, 0.0))  # 0 or 255
    if cv2.countNonZero(solids[0]) + cv2.countNonZero(solids[1]) == alpha.size:  # no border: nothing to sample
        return np.zeros((4, 1, 1, 4), np.float32)
    # r, g, b in 0..1, then 1 for the weight (RGBA from OpenCV: numpy's strided writes cost 20x more)
    colour = cv2.cvtColor(shrink(image_rgb, small_wh[::-1]), cv2.COLOR_RGB2RGBA).astype(np.float32)
    colour *= np.float32(1.0 / 255.0)
    r = max(1, radius // s)
    sums = np.empty((4, small_wh[1], small_wh[0], 4), np.float32)
    for side, solid in enumerate(solids):
        weight = shrink(solid, small_wh[::-1]).astype(np.float32)
        weighted = colour * (weight * np.float32(1.0 / 255.0))[..., None]
        sums[2 * side] = _box(weighted, r)
        sums[2 * side + 1] = _box(weighted, 4 * r)
    return sums


def _mean_at(narrow: np.ndarray, wide: np.ndarray, ys: np.ndarray, xs: np.ndarray,
             hw: tuple[int, int]) -> np.ndarray:
    """(N, 3) weighted local mean at full-resolution pixels (ys, xs) from ``border_sums``' narrow box
    sums; the wide box's where the narrow holds no weight; NaN where neither does."""
    sampled = _sample(narrow, ys, xs, hw)
    num, den = sampled[:, :3], sampled[:, 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean: np.ndarray = num / den[:, None]
    empty = den <= 1e-3
    if empty.any():
        far = _sample(wide, ys[empty], xs[empty], hw)
        wide_num, wide_den = far[:, :3], far[:, 3:]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean[empty] = np.where(wide_den > 1e-4, wide_num / wide_den, np.nan)
    return mean


def _weight_u8(weight: np.ndarray) -> np.ndarray:
    """(H, W) float32 0..1 -> uint8 0..255, rounded (one SIMD pass)."""
    return cv2.convertScaleAbs(weight, alpha=255.0)


def _premultiplied(image_rgb: np.ndarray, weight_u8: np.ndarray) -> np.ndarray:
    """image * weight / 255 in uint8 (SIMD in OpenCV; the precision loss is invisible in a backdrop)."""
    return cv2.multiply(image_rgb, cv2.merge([weight_u8] * 3), scale=1.0 / 255.0)


def normalized_blur(image_rgb: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of the pixels where ``weight`` > 0 only: blur(I w) / blur(w).

    Computed at a reduced scale (a wide Gaussian of a downscaled image looks the same and costs
    a fraction); where no weighted pixel is near, the plain blur of the image stands in.

    Args:
        image_rgb: (H, W, 3) uint8.
        weight: (H, W) float32 0..1, how much each pixel belongs to the region to blur.
        sigma_px: Gaussian sigma in full-resolution pixels.

    Returns:
        (H, W, 3) uint8.
    """
    h, w = weight.shape
    f = max(1, min(int(sigma_px // 3), h, w))
    w8 = _weight_u8(weight)
    premul = _premultiplied(image_rgb, w8)
    if f > 1:
        premul, w8, image_rgb = _shrink_by(premul, f), _shrink_by(w8, f), _shrink_by(image_rgb, f)
    sigma = max(0.3, sigma_px / f)
    num = cv2.GaussianBlur(premul.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    den = cv2.GaussianBlur(w8.astype(np.float32) / 255.0, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)[..., None]
    plain = cv2.GaussianBlur(image_rgb, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    out = np.where(den > 1e-2, num / np.maximum(den, 1e-2), plain)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if f > 1:
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    return out


def normalized_pixelate(image_rgb: np.ndarray, weight: np.ndarray, block_px: int) -> np.ndarray:
    """Blocks of about ``block_px`` pixels square, each the mean colour of its weighted pixels
    (the plain mean where a block has none).

    Returns:
        (H, W, 3) uint8.
    """
    h, w = weight.shape
    k = max(1, int(block_px))
    grid_wh = (max(1, round(w / k)), max(1, round(h / k)))
    w8 = _weight_u8(weight)
    num = cv2.resize(_premultiplied(image_rgb, w8), grid_wh, interpolation=cv2.INTER_AREA).astype(np.float32)
    den = cv2.resize(w8, grid_wh, interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255.0
    plain = cv2.resize(image_rgb, grid_wh, interpolation=cv2.INTER_AREA)
    blocks = np.where(den > 1e-2, num / np.maximum(den, 1e-2), plain)
    blocks = np.clip(blocks + 0.5, 0, 255).astype(np.uint8)
    return cv2.resize(blocks, (w, h), interpolation=cv2.INTER_NEAREST)


def cover(background_rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Scales ``background_rgb`` to cover ``hw`` (aspect kept) and crops the centre: no stretching."""
    bh, bw = background_rgb.shape[:2]
    h, w = hw
    scale = max(h / bh, w / bw)
    new_hw = (max(h, round(bh * scale)), max(w, round(bw * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(background_rgb, new_hw[::-1], interpolation=interp)
    y0, x0 = (new_hw[0] - h) // 2, (new_hw[1] - w) // 2
    return np.ascontiguousarray(resized[y0 : y0 + h, x0 : x0 + w])


def backdrop(image_rgb: np.ndarray, alpha: np.ndarray, options: ComposeOptions,
             background_rgb: np.ndarray | None = None) -> np.ndarray | None:
    """The picture that shows where alpha < 1: (H, W, 3) uint8, or None for ``transparent``."""
    h, w = alpha.shape
    if options.mode == "transparent":
        return None
    if options.mode == "color":  # one row, repeated: np.full with a colour tuple is 40x slower
        row = np.tile(np.asarray(options.color_rgb, np.uint8), w)
        return np.broadcast_to(row, (h, 3 * w)).reshape(h, w, 3).copy()
    if options.mode == "image":
        if background_rgb is None:
            raise ValueError("mode 'image' needs a background picture")
        return cover(background_rgb, (h, w))
    weight = 1.0 - alpha
    if options.mode == "blur":
        return normalized_blur(image_rgb, weight, options.blur_sigma_px)
    return normalized_pixelate(image_rgb, weight, options.block_px)


def composite(image_rgb: np.ndarray, alpha: np.ndarray, options: ComposeOptions,
              background_rgb: np.ndarray | None = None, *, kernel: fused.Choice = "built",
              sums: np.ndarray | None = None) -> np.ndarray:
    """The composed picture.

    Args:
        image_rgb: (H, W, 3) uint8 photo.
        alpha: (H, W) float32 0..1 from ``matte``: 1 keeps the photo's pixel (values outside are
            clipped to it, NaN counts as 0).
        options: what replaces the rest.
        background_rgb: (h, w, 3) uint8, any size, for ``mode="image"``.
        kernel: the border's colour and the blend in the fused kernel, as for ``refine_alpha``.
        sums: ``border_sums(image_rgb, alpha)``, when computed ahead (a video's matte thread does);
            used only for an alpha already within 0..1 (else they are computed from the clipped one).

    Returns:
        (H, W, 4) uint8 RGBA for ``transparent`` (colour decontaminated at the border), else
        (H, W, 3) uint8 RGB: the photo where alpha is 1, the backdrop where it is 0, and between
        them the subject's estimated own colour blended over the backdrop.
    """
    if sums is not None and not (sums.ndim == 4 and sums.shape[0] == sums.shape[3] == 4):
        raise ValueError(f"border sums must be (4, h, w, 4) from border_sums, got {sums.shape}")
    alpha = np.ascontiguousarray(alpha, np.float32)
    if alpha.size and not (alpha.min() >= 0.0 and alpha.max() <= 1.0):  # NaN compares false too
        alpha = np.clip(np.nan_to_num(alpha, nan=0.0), 0.0, 1.0)  # one meaning for both paths: 0..1
        sums = None
    image_rgb = np.ascontiguousarray(image_rgb)
    back = backdrop(image_rgb, alpha, options, background_rgb)
    return _ops(kernel).compose(image_rgb, alpha, back, border_sums(image_rgb, alpha) if sums is None else sums)


class NumpyOps:
    """The per-pixel steps of refinement and compositing with OpenCV and numpy: the reference the
    fused kernel (``fused.PostKernel``, the same methods) is tested against, and the fallback where
    it is not built."""

    @staticmethod
    def guided_products(guide: np.ndarray, p: np.ndarray) -> np.ndarray:
        """(H, W, 13) float32: I (3), p, I p (3), then rr, rg, rb, gg, gb, bb of I I^T."""
        h, w = p.shape
        products = np.empty((h, w, 13), np.float32)
        products[..., 0:3] = guide
        products[..., 3] = p
        np.multiply(guide, p[..., None], out=products[..., 4:7])
        for n, (i, j) in enumerate(_PAIRS):
            np.multiply(guide[..., i], guide[..., j], out=products[..., 7 + n])
        return products

    @staticmethod
    def guided_solve(means: np.ndarray, eps: float) -> np.ndarray:
        """(H, W, 4) float32 (a0, a1, a2, b) from the box means of ``guided_products``."""
        h, w = means.shape[:2]
        planes = np.ascontiguousarray(means.transpose(2, 0, 1))  # (13, H, W): whole planes
        mean_i, mean_p = planes[0:3], planes[3]
        c0, c1, c2 = planes[4:7] - mean_i * mean_p  # covariance of guide and p
        # Symmetric 3x3 covariance of the guide per pixel, plus eps on the diagonal.
        rr, rg, rb, gg, gb, bb = (planes[7 + n] - mean_i[i] * mean_i[j] for n, (i, j) in enumerate(_PAIRS))
        rr, gg, bb = rr + eps, gg + eps, bb + eps
        # Closed-form inverse via the adjugate: cheaper than np.linalg.inv on (H, W, 3, 3).
        i_rr, i_rg, i_rb = gg * bb - gb * gb, gb * rb - rg * bb, rg * gb - gg * rb
        i_gg, i_gb, i_bb = rr * bb - rb * rb, rb * rg - rr * gb, rr * gg - rg * rg
        inv_det = 1.0 / (rr * i_rr + rg * i_rg + rb * i_rb)
        coef = np.empty((h, w, 4), np.float32)
        a0, a1, a2 = ((i_rr * c0 + i_rg * c1 + i_rb * c2) * inv_det, (i_rg * c0 + i_gg * c1 + i_gb * c2) * inv_det,
                      (i_rb * c0 + i_gb * c1 + i_bb * c2) * inv_det)
        coef[..., 0], coef[..., 1], coef[..., 2] = a0, a1, a2
        coef[..., 3] = mean_p - (a0 * mean_i[0] + a1 * mean_i[1] + a2 * mean_i[2])
        return coef

    @staticmethod
    def guided_apply(coef: np.ndarray, guide: np.ndarray, busy: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """``snap(a . guide + b)`` where ``busy``, ``alpha`` elsewhere, the coefficients upsampled."""
        h, w = alpha.shape
        full = cv2.resize(coef, (w, h), interpolation=cv2.INTER_LINEAR)
        q = np.einsum("hwc,hwc->hw", full[..., :3], guide.astype(np.float32)) + full[..., 3]
        out = alpha.copy()
        cv2.copyTo(_snap(q), busy, out)
        return out

    @staticmethod
    def compose(image: np.ndarray, alpha: np.ndarray, back: np.ndarray | None, sums: np.ndarray) -> np.ndarray:
        """The border's own colour (``estimate_foreground``) blended over ``back``; RGBA without it."""
        subject = _subject(image, alpha, sums)
        if back is None:
            rgba: np.ndarray = np.dstack([subject, _weight_u8(alpha)])
            return rgba
        # alpha * subject + (1 - alpha) * backdrop, in one SIMD pass (exact where alpha is 0 or 1)
        out: np.ndarray = cv2.blendLinear(subject, back, alpha, 1.0 - alpha)
        return out


_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def _ops(kernel: fused.Choice) -> fused.PostKernel | NumpyOps:
    fast = fused.chosen(kernel)
    return fast if fast is not None else NumpyOps()
