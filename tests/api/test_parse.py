"""POST /api/parse in-process: the seed's envelope exactly, opt-in outputs, headers, API key."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from m2fp_service.schemas import OUTPUT_NAMES
from tests.api.conftest import image_file, png_array

SEED_DATA_KEYS = ["result_image", "masks", "classes", "inference_time"]


@pytest.fixture(scope="module")
def info(client: TestClient) -> dict:
    return client.get("/api/info").json()


@pytest.fixture(scope="module")
def seed_result(client: TestClient, photo_jpeg: bytes) -> dict:
    response = client.post("/api/parse", files=image_file(photo_jpeg))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def full_result(client: TestClient, photo_jpeg: bytes) -> dict:
    response = client.post("/api/parse", params={"outputs": "all"}, files=image_file(photo_jpeg))
    assert response.status_code == 200, response.text
    return response.json()


def test_seed_envelope_exactly(seed_result: dict) -> None:
    assert list(seed_result) == ["code", "message", "data"]
    assert seed_result["code"] == 0 and seed_result["message"] == "success"
    assert list(seed_result["data"]) == SEED_DATA_KEYS
    assert isinstance(seed_result["data"]["inference_time"], float)
    assert 0 < seed_result["data"]["inference_time"] < 60


def test_result_image_is_the_colour_map_of_the_photo(seed_result: dict, photo: np.ndarray, info: dict) -> None:
    color = png_array(seed_result["data"]["result_image"])
    assert color.shape == photo.shape and color.dtype == np.uint8
    palette = {tuple(c) for c in info["palette"]}
    colours = {tuple(c) for c in np.unique(color.reshape(-1, 3), axis=0)}
    assert colours <= palette
    assert len(colours) >= 3, "the tiny model must give several classes, not an empty result"


def test_masks_align_with_classes_and_colours(seed_result: dict, photo: np.ndarray, info: dict) -> None:
    data = seed_result["data"]
    color = png_array(data["result_image"])
    assert len(data["masks"]) == len(data["classes"]) >= 3
    assert len(set(data["classes"])) == len(data["classes"])
    covered = np.zeros(photo.shape[:2], bool)
    for name, b64 in zip(data["classes"], data["masks"], strict=True):
        mask = png_array(b64)
        assert mask.shape == photo.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        on = mask == 255
        assert on.any(), f"mask of {name} is empty"
        expected = info["palette"][info["classes"].index(name)]
        assert (color[on] == expected).all()
        assert not (covered & on).any(), "class masks overlap"
        covered |= on
    assert covered.all(), "class masks do not cover the image"


def test_all_outputs(full_result: dict, photo: np.ndarray, photo_jpeg: bytes, info: dict) -> None:
    data = full_result["data"]
    assert list(data)[:4] == SEED_DATA_KEYS
    assert set(data) == {*SEED_DATA_KEYS, "label_map", "overlay", "people", "areas", "cutout"}
    h, w = photo.shape[:2]

    label = png_array(data["label_map"])
    assert label.shape == (h, w)
    assert [info["classes"][i] for i in np.unique(label)] == data["classes"]

    assert png_array(data["overlay"]).shape == (h, w, 3)

    areas = data["areas"]
    assert list(areas) == data["classes"] and sum(areas.values()) == h * w
    assert all(areas[info["classes"][i]] == int((label == i).sum()) for i in np.unique(label))

    cutout = png_array(data["cutout"])
    assert cutout.shape == (h, w, 4)
    alpha = cutout[..., 3]
    assert set(np.unique(alpha)) == {0, 255}
    decoded = np.asarray(Image.open(io.BytesIO(photo_jpeg)).convert("RGB"))
    np.testing.assert_array_equal(cutout[..., :3][alpha == 255], decoded[alpha == 255])


def test_people(full_result: dict, photo: np.ndarray, info: dict) -> None:
    people = full_result["data"]["people"]
    assert len(people) >= 2, "the tiny model must find people"
    h, w = photo.shape[:2]
    scores = [p["score"] for p in people]
    assert scores == sorted(scores, reverse=True)
    for i, person in enumerate(people):
        assert person["id"] == i and 0 < person["score"] <= 1
        mask = png_array(person["mask"]) == 255
        assert mask.shape == (h, w)
        assert person["area"] == int(mask.sum()) > 0
        x0, y0, x1, y1 = person["box_xyxy"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert (x0, y0, x1, y1) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        assert sum(person["parts"].values()) == person["area"]
        assert set(person["parts"]) <= set(info["classes"])


def test_outputs_as_form_field_and_merged_with_query(client: TestClient, photo_jpeg: bytes) -> None:
    r = client.post("/api/parse", params={"outputs": "areas"}, data={"outputs": "label, OVERLAY"},
                    files=image_file(photo_jpeg))
    assert r.status_code == 200, r.text
    assert set(r.json()["data"]) == {*SEED_DATA_KEYS, "areas", "label_map", "overlay"}


@pytest.mark.parametrize("outputs", ["bogus", "label,nope", "masks"])
def test_unknown_output_is_400_listing_valid_ones(client: TestClient, photo_jpeg: bytes, outputs: str) -> None:
    for kwargs in ({"params": {"outputs": outputs}}, {"data": {"outputs": outputs}}):
        r = client.post("/api/parse", files=image_file(photo_jpeg), **kwargs)
        assert r.status_code == 400
        body = r.json()
        assert body["code"] == 1002 and body["data"] is None
        assert all(name in body["message"] for name in OUTPUT_NAMES)


def test_response_headers(make_client: Callable[..., TestClient], photo_jpeg: bytes) -> None:
    client = make_client(result_cache_mb=0)  # every stage runs
    r = client.post("/api/parse", files=image_file(photo_jpeg), headers={"X-Request-ID": "client-id-42"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-id-42"
    timing = r.headers["server-timing"]
    for stage in ("decode", "preprocess", "infer", "postprocess", "encode"):
        assert f"{stage};dur=" in timing
    assert r.headers["x-model-trained"] == "false"


@pytest.mark.parametrize("incoming", ["", "x" * 300, "bad id with spaces", "ünïcode"])
def test_insane_request_id_is_replaced(client: TestClient, incoming: str) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": incoming.encode("utf-8")})
    rid = r.headers["x-request-id"]
    assert rid != incoming and len(rid) == 32


def test_api_key(make_client, photo_jpeg: bytes) -> None:  # type: ignore[no-untyped-def]
    c = make_client(api_key="s3cret")
    assert c.get("/api/info", headers={"X-API-Key": "s3cret"}).json()["api_key_required"] is True
    for headers in ({}, {"X-API-Key": "wrong"}):
        r = c.post("/api/parse", files=image_file(photo_jpeg), headers=headers)
        assert r.status_code == 401 and r.json()["code"] == 1003
    r = c.post("/api/parse", files=image_file(photo_jpeg), headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200 and r.json()["code"] == 0
    assert c.get("/healthz").status_code == 200  # only /api/* is protected (tests/api/test_security.py)


def test_cors(make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client(cors_origins=["https://obs.example"])
    r = c.options("/api/parse", headers={"Origin": "https://obs.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://obs.example"
    r = c.get("/api/info", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_webui(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="webui/app.js"' in page.text and "UNTRAINED" in page.text
    # ES modules: each must come with a JavaScript media type or the browser refuses it.
    modules = {name: client.get(f"/webui/{name}") for name in ("app.js", "api.js", "photo.js", "compose.js")}
    assert all(r.status_code == 200 and "javascript" in r.headers["content-type"] for r in modules.values())
    assert "api/parse" in modules["api.js"].text and "trained === false" in modules["app.js"].text
    assert client.get("/webui/app.css").headers["content-type"].startswith("text/css")
