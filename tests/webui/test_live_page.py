"""The Live page and the OBS output page in Chromium with a fake camera fed from a generated clip.

Chromium reads the camera from a Y4M file (``--use-file-for-fake-video-capture``): the astronaut
walking across a striped scene, the clip the video tests use. The page streams it to a real
`m2fp serve` over /api/live and draws what comes back; the OBS page watches the same session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from tests.integration.server import Server, serve
from tests.video.conftest import CLIP_HW, scene
from tests.webui.conftest import ARTIFACTS, CHROMIUM_ARGS, Watch, _chromium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def camera_y4m(tmp_path_factory: pytest.TempPathFactory, person_cutout: np.ndarray) -> Path:
    """60 frames of the walking clip as raw YUV 4:2:0 (what Chromium's fake camera plays, in a loop)."""
    path = tmp_path_factory.mktemp("camera") / "walk.y4m"
    h, w = CLIP_HW
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(60):
            out.write(b"FRAME\n")
            out.write(cv2.cvtColor(scene(i % 40, person_cutout), cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


@pytest.fixture(scope="module")
def camera_browser(camera_y4m: Path) -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    args = [*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={camera_y4m}"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def live_server(tiny_model_path: Path, light_models: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_model_path, tmp_path_factory.mktemp("live-server"), light_model=light_models["general"],
               light_model_landscape=light_models["landscape"]) as server:
        yield server


def open_page(browser: Any, server: Server, path: str) -> tuple[Any, Any, Watch]:
    """The page as the server sends it, with its own Content-Security-Policy (checked to be there: a
    rewritten response would make Chromium treat the page as foreign and block its loopback socket)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = Watch()
    page.on("console", lambda m: watch.problems.append(f"console {m.type}: {m.text}")
            if "Content Security Policy" in m.text or m.type == "error" else None)
    page.on("pageerror", lambda error: watch.problems.append(f"page error: {error}"))
    response = page.goto(f"{server.url}/{path}")
    csp = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
    return context, page, watch


def canvas_pixels(page: Any, selector: str) -> np.ndarray:
    """The canvas's RGBA pixels, read in the page."""
    data = page.evaluate(
        """(sel) => { const c = document.querySelector(sel);
                      return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""",
        selector)
    width = page.evaluate("(sel) => document.querySelector(sel).width", selector)
    return np.asarray(data, np.uint8).reshape(-1, width, 4)


def test_live_page_streams_the_camera_with_a_new_background(camera_browser: Any, live_server: Server) -> None:
    context, page, watch = open_page(camera_browser, live_server, "live")
    try:
        page.select_option("#live-mode", "color")
        page.fill("#live-color", "#00ff00")
        page.click("#live-start")
        page.wait_for_function("() => Number(document.querySelector('#live-canvas').dataset.frames || 0) >= 10",
                               timeout=120_000)
        assert page.locator("#stat-fps").inner_text() != "–"
        assert "ms" in page.locator("#stat-rtt").inner_text()
        pixels = canvas_pixels(page, "#live-canvas")
        assert pixels.shape[:2] == CLIP_HW
        green = (pixels[..., 1] > 200) & (pixels[..., 0] < 60) & (pixels[..., 2] < 60)
        assert 0.3 < green.mean() < 0.97, f"the scene became green, the person did not ({green.mean():.2f})"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "live.png"), full_page=True)
        page.click("#live-stop")
        assert page.locator("#live-status").inner_text() == "stopped"
    finally:
        context.close()
    assert not watch.problems, watch.problems


def test_obs_page_shows_the_session_on_a_transparent_page(camera_browser: Any, live_server: Server) -> None:
    obs_context, obs, obs_watch = open_page(camera_browser, live_server, "obs?session=studio")
    context, page, watch = open_page(camera_browser, live_server, "live")
    try:
        assert obs.evaluate("() => getComputedStyle(document.body).backgroundColor") == "rgba(0, 0, 0, 0)"
        page.select_option("#live-mode", "transparent")
        page.fill("#live-session", "studio")
        page.click("#live-start")
        obs.wait_for_function("() => Number(document.querySelector('#obs-canvas').dataset.frames || 0) >= 5",
                              timeout=120_000)
        assert obs.locator("#obs-status").is_hidden(), "nothing but the picture once frames flow"
        alpha = canvas_pixels(obs, "#obs-canvas")[..., 3]
        assert (alpha == 0).mean() > 0.3 and (alpha == 255).mean() > 0.03, "transparent scene, opaque person"
    finally:
        context.close()
        obs_context.close()
    assert not watch.problems and not obs_watch.problems, watch.problems + obs_watch.problems
