"""Tests for ``m2fp_service.imaging.postprocess``.

Small pure functions are checked on hand-written arrays and against torch; ``to_result`` is
checked end to end against ModelScope's own ``M2FP.postprocess`` (and the methods it calls),
run on synthetic but confident class and mask logits.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2fp_service.imaging import postprocess
from m2fp_service.imaging.postprocess import (
    mask_score,
    query_logits_at,
    resize_bilinear,
    sigmoid,
    softmax,
    to_result,
    top_pairs,
    vote,
    work_hw_for,
)
from m2fp_service.imaging.preprocess import PreprocessMeta, padded_hw, resized_hw
from m2fp_service.modelcard import InferenceSettings
from m2fp_service.result import ParsingResult

SETTINGS = InferenceSettings()
NUM_QUERIES, NUM_CLASSES = 100, 21  # ModelScope's multi-person M2FP: 20 parsing classes + human
CLASSES = [f"class{i}" for i in range(NUM_CLASSES)]


def _torch_resize(img: np.ndarray, hw: tuple[int, int], dtype: type = np.float64) -> np.ndarray:
    """``F.interpolate(bilinear, align_corners=False)``, by default in float64.

    In float32, torch computes the source coordinate ``(dst + 0.5) * (in / out) - 0.5`` in
    float32, which for non-integer downscales drifts by ~1e-4 px (up to ~1e-3 in value on these
    test maps); OpenCV computes it in double. float64 torch is the exact formula.
    """
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=dtype))[None, None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()  # type: ignore[no-any-return]


def _meta(orig: tuple[int, int], short_edge: int = 640, max_long_edge: int = 1333) -> PreprocessMeta:
    new = resized_hw(orig, short_edge, max_long_edge)
    return PreprocessMeta(orig, new, padded_hw(new, 32))


# ---------------------------------------------------------------------------------------------
# softmax, sigmoid
# ---------------------------------------------------------------------------------------------


def test_softmax_hand_values() -> None:
    got = softmax(np.array([[0.0, 0.0], [0.0, np.log(3.0)]], np.float32))
    np.testing.assert_allclose(got, [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6)


def test_softmax_matches_torch_and_survives_large_logits() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.normal(0, 30, (50, 22)) + 1000).astype(np.float32)  # exp(1000) would overflow
    got = softmax(logits)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, torch.softmax(torch.from_numpy(logits), -1).numpy(), atol=1e-6)
    np.testing.assert_allclose(softmax(logits, axis=0), torch.softmax(torch.from_numpy(logits), 0).numpy(), atol=1e-6)


def test_sigmoid_matches_torch() -> None:
    x = np.array([-30.0, -5.0, -1.0, 0.0, 1.0, 5.0, 30.0], np.float32)
    got = sigmoid(x)
    assert got[3] == 0.5
    np.testing.assert_allclose(got, torch.sigmoid(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got + sigmoid(-x), 1.0, rtol=1e-6)


def test_sigmoid_saturates_on_extreme_logits() -> None:
    x = np.array([[-1e4, -100.0, -np.inf], [1e4, 100.0, np.inf]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings either
        got = sigmoid(x)
    np.testing.assert_array_equal(got, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


# ---------------------------------------------------------------------------------------------
# resize_bilinear, query_logits_at
# ---------------------------------------------------------------------------------------------

RESIZES = [
    # (src_hw, dst_hw)
    pytest.param((4, 4), (8, 8), id="up-2x"),
    pytest.param((4, 4), (16, 16), id="up-4x"),
    pytest.param((3, 5), (7, 11), id="up-odd"),
    pytest.param((160, 216), (640, 864), id="up-4x-model-masks"),
    pytest.param((1, 7), (3, 2), id="mixed-from-one-row"),
    pytest.param((8, 8), (4, 4), id="down-2x"),
    pytest.param((12, 12), (3, 3), id="down-4x"),
    pytest.param((9, 7), (4, 3), id="down-odd"),
    pytest.param((640, 994), (333, 517), id="down-model-to-orig"),
    pytest.param((16, 12), (5, 40), id="down-h-up-w"),
    pytest.param((5, 6), (5, 6), id="same-size"),
]


@pytest.mark.parametrize(("src", "dst"), RESIZES)
def test_resize_bilinear_matches_torch_interpolate(src: tuple[int, int], dst: tuple[int, int]) -> None:
    img = (np.random.default_rng(sum(src) + sum(dst)).normal(0, 5, src)).astype(np.float32)
    got = resize_bilinear(img, dst)
    assert got.shape == dst
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _torch_resize(img, dst), rtol=0, atol=1e-5)
    # What ModelScope actually runs (float32 torch) differs only by its coordinate rounding.
    np.testing.assert_allclose(got, _torch_resize(img, dst, np.float32), rtol=0, atol=2e-3)


def test_resize_bilinear_hand_values() -> None:
    # Half-pixel centres: output pixel j of a 2 -> 4 upsampling samples at (j + 0.5) / 2 - 0.5,
    # i.e. -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
    got = resize_bilinear(np.array([[0.0, 4.0]], np.float32), (1, 4))
    np.testing.assert_allclose(got, [[0.0, 1.0, 3.0, 4.0]], atol=1e-6)
    # A 2x downsampling averages each pair.
    got = resize_bilinear(np.array([[0.0, 2.0, 4.0, 8.0]], np.float32), (1, 2))
    np.testing.assert_allclose(got, [[1.0, 6.0]], atol=1e-6)


@pytest.mark.parametrize("orig", [(150, 200), (333, 517), (720, 720), (300, 100)])
def test_query_logits_at_matches_modelscope_chain(orig: tuple[int, int]) -> None:
    meta = _meta(orig)
    q = np.random.default_rng(0).normal(0, 5, (meta.padded_hw[0] // 4, meta.padded_hw[1] // 4)).astype(np.float32)
    padded = _torch_resize(q, meta.padded_hw)
    expected = _torch_resize(padded[: meta.resized_hw[0], : meta.resized_hw[1]], meta.orig_hw)
    got = query_logits_at(q, meta, meta.orig_hw)
    assert got.shape == meta.orig_hw
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    padded32 = _torch_resize(q, meta.padded_hw, np.float32)
    expected32 = _torch_resize(padded32[: meta.resized_hw[0], : meta.resized_hw[1]], meta.orig_hw, np.float32)
    np.testing.assert_allclose(got, expected32, rtol=0, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# top_pairs, mask_score
# ---------------------------------------------------------------------------------------------


def test_top_pairs_hand_example() -> None:
    # 2 queries x (3 classes + no-object); softmax rows are [.1, .2, .3, .4] and [.4, .3, .2, .1].
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], np.float32))
    scores, queries, labels = top_pairs(logits, 3)
    got = sorted(zip([round(float(s), 5) for s in scores], queries.tolist(), labels.tolist(), strict=True))
    assert got == [(0.3, 0, 2), (0.3, 1, 1), (0.4, 1, 0)]


def test_top_pairs_k_larger_than_pairs_returns_all() -> None:
    logits = np.zeros((2, 4), np.float32)
    scores, queries, labels = top_pairs(logits, 100)
    assert scores.shape == queries.shape == labels.shape == (6,)
    assert sorted(zip(queries.tolist(), labels.tolist(), strict=True)) == [(q, c) for q in range(2) for c in range(3)]


@pytest.mark.parametrize(("num_queries", "num_classes", "k"), [(100, 21, 100), (10, 5, 7), (30, 21, 1)])
def test_top_pairs_same_set_as_torch_topk(num_queries: int, num_classes: int, k: int) -> None:
    logits = np.random.default_rng(k).normal(0, 3, (num_queries, num_classes + 1)).astype(np.float32)
    scores, queries, labels = top_pairs(logits, k)
    assert scores.shape == queries.shape == labels.shape == (k,)
    probs = torch.softmax(torch.from_numpy(logits), -1)[:, :-1]
    ref_scores, ref_idx = probs.flatten().topk(k, sorted=False)
    ours = {(int(q), int(c)) for q, c in zip(queries, labels, strict=True)}
    theirs = {(int(i) // num_classes, int(i) % num_classes) for i in ref_idx}
    assert ours == theirs
    np.testing.assert_allclose(np.sort(scores), np.sort(ref_scores.numpy()), rtol=1e-5)
    # Each score is the softmax probability of its own pair.
    np.testing.assert_allclose(scores, probs.numpy()[queries, labels], rtol=1e-6)


MASK_SCORES = [
    # (logits, expected)
    pytest.param([[-1.0, -2.0], [-3.0, 0.0]], 0.0, id="no-positive-pixel"),  # 0 is not > 0
    pytest.param([[1.0, -1.0], [0.0, -5.0]], 0.7310586 / (1 + 1e-6), id="one-positive"),
    pytest.param([[2.0, 2.0], [2.0, 2.0]], 0.8807971 * 4 / (4 + 1e-6), id="all-positive"),
    pytest.param([[10.0, -10.0], [1.0, -1.0]], (0.9999546 + 0.7310586) / (2 + 1e-6), id="mixed"),
]


@pytest.mark.parametrize(("logits", "expected"), MASK_SCORES)
def test_mask_score_hand_values(logits: list[list[float]], expected: float) -> None:
    assert mask_score(np.array(logits, np.float32)) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_mask_score_matches_modelscope_formula() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(rng.uniform(-3, 3), 4, (37, 53)).astype(np.float32)
        t = torch.from_numpy(logits)[None]
        binary = (t > 0).float()
        expected = (t.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        assert mask_score(logits) == pytest.approx(float(expected[0]), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# vote (the argmax, class by class), work_hw_for
# ---------------------------------------------------------------------------------------------


def _a(rows: list[list[float]]) -> np.ndarray:
    return np.array(rows, np.float32)


ARGMAX = [
    # (class_probs, out_hw, expected)
    pytest.param({}, (2, 3), [[0, 0, 0], [0, 0, 0]], id="no-classes-all-background"),
    pytest.param(
        {1: _a([[0.0, 0.9], [0.0, 0.0]]), 2: _a([[0.0, 0.0], [0.7, 0.0]])},
        (2, 2),
        [[0, 1], [2, 0]],
        id="all-zero-pixels-are-background",
    ),
    pytest.param({1: _a([[0.5, 0.2]]), 2: _a([[0.5, 0.3]])}, (1, 2), [[1, 2]], id="tie-goes-to-lower-id"),
    pytest.param({2: _a([[0.5, 0.3]]), 1: _a([[0.5, 0.2]])}, (1, 2), [[1, 2]], id="tie-independent-of-dict-order"),
    pytest.param({0: _a([[0.6, 0.2]]), 3: _a([[0.6, 0.4]])}, (1, 2), [[0, 3]], id="tie-with-background-is-0"),
    pytest.param({7: _a([[0.1, 0.0]]), 19: _a([[0.0, 0.2]])}, (1, 2), [[7, 19]], id="absent-classes-skipped"),
    pytest.param(
        {
            0: _a([[0.9, 0.1, 0.1, 0.1]] * 4),
            4: _a([[0.0, 0.8, 0.8, 0.0]] * 4),
            5: _a([[0.0, 0.0, 0.95, 0.7]] * 4),
        },
        (4, 4),
        [[0, 4, 5, 5]] * 4,
        id="4x4-three-classes",
    ),
    # 1 x 2 -> 1 x 4 bilinear gives 0, 0.25, 0.75, 1: only the first pixel stays background.
    pytest.param({1: _a([[0.0, 1.0]])}, (1, 4), [[0, 1, 1, 1]], id="resized-bilinearly-first"),
    pytest.param({1: _a([[0.0, 0.0, 1.0, 1.0]])}, (1, 2), [[0, 1]], id="downsized-bilinearly-first"),
]


def argmax_label_map(class_probs: dict[int, np.ndarray], out_hw: tuple[int, int],
                     kernel: Any = None) -> np.ndarray:
    """The label map ``to_result`` builds from class maps: ``vote`` for each class in increasing order."""
    best, label_map = np.zeros(out_hw, np.float32), np.zeros(out_hw, np.uint8)
    for c in sorted(class_probs):
        vote(class_probs[c], c, best, label_map, kernel)
    return label_map


@pytest.mark.parametrize(("probs", "out_hw", "expected"), ARGMAX)
def test_argmax_label_map(probs: dict[int, np.ndarray], out_hw: tuple[int, int], expected: list[list[int]]) -> None:
    got = argmax_label_map(probs, out_hw)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.array(expected, np.uint8))


def test_argmax_label_map_matches_torch_argmax_over_all_classes() -> None:
    rng = np.random.default_rng(0)
    probs = {}
    for c in (0, 2, 3, 9, 19):  # the others are absent, i.e. all zero
        p = rng.uniform(0, 1, (24, 31)).astype(np.float32)
        p[p < 0.6] = 0.0  # many zeros, so many ties with absent classes and all-zero pixels
        probs[c] = np.round(p, 1)  # and some exact ties between present classes
    stacked = torch.zeros((20, 24, 31))
    for c, p in probs.items():
        stacked[c] = torch.from_numpy(p)
    np.testing.assert_array_equal(argmax_label_map(probs, (24, 31)), stacked.argmax(0).numpy())


WORK_HW = [
    # (orig_hw, resized_hw, mode, expected)
    pytest.param((100, 150), (640, 960), "exact", (100, 150), id="exact-small"),
    pytest.param((100, 150), (640, 960), "fast", (100, 150), id="fast-small-stays-orig"),
    pytest.param((1000, 1500), (640, 960), "exact", (1000, 1500), id="exact-large"),
    pytest.param((1000, 1500), (640, 960), "fast", (640, 960), id="fast-large-uses-model-size"),
    pytest.param((640, 640), (640, 640), "fast", (640, 640), id="fast-equal"),
    pytest.param((20, 80), (40, 40), "fast", (20, 80), id="fast-equal-area-keeps-orig"),
    pytest.param((3000, 100), (1333, 44), "fast", (1333, 44), id="fast-capped-tall"),
    # fast keeps the photo's size up to twice the model input's pixels (faster there, and exact)
    pytest.param((720, 1280), (640, 1138), "fast", (720, 1280), id="fast-720p-keeps-orig"),
    pytest.param((900, 1600), (640, 1138), "fast", (900, 1600), id="fast-1.98x-keeps-orig"),
    pytest.param((1080, 1920), (640, 1138), "fast", (640, 1138), id="fast-1080p-uses-model-size"),
]


@pytest.mark.parametrize(("orig", "resized", "mode", "expected"), WORK_HW)
def test_work_hw_for(orig: tuple[int, int], resized: tuple[int, int], mode: Any, expected: tuple[int, int]) -> None:
    meta = PreprocessMeta(orig, resized, padded_hw(resized, 32))
    assert work_hw_for(meta, mode) == expected


# ---------------------------------------------------------------------------------------------
# to_result: small hand-made cases
# ---------------------------------------------------------------------------------------------

TINY = InferenceSettings(num_parsing=3, human_class_index=3, test_topk_per_image=8)
TINY_CLASSES = ["bg", "hat", "face", "person"]
TINY_META = PreprocessMeta((8, 8), (8, 8), (8, 8))


def _tiny_outputs() -> tuple[np.ndarray, np.ndarray]:
    """3 queries x (4 classes + no-object) on an 8x8 image; mask logits are 2x2 (stride 4)."""
    class_logits = np.full((3, 5), -10.0, np.float32)
    class_logits[0, 1] = 10.0  # query 0: hat
    class_logits[1, 3] = 10.0  # query 1: a person
    class_logits[2, 4] = 10.0  # query 2: no object
    mask_logits = np.full((3, 2, 2), -10.0, np.float32)
    mask_logits[0] = [[10.0, 10.0], [-10.0, -10.0]]  # hat over the top half
    mask_logits[1] = 10.0  # the person covers everything
    mask_logits[2] = 10.0
    return class_logits, mask_logits


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_to_result_tiny_hand_example(mode: Any) -> None:
    class_logits, mask_logits = _tiny_outputs()
    result = to_result(class_logits, mask_logits, TINY_META, TINY, TINY_CLASSES, mode=mode, trained=False)
    assert isinstance(result, ParsingResult)
    assert result.classes == ["bg", "hat", "face"]
    assert result.trained is False
    expected = np.zeros((8, 8), np.uint8)
    expected[:4] = 1  # the 2x2 -> 8x8 upsampling crosses zero exactly between rows 3 and 4
    np.testing.assert_array_equal(result.label_map, expected)
    assert result.num_people == 1
    assert result.person_masks.shape == (1, 8, 8) and result.person_masks.all()
    assert result.person_scores.dtype == np.float32
    assert result.person_scores[0] == pytest.approx(1.0, abs=1e-3)
    assert [p.class_id for p in result.parts] == [1]
    # Mask score: mean sigmoid over the positive rows 0-3, whose logits are 10, 10, 7.5, 2.5.
    expected_score = (2 * 0.9999546 + 0.9994472 + 0.9241418) / 4
    assert result.parts[0].score == pytest.approx(expected_score, rel=1e-5)


def test_to_result_nothing_detected_is_empty() -> None:
    class_logits = np.zeros((5, 22), np.float32)
    class_logits[:, -1] = 20.0  # every query says "no object"
    meta = PreprocessMeta((10, 12), (640, 768), (640, 768))
    mask_logits = np.full((5, 160, 192), 5.0, np.float32)
    result = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode="exact")
    assert result.hw == (10, 12)
    assert not result.label_map.any()
    assert result.num_people == 0 and result.person_masks.shape == (0, 10, 12)
    assert result.parts == []
    assert len(result.classes) == 20


def test_to_result_low_scores_are_dropped_by_each_threshold() -> None:
    # Query 0: hat at 0.3 (a part, but too weak to paste); query 1: a person at 0.05 (too weak);
    # query 3: a person at 0.15 whose mask score (sigmoid(0.01) ~ 0.5025) takes it to 0.075 (too weak).
    class_logits = np.full((4, 5), -30.0, np.float32)
    class_logits[0, [1, 4]] = np.log([0.3, 0.7])
    class_logits[1, [3, 4]] = np.log([0.05, 0.95])
    class_logits[2, 4] = 0.0
    class_logits[3, [3, 4]] = np.log([0.15, 0.85])
    mask_logits = np.full((4, 2, 2), 30.0, np.float32)  # mask score ~1
    mask_logits[3] = 0.01
    result = to_result(class_logits, mask_logits, TINY_META, TINY, TINY_CLASSES, mode="exact")
    assert not result.label_map.any()
    assert result.num_people == 0
    assert [p.class_id for p in result.parts] == [1]
    assert result.parts[0].score == pytest.approx(0.3, rel=1e-4)


TO_RESULT_REJECTS = [
    # (class_logits shape, mask_logits shape, raises)
    pytest.param((3, 5), (3, 2, 2), None, id="ok"),
    pytest.param((1, 3, 5), (3, 2, 2), ValueError, id="batched-class-logits"),
    pytest.param((3, 5), (1, 3, 2, 2), ValueError, id="batched-mask-logits"),
    pytest.param((3, 5), (4, 2, 2), ValueError, id="query-count-mismatch"),
    pytest.param((15,), (3, 2, 2), ValueError, id="flat-class-logits"),
]


@pytest.mark.parametrize(("cls_shape", "mask_shape", "raises"), TO_RESULT_REJECTS)
def test_to_result_checks_shapes(
    cls_shape: tuple[int, ...], mask_shape: tuple[int, ...], raises: type[Exception] | None
) -> None:
    with pytest.raises(raises, match=r"expected \(Q, C\+1\)") if raises else contextlib.nullcontext():
        to_result(np.zeros(cls_shape, np.float32), np.zeros(mask_shape, np.float32), TINY_META, TINY, TINY_CLASSES)


# ---------------------------------------------------------------------------------------------
# to_result end to end against ModelScope's torch post-processing
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def m2fp_class() -> type:
    from m2fp_export import msda

    msda.install()
    with warnings.catch_warnings():  # timm/modelscope deprecation noise at import time
        warnings.simplefilter("ignore", FutureWarning)
        from modelscope.models.cv.image_human_parsing.m2fp_net import M2FP
    return M2FP  # type: ignore[no-any-return]


def modelscope_parsing(
    m2fp: type, class_logits: np.ndarray, mask_logits: np.ndarray, meta: PreprocessMeta
) -> dict[str, Any]:
    """ModelScope's own ``M2FP.postprocess`` (multi-person, ``parsing_on``) on raw outputs.

    The methods are ModelScope's, bound to a namespace holding only the attributes they read, so
    no network is built. Returns the ``parsing`` dict: semantic_outputs, part_outputs, human_outputs.
    """
    model = types.SimpleNamespace(
        num_classes=NUM_CLASSES,
        num_queries=NUM_QUERIES,
        test_topk_per_image=100,
        num_parsing=SETTINGS.num_parsing,
        parsing_ins_score_thr=SETTINGS.parsing_ins_score_thr,
        device=torch.device("cpu"),
        training=False,
        single_human=False,
        sem_seg_postprocess_before_inference=True,
        semantic_on=False,
        parsing_on=True,
    )
    for name in (
        "postprocess",
        "sem_seg_postprocess",
        "instance_parsing_inference",
        "paste_instance_to_semseg_probs",
        "paste_category_probs",
    ):
        setattr(model, name, types.MethodType(getattr(m2fp, name), model))
    images = types.SimpleNamespace(tensor=torch.empty(1, 3, *meta.padded_hw), image_sizes=[meta.resized_hw])
    inputs = {
        "outputs": {
            "pred_logits": torch.from_numpy(class_logits)[None],
            "pred_masks": torch.from_numpy(mask_logits)[None],
        },
        "batched_inputs": [{"height": meta.orig_hw[0], "width": meta.orig_hw[1]}],
        "images": images,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than OpenMP threads on a busy CI box; restored below
    try:
        with torch.no_grad():
            out = model.postprocess(inputs)
    finally:
        torch.set_num_threads(threads)
    return out["eval_result"][0]["parsing"]  # type: ignore[no-any-return]


def synthetic_outputs(meta: PreprocessMeta, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Confident (Q=100, C+1=22) class logits and blobby (Q, Hp/4, Wp/4) mask logits in about +-10.

    Queries 0-2 are people, 3 is background, 4-19 confident parts (classes repeat, so some pixels
    get pasted twice), 20-23 parts at ~0.3 (counted as parts, never pasted); the rest say
    "no object".
    """
    rng = np.random.default_rng(seed)
    h4, w4 = meta.padded_hw[0] // 4, meta.padded_hw[1] // 4
    class_logits = rng.normal(0, 1, (NUM_QUERIES, NUM_CLASSES + 1)).astype(np.float32)
    class_logits[:, NUM_CLASSES] += 8.0
    labels = [20, 20, 20, 0, *rng.integers(1, 20, 16).tolist()]
    for q, label in enumerate(labels):
        class_logits[q, NUM_CLASSES] -= 8.0
        class_logits[q, label] += 10.0
    for q, label in enumerate(rng.integers(1, 20, 4).tolist(), start=len(labels)):
        class_logits[q, NUM_CLASSES] -= 8.0
        class_logits[q, label] += 1.5 + np.log(0.3 * NUM_CLASSES)

    yy, xx = np.mgrid[0:h4, 0:w4].astype(np.float32)
    rh, rw = meta.resized_hw[0] / 4, meta.resized_hw[1] / 4  # blobs on the image, not the padding
    mask_logits = np.empty((NUM_QUERIES, h4, w4), np.float32)
    for q in range(NUM_QUERIES):
        blobs = np.zeros((h4, w4), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, rh), rng.uniform(0, rw)
            sy, sx = rng.uniform(0.05, 0.3) * rh, rng.uniform(0.05, 0.3) * rw
            blobs += np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
        mask_logits[q] = np.clip(blobs, 0, 1) * 20 - 10 + rng.normal(0, 0.5, (h4, w4))
    return class_logits, mask_logits


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


GEOMETRIES = [
    # (orig_hw, short_edge): the smaller short edges keep ModelScope's (Q, H, W) tensors small
    # while the original image is larger than the model input.
    pytest.param((150, 200), 640, id="orig-smaller-640x853-pad-to-864"),
    pytest.param((300, 100), 640, id="orig-smaller-long-edge-capped-1333x444"),
    pytest.param((520, 700), 384, id="orig-larger-384x517-pad-to-544"),
    pytest.param((333, 517), 256, id="orig-larger-256x397-pad-to-416"),
]


@pytest.mark.parametrize("kernel", ["built", None], ids=["fused-kernel", "opencv-numpy"])
@pytest.mark.parametrize(("orig", "short_edge"), GEOMETRIES)
def test_to_result_exact_matches_modelscope(orig: tuple[int, int], short_edge: int, kernel: Any,
                                            m2fp_class: type) -> None:
    """Both per-pixel paths: the fused kernel (when built; tests/imaging/test_fused.py requires it in
    CI) and the OpenCV/numpy one."""
    meta = _meta(orig, short_edge)
    class_logits, mask_logits = synthetic_outputs(meta, seed=sum(orig))
    ref = modelscope_parsing(m2fp_class, class_logits, mask_logits, meta)
    ours = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode="exact", kernel=kernel)

    ref_map = ref["semantic_outputs"].argmax(0).numpy()
    assert ref_map.shape == ours.label_map.shape == orig
    # Non-trivial: several classes painted, several people found.
    assert len(np.unique(ref_map)) >= 4
    assert len(ref["human_outputs"]) >= 2
    agreement = float((ref_map == ours.label_map).mean())
    print(f"\nexact vs ModelScope {orig}: label agreement {agreement:.6f}, classes {len(np.unique(ref_map))}")
    assert agreement >= 0.999, agreement

    humans = sorted(ref["human_outputs"], key=lambda h: -h["score"])
    assert ours.num_people == len(humans)
    np.testing.assert_allclose(ours.person_scores, [h["score"] for h in humans], rtol=1e-4)
    for i, human in enumerate(humans):
        assert _iou(ours.person_masks[i], (human["mask"] > 0).numpy()) >= 0.99, i

    ref_parts = sorted(((p["score"], p["category_id"]) for p in ref["part_outputs"]), reverse=True)
    assert len(ours.parts) == len(ref_parts)
    assert sorted(p.class_id for p in ours.parts) == sorted(c for _, c in ref_parts)
    np.testing.assert_allclose([p.score for p in ours.parts], [s for s, _ in ref_parts], rtol=1e-4)

    if work_hw_for(meta, "fast") != orig:  # report how far the fast shortcut is from the reference
        fast = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode="fast")
        print(
            f"fast vs ModelScope {orig} -> work {meta.resized_hw}: label agreement "
            f"{float((fast.label_map == ref_map).mean()):.5f}, people {fast.num_people}/{len(humans)}"
        )


@pytest.mark.parametrize("orig", [(150, 200), (333, 517), (300, 100), (720, 720), (700, 1100)])
def test_to_result_fast_is_exact_up_to_twice_the_input_pixels(orig: tuple[int, int]) -> None:
    meta = _meta(orig)
    class_logits, mask_logits = synthetic_outputs(meta, seed=sum(orig))
    exact = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode="exact")
    fast = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode="fast")
    np.testing.assert_array_equal(fast.label_map, exact.label_map)
    np.testing.assert_array_equal(fast.person_masks, exact.person_masks)
    np.testing.assert_array_equal(fast.person_scores, exact.person_scores)
    assert fast.parts == exact.parts


@pytest.mark.parametrize("orig", [(1000, 1000), (1200, 1200), (1000, 1700)])
def test_to_result_fast_close_to_exact_when_image_larger(orig: tuple[int, int]) -> None:
    meta = _meta(orig)
    assert work_hw_for(meta, "fast") == meta.resized_hw != orig
    class_logits, mask_logits = synthetic_outputs(meta, seed=sum(orig))
    exact = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode="exact")
    fast = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode="fast")
    agreement = float((fast.label_map == exact.label_map).mean())
    ious = [_iou(f, e) for f, e in zip(fast.person_masks, exact.person_masks, strict=True)]
    print(
        f"\nfast vs exact {orig} -> work {meta.resized_hw}: label agreement {agreement:.5f}, "
        f"people {fast.num_people}/{exact.num_people}, person IoU min {min(ious, default=1.0):.4f}, "
        f"parts {len(fast.parts)}/{len(exact.parts)}"
    )
    assert fast.label_map.shape == exact.label_map.shape == orig
    assert agreement >= 0.98
    assert fast.num_people == exact.num_people >= 2
    assert min(ious) >= 0.97
    np.testing.assert_allclose(fast.person_scores, exact.person_scores, rtol=1e-2)
    # Parts with nearly equal scores may swap places; the multiset of classes must not change.
    assert sorted(p.class_id for p in fast.parts) == sorted(p.class_id for p in exact.parts)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_to_result_bands_on_threads_change_nothing(mode: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-pixel work split into row bands on threads gives what one band on one thread gives."""
    meta = _meta((700, 1100))
    class_logits, mask_logits = synthetic_outputs(meta, seed=7)
    results = {}
    for threads in (1, 2, 3):
        monkeypatch.setattr(postprocess, "THREADS", threads)
        results[threads] = to_result(class_logits, mask_logits, meta, SETTINGS, CLASSES, mode=mode)
    one = results[1]
    assert len(np.unique(one.label_map)) >= 4 and one.num_people >= 2  # something to disagree about
    for threads in (2, 3):
        got = results[threads]
        np.testing.assert_array_equal(got.label_map, one.label_map)
        np.testing.assert_array_equal(got.person_masks, one.person_masks)
        np.testing.assert_allclose(got.person_scores, one.person_scores, rtol=1e-6)
        assert [p.class_id for p in got.parts] == [p.class_id for p in one.parts]
        np.testing.assert_allclose([p.score for p in got.parts], [p.score for p in one.parts], rtol=1e-6)
