"""The render stage (``outputs.render``) on the tiny model's parsing of the photo, and the result cache."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from m2fp_service import pipeline
from m2fp_service.engine import ParsingEngine
from m2fp_service.errors import InvalidParameter
from m2fp_service.imaging.compose import MODES, ComposeOptions
from m2fp_service.labels import pascal_palette
from m2fp_service.labelsets import LABEL_SET_NAMES, TABLES, label_set
from m2fp_service.limits import ImageLimits
from m2fp_service.outputs import (
    OUTPUT_NAMES,
    ComposeSpec,
    Rendered,
    RenderRequest,
    parse_output_names,
    render,
)
from m2fp_service.pipeline import ResultCache
from m2fp_service.result import ParsingResult
from m2fp_service.selection import Keep
from m2fp_service.timings import Timings

MARGIN_PX = 16
PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def decode(data: bytes, fmt: str = "png") -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == PIL_FORMATS[fmt]
    return np.asarray(image)


@pytest.fixture(scope="module")
def result(engine: ParsingEngine, photo: np.ndarray) -> ParsingResult:
    parsed = pipeline.parse_array(engine, photo)
    assert parsed.num_people >= 2 and len(parsed.class_areas()) >= 5, "the tiny model must find people and parts"
    return parsed


@pytest.fixture(scope="module")
def cihp(engine: ParsingEngine):  # type: ignore[no-untyped-def]
    return label_set("cihp", engine.card.palette)


@pytest.fixture(scope="module")
def small_person(result: ParsingResult) -> int:
    """The id of the person with the smallest non-empty mask: keeping them leaves much to replace."""
    areas = result.person_masks.reshape(result.num_people, -1).sum(axis=1)
    candidates = [i for i in range(result.num_people) if areas[i]]
    return min(candidates, key=lambda i: areas[i])


@pytest.fixture(scope="module")
def everything(photo: np.ndarray, result: ParsingResult, cihp) -> tuple[Rendered, Timings]:  # type: ignore[no-untyped-def]
    timings = Timings()
    request = RenderRequest(outputs=frozenset(OUTPUT_NAMES), labels=cihp, compose=ComposeSpec())
    return render(photo, result, request, timings=timings), timings


def test_every_output_renders_and_decodes(everything: tuple[Rendered, Timings], photo: np.ndarray,
                                          result: ParsingResult, cihp) -> None:  # type: ignore[no-untyped-def]
    out, timings = everything
    h, w = photo.shape[:2]
    assert set(timings.seconds) == {"compose", "encode"}
    assert out.result is result  # CIHP: no relabelling
    assert out.palette == list(cihp.palette)

    color = decode(out.color)  # type: ignore[arg-type]
    assert color.shape == (h, w, 3)
    label = decode(out.label)  # type: ignore[arg-type]
    assert label.shape == (h, w) and label.dtype == np.uint8
    assert (label == result.label_map).all()
    lut = np.asarray(out.palette, np.uint8)
    assert (color == lut[label]).all()

    overlay = decode(out.overlay).astype(int)  # type: ignore[arg-type]
    assert overlay.shape == (h, w, 3)
    bg = label == 0
    assert (overlay[bg] == photo[bg]).all()
    expected = (photo.astype(int) + lut[label].astype(int)) / 2
    assert np.abs(overlay[~bg] - expected[~bg]).max() <= 1
    assert (~bg).any()

    cutout = decode(out.cutout)  # type: ignore[arg-type]
    assert cutout.shape == (h, w, 4)
    fg = (result.label_map > 0) | result.person_masks.any(axis=0)
    assert (cutout[..., 3] == np.where(fg, 255, 0)).all()
    assert (cutout[..., :3] == photo).all()
    assert {0, 255} <= set(np.unique(cutout[..., 3]).tolist())

    assert out.masks is not None and len(out.masks) == len(out.classes_present) >= 5
    covered = np.zeros((h, w), bool)
    for name, data in zip(out.classes_present, out.masks, strict=True):
        mask = decode(data)
        assert mask.shape == (h, w) and set(np.unique(mask).tolist()) == {0, 255}
        assert ((mask == 255) == (label == result.classes.index(name))).all()
        covered |= mask == 255
    assert covered.all()

    assert out.areas == result.class_areas() and sum(out.areas.values()) == h * w
    assert out.classes_present == list(out.areas)

    assert out.people is not None and len(out.people) == result.num_people
    for i, person in enumerate(out.people):
        assert set(person) == {"id", "score", "box_xyxy", "area", "parts", "mask"}
        assert person["id"] == i and 0 < person["score"] <= 1
        mask = decode(person["mask"])
        assert mask.shape == (h, w) and ((mask == 255) == result.person_masks[i]).all()
        assert person["area"] == int(result.person_masks[i].sum())
        assert sum(person["parts"].values()) == person["area"]

    assert out.composite is not None
    picture = out.composite
    assert (picture.format, picture.media_type, picture.suffix) == ("png", "image/png", ".png")
    assert (picture.width, picture.height, picture.has_alpha) == (w, h, True)
    composite = decode(picture.data)
    assert composite.shape == (h, w, 4)


def test_people_without_masks(photo: np.ndarray, result: ParsingResult, cihp) -> None:  # type: ignore[no-untyped-def]
    out = render(photo, result, RenderRequest(outputs=frozenset({"people"}), labels=cihp, person_masks=False))
    assert out.people is not None and len(out.people) == result.num_people
    assert all("mask" not in person for person in out.people)
    assert out.color is None and out.masks is None and out.composite is None and out.areas is None


def test_nothing_asked_nothing_rendered(photo: np.ndarray, result: ParsingResult, cihp) -> None:  # type: ignore[no-untyped-def]
    out = render(photo, result, RenderRequest(outputs=frozenset(), labels=cihp))
    assert all(getattr(out, name) is None for name in OUTPUT_NAMES)
    assert out.classes_present == list(result.class_areas())


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [(m, f) for m in MODES for f in ("png", "webp", "jpeg") if (m, f) != ("transparent", "jpeg")],  # refused below
)
def test_composite_every_mode_and_format(photo: np.ndarray, result: ParsingResult, cihp, small_person: int,  # type: ignore[no-untyped-def]
                                         mode: str, fmt: str) -> None:
    h, w = photo.shape[:2]
    backdrop = np.zeros((300, 200, 3), np.uint8)
    backdrop[:, :, 2] = 255  # blue
    spec = ComposeSpec(keep=Keep("ids", ids=(small_person,)),
                       options=ComposeOptions(mode=mode, color_rgb=(255, 0, 255)),  # type: ignore[arg-type]
                       format=fmt)  # type: ignore[arg-type]
    out = render(photo, result, RenderRequest(outputs=frozenset({"composite"}), labels=cihp, compose=spec),
                 background_rgb=backdrop if mode == "image" else None)
    picture = out.composite
    assert picture is not None
    assert picture.format == fmt and picture.media_type == f"image/{fmt}"
    assert picture.suffix == {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}[fmt]
    assert (picture.width, picture.height) == (w, h)
    assert picture.has_alpha is (mode == "transparent")
    image = decode(picture.data, fmt)
    assert image.shape == ((h, w, 4) if mode == "transparent" else (h, w, 3))

    kept = result.person_masks[small_person]
    # the refined border moves alpha only within ~radius + 2 * scale (12 px here) of the mask's edge
    far = ~_dilate(kept, MARGIN_PX)
    assert far.mean() > 0.1, "keeping the smallest person must leave much of the picture to replace"
    inside = _erode(kept, MARGIN_PX)
    assert inside.mean() > 0.05
    tol = 0 if fmt == "png" else 40
    if mode == "transparent":
        assert (image[..., 3][far] <= tol // 8).all() and (image[..., 3][inside] >= 255 - tol // 8).all()
    elif mode in ("color", "image"):
        colour = np.array((255, 0, 255) if mode == "color" else (0, 0, 255))
        assert np.abs(image[far].astype(int) - colour).max() <= tol
    if mode != "transparent":
        # kept pixels are the photo's
        assert np.abs(image[inside].astype(int) - photo[inside]).mean() <= (0 if fmt == "png" else 6)


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    return ~_dilate(~mask, px)


def test_unknown_person_id_raises(photo: np.ndarray, result: ParsingResult, cihp) -> None:  # type: ignore[no-untyped-def]
    spec = ComposeSpec(keep=Keep("ids", ids=(result.num_people,)))
    with pytest.raises(InvalidParameter, match=f"{result.num_people} found"):
        render(photo, result, RenderRequest(outputs=frozenset({"composite"}), labels=cihp, compose=spec))


@pytest.mark.parametrize("name", LABEL_SET_NAMES)
def test_label_sets_are_consistent(photo: np.ndarray, result: ParsingResult, engine: ParsingEngine,
                                   name: str) -> None:
    labels = label_set(name, engine.card.palette)
    request = RenderRequest(outputs=frozenset({"color", "label", "masks", "areas", "people", "overlay"}),
                            labels=labels)
    out = render(photo, result, request)
    table = TABLES[name]
    n = len(table.classes)
    assert out.result.classes == list(table.classes)
    assert out.palette == list(labels.palette) and len(out.palette) == n
    if name == "cihp":
        assert out.palette == [tuple(c) for c in engine.card.palette[:n]]
    else:
        assert out.palette == pascal_palette(n)

    label = decode(out.label)  # type: ignore[arg-type]
    assert int(label.max()) < n
    color = decode(out.color)  # type: ignore[arg-type]
    colours = {tuple(c) for c in np.unique(color.reshape(-1, 3), axis=0).tolist()}
    assert colours <= set(out.palette)
    lut = np.asarray(out.palette, np.uint8)
    assert (color == lut[label]).all()

    present = sorted(np.unique(label).tolist())
    assert out.classes_present == [table.classes[i] for i in present]
    assert len(present) >= 2, "the tiny model's parts must survive relabelling"
    assert out.masks is not None and len(out.masks) == len(present)
    for i, data in zip(present, out.masks, strict=True):
        assert ((decode(data) == 255) == (label == i)).all()
    assert out.areas is not None and set(out.areas) == set(out.classes_present)
    assert sum(out.areas.values()) == label.size
    assert out.people is not None and len(out.people) == result.num_people
    for person in out.people:
        assert set(person["parts"]) <= set(table.classes)

    if not any(isinstance(t, tuple) for t in table.mapping.values()):
        # without side splits, each pixel's class is its CIHP class looked up in the table
        lookup = np.array([table.classes.index(table.mapping[c]) for c in result.classes], np.uint8)  # type: ignore[arg-type]
        assert (label == lookup[result.label_map]).all()
    if name == "person":
        assert (label == (result.label_map > 0)).all()


def test_render_request_refuses_bad_combinations(cihp) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"unknown outputs \['bogus'\]"):
        RenderRequest(outputs=frozenset({"color", "bogus"}), labels=cihp)
    with pytest.raises(ValueError, match="composite output needs a ComposeSpec"):
        RenderRequest(outputs=frozenset({"composite"}), labels=cihp)
    RenderRequest(outputs=frozenset(OUTPUT_NAMES), labels=cihp, compose=ComposeSpec())


def test_compose_spec_refuses_transparent_jpeg() -> None:
    with pytest.raises(ValueError, match="cannot be JPEG"):
        ComposeSpec(options=ComposeOptions(mode="transparent"), format="jpeg")
    for mode in MODES:
        if mode != "transparent":
            ComposeSpec(options=ComposeOptions(mode=mode), format="jpeg")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        ((None,), set()),
        (("",), set()),
        (("color, LABEL",), {"color", "label"}),
        (("color", "label,color"), {"color", "label"}),
        (("all",), set(OUTPUT_NAMES)),
        (("people,all",), set(OUTPUT_NAMES)),
    ],
)
def test_parse_output_names(texts: tuple[str | None, ...], expected: set[str]) -> None:
    assert parse_output_names(texts, OUTPUT_NAMES, "outputs") == expected


def test_parse_output_names_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"unknown output\(s\) 'colour', 'x' in 'outputs'; valid ones: color,") as info:
        parse_output_names(["colour,x,label"], OUTPUT_NAMES, "outputs")
    assert "(or 'all')" in str(info.value)


# --- the result cache -------------------------------------------------------------------------


def _tiny_result(fill: int = 1) -> ParsingResult:
    label_map = np.full((4, 6), fill, np.uint8)
    return ParsingResult(label_map=label_map, classes=[f"c{i}" for i in range(8)],
                         person_masks=np.ones((2, 4, 6), bool), person_scores=np.array([0.9, 0.8], np.float32))


ITEM_BYTES = 4 * 6 + 2 * 4 * 6  # label map + person masks


def test_cache_key_depends_on_bytes_and_mode() -> None:
    assert ResultCache.key(b"abc", "exact") == ResultCache.key(b"abc", "exact")
    assert ResultCache.key(b"abc", "exact") != ResultCache.key(b"abd", "exact")
    assert ResultCache.key(b"abc", "exact") != ResultCache.key(b"abc", "fast")


def test_cache_hits_misses_and_read_only_arrays() -> None:
    cache = ResultCache(max_bytes=10 * ITEM_BYTES)
    assert cache.get("a") is None and (cache.hits, cache.misses) == (0, 1)
    item = _tiny_result()
    cache.put("a", item)
    assert cache.get("a") is item and (cache.hits, cache.misses) == (1, 1)
    assert len(cache) == 1 and cache.size_bytes == ITEM_BYTES
    for array in (item.label_map, item.person_masks, item.person_scores):
        assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        item.label_map[0, 0] = 2
    cache.put("a", _tiny_result(2))  # the same key again: the first stays
    assert cache.get("a") is item and cache.size_bytes == ITEM_BYTES


def test_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = ResultCache(max_bytes=2 * ITEM_BYTES)
    a, b, c = _tiny_result(1), _tiny_result(2), _tiny_result(3)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("c", c)
    assert len(cache) == 2 and cache.size_bytes == 2 * ITEM_BYTES
    assert cache.get("b") is None
    assert cache.get("a") is a and cache.get("c") is c


def test_cache_refuses_what_does_not_fit() -> None:
    cache = ResultCache(max_bytes=ITEM_BYTES - 1)
    item = _tiny_result()
    cache.put("a", item)
    assert len(cache) == 0 and cache.size_bytes == 0 and cache.get("a") is None
    assert item.label_map.flags.writeable  # not shared, so left writable
    off = ResultCache(max_bytes=0)
    off.put("a", _tiny_result())
    assert len(off) == 0


def test_process_twice_hits_the_cache_with_identical_outputs(engine: ParsingEngine, photo: np.ndarray,
                                                              small_person: int) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    data = buf.getvalue()
    cache = ResultCache(max_bytes=64 * 2**20)
    spec = ComposeSpec(keep=Keep("ids", ids=(small_person,)), options=ComposeOptions(mode="blur"))
    request = RenderRequest(outputs=frozenset(OUTPUT_NAMES), labels=label_set("atr"), compose=spec)
    limits = ImageLimits(max_pixels=10**8, max_side=10**5)

    first_t, second_t = Timings(), Timings()
    first = pipeline.process(engine, data, request, limits=limits, timings=first_t, cache=cache)
    second = pipeline.process(engine, data, request, limits=limits, timings=second_t, cache=cache)
    assert first_t.cache_hit is False and "infer" in first_t.seconds
    assert second_t.cache_hit is True
    assert not {"preprocess", "infer", "postprocess"} & set(second_t.seconds)
    assert {"decode", "compose", "encode"} <= set(second_t.seconds)
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)

    for name in ("color", "masks", "label", "overlay", "cutout", "people", "areas"):
        assert getattr(first, name) == getattr(second, name), name
        assert getattr(first, name), name
    assert first.composite == second.composite and first.composite is not None
    assert first.classes_present == second.classes_present
    assert first.result.num_people == second.result.num_people >= 2

    other = Timings()
    pipeline.process(engine, data, request, limits=limits, mode="fast", timings=other, cache=cache)
    assert other.cache_hit is False and len(cache) == 2
