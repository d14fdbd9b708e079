"""The committed openapi/openapi.json is what the app serves (regenerate: `m2fp openapi`)."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from m2fp_service.api.serve import openapi_text, write_openapi
from m2fp_service.cli import main

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_committed_schema_matches_the_app(client: TestClient) -> None:
    assert COMMITTED.is_file(), "openapi/openapi.json is missing: run `m2fp openapi`"
    served = client.get("/openapi.json").json()
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert committed == served, "openapi/openapi.json is stale: run `m2fp openapi` (or `make openapi`)"
    assert COMMITTED.read_text(encoding="utf-8") == openapi_text(), "not formatted by `m2fp openapi`"


def test_check_mode(tmp_path: Path) -> None:
    assert write_openapi(COMMITTED, check=True) == 0
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n")
    assert main(["openapi", "--check", "-o", str(stale)]) == 1
    assert main(["openapi", "-o", str(stale)]) == 0
    assert stale.read_text() == COMMITTED.read_text()


def test_stable_operation_ids_and_documented_parse(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    ops = {op["operationId"]: (path, method) for path, item in doc["paths"].items() for method, op in item.items()}
    assert ops == {"parse": ("/api/parse", "post"), "background": ("/api/background", "post"),
                   "info": ("/api/info", "get"), "healthz": ("/healthz", "get"),
                   "readyz": ("/readyz", "get"), "metrics": ("/metrics", "get")}
    parse = doc["paths"]["/api/parse"]["post"]
    body = parse["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["image"] and body["properties"]["image"]["format"] == "binary"
    assert "cutout" in body["properties"]["outputs"]["description"]
    query = {p["name"]: p for p in parse["parameters"]}
    assert set(query["outputs"]["examples"]) >= {"overlay", "people", "background", "all"}
    assert {"200", "400", "413", "415", "422", "503", "504"} <= set(parse["responses"])
    assert parse["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    schemas = doc["components"]["schemas"]
    assert {"ParseResponse", "ParseData", "PersonOut", "ErrorResponse", "InfoResponse"} <= set(schemas)
    assert schemas["ParseResponse"]["examples"][0]["code"] == 0
    assert "HTTPValidationError" not in schemas
    # No key configured (the committed document's settings): no auth is described, none is enforced.
    assert "securitySchemes" not in doc["components"] and "401" not in parse["responses"]
    assert not any("security" in op for item in doc["paths"].values() for op in item.values())
