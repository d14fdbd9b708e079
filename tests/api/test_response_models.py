"""The documented response models validate every response the app sends.

Each request below is sent to a real app (ready, keyed, or without a model) and its answer is
checked against what the app's own OpenAPI document declares for that path, method and status:
the media type must be a declared one, and a JSON body must validate against the pydantic model
the ``$ref`` names (resolved by name in ``m2fp_service.schemas``), losslessly — no field the model
does not know, none changed by validation. Answers of no operation (404, 405) must be the error
envelope that ``ErrorResponse`` documents for every error.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import BaseModel

from m2fp_service import schemas
from m2fp_service.labelsets import LABEL_SET_NAMES
from m2fp_service.schemas import OUTPUT_NAMES
from tests.api.conftest import make_settings, png_header_only, running_client

SEED_DATA_KEYS = ["result_image", "masks", "classes", "inference_time"]
ERROR_REF = "#/components/schemas/ErrorResponse"
GIF = b"GIF89a" + b"\x00" * 64


@pytest.fixture(scope="module")
def keyed(tiny_model_path: Path) -> Iterator[TestClient]:
    with running_client(make_settings(tiny_model_path, api_key="k3y")) as c:
        yield c


@pytest.fixture(scope="module")
def no_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    missing = tmp_path_factory.mktemp("nomodel") / "absent.onnx"
    with running_client(make_settings(missing)) as c:
        assert c.get("/readyz").json()["status"] == "failed"
        yield c


@pytest.fixture(scope="module")
def document(client: TestClient) -> dict[str, Any]:
    doc: dict[str, Any] = client.get("/openapi.json").json()
    return doc


def model_named(ref: str) -> type[BaseModel]:
    name = ref.rsplit("/", 1)[-1]
    model = getattr(schemas, name, None)
    assert isinstance(model, type) and issubclass(model, BaseModel), f"{ref} is not a model in m2fp_service.schemas"
    return model


def declared_response(document: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    operation = document["paths"].get(path, {}).get(method.lower())
    if operation is None:  # no such operation: the one error envelope
        assert status >= 400, f"{method} {path} is no documented operation but answered {status}"
        assert "ErrorResponse" in document["components"]["schemas"]
        return {"content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}
    declared = operation["responses"].get(str(status))
    assert declared is not None, (f"{method} {path} answered {status}, which its OpenAPI document does not "
                                  f"declare (declared: {sorted(operation['responses'])})")
    return declared  # type: ignore[no-any-return]


def check_against_document(document: dict[str, Any], method: str, path: str, response: httpx.Response) -> Any:
    """Validates ``response`` against the document; returns the JSON body, or the bytes for other media."""
    declared = declared_response(document, method, path, response.status_code)
    media = response.headers["content-type"].split(";")[0].strip()
    content = declared.get("content", {})
    assert media in content, f"{method} {path} {response.status_code} sent {media}, declared {sorted(content)}"
    schema = content[media].get("schema", {})
    if "$ref" in schema:
        model = model_named(schema["$ref"])
        body = response.json()
        validated = model.model_validate_json(response.content, strict=True)
        assert validated.model_dump(mode="json", exclude_unset=True) == body, (
            f"{method} {path}: the body has fields {model.__name__} does not describe, or values it changes")
        return body
    if schema.get("format") == "binary":
        image = Image.open(io.BytesIO(response.content))
        assert Image.MIME[image.format] == media
        image.load()
    elif schema.get("type") == "string":
        assert response.content.decode("utf-8")
    return response.content


def _photo(photo_jpeg: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"image": ("photo.jpg", photo_jpeg, "image/jpeg")}


# (id, client, method, path, request options, expected status); "PHOTO" stands for the photo upload
READY: list[tuple[str, str, str, str, dict[str, Any], int]] = [
    ("parse-seed", "client", "POST", "/api/parse", {"files": "PHOTO"}, 200),
    *[(f"parse-{name}", "client", "POST", "/api/parse", {"files": "PHOTO", "params": {"outputs": name}}, 200)
      for name in OUTPUT_NAMES],
    ("parse-all", "client", "POST", "/api/parse", {"files": "PHOTO", "params": {"outputs": "all"}}, 200),
    ("parse-all-form", "client", "POST", "/api/parse", {"files": "PHOTO", "data": {"outputs": "all"}}, 200),
    *[(f"parse-labels-{name}", "client", "POST", "/api/parse", {"files": "PHOTO", "params": {"labels": name}}, 200)
      for name in LABEL_SET_NAMES],
    ("parse-atr-all", "client", "POST", "/api/parse",
     {"files": "PHOTO", "params": {"labels": "atr", "outputs": "all"}}, 200),
    ("info", "client", "GET", "/api/info", {}, 200),
    ("healthz", "client", "GET", "/healthz", {}, 200),
    ("readyz", "client", "GET", "/readyz", {}, 200),
    ("metrics", "client", "GET", "/metrics", {}, 200),
    ("background-png", "client", "POST", "/api/background", {"files": "PHOTO"}, 200),
    ("background-webp", "client", "POST", "/api/background",
     {"files": "PHOTO", "params": {"mode": "blur", "format": "webp"}}, 200),
    ("background-jpeg", "client", "POST", "/api/background",
     {"files": "PHOTO", "params": {"mode": "color", "format": "jpeg"}}, 200),
    ("parse-400-output", "client", "POST", "/api/parse", {"files": "PHOTO", "params": {"outputs": "nope"}}, 400),
    ("parse-400-labels", "client", "POST", "/api/parse", {"files": "PHOTO", "params": {"labels": "nope"}}, 400),
    ("parse-400-no-image", "client", "POST", "/api/parse",
     {"files": {"picture": ("a.jpg", b"x", "image/jpeg")}}, 400),
    ("background-400-mode", "client", "POST", "/api/background", {"files": "PHOTO", "params": {"mode": "x"}}, 400),
    ("background-400-person", "client", "POST", "/api/background",
     {"files": "PHOTO", "params": {"keep": "people:99"}}, 400),
    ("background-400-unknown-param", "client", "POST", "/api/background",
     {"files": "PHOTO", "params": {"nope": "1"}}, 400),
    ("not-found", "client", "GET", "/api/nope", {}, 404),
    ("parse-405", "client", "GET", "/api/parse", {}, 405),
    ("background-405", "client", "GET", "/api/background", {}, 405),
    ("info-405", "client", "POST", "/api/info", {}, 405),
    ("parse-413", "client", "POST", "/api/parse",
     {"files": {"image": ("bomb.png", png_header_only(30000, 30000), "image/png")}}, 413),
    ("background-413", "client", "POST", "/api/background",
     {"files": {"image": ("bomb.png", png_header_only(30000, 30000), "image/png")}}, 413),
    ("parse-415-gif", "client", "POST", "/api/parse", {"files": {"image": ("a.gif", GIF, "image/gif")}}, 415),
    ("parse-415-not-multipart", "client", "POST", "/api/parse", {"content": b"{}",
                                                                 "headers": {"Content-Type": "application/json"}}, 415),
    ("background-415", "client", "POST", "/api/background", {"data": {"mode": "blur"}}, 415),
    ("parse-422", "client", "POST", "/api/parse",
     {"files": {"image": ("noise.jpg", os.urandom(4096), "image/jpeg")}}, 422),
    ("background-422-backdrop", "client", "POST", "/api/background",
     {"files": "PHOTO+TEXT", "params": {"mode": "image"}}, 422),
    ("parse-401", "keyed", "POST", "/api/parse", {"files": "PHOTO"}, 401),
    ("background-401", "keyed", "POST", "/api/background", {"files": "PHOTO", "headers": {"X-API-Key": "no"}}, 401),
    ("parse-503", "no_model", "POST", "/api/parse", {"files": "PHOTO"}, 503),
    ("background-503", "no_model", "POST", "/api/background", {"files": "PHOTO"}, 503),
    ("readyz-503", "no_model", "GET", "/readyz", {}, 503),
    ("info-no-model", "no_model", "GET", "/api/info", {}, 200),
    ("healthz-no-model", "no_model", "GET", "/healthz", {}, 200),
    ("metrics-no-model", "no_model", "GET", "/metrics", {}, 200),
]


@pytest.mark.parametrize(("client_name", "method", "path", "options", "status"), [row[1:] for row in READY],
                         ids=[row[0] for row in READY])
def test_response_validates_against_the_documented_model(request: pytest.FixtureRequest, document: dict[str, Any],
                                                         photo_jpeg: bytes, client_name: str, method: str, path: str,
                                                         options: dict[str, Any], status: int) -> None:
    client: TestClient = request.getfixturevalue(client_name)
    options = dict(options)
    if options.get("files") == "PHOTO":
        options["files"] = _photo(photo_jpeg)
    elif options.get("files") == "PHOTO+TEXT":
        options["files"] = {**_photo(photo_jpeg), "background": ("bg.txt", b"not a picture\n" * 8, "text/plain")}
    response = client.request(method, path, **options)
    assert response.status_code == status, response.text
    # A server with an API key serves a document that declares the auth and its 401s.
    served = client.get("/openapi.json").json() if client_name == "keyed" else document
    body = check_against_document(served, method, path, response)
    if isinstance(body, dict) and status >= 400 and path != "/readyz":  # /readyz answers its own status model
        assert set(body) == {"code", "message", "data"}
        assert body["code"] != 0 and body["message"] and body["data"] is None


@pytest.mark.parametrize("labels", [None, *LABEL_SET_NAMES])
def test_parse_without_outputs_has_exactly_the_seed_keys(client: TestClient, photo_jpeg: bytes,
                                                         labels: str | None) -> None:
    params = {} if labels is None else {"labels": labels}
    body = client.post("/api/parse", params=params, files=_photo(photo_jpeg)).json()
    assert list(body) == ["code", "message", "data"]
    assert body["code"] == 0 and body["message"] == "success"
    assert list(body["data"]) == SEED_DATA_KEYS
    assert len(body["data"]["masks"]) == len(body["data"]["classes"]) >= 2


def test_every_documented_operation_is_exercised(document: dict[str, Any]) -> None:
    """The table above covers every operation and every status it declares that is cheap to provoke."""
    sent = {(method.lower(), path, str(status)) for _, _, method, path, _, status in READY}
    expensive = {"408", "504"}  # a slow upload, a timeout: tests/api/test_errors.py provokes them
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status in operation["responses"]:
                if status in expensive:
                    continue
                assert (method, path, status) in sent, f"{method.upper()} {path} {status} is declared but not checked"
