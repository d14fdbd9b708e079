"""The WebUI, Swagger UI and ReDoc really work under our Content-Security-Policy, in headless Chromium.

Debian's chromium driven by Playwright (``.ci/run`` installs it). Chromium reports every CSP
violation on the console; none may appear, while a script injected into the page is refused (the
policy is really enforced).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.server import Server, serve

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "browser-key-42"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def keyed_server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_model_path, tmp_path_factory.mktemp("csp"), api_key=KEY) as s:
        yield s


def _open(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url)
    return page, problems


# ReDoc's footer fetches its vendor's logo from a CDN: the CSP blocks that, so the docs stay offline.
_EXPECTED_BLOCKS = ("Loading the image 'https://cdn.redoc.ly/",)


def _csp_violations(problems: list[str]) -> list[str]:
    return [p for p in problems if "Content Security Policy" in p and not p.startswith(_EXPECTED_BLOCKS)]


def test_webui_runs_under_the_csp_and_sends_the_key(browser: Any, keyed_server: Server) -> None:
    page, problems = _open(browser, keyed_server.url + "/")
    meta = page.locator("#model-meta")
    meta.filter(has_text="requires an API key").wait_for(timeout=15000)  # app.js ran, got the 401
    assert page.locator("#key-row").is_visible()
    assert page.evaluate("getComputedStyle(document.querySelector('header')).backgroundColor") == \
        "rgb(255, 255, 255)", "app.css did not apply"
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    meta.filter(has_text="status: ready").wait_for(timeout=15000)
    assert page.locator("#banner-untrained").is_visible()
    injected = page.evaluate("""() => { const s = document.createElement('script');
        s.textContent = 'window.__injected = 1'; document.body.append(s); return window.__injected; }""")
    assert injected is None, "an inline script ran: the CSP is not enforced"
    page.wait_for_timeout(200)
    violations = _csp_violations(problems)
    assert len(violations) == 1 and "inline script" in violations[0], problems  # only the injected one
    page.close()


@pytest.mark.parametrize(("path", "ready"), [("/docs", ".swagger-ui .info .title"), ("/redoc", "h1")])
def test_api_docs_render_under_their_csp(browser: Any, keyed_server: Server, path: str, ready: str) -> None:
    page, problems = _open(browser, keyed_server.url + path)
    page.locator(ready).filter(has_text="m2fp-service").first.wait_for(timeout=30000)
    page.get_by_text("/api/parse").first.wait_for(timeout=30000)
    page.wait_for_timeout(500)
    assert not _csp_violations(problems), problems
    page.close()
