"""WebUI fixtures: Debian's chromium driven by Playwright, against a real `m2fp serve` with the tiny model.

Every page is served under the Content-Security-Policy the service is going to send
(``default-src 'self'; img-src 'self' data: blob:``: no inline script or style), added here by a route
handler on the document, and a test fails if the page breaks it or throws.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.integration.server import Server, serve

CSP = "default-src 'self'; img-src 'self' data: blob:"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MB = 1024 * 1024
MAX_UPLOAD = 8 * MB
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "webui"


def _chromium() -> str:
    """Debian's chromium; missing it skips locally but fails in CI, where .ci/run installs it."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install chromium): the WebUI tests need a real browser"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; .ci/run must install it", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def webui_server(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_model_path, tmp_path_factory.mktemp("webui-server"), queue_size=8,
               max_upload_bytes=MAX_UPLOAD) as server:
        yield server


@pytest.fixture(scope="session")
def photo_path(photo_jpeg: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's photograph (the astronaut pair, 1024 x 512) as a file a person would pick."""
    path = tmp_path_factory.mktemp("photos") / "astronaut.jpg"
    path.write_bytes(photo_jpeg)
    return path


@dataclass
class Watch:
    """What a page did: API requests, and anything that must fail the test (CSP violations, JS errors)."""

    problems: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    failed: list[Any] = field(default_factory=list)

    def api(self, path: str) -> list[Any]:
        return [r for r in self.requests if f"/{path}" in r.url]


def open_page(browser: Any, server: Server, *, width: int = 1280, height: int = 900,
              ready: bool = True) -> tuple[Any, Any, Watch]:
    """A fresh browser context and page on the WebUI under the CSP; returns (context, page, watch)."""
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    page = context.new_page()
    watch = Watch()

    def on_console(message: Any) -> None:
        text = message.text
        # A refused request (4xx) is logged by the browser; the tests check those statuses themselves.
        if "Content Security Policy" in text or (message.type == "error" and "Failed to load resource" not in text):
            watch.problems.append(f"console {message.type}: {text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: watch.problems.append(f"page error: {error}"))
    # Keeps Playwright's file-chooser interception on for the page's whole life: switched on per
    # expect_file_chooser() it can arrive after the key press, and the picker then opens unseen.
    page.on("filechooser", lambda chooser: None)
    page.on("request", lambda request: watch.requests.append(request))
    page.on("requestfailed", lambda request: watch.failed.append(request))

    def with_csp(route: Any) -> None:
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": CSP})

    page.route(f"{server.url}/", with_csp)
    page.goto(f"{server.url}/")
    if ready:
        page.locator("#model-meta", has_text="status: ready").wait_for()
    return context, page, watch


@pytest.fixture
def webui(browser: Any, webui_server: Server) -> Iterator[tuple[Any, Watch]]:
    """(page, watch) at desktop size; the test fails if the page violated the CSP or threw."""
    context, page, watch = open_page(browser, webui_server)
    yield page, watch
    context.close()
    assert not watch.problems, watch.problems


def screenshot(page: Any, name: str) -> Path:
    """Saves a full-page screenshot under test-artifacts/webui/ (gitignored) and returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
