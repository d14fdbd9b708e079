"""POST /api/background in-process: every mode, format and keep, options as query or form, every refusal.

The photo is sent as PNG so the kept pixels can be compared with it exactly. The tiny model's
people overlap and cover most of the picture, so most checks keep one small person (found through
``/api/parse?outputs=people`` on the same bytes: the result cache makes every request after the
first cost no inference) and look at pixels well inside or well away from them: the refined
border moves alpha only within ``MARGIN_PX`` of the mask's edge.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from m2fp_service.labelsets import CIHP_CLASSES, TABLES
from tests.api.conftest import png_array, png_header_only

MARGIN_PX = 16
GREEN = (0, 255, 0)
MAGENTA = (255, 0, 255)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_png(photo: np.ndarray) -> bytes:
    return png_bytes(photo)


class Parsed:
    """What /api/parse says about the photo: CIHP and ATR label maps, people's masks."""

    def __init__(self, client: TestClient, data: bytes) -> None:
        r = client.post("/api/parse", params={"outputs": "label,people"}, files={"image": ("p.png", data, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()["data"]
        self.label = png_array(body["label_map"])
        self.masks = [png_array(p["mask"]) == 255 for p in body["people"]]
        self.areas = [int(m.sum()) for m in self.masks]
        r = client.post("/api/parse", params={"outputs": "label", "labels": "atr"},
                        files={"image": ("p.png", data, "image/png")})
        assert r.status_code == 200, r.text
        self.atr_label = png_array(r.json()["data"]["label_map"])
        assert len(self.masks) >= 2, "the tiny model must find people"

    @property
    def small(self) -> int:
        """The person with the smallest non-empty mask."""
        return min((i for i, a in enumerate(self.areas) if a), key=lambda i: self.areas[i])

    @property
    def everyone(self) -> np.ndarray:
        return (self.label > 0) | np.any(self.masks, axis=0)

    def central(self) -> int:
        h, w = self.label.shape
        best, best_d = -1, np.inf
        for i, mask in enumerate(self.masks):
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            d = ((ys.mean() - (h - 1) / 2) / h) ** 2 + ((xs.mean() - (w - 1) / 2) / w) ** 2
            if d < best_d:
                best, best_d = i, d
        return best

    def mid_class(self) -> str:
        """A CIHP class present on between 2% and 50% of the picture (the largest such)."""
        counts = np.bincount(self.label.ravel(), minlength=len(CIHP_CLASSES))
        ok = [c for c in range(1, len(CIHP_CLASSES)) if 0.02 * self.label.size <= counts[c] <= 0.5 * self.label.size]
        assert ok, "no class of a useful size in the tiny model's parsing"
        return CIHP_CLASSES[max(ok, key=lambda c: counts[c])]


@pytest.fixture(scope="module")
def parsed(client: TestClient, photo_png: bytes) -> Parsed:
    return Parsed(client, photo_png)


@pytest.fixture(scope="module")
def post(client: TestClient, photo_png: bytes) -> Callable[..., httpx.Response]:
    def send(params: dict[str, Any] | None = None, data: dict[str, str] | None = None,
             background: tuple[str, bytes, str] | None = None, **kwargs: Any) -> httpx.Response:
        """POSTs the photo with these options (query ``params``, form ``data``) and optional backdrop file."""
        files = {"image": ("photo.png", photo_png, "image/png")}
        if background is not None:
            files["background"] = background
        return client.post("/api/background", params=params or {}, data=data or {}, files=files, **kwargs)

    return send


def picture(response: httpx.Response, fmt: str = "png") -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"image/{fmt}"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
    return np.asarray(image)


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def inside_and_far(mask: np.ndarray, px: int = MARGIN_PX) -> tuple[np.ndarray, np.ndarray]:
    """Pixels deeper than ``px`` inside ``mask`` and farther than ``px`` outside it, both asserted non-empty."""
    inside, far = ~dilate(~mask, px), ~dilate(mask, px)
    assert inside.sum() > 1000 and far.sum() > 1000, "the kept region must leave both sides to check"
    return inside, far


# --- modes ----------------------------------------------------------------------------------


def test_default_is_a_transparent_png_of_everyone(post: Callable[..., httpx.Response], parsed: Parsed,
                                                  photo: np.ndarray) -> None:
    r = post()
    out = picture(r)
    assert out.shape == (*photo.shape[:2], 4)
    assert r.headers["content-disposition"] == 'inline; filename="background.png"'
    inside = ~dilate(~parsed.everyone, MARGIN_PX)
    assert inside.mean() > 0.5
    assert (out[..., 3][inside] == 255).all()
    assert (out[..., :3][inside] == photo[inside]).all()


def test_transparent_keeps_one_person_with_alpha(post: Callable[..., httpx.Response], parsed: Parsed,
                                                 photo: np.ndarray) -> None:
    out = picture(post({"keep": f"people:{parsed.small}", "mode": "transparent"}))
    assert out.shape == (*photo.shape[:2], 4)
    alpha = out[..., 3]
    assert (alpha == 0).sum() > 1000 and (alpha == 255).sum() > 1000
    inside, far = inside_and_far(parsed.masks[parsed.small])
    assert (alpha[inside] == 255).all() and (alpha[far] == 0).all()
    opaque = alpha == 255
    assert (out[..., :3][opaque] == photo[opaque]).all()


@pytest.mark.parametrize(("color", "rgb"), [("#00ff00", GREEN), ("#F0F", MAGENTA), ("ff00ff", MAGENTA)])
def test_color_far_from_the_person_is_exactly_the_colour(post: Callable[..., httpx.Response], parsed: Parsed,
                                                         photo: np.ndarray, color: str, rgb: tuple[int, ...]) -> None:
    out = picture(post({"keep": f"people:{parsed.small}", "mode": "color", "color": color}))
    assert out.shape == photo.shape
    inside, far = inside_and_far(parsed.masks[parsed.small])
    assert (out[far] == rgb).all()
    assert (out[inside] == photo[inside]).all()


def test_blur_blurs_only_the_background(post: Callable[..., httpx.Response], parsed: Parsed,
                                        photo: np.ndarray) -> None:
    keep = f"people:{parsed.small}"
    soft = picture(post({"keep": keep, "mode": "blur", "blur": 4})).astype(float)
    strong = picture(post({"keep": keep, "mode": "blur", "blur": 40})).astype(float)
    inside, far = inside_and_far(parsed.masks[parsed.small])
    assert (soft[inside] == photo[inside]).all() and (strong[inside] == photo[inside]).all()

    def detail(image: np.ndarray) -> float:  # mean horizontal gradient over the far pixels
        grad = np.abs(np.diff(image, axis=1)).sum(axis=2)
        return float(grad[far[:, 1:] & far[:, :-1]].mean())

    original = detail(photo.astype(float))
    assert original > 5, "the photo must have detail there for the check to mean anything"
    assert detail(soft) < 0.8 * original
    assert detail(strong) < 0.5 * detail(soft)
    # the blurred background is still the photo's colours, not a fill
    assert abs(strong[far].mean() - photo[far].mean()) < 20


STEP = 12


def _grid_backdrop(hw: tuple[int, int], cell: int) -> np.ndarray:
    """Cells of ``cell`` px, each a colour of its own: (STEP i, STEP j, 200) for up to 21 x 21 cells."""
    h, w = hw
    ys, xs = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w, 3), np.uint8)
    assert h <= 21 * cell and w <= 21 * cell
    out[..., 0] = (ys // cell) * STEP
    out[..., 1] = (xs // cell) * STEP
    out[..., 2] = 200
    return out


def _expected_cells(photo_hw: tuple[int, int], backdrop_hw: tuple[int, int], cell: int, *, stretch: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output pixel: the backdrop cell (row, col) it shows, and whether it is well inside that cell."""
    h, w = photo_hw
    bh, bw = backdrop_hw
    if stretch:
        sy, sx, y0, x0 = h / bh, w / bw, 0, 0
    else:  # cover: one scale, centred crop
        s = max(h / bh, w / bw)
        sy = sx = s
        y0, x0 = (round(bh * s) - h) // 2, (round(bw * s) - w) // 2
    src_y = (np.arange(h) + y0 + 0.5) / sy - 0.5
    src_x = (np.arange(w) + x0 + 0.5) / sx - 0.5
    clear_y = np.abs(((src_y + 0.5) % cell) - cell / 2) < cell / 2 - 2
    clear_x = np.abs(((src_x + 0.5) % cell) - cell / 2) < cell / 2 - 2
    rows = (np.clip(src_y, 0, bh - 1) // cell).astype(int)
    cols = (np.clip(src_x, 0, bw - 1) // cell).astype(int)
    return rows[:, None] + 0 * cols[None, :], cols[None, :] + 0 * rows[:, None], clear_y[:, None] & clear_x[None, :]


@pytest.mark.parametrize("backdrop_hw", [(300, 300), (400, 200), (90, 600)], ids=["square", "portrait", "wide"])
def test_image_backdrop_covers_and_is_not_stretched(post: Callable[..., httpx.Response], parsed: Parsed,
                                                    photo: np.ndarray, backdrop_hw: tuple[int, int]) -> None:
    cell = 30
    backdrop = _grid_backdrop(backdrop_hw, cell)
    r = post({"keep": f"people:{parsed.small}"}, background=("bg.png", png_bytes(backdrop), "image/png"))
    out = picture(r)  # mode defaults to image when a background file is sent
    assert out.shape == photo.shape
    _, far = inside_and_far(parsed.masks[parsed.small])
    rows, cols, clear = _expected_cells(photo.shape[:2], backdrop_hw, cell, stretch=False)
    check = far & clear
    assert check.sum() > 5000
    expected = np.stack([rows * STEP, cols * STEP, np.full_like(rows, 200)], axis=-1)
    assert (out[check] == expected[check]).all(), "the backdrop is not scaled to cover and centred"
    # the same pixels of a stretched backdrop would show other cells: the check tells the two apart
    s_rows, s_cols, s_clear = _expected_cells(photo.shape[:2], backdrop_hw, cell, stretch=True)
    both = check & s_clear
    assert ((s_rows != rows) | (s_cols != cols))[both].mean() > 0.3


def test_pixelate_far_from_people_is_constant_blocks(post: Callable[..., httpx.Response], parsed: Parsed,
                                                     photo: np.ndarray) -> None:
    block = 16
    out = picture(post({"keep": f"people:{parsed.small}", "mode": "pixelate", "block": block}))
    inside, far = inside_and_far(parsed.masks[parsed.small])
    assert (out[inside] == photo[inside]).all()
    h, w = photo.shape[:2]
    assert h % block == 0 and w % block == 0
    checked, colours = 0, set()
    for y in range(0, h, block):
        for x in range(0, w, block):
            if not far[y : y + block, x : x + block].all():
                continue
            tile = out[y : y + block, x : x + block].reshape(-1, 3)
            assert (tile == tile[0]).all(), f"block at ({y}, {x}) is not constant"
            mean = photo[y : y + block, x : x + block].reshape(-1, 3).mean(axis=0)
            assert np.abs(tile[0] - mean).max() <= 1.5, "a block is the mean colour of the photo under it"
            checked += 1
            colours.add(tuple(tile[0]))
    assert checked >= 20 and len(colours) >= 10


# --- formats --------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "mode", "channels"),
                         [("png", "blur", 3), ("webp", "blur", 3), ("jpeg", "blur", 3), ("webp", "transparent", 4),
                          ("jpeg", "color", 3)])
def test_formats(post: Callable[..., httpx.Response], parsed: Parsed, photo: np.ndarray, fmt: str, mode: str,
                 channels: int) -> None:
    r = post({"keep": f"people:{parsed.small}", "mode": mode, "format": fmt, "quality": 85})
    out = picture(r, fmt)
    assert out.shape == (*photo.shape[:2], channels)
    suffix = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}[fmt]
    assert r.headers["content-disposition"] == f'inline; filename="background{suffix}"'
    inside, far = inside_and_far(parsed.masks[parsed.small])
    assert np.abs(out[..., :3][inside].astype(int) - photo[inside]).mean() < 8
    if mode == "transparent":
        assert (out[..., 3][far] < 8).all() and (out[..., 3][inside] > 247).all()
    if mode == "color":
        assert np.abs(out[far].astype(int) - GREEN).mean() < 8


# --- keep -----------------------------------------------------------------------------------


KEEP_CASES = ["people", "largest", "central", "people:0", "two-people", "class", "two-classes"]


def _keep_case(parsed: Parsed, case: str) -> tuple[str, np.ndarray]:
    """The ``keep`` text of a case and the pixels it must select, worked out from /api/parse's answer."""
    cls = parsed.mid_class()
    cls_id, face_id = CIHP_CLASSES.index(cls), CIHP_CLASSES.index("face")
    return {
        "people": ("people", parsed.everyone),
        "largest": ("largest", parsed.masks[int(np.argmax(parsed.areas))]),
        "central": ("central", parsed.masks[parsed.central()]),
        "people:0": ("people:0", parsed.masks[0]),
        "two-people": (f"people:0,{parsed.small}", parsed.masks[0] | parsed.masks[parsed.small]),
        "class": (f"classes:{cls}", parsed.label == cls_id),
        "two-classes": (f"classes:{cls},face", np.isin(parsed.label, [cls_id, face_id])),
    }[case]


@pytest.mark.parametrize("invert", [False, True], ids=["kept", "inverted"])
@pytest.mark.parametrize("case", KEEP_CASES)
def test_keep_selects_exactly_the_asked_pixels(post: Callable[..., httpx.Response], parsed: Parsed,
                                               photo: np.ndarray, case: str, invert: bool) -> None:
    keep, selected = _keep_case(parsed, case)
    if invert:
        selected = ~selected
    assert 0 < selected.sum() < selected.size, f"keep={keep} must select some pixels, not all"
    # without refinement the border is binary: each pixel is the photo's or the colour
    out = picture(post({"keep": keep, "invert": str(invert).lower(), "mode": "color", "color": "#ff00ff",
                        "refine": "false"}))
    expected = np.where(selected[..., None], photo, np.array(MAGENTA, np.uint8))
    assert (out == expected).all(), f"keep={keep} invert={invert}"


def test_invert_with_refined_edges_replaces_the_class(post: Callable[..., httpx.Response], parsed: Parsed,
                                                      photo: np.ndarray) -> None:
    cls = parsed.mid_class()
    region = parsed.label == CIHP_CLASSES.index(cls)
    out = picture(post({"keep": f"classes:{cls}", "invert": "true", "mode": "color"}))
    inside, far = inside_and_far(region, 8)
    assert (out[inside] == GREEN).all()
    assert (out[far] == photo[far]).all()


def test_atr_upper_clothes_is_cihp_upper_clothes_and_coat(post: Callable[..., httpx.Response], parsed: Parsed,
                                                          photo: np.ndarray) -> None:
    common = {"mode": "color", "refine": "false"}
    atr = post({**common, "labels": "atr", "keep": "classes:upper-clothes"})
    region = parsed.atr_label == TABLES["atr"].classes.index("upper-clothes")
    assert region.sum() > 0, "the tiny model must give some upper clothes or coat"
    expected = np.where(region[..., None], photo, np.array(GREEN, np.uint8))
    assert (picture(atr) == expected).all()
    cihp = post({**common, "keep": "classes:upper-clothes,coat"})
    assert cihp.status_code == 200 and atr.content == cihp.content
    # and ATR's own names are refused without labels=atr, CIHP's with it
    assert post({"keep": "classes:belt"}).status_code == 400
    assert post({"labels": "atr", "keep": "classes:coat"}).status_code == 400


# --- options: query and form ----------------------------------------------------------------


def test_options_as_form_fields_equal_query_parameters(post: Callable[..., httpx.Response], parsed: Parsed) -> None:
    options = {"keep": f"people:{parsed.small}", "mode": "color", "color": "#0000ff", "refine": "false",
               "format": "webp", "quality": "80", "invert": "true"}
    by_query = post(options)
    by_form = post(data=options)
    half = post({k: v for k, v in options.items() if k in ("keep", "mode", "quality")},
                data={k: v for k, v in options.items() if k not in ("keep", "mode", "quality")})
    picture(by_query, "webp")
    assert by_form.status_code == 200 and half.status_code == 200, (by_form.text, half.text)
    assert by_query.content == by_form.content == half.content
    assert by_query.content != post({**options, "invert": "false"}).content


def test_query_and_form_clash_is_400(post: Callable[..., httpx.Response]) -> None:
    r = post({"mode": "blur"}, data={"mode": "color"})
    assert r.status_code == 400 and r.json()["code"] == 1002
    assert "mode" in r.json()["message"] and "query parameter and as form field" in r.json()["message"]


@pytest.mark.parametrize(("query", "form"), [
    ({"blur": "20"}, {"blur": "20"}),
    ({"blur": "20"}, {"blur": "20.0"}),
    ({"invert": "true"}, {"invert": "1"}),
    ({"keep": "Largest"}, {"keep": "largest"}),
], ids=["same-number", "same-number-spelt-differently", "same-bool-spelt-differently", "case"])
def test_the_same_value_in_query_and_form_is_no_clash(post: Callable[..., httpx.Response], query: dict[str, str],
                                                      form: dict[str, str]) -> None:
    r = post({"mode": "blur", **query}, data=form)
    assert r.status_code == 200, r.text


# --- headers --------------------------------------------------------------------------------


def test_headers(post: Callable[..., httpx.Response], parsed: Parsed) -> None:
    r = post({"mode": "blur"}, headers={"X-Request-ID": "bg-test-7"})
    assert r.status_code == 200
    assert int(r.headers["x-people"]) == len(parsed.masks) > 0
    assert r.headers["x-model-trained"] == "false"
    assert r.headers["x-request-id"] == "bg-test-7"
    timing = r.headers["server-timing"]
    for stage in ("decode", "compose", "encode"):
        assert f"{stage};dur=" in timing
    assert 'cache;desc="hit"' in timing  # the photo was parsed before: no inference this time


def test_every_stage_runs_without_the_cache(make_client: Callable[..., TestClient], photo_png: bytes) -> None:
    client = make_client(result_cache_mb=0, api_key="k3y")
    files = {"image": ("p.png", photo_png, "image/png")}
    for headers in ({}, {"X-API-Key": "wrong"}):
        r = client.post("/api/background", files=files, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == 1003
    r = client.post("/api/background", params={"mode": "blur"}, files=files, headers={"X-API-Key": "k3y"})
    assert r.status_code == 200 and int(r.headers["x-people"]) > 0
    timing = r.headers["server-timing"]
    for stage in ("decode", "preprocess", "infer", "postprocess", "compose", "encode"):
        assert f"{stage};dur=" in timing
    assert "cache" not in timing


# --- refusals -------------------------------------------------------------------------------

GIF = b"GIF89a" + b"\x00" * 64


REFUSALS: list[tuple[dict[str, str], dict[str, str], tuple[str, Any, str] | None, int, int, list[str]]] = [
    ({"keep": "classes:nose"}, {}, None, 400, 1002, ["'nose'", "valid classes", "face", "right-shoe"]),
    ({"keep": "classes:glove", "labels": "atr"}, {}, None, 400, 1002, ["'glove'", "left-arm", "belt"]),
    ({"keep": "people:99"}, {}, None, 400, 1002, ["no person 99", "found", "ids 0-", "outputs=people"]),
    ({}, {"keep": "people:99"}, None, 400, 1002, ["no person 99", "found"]),
    ({"keep": "people:x"}, {}, None, 400, 1002, ["person ids must be numbers"]),
    ({"keep": "people:\u00b2"}, {}, None, 400, 1002, ["person ids must be numbers"]),
    ({"keep": "everyone"}, {}, None, 400, 1002, ["people", "largest", "central", "classes:"]),
    ({"labels": "pascal"}, {}, None, 400, 1002, ["labels", "'cihp'", "'atr'", "'tryon'", "'person'"]),
    ({}, {"labels": "pascal"}, None, 400, 1002, ["labels", "'cihp'", "'mediapipe6'"]),
    ({"mode": "sepia"}, {}, None, 400, 1002, ["mode", "'transparent'", "'blur'", "'image'", "'pixelate'"]),
    ({"color": "green"}, {}, None, 400, 1002, ["color", "'green'", "#00ff00"]),
    ({"mode": "color", "color": "#12345"}, {}, None, 400, 1002, ["#12345", "#00ff00"]),
    ({}, {"mode": "color", "color": "red"}, None, 400, 1002, ["'red'", "#00ff00"]),
    ({"mode": "image"}, {}, None, 400, 1002, ["mode=image", "'background'"]),
    ({"mode": "blur"}, {}, ("bg.png", "PHOTO", "image/png"), 400, 1002, ["'background'", "mode=blur",
                                                                         "mode=image"]),
    ({"mode": "transparent", "format": "jpeg"}, {}, None, 400, 1002, ["jpeg", "png or webp"]),
    ({"format": "jpeg"}, {}, None, 400, 1002, ["jpeg", "png or webp"]),  # transparent is the default mode
    ({}, {"mode": "transparent", "format": "jpeg"}, None, 400, 1002, ["png or webp"]),
    ({"format": "gif"}, {}, None, 400, 1002, ["format", "'png'", "'webp'", "'jpeg'"]),
    ({"mode": "blur", "blur": "0"}, {}, None, 400, 1002, ["blur", "greater than 0"]),
    ({"mode": "blur", "blur": "1000"}, {}, None, 400, 1002, ["blur", "250"]),
    ({"mode": "blur", "blur": "strong"}, {}, None, 400, 1002, ["blur", "number"]),
    ({"mode": "pixelate", "block": "1"}, {}, None, 400, 1002, ["block", "2"]),
    ({"quality": "101"}, {}, None, 400, 1002, ["quality", "100"]),
    ({"feather": "-1"}, {}, None, 400, 1002, ["feather", "0"]),
    ({"invert": "maybe"}, {}, None, 400, 1002, ["invert", "bool"]),
    ({"mode": "blur", "foo": "1"}, {}, None, 400, 1002, ["foo", "keep", "mode", "blur", "labels"]),
    ({"mode": "blur"}, {"foo": "1"}, None, 400, 1002, ["foo", "keep", "mode", "blur", "labels"]),
    ({"mode": "image"}, {}, ("bg.txt", b"plain text, not a picture\n" * 10, "text/plain"), 422, 1006,
     ["background", "not a recognisable image", "JPEG, PNG, WebP or BMP"]),
    ({}, {}, ("bg.gif", GIF, "image/gif"), 415, 1005, ["background", "GIF"]),
    ({}, {}, ("bg.png", b"", "image/png"), 422, 1006, ["background", "empty"]),
    ({}, {}, ("bomb.png", png_header_only(30000, 30000), "image/png"), 413, 1007, ["background", "30000x30000"]),
]


def _refusal_id(params: dict[str, str], form: dict[str, str], background: tuple[str, Any, str] | None,
                *_: object) -> str:
    parts = [f"{k}={v}" for k, v in params.items()] + [f"form:{k}={v}" for k, v in form.items()]
    if background is not None:
        parts.append(f"background={background[0]}")
    return "&".join(parts)


@pytest.mark.parametrize(("params", "form", "background", "status", "code", "words"), REFUSALS,
                         ids=[_refusal_id(*row) for row in REFUSALS])
def test_refusals(post: Callable[..., httpx.Response], photo_png: bytes, params: dict[str, str],
                  form: dict[str, str], background: tuple[str, Any, str] | None, status: int, code: int,
                  words: list[str]) -> None:
    if background is not None and background[1] == "PHOTO":
        background = (background[0], photo_png, background[2])
    r = post(params, data=form, background=background)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "data"} and body["code"] == code and body["data"] is None
    for word in words:
        assert word.lower() in body["message"].lower(), f"{word!r} not in {body['message']!r}"
    assert r.headers["x-request-id"]


def test_missing_image_is_400(client: TestClient, photo_png: bytes) -> None:
    r = client.post("/api/background", params={"mode": "image"},
                    files={"background": ("bg.png", photo_png, "image/png")})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == 1001 and "'image'" in r.json()["message"]
    r = client.post("/api/background", data={"mode": "blur"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["message"]


def test_two_backgrounds_are_refused(post: Callable[..., httpx.Response], client: TestClient,
                                     photo_png: bytes) -> None:
    files = [("image", ("p.png", photo_png, "image/png")), ("background", ("a.png", photo_png, "image/png")),
             ("background", ("b.png", photo_png, "image/png"))]
    r = client.post("/api/background", files=files)
    assert r.status_code == 400 and "one 'background'" in r.json()["message"]


def test_a_bad_background_is_refused_before_inference(client: TestClient, photo: np.ndarray) -> None:
    """A backdrop that cannot be decoded must not cost the photo's inference first."""
    cache = client.app.state.cache  # type: ignore[attr-defined]
    fresh = png_bytes(np.ascontiguousarray(photo[::-1]))  # bytes this app has not parsed (the photo is
    # its own mirror image left to right, so flip it upside down)
    before = (len(cache), cache.misses)
    files = {"image": ("p.png", fresh, "image/png"), "background": ("bg.jpg", b"\xff\xd8\xff", "image/jpeg")}
    r = client.post("/api/background", params={"mode": "image"}, files=files)
    assert r.status_code == 422 and "background" in r.json()["message"]
    assert (len(cache), cache.misses) == before, "the photo was parsed although the backdrop was unusable"


def test_an_empty_file_input_is_no_background(post: Callable[..., httpx.Response]) -> None:
    """A plain HTML form sends an unchosen file input as a part with filename="" and no bytes."""
    r = post({"mode": "blur"}, background=("", b"", "application/octet-stream"))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("params", "backdrop_hw"),
    [
        ({"mode": "pixelate", "block": "1024"}, None),
        ({"mode": "pixelate", "block": "2"}, None),
        ({"mode": "blur", "blur": "250"}, None),
        ({"mode": "blur", "blur": "0.01"}, None),
        ({"mode": "color", "feather": "200"}, None),
        ({"mode": "transparent", "feather": "0.5", "format": "webp", "quality": "100"}, None),
        ({"mode": "color", "format": "jpeg", "quality": "1"}, None),
        ({"keep": "classes:hat,hair,glove,sunglasses,face", "invert": "true", "mode": "pixelate"}, None),
        ({"keep": "classes:face"}, (1, 1)),
        ({"keep": "classes:face"}, (1, 3000)),
        ({"keep": "classes:face"}, (2000, 3)),
    ],
    ids=["block-1024", "block-2", "blur-250", "blur-tiny", "feather-200", "webp-lossless-feather-half",
         "jpeg-quality-1", "many-classes-inverted", "backdrop-1x1", "backdrop-1x3000", "backdrop-2000x3"],
)
def test_extreme_but_valid_options(post: Callable[..., httpx.Response], photo: np.ndarray, params: dict[str, str],
                                   backdrop_hw: tuple[int, int] | None) -> None:
    background = None
    if backdrop_hw is not None:
        backdrop = np.full((*backdrop_hw, 3), (200, 100, 50), np.uint8)
        background = ("bg.png", png_bytes(backdrop), "image/png")
    fmt = params.get("format", "png")
    out = picture(post(params, background=background), fmt)
    assert out.shape[:2] == photo.shape[:2]
    if backdrop_hw is not None:
        assert (out == (200, 100, 50)).all(axis=2).mean() > 0.5, "the backdrop shows around the face"
