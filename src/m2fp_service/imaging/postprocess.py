"""Raw model outputs -> ``ParsingResult``, reproducing ModelScope's multi-person parsing.

Reference: ``M2FP.postprocess`` with ``parsing_on`` (mask logits upsampled to the padded
input, cropped to the resized image, resized to the original size, all bilinear with
``align_corners=False``), then ``instance_parsing_inference`` and
``paste_instance_to_semseg_probs``; the label map is the argmax of the pasted class
probabilities.

Two exact shortcuts keep it fast without changing any result:
- a (query, class) pair whose class score is below every threshold (parts 0.1, people 0.1,
  paste 0.5) cannot pass after multiplying by a mask score <= 1, so its mask is never upsampled;
- a query's mask and mask score do not depend on the class, so each is computed once (the mask
  again only for a query with pairs of several classes, which is rare).

Classes are taken one at a time, in increasing order: a class's pasted sums are built from its
instances (in increasing query order, as query by query), averaged and voted into the label map
before the next class starts, so one class's maps are alive at a time.

The per-pixel work of each query runs on row bands, one per thread (``THREADS``), in the fused
kernel (``imaging/fused.py``) when it is built, else with OpenCV's SIMD kernels where numpy's
float32 ``exp`` and masked operations are slow; every pixel gets the same operations in the same
order whatever the number of bands. The kernel does a query's two resizes as the one resampling
they compose to (``composite_taps``: columns at the low resolution, then rows), with the squash, in
one pass: no padded-size or work-size logits are stored (a person's are for its mask on the one-step
path; the two-pass path takes the mask without them), and the
results equal OpenCV's two resizes to float rounding (~2e-7 relative at photo sizes; for a
resized image only a pixel or so thick, OpenCV's own rounding is larger, ~1e-5).

Where the work size is the original size (``exact``, the default), the fused kernel goes in two
passes that write no full-size map but the label map (``_TiledPixels``): every live query's mask
score first, then, tile by tile of a few rows, each pasted instance squashed again and added, each
class averaged and voted, all in the cache. Recomputing the pasted queries' sigmoids costs less
than writing them out and reading them back (3.7 MB per query at 720p): 1.28x as fast on the bench
photo's 98 live queries, the same labels and scores to the bit.

``work_hw`` picks where the per-pixel work happens: the original size (``exact``), or (``fast``)
the resized model-input size when that is less than half the photo's pixels, with each class's probability map then
resized bilinearly before the argmax and person masks thresholded after a bilinear resize of
their logits.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Literal, TypeVar

import cv2
import numpy as np

from m2fp_service.imaging import THREADS, fused
from m2fp_service.imaging.preprocess import PreprocessMeta
from m2fp_service.modelcard import InferenceSettings
from m2fp_service.result import ParsingResult, PartInstance

Mode = Literal["exact", "fast"]
T = TypeVar("T")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)  # type: ignore[no-any-return]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 sigmoid of ``x`` (a new array)."""
    return sigmoid_into(x, np.empty(x.shape, np.float32))


def resize_bilinear(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W) float32 map, half-pixel centres (= torch align_corners=False)."""
    if img.shape == hw:
        return img
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def query_logits_at(
    mask_logits_q: np.ndarray,
    meta: PreprocessMeta,
    work_hw: tuple[int, int],
    out: np.ndarray | None = None,
    padded: np.ndarray | None = None,
) -> np.ndarray:
    """One query's (h/4, w/4) mask logits -> (work_hw) logits, as ModelScope upsamples them.

    Written into ``out`` (a C-contiguous (work_hw) float32 buffer) when given, through ``padded``
    (a (padded_hw) float32 buffer) when given: buffers reused from query to query spare the
    allocator fresh pages, whose first-touch faults cost more than the resizing on a VM. The crop
    is a view that OpenCV resizes in place of a copy (the same values).
    """
    if padded is None:
        padded = np.empty(meta.padded_hw, np.float32)
    if mask_logits_q.shape == meta.padded_hw:
        np.copyto(padded, mask_logits_q)
    else:
        cv2.resize(mask_logits_q, (meta.padded_hw[1], meta.padded_hw[0]), dst=padded, interpolation=cv2.INTER_LINEAR)
    cropped = padded[: meta.resized_hw[0], : meta.resized_hw[1]]
    if out is None:
        out = np.empty(work_hw, np.float32)
    if cropped.shape == work_hw:
        np.copyto(out, cropped)
    else:
        cv2.resize(cropped, (work_hw[1], work_hw[0]), dst=out, interpolation=cv2.INTER_LINEAR)
    return out


@functools.lru_cache(maxsize=16)  # one photo size after another (video frames): made once
def composite_taps(n_low: int, n_padded: int, n_resized: int, n_work: int) -> fused.Taps:
    """``query_logits_at`` along one axis (resize to the padded input, crop to the resized image,
    resize to the work size) as one resampling: each output's weights on the low-resolution
    logits, the products of the two resizes' weights summed in float64. Read-only (shared)."""
    first_index, first_weight = fused.bilinear_taps(n_low, n_padded)
    second_index, second_weight = fused.bilinear_taps(n_resized, n_work)  # into the crop: padded rows < n_resized
    index = first_index[second_index].reshape(n_work, 4)  # the 2 x 2 products per output
    weight = (second_weight[:, :, None] * first_weight[second_index]).reshape(n_work, 4)
    base = index.min(1)
    offset = index - base[:, None]
    dense = np.zeros((n_work, int(offset.max()) + 1))
    outputs = np.arange(n_work)
    for j in range(4):  # one output per row in each column of products: no repeated index within an add
        dense[outputs, offset[:, j]] += weight[:, j]
    taps = np.minimum(base[:, None] + np.arange(dense.shape[1]), n_low - 1)  # a clipped tap has weight 0
    return fused.Taps(taps.astype(np.int32), dense.astype(np.float32), n_low)


def sigmoid_into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``sigmoid(x)`` of a 1-D or 2-D float32 array, written into ``out`` without temporaries.

    The exponential is OpenCV's (SIMD; numpy's float32 ``exp`` took 8x longer here): within
    1.2e-7 of numpy's sigmoid. Large inputs saturate to 1 and 0 without overflow warnings.
    """
    np.negative(x, out=out)
    cv2.exp(out, out)
    np.add(out, 1.0, out=out)
    np.reciprocal(out, out=out)
    return out


def mask_score(logits: np.ndarray, probs: np.ndarray | None = None) -> float:
    """Mean sigmoid over the mask's positive pixels (ModelScope's ``mask_scores_per_image``).

    Args:
        logits: (H, W) float32 mask logits.
        probs: ``sigmoid(logits)`` if already computed.
    """
    total, count = _positive_sum(logits, sigmoid(logits) if probs is None else probs, None)
    return total / (count + 1e-6)


def _positive_sum(logits: np.ndarray, probs: np.ndarray, scratch: np.ndarray | None) -> tuple[float, int]:
    """(sum of ``probs`` where ``logits > 0``, how many such pixels)."""
    positive = cv2.threshold(logits, 0.0, 1.0, cv2.THRESH_BINARY)[1]  # 1.0 where logits > 0
    kept = np.multiply(probs, positive, out=scratch)  # a masked sum (sum(where=)) is 15x slower
    return float(cv2.sumElems(kept)[0]), cv2.countNonZero(positive)


def _squash_band(logits: np.ndarray, sig: np.ndarray, scratch: np.ndarray) -> tuple[float, int]:
    """One band of rows of a query: its sigmoid into ``sig``, and its part of the mask score."""
    sigmoid_into(logits, sig)
    return _positive_sum(logits, sig, scratch)


def _add_instance_band(
    sig: np.ndarray, probs: np.ndarray, counts: np.ndarray, scratch: np.ndarray, final: np.float32
) -> None:
    """One band of rows: adds an instance's probability (``sig * final``) where it passes 0.5.

    Added everywhere with 0 below 0.5 (adding 0 changes nothing), 5x faster than a masked add.
    """
    np.multiply(sig, final, out=scratch)
    cv2.threshold(scratch, 0.5, 0.0, cv2.THRESH_TOZERO, dst=scratch)
    probs += scratch
    hit = scratch > 0.5
    np.add(counts, hit.view(np.uint8), out=counts)


def _map(pool: ThreadPoolExecutor, fn: Callable[..., T], *iterables: Iterable[Any]) -> list[T]:
    """``list(map(fn, *iterables))``, the first call on this thread and the others on the pool's:
    the calling thread works instead of waiting (a thread hand-off fewer per query, ~25 us here)."""
    calls = list(zip(*iterables, strict=True))
    futures = [pool.submit(fn, *args) for args in calls[1:]]
    try:
        first = [fn(*args) for args in calls[:1]]
    finally:
        wait(futures)  # none still writes to the buffers when this returns or raises
    return first + [future.result() for future in futures]


def _on_bands(
    pool: ThreadPoolExecutor, bands: list[slice], fn: Callable[..., T], arrays: tuple[np.ndarray, ...], *args: Any
) -> list[T]:
    """``fn(*(a[band] for a in arrays), *args)`` for each band, on this thread and the pool's."""
    return _map(pool, lambda band: fn(*(a[band] for a in arrays), *args), bands)


def _bands(height: int) -> list[slice]:
    edges = np.linspace(0, height, min(THREADS, height) + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def top_pairs(class_logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (query, class) pairs by softmax score, 'no object' column dropped.

    Returns ``(scores, queries, labels)``, each (k,).
    """
    scores = softmax(class_logits.astype(np.float32), -1)[:, :-1]
    num_classes = scores.shape[1]
    flat = scores.ravel()
    k = min(k, flat.size)
    idx = np.argpartition(-flat, k - 1)[:k]
    return flat[idx], idx // num_classes, idx % num_classes


EXACT_MAX_PIXELS = 4_000_000
FAST_EXACT_RATIO = 2.0


def work_hw_for(meta: PreprocessMeta, mode: Mode) -> tuple[int, int]:
    """Where per-pixel work happens: the original size, or (fast) the model-input size when it is
    less than half the photo's pixels.

    ``exact`` works at the original size only up to ``EXACT_MAX_PIXELS`` (4 MP: 1080p and 2K
    photos are exact); above it, it works like ``fast``, so memory and time stay bounded by the
    model-input size (<= 1333 x 1333) whatever the photo's size. ``fast`` keeps the original size
    for a photo of at most ``FAST_EXACT_RATIO`` times the model input's pixels (720p: 1.27): there
    the native kernel's two passes at full size, in the cache, take less time than the one pass at
    the model-input size with its full-size maps and per-class resizes (bench photo's outputs: 108
    against 158 ms at 720p, 150 against 160 at 1600 x 900; 234 against 210 at 1080p, 2.85 times the
    pixels), and the result is the exact one. The rule does not depend on the kernel being built,
    so that results do not either (without it, ``exact`` at 720p costs ~1.06x ``fast``).
    """
    orig_px = meta.orig_hw[0] * meta.orig_hw[1]
    resized_px = meta.resized_hw[0] * meta.resized_hw[1]
    if resized_px * (FAST_EXACT_RATIO if mode == "fast" else 1) >= orig_px or (
            mode == "exact" and orig_px <= EXACT_MAX_PIXELS):
        return meta.orig_hw
    return meta.resized_hw


def vote(prob: np.ndarray, class_id: int, best: np.ndarray, label_map: np.ndarray,
         kernel: fused.PostKernel | None = None) -> None:
    """One class's step of the per-pixel argmax over class probability maps, classes taken in
    increasing order: where ``prob`` (resized bilinearly to ``best``'s size first) beats ``best``,
    it becomes ``best`` and the label ``class_id``. With ``best`` and ``label_map`` starting at 0,
    absent classes count as probability 0, ties go to the lower class id and a pixel where every
    class is 0 is background (0), as ``torch.argmax`` over all classes gives. ``kernel`` (the fused
    library) does it in one pass, with the same result."""
    prob = np.ascontiguousarray(resize_bilinear(prob, best.shape))
    if kernel is not None:
        kernel.vote(prob, class_id, best, label_map)
        return
    better = cv2.compare(prob, best, cv2.CMP_GT)  # 255 where this class beats all before it
    cv2.max(best, prob, dst=best)
    # Classes come in increasing order, so every label set so far is below c: taking the maximum
    # with c (where better) and 0 (elsewhere) sets c exactly where this class wins.
    cv2.max(label_map, np.bitwise_and(better, np.uint8(class_id), out=better), dst=label_map)


class _Pixels:
    """What ``to_result`` asks of its per-pixel work, besides ``squash``, ``add`` and ``vote``."""

    meta: PreprocessMeta
    logits: np.ndarray
    # Whether ``prepare`` scores the people's queries too (their masks then come from ``person_mask``
    # without a squash of their own).
    people_in_first_pass = False

    def prepare(self, queries: list[int]) -> None:
        """Before the first query (``queries``: those with pairs of a class other than "human", and the
        people's when ``people_in_first_pass``; each is squashed when it comes): the best probability
        so far at each pixel, for the votes."""
        self.best = np.empty(self.meta.orig_hw, np.float32)
        self.best.fill(0)  # written now, not on first use: a fresh page read and then written faults twice

    def finish(self, label_map: np.ndarray) -> None:
        """Nothing left: every class was voted as it ended."""

    def person_mask(self, q: int) -> np.ndarray:
        """Query ``q``'s mask at the original size, (H, W) bool where its logits are > 0: from the logits
        its squash (``keep_logits``) left."""
        return resize_bilinear(self.logits, self.meta.orig_hw) > 0  # no-op when work size = original


class _NumpyPixels(_Pixels):
    """The per-pixel work of ``to_result`` with OpenCV and numpy, on row bands in ``pool``.

    Holds one query's logits and sigmoid (``squash``) and one class's pasted sums (``add``) at a time.
    """

    def __init__(self, pool: ThreadPoolExecutor, meta: PreprocessMeta, work_hw: tuple[int, int],
                 mask_logits: np.ndarray) -> None:
        self.pool, self.meta, self.work_hw, self.mask_logits = pool, meta, work_hw, mask_logits
        self.bands = _bands(work_hw[0])
        self.padded = np.empty(meta.padded_hw, np.float32)
        self.logits = np.empty(work_hw, np.float32)  # the last squashed query's (always kept here)
        self.sig = np.empty(work_hw, np.float32)
        self.scratch = np.empty(work_hw, np.float32)
        self.probs = np.empty(work_hw, np.float32)
        self.counts = np.empty(work_hw, np.uint8)  # <= 100 instances per pixel
        self.has_logits = True

    def squash(self, q: int, keep_logits: bool) -> tuple[float, int]:
        """Query ``q``'s (h, w) logits upsampled and squashed; returns its mask score's (sum, count)."""
        low = _low(self.mask_logits, q)
        query_logits_at(low, self.meta, self.work_hw, out=self.logits, padded=self.padded)
        return _sum_pairs(_on_bands(self.pool, self.bands, _squash_band, (self.logits, self.sig, self.scratch)))

    def add(self, final: np.float32, first: bool) -> None:
        """Pastes the squashed query into its class's sums with score ``final`` (``first``: the class's first)."""
        if first:
            self.probs.fill(0)
            self.counts.fill(0)
        _on_bands(self.pool, self.bands, _add_instance_band, (self.sig, self.probs, self.counts, self.scratch), final)

    def vote(self, class_id: int, label_map: np.ndarray) -> None:
        """The class's pasted sums averaged and voted into the label map."""
        self.probs /= np.maximum(self.counts, 1).astype(np.float32)
        vote(self.probs, class_id, self.best, label_map)


class _FusedPixels(_Pixels):
    """The same work in the fused kernel: a query's two resizes as the one resampling they compose
    to (``composite_taps``), with the squash, in one pass that stores the logits only when asked.
    Used where the work size is not the label map's (``fast``, and photos past ``EXACT_MAX_PIXELS``);
    elsewhere ``_TiledPixels``."""

    def __init__(self, kernel: fused.PostKernel, pool: ThreadPoolExecutor, meta: PreprocessMeta,
                 work_hw: tuple[int, int], mask_logits: np.ndarray) -> None:
        self.pool, self.meta, self.work_hw, self.kernel, self.mask_logits = pool, meta, work_hw, kernel, mask_logits
        low_hw = mask_logits.shape[1:]
        self.bands = _bands(work_hw[0])
        self.cols = composite_taps(low_hw[1], meta.padded_hw[1], meta.resized_hw[1], work_hw[1])
        rows = composite_taps(low_hw[0], meta.padded_hw[0], meta.resized_hw[0], work_hw[0])
        self.row_bands = [rows.band(band) for band in self.bands]
        self.scratches = [np.empty((low_hw[0] + 1, work_hw[1]), np.float32) for _ in self.bands]
        self.logits = np.empty(work_hw, np.float32)
        self.sig = np.empty(work_hw, np.float32)
        self.probs = np.empty(work_hw, np.float32)
        self.counts = np.empty(work_hw, np.uint8)
        self.has_logits = False

    def squash(self, q: int, keep_logits: bool) -> tuple[float, int]:
        low = _low(self.mask_logits, q)
        logits = [self.logits[band] if keep_logits else None for band in self.bands]
        self.has_logits = keep_logits
        n = len(self.bands)
        return _sum_pairs(_map(self.pool, self.kernel.upsample_squash, [low] * n, [self.cols] * n, self.row_bands,
                               self.scratches, [self.sig[band] for band in self.bands], logits))

    def add(self, final: np.float32, first: bool) -> None:  # the first instance writes, not adds to zeros
        _on_bands(self.pool, self.bands, self.kernel.add_instance, (self.sig, self.probs, self.counts), final, first)

    def vote(self, class_id: int, label_map: np.ndarray) -> None:
        self.kernel.average(self.probs, self.counts)
        vote(self.probs, class_id, self.best, label_map, self.kernel)


class _TiledPixels(_FusedPixels):
    """The fused kernel where the work size is the label map's (``exact``, the default): two passes
    that write no full-size map but the label map. First every live query's mask score
    (``PostKernel.mask_scores``: the squash without storing it); then, once the thresholds have
    picked the instances, each band's labels from them (``PostKernel.paste_vote``: tile by tile of a
    few rows, each instance squashed again there and pasted, each class averaged and voted, all in
    the cache). At 720p a query's sig was 3.7 MB written and read again, its class's sums as much:
    post-processing streamed ~1.6 GB for a photo of ~100 queries. The same labels and scores to the
    bit as ``_FusedPixels``: the same operations on every pixel, the scores summed in the same order.
    A person's query is scored in the first pass too, and its mask is where its resampled logits are
    > 0 (``PostKernel.upsample_positive``: no sigmoid, no logits stored, what cannot be positive
    skipped); the full-size buffers it inherits are never touched (no pages)."""

    people_in_first_pass = True

    def __init__(self, kernel: fused.PostKernel, pool: ThreadPoolExecutor, meta: PreprocessMeta,
                 work_hw: tuple[int, int], mask_logits: np.ndarray) -> None:
        super().__init__(kernel, pool, meta, work_hw, mask_logits)
        self.query = -1  # the last query squashed
        self.scores: dict[int, tuple[float, int]] = {}  # each query's mask score's (sum, count)
        self.pending: list[tuple[int, float]] = []  # the current class's instances: (query, score)
        self.pasted: list[tuple[int, int, float]] = []  # (class, query, score), classes in increasing order

    def prepare(self, queries: list[int]) -> None:
        lows = [_low(self.mask_logits, q) for q in queries]
        bands = _map(self.pool, self.kernel.mask_scores, [lows] * len(self.bands), [self.cols] * len(self.bands),
                     self.row_bands)
        self.scores = {q: (sum(float(sums[i]) for sums, _ in bands), sum(int(counts[i]) for _, counts in bands))
                       for i, q in enumerate(queries)}

    def squash(self, q: int, keep_logits: bool) -> tuple[float, int]:
        self.query = q
        return self.scores[q]

    def person_mask(self, q: int) -> np.ndarray:
        mask = np.empty(self.meta.orig_hw, bool)  # work size = original here
        low = _low(self.mask_logits, q)
        _map(self.pool, lambda rows, band: self.kernel.upsample_positive(low, self.cols, rows, mask[band]),
             self.row_bands, self.bands)
        return mask

    def add(self, final: np.float32, first: bool) -> None:
        self.pending.append((self.query, float(final)))

    def vote(self, class_id: int, label_map: np.ndarray) -> None:
        self.pasted += [(class_id, q, score) for q, score in self.pending]
        self.pending = []

    def finish(self, label_map: np.ndarray) -> None:
        lows = [_low(self.mask_logits, q) for _, q, _ in self.pasted]
        scores = np.array([score for _, _, score in self.pasted], np.float32)
        classes = np.array([class_id for class_id, _, _ in self.pasted], np.uint8)
        n = len(self.bands)
        _map(self.pool, self.kernel.paste_vote, [lows] * n, [scores] * n, [classes] * n, [self.cols] * n,
             self.row_bands, [label_map[band] for band in self.bands])


def _low(mask_logits: np.ndarray, q: int) -> np.ndarray:
    """Query ``q``'s low-resolution logits as the kernels take them (C-contiguous float32)."""
    return np.ascontiguousarray(mask_logits[q], dtype=np.float32)


def _sum_pairs(sums: Iterable[tuple[float, int]]) -> tuple[float, int]:
    """Bands' (sum, count) pairs added up, in band order."""
    pairs = list(sums)
    return sum(t for t, _ in pairs), sum(n for _, n in pairs)


def to_result(
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    meta: PreprocessMeta,
    settings: InferenceSettings,
    classes: list[str],
    mode: Mode = "exact",
    trained: bool = True,
    kernel: fused.Choice = "built",
) -> ParsingResult:
    """Turns one image's raw outputs into a ParsingResult at the original resolution.

    Args:
        class_logits: (Q, C+1) float32.
        mask_logits: (Q, Hp/4, Wp/4) float32, on the padded input.
        meta: geometry from ``preprocess.prepare``.
        settings: the model card's inference settings.
        classes: the model card's class names (parsing classes first).
        mode: ``exact`` (per-pixel work at the original size, up to EXACT_MAX_PIXELS) or ``fast``
            (at model-input size).
        trained: copied to the result.
        kernel: the fused per-pixel kernel: "built" (the package's build when it loads), a
            ``fused.PostKernel``, or None (the OpenCV/numpy path). Same results within float rounding.
    """
    if class_logits.ndim != 2 or mask_logits.ndim != 3 or class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"expected (Q, C+1) and (Q, h, w), got {class_logits.shape} and {mask_logits.shape}")
    num_parsing, human = settings.num_parsing, settings.human_class_index
    work_hw = work_hw_for(meta, mode)
    floor = min(settings.part_score_thr, settings.human_score_thr, settings.parsing_ins_score_thr)

    scores, queries, labels = top_pairs(class_logits, settings.test_topk_per_image)
    live = scores >= floor  # pairs that can still pass some threshold after the mask score
    # Class by class, each class's queries in increasing order: one class's pasted sums are alive
    # at a time, voted into the label map as soon as its last instance is in (classes in increasing
    # order, as the argmax needs). Each class gets its instances in the same order as query by
    # query, so the sums are the same to the bit; and at 720p, 18 classes' 4.6 MB of fresh pages
    # cost more in first-touch faults than all the arithmetic (measured: ~0.15 s per photo here).
    order = sorted(zip(labels[live].tolist(), queries[live].tolist(), scores[live].tolist(), strict=True))
    people: list[tuple[float, int, np.ndarray]] = []  # (score, query, (H, W) bool mask at the original size)
    parts: list[tuple[float, int, PartInstance]] = []
    fast = fused.chosen(kernel)
    label_map = np.empty(meta.orig_hw, np.uint8)
    label_map.fill(0)  # written now, not on first use: a fresh page read and then written faults twice
    mask_scores: dict[int, float] = {}
    in_sig = -1  # the query squashed last (whose logits the buffers hold, if has_logits)
    # The per-pixel work runs on row bands in parallel (numpy, OpenCV and the kernel release the
    # GIL); each band's pixels get exactly the operations, in the same order, as without bands.
    with ThreadPoolExecutor(THREADS, thread_name_prefix="m2fp-post") as pool:
        pixels = (_NumpyPixels(pool, meta, work_hw, mask_logits) if fast is None
                  else _TiledPixels(fast, pool, meta, work_hw, mask_logits) if work_hw == meta.orig_hw
                  else _FusedPixels(fast, pool, meta, work_hw, mask_logits))
        pixels.prepare(sorted({q for label, q, _ in order if label != human or pixels.people_in_first_pass}))
        for label, group in itertools.groupby(order, key=lambda pair: pair[0]):
            pasted = False
            for _, q, score in group:
                # A query is squashed once, unless it has pairs of several classes (its logits are
                # needed only for a person's mask).
                if q != in_sig or (label == human and not pixels.has_logits):
                    total, count = pixels.squash(q, keep_logits=label == human)
                    mask_scores.setdefault(q, total / (count + 1e-6))
                    in_sig = q
                final = np.float32(score) * np.float32(mask_scores[q])
                if label == human:
                    if final > settings.human_score_thr:
                        people.append((float(final), q, pixels.person_mask(q)))
                    continue
                if label != 0 and final >= settings.part_score_thr:
                    parts.append((float(final), q, PartInstance(label, float(final))))
                if final < settings.parsing_ins_score_thr or label >= num_parsing:
                    continue
                pixels.add(final, first=not pasted)
                pasted = True
            if pasted:
                pixels.vote(label, label_map)
        pixels.finish(label_map)

    people.sort(key=lambda p: (-p[0], p[1]))  # by score, ties by query (the order they were found in)
    parts.sort(key=lambda p: (-p[0], p[1]))
    masks = np.zeros((len(people), *meta.orig_hw), bool)
    for i, (_, _, mask) in enumerate(people):
        masks[i] = mask
    return ParsingResult(
        label_map=label_map,
        classes=classes[:num_parsing],
        person_masks=masks,
        person_scores=np.asarray([p[0] for p in people], np.float32),
        parts=[part for _, _, part in parts],
        trained=trained,
    )
