"""schemathesis (every check) against a real `m2fp serve`, from the published schema.

Every operation of the document is exercised, so new endpoints join as they land. Without a key the
committed ``openapi/openapi.json`` is the contract; with ``M2FP_API_KEY`` set, the document the server
serves (which then declares the auth) is, and schemathesis also checks that bad or missing keys are
refused. The example count per operation is bounded for CI (``SCHEMATHESIS_MAX_EXAMPLES``, default 20).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.server import serve

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "openapi" / "openapi.json"
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "20"))
KEY = "fuzz-key-0123456789"
CONFIG = Path(__file__).with_name("schemathesis.toml")  # per-operation exceptions, with their reasons


def run_schemathesis(schema: str, url: str, workdir: Path, *extra: str) -> dict[str, object]:
    """Runs the schemathesis CLI with all checks; returns its JSON report (and prints its summary)."""
    report = workdir / "schemathesis.json"
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "run", schema, "--url",
           url,
           "--max-examples", str(MAX_EXAMPLES), "--seed", "20261125", "--generation-database", "none",
           "--request-timeout", "120", "--no-color", "--report", "json", "--report-json-path", str(report), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks"}
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    print(done.stdout[-3000:])
    assert report.is_file(), done.stdout + done.stderr
    result: dict[str, object] = json.loads(report.read_text())
    assert done.returncode == 0 and not result["failures"] and not result["errors"], done.stdout[-6000:]
    return result


def _summary(result: dict[str, object]) -> str:
    ops, cases = result["operations"], result["test_cases"]
    return f"{ops['tested']} operations, {cases['generated']} test cases"  # type: ignore[index]


def test_schemathesis_default_settings_against_the_committed_schema(tiny_model_path: Path, tmp_path: Path) -> None:
    with serve(tiny_model_path, tmp_path, queue_size=16) as s:
        before = s.metrics()  # /readyz answered 503 while the model loaded
        result = run_schemathesis(str(COMMITTED), s.url, tmp_path)
        assert s.healthy()
        errors_5xx = {k: v - before.get(k, 0) for k, v in s.metrics().items()
                      if k.startswith("m2fp_http_requests_total") and 'status="5' in k and v > before.get(k, 0)}
    ops = result["operations"]
    assert ops["tested"] == ops["total"] >= 5, ops  # type: ignore[index]
    assert not errors_5xx, errors_5xx
    print("schemathesis, no key:", _summary(result))


def test_schemathesis_with_an_api_key_against_the_served_schema(tiny_model_path: Path, tmp_path: Path) -> None:
    with serve(tiny_model_path, tmp_path, queue_size=16, api_key=KEY) as s:
        result = run_schemathesis(f"{s.url}/openapi.json", s.url, tmp_path, "--header", f"Authorization: Bearer {KEY}")
        assert s.healthy()
    ops = result["operations"]
    assert ops["tested"] == ops["total"] >= 5, ops  # type: ignore[index]
    print("schemathesis, with key:", _summary(result))
