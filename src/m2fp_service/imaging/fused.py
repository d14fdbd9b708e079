"""The fused per-pixel kernels of post-processing and compositing, ``libm2fp_post.so``
(``native/m2fp_post.c``), and preprocessing's resize (``native/m2fp_resize.c``), via ctypes.

Built by ``native/build.py`` (``make native``) beside the deformable-attention kernel. Where it is
absent (no compiler at install time) or does not load (built for another machine), post-processing
and compositing run their OpenCV/numpy paths: the same results within float rounding, slower.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL

log = logging.getLogger(__name__)

BUILT = Path(__file__).resolve().parent.parent / "native" / "libm2fp_post.so"
ABI = 10  # m2fp_post_abi() of the library these signatures and meanings match

_floats = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_bytes = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")
_ints = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
_address = ctypes.c_void_p  # an array checked by hand (_checked): the hot calls skip ndpointer's conversions


def _checked(array: np.ndarray, dtype: type, name: str, *, written: bool = False) -> int:
    """``array``'s address once it is a C-contiguous array of ``dtype`` (and writeable when
    ``written``); ~1.5 us where ndpointer's conversion took ~4 (per array, per call)."""
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array, got {array.dtype}")
    if written and not array.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return int(array.ctypes.data)


@dataclass(frozen=True)
class Taps:
    """A linear resampling along one axis: output ``o`` = ``sum_k weight[o, k] * input[index[o, k]]``
    over the taps whose weight is not 0. Checked when made, so the kernel can trust the indices.

    Attributes:
        index: (n_out, K) int32, each in ``[0, n_in)``.
        weight: (n_out, K) float32.
        n_in: the input's length along the axis.
    """

    index: np.ndarray
    weight: np.ndarray
    n_in: int

    def __post_init__(self) -> None:
        index, weight = np.array(self.index, order="C"), np.array(self.weight, order="C")  # its own, read-only
        index.flags.writeable = weight.flags.writeable = False
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "weight", weight)
        if index.dtype != np.int32 or weight.dtype != np.float32:
            raise ValueError(f"taps need int32 indices and float32 weights, got {index.dtype} and {weight.dtype}")
        if index.ndim != 2 or index.shape != weight.shape or index.shape[1] < 1:
            raise ValueError(f"taps need (n_out, K) indices and weights alike, got {index.shape} and {weight.shape}")
        if index.size and (int(index.min()) < 0 or int(index.max()) >= self.n_in):
            raise ValueError(f"tap indices must lie in [0, {self.n_in})")

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @functools.cached_property
    def addresses(self) -> tuple[int, int]:
        """Where ``index`` and ``weight`` are (arrays the taps own, read-only): taken once, as the
        kernel is called per query and band."""
        return self.index.ctypes.data, self.weight.ctypes.data

    def band(self, rows: slice) -> Taps:
        """The taps of a band of outputs."""
        return Taps(self.index[rows], self.weight[rows], self.n_in)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """A bilinear resize along one axis, half-pixel centres (OpenCV's ``INTER_LINEAR``, torch's
    ``align_corners=False``), as (n_out, 2) source indices and float64 weights."""
    if n_in == n_out:
        index = np.arange(n_out)
        return np.stack([index, index], 1), np.stack([np.ones(n_out), np.zeros(n_out)], 1)
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    first = np.floor(src).astype(np.int64)
    frac = src - first
    frac[first >= n_in - 1] = 0.0
    first = np.minimum(first, n_in - 1)
    return np.stack([first, np.minimum(first + 1, n_in - 1)], 1), np.stack([1.0 - frac, frac], 1)


@functools.lru_cache(maxsize=16)  # one frame size after another: made once
def bilinear(n_in: int, n_out: int) -> Taps:
    """``bilinear_taps`` as kernel taps (read-only, shared)."""
    index, weight = bilinear_taps(n_in, n_out)
    return Taps(index.astype(np.int32), weight.astype(np.float32), n_in)


def _check_low(low: np.ndarray, cols: Taps, rows: Taps) -> None:
    """A query's low-resolution logits must be what the taps resample: (rows.n_in, cols.n_in)."""
    if low.ndim != 2 or (rows.n_in, cols.n_in) != low.shape:
        raise ValueError(f"low logits {low.shape} do not match taps from {(rows.n_in, cols.n_in)}")


def _check_image(name: str, array: np.ndarray, shape: tuple[int, ...], dtype: type) -> None:
    if 0 in shape:
        raise ValueError(f"{name} is empty: {shape}")
    if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array of shape {shape}, got "
                         f"{array.dtype.name} {array.shape}")


class PostKernel:
    """The library's functions over C-contiguous arrays (one band of rows, or a whole map, per call).

    ``lanes``: the vector width (floats) of the per-pixel kernels to run, 16, 8 or 4; the widest the
    library has that this CPU runs when None (``lanes`` says which).

    Raises:
        OSError: ``path`` is not a loadable library, or not this project's (another ABI), or has no
            kernels of ``lanes`` that this CPU runs.
    """

    def __init__(self, path: Path, lanes: int | None = None) -> None:
        lib = ctypes.CDLL(str(path))  # ctypes.CDLL releases the GIL during each call
        try:
            abi = lib.m2fp_post_abi
        except AttributeError as e:
            raise OSError(f"{path}: not m2fp's post-processing library (no m2fp_post_abi)") from e
        abi.restype = ctypes.c_int
        if abi() != ABI:
            raise OSError(f"{path}: ABI {abi()}, expected {ABI}; rebuild it with `make native`")
        lib.m2fp_post_lanes.restype = ctypes.c_int
        widest = lib.m2fp_post_lanes()
        built = [n for n in (16, 8, 4) if n <= widest and hasattr(lib, f"m2fp_paste_vote_w{n}")]
        self.lanes = (built[0] if built else widest) if lanes is None else lanes
        if self.lanes not in built:
            raise OSError(f"{path}: no {self.lanes}-lane kernels this CPU runs (it has {built or 'none'})")
        # The per-pixel kernels of the vector width chosen: the CPU's widest unless asked (tests).
        kernels = {name: getattr(lib, f"m2fp_{name}_w{self.lanes}")
                   for name in ("upsample_squash", "mask_scores", "paste_vote", "add_instance", "upsample_positive")}
        taps: list[Any] = [ctypes.c_int64, ctypes.c_int64, _address, _address, ctypes.c_int64, ctypes.c_int64, _address,
                _address, ctypes.c_int64, ctypes.c_int64]  # low_h, low_w, then the columns' and rows' taps (_taps)
        kernels["upsample_squash"].argtypes = [_address, *taps, _address, _address, _address,
                                               ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64)]
        kernels["upsample_squash"].restype = None
        kernels["mask_scores"].argtypes = [_address, ctypes.c_int64, *taps, _address, _address]
        kernels["mask_scores"].restype = ctypes.c_int
        kernels["paste_vote"].argtypes = [_address, _address, _address, ctypes.c_int64, *taps, _address]
        kernels["paste_vote"].restype = ctypes.c_int
        kernels["add_instance"].argtypes = [_address, ctypes.c_int64, ctypes.c_float, _address, _address, ctypes.c_int]
        kernels["add_instance"].restype = None
        kernels["upsample_positive"].argtypes = [_address, *taps, _address]
        kernels["upsample_positive"].restype = ctypes.c_int
        self._upsample_positive = kernels["upsample_positive"]
        self._upsample_squash, self._mask_scores = kernels["upsample_squash"], kernels["mask_scores"]
        self._paste_vote, self._add_instance = kernels["paste_vote"], kernels["add_instance"]
        lib.m2fp_average.argtypes = [_floats, _bytes, ctypes.c_int64]
        lib.m2fp_average.restype = None
        lib.m2fp_vote.argtypes = [_floats, ctypes.c_int64, ctypes.c_uint8, _floats, _bytes]
        lib.m2fp_vote.restype = None
        lib.m2fp_average_vote.argtypes = [_floats, _bytes, ctypes.c_int64, ctypes.c_uint8, _floats, _bytes]
        lib.m2fp_average_vote.restype = None
        lib.m2fp_guided_products.argtypes = [_floats, _floats, ctypes.c_int64, _floats]
        lib.m2fp_guided_products.restype = None
        lib.m2fp_guided_solve.argtypes = [_floats, ctypes.c_int64, ctypes.c_float, _floats]
        lib.m2fp_guided_solve.restype = None
        lib.m2fp_guided_apply.argtypes = [_floats, ctypes.c_int64, _ints, _floats, _ints, _floats,
                                          _bytes, _bytes, _floats, ctypes.c_int64, ctypes.c_int64, _floats, _floats]
        lib.m2fp_guided_apply.restype = None
        lib.m2fp_compose.argtypes = [_bytes, _floats, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, _floats,
                                     ctypes.c_int64, ctypes.c_int64, _ints, _floats, _ints, _floats, _floats, _bytes]
        lib.m2fp_compose.restype = None
        lib.m2fp_resize_rgb.argtypes = [_address, *[ctypes.c_int64] * 6, _address, ctypes.c_int64, ctypes.c_int64]
        lib.m2fp_resize_rgb.restype = ctypes.c_int
        lib.m2fp_mask_rows_up.argtypes = [_address, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint8, _address]
        lib.m2fp_mask_rows_up.restype = None
        self.path = path
        self._lib = lib

    def upsample_squash(self, low: np.ndarray, cols: Taps, rows: Taps, scratch: np.ndarray, sig: np.ndarray,
                        logits: np.ndarray | None = None) -> tuple[float, int]:
        """One query's low-resolution logits resampled (``rows`` x ``cols``: a band of output rows)
        and squashed: ``sig = sigmoid(resampled)`` where ``resampled > 0`` and 0 elsewhere (NaN
        included: the only values ever read, as a mask's score and its pasting read none where the
        logit is not positive), and ``logits = resampled`` when given.

        Args:
            low: (h, w) float32 logits.
            cols: taps from ``w`` columns to the output's width.
            rows: taps from ``h`` rows to this band's output rows.
            scratch: float32 of at least (h + 1) * width values, not shared with another call in flight.
            sig, logits: (len(rows), width) float32, written.

        Returns:
            (sum of ``sig`` where the resampled logits are > 0, how many such pixels).
        """
        out_hw = (len(rows), len(cols))
        _check_low(low, cols, rows)
        if sig.shape != out_hw or (logits is not None and logits.shape != out_hw):
            raise ValueError(f"sig {sig.shape} / logits {None if logits is None else logits.shape}: expected {out_hw}")
        if scratch.size < (low.shape[0] + 1) * out_hw[1]:
            raise ValueError(f"scratch of {scratch.size} values, needs {(low.shape[0] + 1) * out_hw[1]}")
        written = [a for a in (scratch, sig, logits) if a is not None]
        if any(np.may_share_memory(a, b) for i, a in enumerate(written) for b in written[i + 1:]):
            raise ValueError("scratch, sig and logits must not overlap")
        total, count = ctypes.c_double(), ctypes.c_int64()
        self._upsample_squash(_checked(low, np.float32, "low"), *self._taps(low, cols, rows),
                              _checked(scratch, np.float32, "scratch", written=True),
                              None if logits is None else _checked(logits, np.float32, "logits", written=True),
                              _checked(sig, np.float32, "sig", written=True), ctypes.byref(total),
                              ctypes.byref(count))
        return total.value, count.value

    def upsample_positive(self, low: np.ndarray, cols: Taps, rows: Taps, positive: np.ndarray) -> None:
        """Where one query's low-resolution logits resampled (``rows`` x ``cols``, ``upsample_squash``'s
        values) are > 0: ``positive`` = 1 there, else 0 (NaN too); no sigmoid, and what cannot be positive
        is skipped. A person's mask, without its logits stored.

        Args:
            low: (h, w) float32 logits.
            cols: taps from ``w`` columns to the output's width.
            rows: taps from ``h`` rows to this band's output rows.
            positive: (len(rows), len(cols)) uint8 or bool, C-contiguous, written.

        Raises:
            ValueError: arrays that do not match the taps, or of another type or layout.
            MemoryError: the kernel could not get its working memory (nothing written).
        """
        out_hw = (len(rows), len(cols))
        _check_low(low, cols, rows)
        if positive.shape != out_hw or positive.dtype not in (np.uint8, np.bool_):
            raise ValueError(f"positive must be a uint8 or bool {out_hw} array, got {positive.dtype} {positive.shape}")
        if not positive.flags.c_contiguous:
            raise ValueError("positive must be C-contiguous")
        target = _checked(positive.view(np.uint8), np.uint8, "positive", written=True)
        if self._upsample_positive(_checked(low, np.float32, "low"), *self._taps(low, cols, rows), target) != 0:
            raise MemoryError("the post-processing kernel could not get its working memory")

    def mask_scores(self, lows: list[np.ndarray], cols: Taps, rows: Taps) -> tuple[np.ndarray, np.ndarray]:
        """``upsample_squash``'s (sum, count) of each query over a band of output rows (``rows``), in
        one call, without writing its sig or logits: (n,) float64 sums and (n,) int64 counts.

        Args:
            lows: each query's (h, w) float32 low-resolution logits.
            cols, rows: taps as for ``upsample_squash``.
        """
        sums, counts = np.empty(len(lows), np.float64), np.empty(len(lows), np.int64)
        if lows:
            status = self._mask_scores(self._lows(lows, cols, rows), len(lows),
                                       *self._taps(lows[0], cols, rows), sums.ctypes.data, counts.ctypes.data)
            if status != 0:
                raise MemoryError("the post-processing kernel could not get its working memory")
        return sums, counts

    def paste_vote(self, lows: list[np.ndarray], scores: np.ndarray, classes: np.ndarray, cols: Taps, rows: Taps,
                   labels: np.ndarray) -> None:
        """A band of the label map (``labels``, (len(rows), len(cols)) uint8, written) from the pasted
        instances: for each class in turn, its instances' masks (``upsample_squash``) added where
        ``sig * score > 0.5`` (``add_instance``), averaged and voted (``average_vote``) over labels and
        best probabilities starting at 0. The same labels as those calls over the band, without any
        full-size map but ``labels``.

        Args:
            lows: each instance's (h, w) float32 low-resolution logits.
            scores: (n,) float32 in [0, 1]. classes: (n,) uint8, non-decreasing (a class's instances together).
            cols, rows: taps as for ``upsample_squash``.
        """
        scores = np.ascontiguousarray(scores, np.float32)
        if len(classes) and not (np.min(classes) >= 0 and np.max(classes) <= 255):
            raise ValueError("class ids must lie in 0..255 (a uint8 label map)")
        classes = np.ascontiguousarray(classes, np.uint8)
        if not len(lows) == len(scores) == len(classes):
            raise ValueError(f"{len(lows)} masks, {len(scores)} scores and {len(classes)} classes differ")
        if len(scores) and not (scores.min() >= 0.0 and scores.max() <= 1.0):  # NaN fails both
            raise ValueError("an instance's score must lie in [0, 1]")
        if np.any(np.diff(classes.astype(np.int16)) < 0):
            raise ValueError("instances must come by class, in increasing class order")
        _check_image("labels", labels, (len(rows), len(cols)), np.uint8)
        if not labels.flags.writeable:
            raise ValueError("labels must be writeable")
        if not lows:
            labels.fill(0)
            return
        status = self._paste_vote(self._lows(lows, cols, rows), scores.ctypes.data, classes.ctypes.data,
                                  len(lows), *self._taps(lows[0], cols, rows), labels.ctypes.data)
        if status != 0:
            raise MemoryError("the post-processing kernel could not get its working memory")

    @staticmethod
    def _lows(lows: list[np.ndarray], cols: Taps, rows: Taps) -> ctypes.Array[ctypes.c_void_p]:
        """The queries' logits checked against the taps, as an array of their addresses."""
        for low in lows:
            _check_low(low, cols, rows)
        return (ctypes.c_void_p * len(lows))(*(_checked(low, np.float32, "low") for low in lows))

    @staticmethod
    def _taps(low: np.ndarray, cols: Taps, rows: Taps) -> tuple[int, ...]:
        """The kernel's geometry arguments: low_h, low_w, the columns' taps, the rows'."""
        (col_index, col_weight), (row_index, row_weight) = cols.addresses, rows.addresses
        return (low.shape[0], low.shape[1], col_index, col_weight, len(cols), cols.index.shape[1], row_index,
                row_weight, len(rows), rows.index.shape[1])

    def add_instance(self, sig: np.ndarray, probs: np.ndarray, counts: np.ndarray, score: np.float32,
                     first: bool = False) -> None:
        """Where ``sig * score > 0.5``: ``probs += sig * score`` and ``counts += 1``. With ``first``
        (the class's first instance) ``probs`` and ``counts`` are written as if they held zeros.

        Raises:
            ValueError: a ``score`` outside [0, 1]: ``upsample_squash`` leaves sig 0 where the logit
                is <= 0 (sigmoid <= 0.5), which a score above 1 could have pasted.
        """
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"an instance's score must lie in [0, 1], got {score}")
        if not sig.shape == probs.shape == counts.shape:
            raise ValueError(f"sig {sig.shape}, probs {probs.shape} and counts {counts.shape} differ")
        self._add_instance(_checked(sig, np.float32, "sig"), sig.size, score,
                           _checked(probs, np.float32, "probs", written=True),
                           _checked(counts, np.uint8, "counts", written=True), int(first))

    def average(self, probs: np.ndarray, counts: np.ndarray) -> None:
        """``probs /= max(counts, 1)``, in place."""
        if probs.shape != counts.shape:
            raise ValueError(f"probs {probs.shape} and counts {counts.shape} differ")
        self._lib.m2fp_average(probs, counts, probs.size)

    def vote(self, prob: np.ndarray, class_id: int, best: np.ndarray, labels: np.ndarray) -> None:
        """Where ``prob > best``: ``best = prob`` and ``labels = class_id`` (an argmax, one class at a time)."""
        if not prob.shape == best.shape == labels.shape:
            raise ValueError(f"prob {prob.shape}, best {best.shape} and labels {labels.shape} differ")
        if not 0 <= class_id <= 255:
            raise ValueError(f"class id {class_id} does not fit a uint8 label map")
        self._lib.m2fp_vote(prob, prob.size, class_id, best, labels)

    def average_vote(self, probs: np.ndarray, counts: np.ndarray, best: np.ndarray, labels: np.ndarray,
                     class_id: int) -> None:
        """``average`` then ``vote`` in one pass (``probs`` itself is left as it is)."""
        if not probs.shape == counts.shape == best.shape == labels.shape:
            raise ValueError(f"probs {probs.shape}, counts {counts.shape}, best {best.shape} and labels "
                             f"{labels.shape} differ")
        if not 0 <= class_id <= 255:
            raise ValueError(f"class id {class_id} does not fit a uint8 label map")
        self._lib.m2fp_average_vote(probs, counts, probs.size, class_id, best, labels)

    def guided_products(self, guide: np.ndarray, p: np.ndarray) -> np.ndarray:
        """(h, w, 13) float32, the products the colour guided filter box-averages: I (3), p, I p (3),
        then rr, rg, rb, gg, gb, bb of I I^T.

        Args:
            guide: (h, w, 3) float32. p: (h, w) float32.
        """
        h, w = p.shape
        _check_image("guide", guide, (h, w, 3), np.float32)
        _check_image("p", p, (h, w), np.float32)
        out = np.empty((h, w, 13), np.float32)
        self._lib.m2fp_guided_products(guide, p, h * w, out)
        return out

    def guided_solve(self, means: np.ndarray, eps: float) -> np.ndarray:
        """(h, w, 4) float32, the guided filter's a (three channels) and b per pixel, from the box
        means (h, w, 13) of ``guided_products``; ``eps`` is added to the guide's variances."""
        if means.ndim != 3 or means.shape[2] != 13:
            raise ValueError(f"means must be (h, w, 13), got {means.shape}")
        _check_image("means", means, means.shape, np.float32)
        out = np.empty((*means.shape[:2], 4), np.float32)
        self._lib.m2fp_guided_solve(means, means.shape[0] * means.shape[1], eps, out)
        return out

    def guided_apply(self, coef: np.ndarray, guide: np.ndarray, busy: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """The guided filter's output where ``busy``, ``alpha`` elsewhere (``compose.refine_alpha``):
        ``snap(a . guide + b)`` with ``coef`` = (a0, a1, a2, b) bilinearly upsampled to the guide.

        Args:
            coef: (hs, ws, 4) float32, the small map of coefficients (on the guide's 0..255 values).
            guide: (h, w, 3) uint8.
            busy: (h, w) uint8, non-zero where the filter's output is taken.
            alpha: (h, w) float32, kept where ``busy`` is 0.

        Returns:
            (h, w) float32, a new array.
        """
        h, w = alpha.shape
        if coef.ndim != 3 or coef.shape[2] != 4 or min(coef.shape) < 1:
            raise ValueError(f"coefficients must be (hs, ws, 4), got {coef.shape}")
        _check_image("coef", coef, coef.shape, np.float32)
        _check_image("guide", guide, (h, w, 3), np.uint8)
        _check_image("busy", busy, (h, w), np.uint8)
        _check_image("alpha", alpha, (h, w), np.float32)
        rows, cols = bilinear(coef.shape[0], h), bilinear(coef.shape[1], w)
        out = np.empty((h, w), np.float32)
        tmp = np.empty(coef.shape[1] * 4, np.float32)
        self._lib.m2fp_guided_apply(coef, coef.shape[1], rows.index, rows.weight, cols.index,
                                    cols.weight, guide, busy, alpha, h, w, tmp, out)
        return out

    def compose(self, image: np.ndarray, alpha: np.ndarray, back: np.ndarray | None, sums: np.ndarray) -> np.ndarray:
        """The composed picture (``compose.composite``): the border's own colour estimated from the
        local sums and blended over ``back``; RGBA with alpha when ``back`` is None.

        Args:
            image: (h, w, 3) uint8.
            alpha: (h, w) float32 0..1.
            back: (h, w, 3) uint8, or None.
            sums: (4, hs, ws, 4) float32, ``compose.border_sums``.

        Returns:
            (h, w, 3) uint8, or (h, w, 4) without ``back``; a new array.
        """
        h, w = alpha.shape
        if sums.ndim != 4 or sums.shape[0] != 4 or sums.shape[3] != 4 or min(sums.shape) < 1:
            raise ValueError(f"sums must be (4, hs, ws, 4), got {sums.shape}")
        _check_image("sums", sums, sums.shape, np.float32)
        _check_image("image", image, (h, w, 3), np.uint8)
        _check_image("alpha", alpha, (h, w), np.float32)
        if back is not None:
            _check_image("backdrop", back, (h, w, 3), np.uint8)
        rows, cols = bilinear(sums.shape[1], h), bilinear(sums.shape[2], w)
        out = np.empty((h, w, 3 if back is not None else 4), np.uint8)
        self._lib.m2fp_compose(image, alpha, None if back is None else back.ctypes.data, h, w, sums, sums.shape[1],
                               sums.shape[2], rows.index, rows.weight, cols.index, cols.weight,
                               np.empty(9 * w, np.float32), out)
        return out

    def resize_rgb(self, image: np.ndarray, hw: tuple[int, int], out: np.ndarray, rows: tuple[int, int]) -> None:
        """Rows ``rows[0]:rows[1]`` of ``image`` resized to ``hw`` (height, width) as Pillow's bilinear
        resize makes them, to the byte, written as floats into ``out[:, rows[0]:rows[1], :width]``
        (the rest of ``out`` is left alone). Pillow's own order of passes only (``pillow_rows_first``).

        Args:
            image: (H, W, 3) uint8 RGB, C-contiguous.
            hw: the resized (height, width).
            out: (3, Hp, Wp) float32, C-contiguous, Hp >= height and Wp >= width.
            rows: the band of output rows, within ``[0, height]``.

        Raises:
            ValueError: arrays or rows that do not fit; Pillow would take the passes the other way, or
                its order is not known (``pillow_rows_first``).
            MemoryError: the kernel could not get its working memory (nothing written).
        """
        (h, w), (y0, y1) = hw, rows
        if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"image must be (H, W, 3), got {image.shape}")
        if min(h, w) < 1:
            raise ValueError(f"the resized size must be at least 1x1, got {h}x{w}")
        if out.ndim != 3 or out.shape[0] != 3 or out.shape[1] < h or out.shape[2] < w:
            raise ValueError(f"out must be (3, Hp, Wp) with room for {h}x{w}, got {out.shape}")
        source, target = _checked(image, np.uint8, "image"), _checked(out, np.float32, "out", written=True)
        if not 0 <= y0 <= y1 <= h:
            raise ValueError(f"rows {y0}:{y1} are not within the resized height {h}")
        if not pillow_rows_first(image.shape[:2], hw):
            raise ValueError(f"Pillow {PIL.__version__} resizes {image.shape[:2]} to {hw} along columns first, "
                             "or in an order this code does not know")
        status = self._lib.m2fp_resize_rgb(source, image.shape[0], image.shape[1], h, w, y0, y1, target, out.shape[1],
                                           out.shape[2])
        if status == -1:
            raise MemoryError("the resize kernel could not get its working memory")
        if status != 0:
            raise ValueError(f"the resize kernel refused {image.shape} -> {hw}, rows {y0}:{y1}, into {out.shape}")

    def mask_rows_up(self, label_map: np.ndarray, class_id: int) -> np.ndarray:
        """One class's 0/255 mask of ``label_map`` as PNG rows filtered "up", each led by its filter byte:
        (H, W + 1) uint8, what ``render.encode_png`` deflates for ``render.class_mask(label_map, class_id)``.

        Raises:
            ValueError: not a non-empty (H, W) C-contiguous uint8 map, or a class id outside 0..255.
        """
        if label_map.ndim != 2 or 0 in label_map.shape:
            raise ValueError(f"label map must be a non-empty (H, W) array, got {label_map.shape}")
        if not 0 <= class_id <= 255:
            raise ValueError(f"class id {class_id} does not fit a uint8 label map")
        h, w = label_map.shape
        out = np.empty((h, w + 1), np.uint8)
        self._lib.m2fp_mask_rows_up(_checked(label_map, np.uint8, "label map"), h, w, class_id, out.ctypes.data)
        return out


def _pillow_version() -> tuple[int, int] | None:
    """The installed Pillow's (major, minor); None for a pre-release (a 13.0 development build still
    had 12.2's order of passes) or a version string of another form."""
    parts = PIL.__version__.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return None
    return int(parts[0]), int(parts[1])


PILLOW_VERSION = _pillow_version()


def pillow_rows_first(in_hw: tuple[int, int], out_hw: tuple[int, int],
                      version: tuple[int, int] | None = None) -> bool:
    """Whether Pillow ``version`` (the installed one by default) resizes ``in_hw`` to ``out_hw`` along rows
    first (the only order ``PostKernel.resize_rgb`` takes; the two orders round differently). Before 12.2,
    always. 12.2 and 12.3 take the columns first, as two resizes, for an image more than 100 times as tall
    as wide whose height shrinks (src/PIL/Image.py); 13.0 does in its C code when the height shrinks by
    more than twice as many pixels as the width (src/libImaging/Resample.c, ImagingResampleInner). A resize
    along one axis is that axis's one pass in all of them. Another version (13.1 and later, a pre-release),
    whose order this code does not know, is taken as not rows first: its own resize is used."""
    (h, w), (new_h, new_w) = in_hw, out_hw
    known = PILLOW_VERSION if version is None else version
    if known is None or known >= (13, 1) or (12, 4) <= known < (13, 0):
        return False
    if known < (12, 2) or h == new_h or w == new_w:
        return True
    if known < (13, 0):
        return not (h > w * 100 and new_h < h)
    return not (h - new_h > 0 and h - new_h > (w - new_w) * 2)


Choice = PostKernel | None | Literal["built"]  # what callers pass as ``kernel=``


def chosen(kernel: Choice) -> PostKernel | None:
    """The kernel a caller asked for: "built" is the package's own build when it loads (``built``)."""
    return built() if kernel == "built" else kernel


@functools.cache
def built() -> PostKernel | None:
    """The package's own build, loaded once; None when it is not built or does not load (warned)."""
    if not BUILT.is_file():
        return None
    try:
        return PostKernel(BUILT)
    except OSError as e:
        log.warning("post-processing kernel %s does not load (%s): using the OpenCV/numpy path", BUILT, e)
        return None
