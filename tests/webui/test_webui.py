"""The WebUI in a real browser (Debian's chromium, headless, via Playwright) against a real server.

A person's path through the page: a real photograph in (picker, drop, paste, keyboard), the legend and
the canvas checked against what the API itself returns, classes and people selected, the overlay's
opacity moved, files downloaded and decoded, a background composed and compared with the API's own
picture, bad files refused with a clear message. Every page runs under the service's coming CSP.
"""

from __future__ import annotations

import base64
import io
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from tests.integration.server import Server, serve
from tests.webui.conftest import MAX_UPLOAD, Watch, open_page, screenshot

pytestmark = pytest.mark.slow

CANVAS_STATS = """() => {
  const canvas = document.getElementById("parsing");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let opaque = 0, dimmed = 0;
  for (let i = 3; i < data.length; i += 4) {
    if (data[i] === 255) opaque += 1; else if (data[i] > 0) dimmed += 1;
  }
  return {width: canvas.width, height: canvas.height, opaque, dimmed};
}"""


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


@pytest.fixture(scope="module")
def reference(webui_server: Server, photo_jpeg: bytes) -> dict[str, Any]:
    """What the API itself says about the photo: classes, areas, label map, people (with masks)."""
    r = requests.post(f"{webui_server.url}/api/parse", params={"outputs": "label,areas,people"},
                      files={"image": ("astronaut.jpg", photo_jpeg, "image/jpeg")}, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data["classes"]) >= 3 and len(data["people"]) >= 2, "the tiny model must give a non-trivial result"
    data["label"] = png_array(base64.b64decode(data["label_map"]))
    for person in data["people"]:
        person["mask_array"] = png_array(base64.b64decode(person["mask"])) > 127
    return data


def choose_file(page: Any, path: Path) -> None:
    """Opens the picker as a person does (click on the drop zone) and picks ``path``."""
    with page.expect_file_chooser() as chooser:
        page.click("#drop")
    chooser.value.set_files(str(path))


def wait_parsed(page: Any, name: str, timeout: float = 60_000) -> None:
    page.locator("#status", has_text=f"Parsed {name}").wait_for(timeout=timeout)


def upload(page: Any, path: Path) -> None:
    with page.expect_response(lambda r: "/api/parse" in r.url):
        choose_file(page, path)
    wait_parsed(page, path.name)


def stats(page: Any) -> dict[str, int]:
    return page.evaluate(CANVAS_STATS)  # type: ignore[no-any-return]


def legend(page: Any) -> list[tuple[str, int]]:
    """(class name, pixels) per legend entry, as the page shows them."""
    entries = []
    for button in page.locator("#legend button").all():
        name = button.locator(".name").inner_text()
        pixels = int(re.sub(r"\D", "", button.get_attribute("title")))
        entries.append((name, pixels))
    return entries


def click_away(page: Any, locator: Any) -> None:
    """Clicks, then moves the mouse off the page (a hovered legend entry or person is highlighted)."""
    locator.click()
    page.mouse.move(0, 0)


def composed_request(page: Any) -> dict[str, str]:
    return json.loads(page.locator("#composed").get_attribute("data-request"))  # type: ignore[no-any-return]


def download(page: Any, selector: str) -> tuple[str, bytes]:
    with page.expect_download() as info:
        page.click(selector)
    path = info.value.path()
    return info.value.suggested_filename, Path(path).read_bytes()


# ---- the page itself --------------------------------------------------------------------------------------


def test_page_has_no_inline_code_or_style() -> None:
    webui = resources.files("m2fp_service") / "webui"
    html = (webui / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script>"
    assert not re.search(r"<style\b", html), "inline <style>"
    assert not re.search(r"\sstyle\s*=", html), "style attribute"
    assert not re.search(r"\son[a-z]+\s*=", html), "on* handler attribute"
    for module in ("app.js", "api.js", "dom.js", "intake.js", "photo.js", "compose.js", "render.js"):
        code = (webui / module).read_text()
        assert "innerHTML" not in code and "eval(" not in code and "new Function" not in code, module
        assert not re.search(r"setAttribute\(\s*[\"']style", code), module


def test_page_loads_offline_under_the_csp(webui: tuple[Any, Watch], webui_server: Server) -> None:
    page, watch = webui
    banner = page.locator("#banner-untrained")
    assert banner.is_visible() and "UNTRAINED DEMO MODEL" in banner.inner_text()
    assert page.locator("#views-nav a[aria-current=page]").inner_text() == "Photo"
    outside = [r.url for r in watch.requests if not r.url.startswith((webui_server.url, "data:", "blob:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"
    # The CSP is really enforced here: an inline style attribute is refused (and reported).
    width = page.evaluate("""() => {
      const probe = document.createElement("div");
      probe.setAttribute("style", "width: 123px");
      document.body.append(probe);
      const width = getComputedStyle(probe).width;
      probe.remove();
      return width;
    }""")
    assert width != "123px"
    page.wait_for_timeout(200)
    assert any("Content Security Policy" in p for p in watch.problems), "the CSP probe went unnoticed"
    watch.problems.clear()


# ---- parse, explore, download -------------------------------------------------------------------------------


def test_parse_explore_and_download(webui: tuple[Any, Watch], photo_path: Path, reference: dict[str, Any],
                                    webui_server: Server, photo_jpeg: bytes) -> None:
    page, watch = webui
    upload(page, photo_path)
    h, w = reference["label"].shape
    total = h * w
    areas = reference["areas"]

    # Parsing started on its own, without person masks.
    parse_urls = [r.url for r in watch.api("api/parse")]
    assert len(parse_urls) == 1 and "people" not in parse_urls[0] and "label" in parse_urls[0]
    summary = page.inner_text("#summary")
    assert f"{w} × {h} px" in summary and "inference" in summary and "UNTRAINED" in summary

    # The legend lists exactly the API's classes, with the API's pixel counts (decoded from the label map).
    assert legend(page) == [(name, areas[name]) for name in reference["classes"]]
    canvas = stats(page)
    assert (canvas["width"], canvas["height"]) == (w, h)
    assert canvas["opaque"] == total - areas.get("background", 0) and canvas["dimmed"] == 0
    screenshot(page, "result")

    # Classes: one shows only it, two combine, show all restores.
    parts = sorted((n for n in reference["classes"] if n != "background"), key=lambda n: -areas[n])
    first, second = page.locator("#legend button", has_text=parts[0]), page.locator("#legend button", has_text=parts[1])
    click_away(page, first)
    assert first.get_attribute("aria-pressed") == "true"
    assert stats(page)["opaque"] == areas[parts[0]]
    click_away(page, second)
    assert stats(page)["opaque"] == areas[parts[0]] + areas[parts[1]]
    click_away(page, first)
    assert first.get_attribute("aria-pressed") == "false" and stats(page)["opaque"] == areas[parts[1]]
    click_away(page, page.locator("#show-all"))
    assert stats(page)["opaque"] == total - areas.get("background", 0)
    # Hovering a class highlights it: the others are dimmed.
    page.locator("#legend button", has_text=parts[2]).hover()
    hovered = stats(page)
    others = total - areas.get("background", 0) - areas[parts[2]]
    assert hovered["opaque"] == areas[parts[2]] and hovered["dimmed"] == others
    page.mouse.move(0, 0)
    assert stats(page)["dimmed"] == 0

    # Overlay with an opacity slider.
    page.check("input[name=layout][value=overlay]")
    assert page.locator("#opacity").is_visible()
    page.fill("#opacity", "25")
    assert page.inner_text("#opacity-out") == "25%"
    assert page.eval_on_selector("#parsing", "c => getComputedStyle(c).opacity") == "0.25"
    photo_box, parsing_box = page.locator("#photo-img").bounding_box(), page.locator("#parsing").bounding_box()
    assert abs(photo_box["x"] - parsing_box["x"]) < 2 and abs(photo_box["y"] - parsing_box["y"]) < 2
    page.check("input[name=layout][value=side]")
    assert not page.locator("#opacity").is_visible()

    # People: fetched only now, listed, selectable.
    page.click("#people-load")
    page.locator("#people button").first.wait_for()
    assert [("people" in r.url) for r in watch.api("api/parse")] == [False, True]
    people = reference["people"]
    assert page.locator("#people button").count() == len(people)
    label = reference["label"]
    pick = max(range(len(people)), key=lambda i: people[i]["area"])
    click_away(page, page.locator(f"#people button[data-person='{people[pick]['id']}']"))
    expected = int((people[pick]["mask_array"] & (label > 0)).sum())
    assert expected > 0 and stats(page)["opaque"] == expected
    other = next(p for p in people if p["id"] != people[pick]["id"])
    page.locator(f"#people button[data-person='{other['id']}']").hover()
    assert stats(page)["dimmed"] > 0
    page.mouse.move(0, 0)
    assert "people" in page.inner_text("#summary")

    # Downloads: the API's own colour map and label map, and a JSON summary.
    name, color_png = download(page, "#dl-color")
    assert name == "astronaut.cihp.color.png" and color_png == base64.b64decode(reference["result_image"])
    assert png_array(color_png).shape == (h, w, 3)
    _, label_png = download(page, "#dl-label")
    assert np.array_equal(png_array(label_png), label)
    _, summary_json = download(page, "#dl-json")
    summary_data = json.loads(summary_json)
    assert summary_data["classes"] == reference["classes"] and summary_data["areas"] == areas
    assert len(summary_data["people"]) == len(people) and "mask" not in summary_data["people"][0]

    # Another label set: parsed again (server cache), the legend in its classes.
    atr = requests.post(f"{webui_server.url}/api/parse", params={"labels": "atr", "outputs": "areas"},
                        files={"image": ("a.jpg", photo_jpeg, "image/jpeg")}, timeout=120).json()["data"]
    with page.expect_response(lambda r: "labels=atr" in r.url):
        page.select_option("#labels", "atr")
    page.locator("#dl-color[download='astronaut.atr.color.png']").wait_for()
    assert legend(page) == [(n, atr["areas"][n]) for n in atr["classes"]]


# ---- compose ----------------------------------------------------------------------------------------------


def test_compose_blurred_background_and_download(webui: tuple[Any, Watch], photo_path: Path,
                                                 reference: dict[str, Any], webui_server: Server,
                                                 photo_jpeg: bytes, photo: np.ndarray) -> None:
    page, watch = webui
    upload(page, photo_path)
    # A first preview on its own: everyone, transparent.
    page.locator("#composed[data-request*='transparent']").wait_for(timeout=60_000)
    assert page.eval_on_selector("#composed", "img => img.naturalWidth") == photo.shape[1]

    # Keep one class (the untrained model calls nearly everything a person), blur the rest.
    kept = max((n for n in reference["classes"] if n != "background"), key=lambda n: reference["areas"][n])
    page.locator("#legend button", has_text=kept).click()
    page.check("input[name=keep][value=chosen-classes]")
    page.locator(f"#composed[data-request*='classes:{kept}']").wait_for(timeout=60_000)
    page.check("input[name=mode][value=blur]")
    page.fill("#blur", "30")
    page.locator("#composed[data-request*='\"blur\":\"30\"']").wait_for(timeout=60_000)
    fields = composed_request(page)
    assert fields["keep"] == f"classes:{kept}" and fields["mode"] == "blur" and fields["labels"] == "cihp"
    assert "cache" in page.inner_text("#compose-status"), "recomposing must not run inference again"

    name, picture = download(page, "#dl-composed")
    assert name == "astronaut.blur.png"
    composed = png_array(picture)
    assert composed.shape[:2] == photo.shape[:2]
    api = requests.post(f"{webui_server.url}/api/background", data=fields,
                        files={"image": ("a.jpg", photo_jpeg, "image/jpeg")}, timeout=120)
    assert api.status_code == 200, api.text
    assert np.array_equal(composed, png_array(api.content)), "the page must show what the API composes"
    rest = reference["label"] != reference["classes"].index(kept)
    original = np.asarray(Image.open(photo_path).convert("RGB"), dtype=np.int16)
    assert np.abs(composed[..., :3].astype(np.int16) - original)[rest].mean() > 3, "the background is not blurred"

    # Chosen people and a colour: the request follows the selection.
    page.click("#people-load")
    page.locator("#people button").first.wait_for()
    first = reference["people"][0]["id"]
    page.locator(f"#people button[data-person='{first}']").click()
    page.check("input[name=keep][value=chosen-people]")
    page.check("input[name=mode][value=color]")
    page.fill("#color", "#ff0000")
    page.locator(f"#composed[data-request*='people:{first}'][data-request*='ff0000']").wait_for(timeout=60_000)
    assert not page.inner_text("#compose-error")


def test_compose_shows_only_the_latest_request(browser: Any, webui_server: Server, photo_path: Path) -> None:
    context, page, watch = open_page(browser, webui_server)
    try:
        upload(page, photo_path)
        page.locator("#composed[data-request*='transparent']").wait_for(timeout=60_000)
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions",
                 {"offline": False, "latency": 1500, "downloadThroughput": -1, "uploadThroughput": -1})
        before = len(watch.api("api/background"))
        with page.expect_request(lambda r: "/api/background" in r.url):
            page.check("input[name=mode][value=blur]")
        page.focus("#blur")
        for _ in range(5):  # quick changes: debounced into one request, which aborts the one in flight
            page.keyboard.press("ArrowRight")
        page.locator("#composed[data-request*='\"blur\":\"25\"']").wait_for(timeout=60_000)
        sent = watch.api("api/background")[before:]
        assert len(sent) == 2, [r.url for r in sent]
        aborted = [r for r in watch.failed if "/api/background" in r.url]
        assert aborted and aborted[0] is sent[0], "the stale request was not cancelled"
        assert composed_request(page)["mode"] == "blur"
        assert watch.problems == []
    finally:
        context.close()


# ---- input ------------------------------------------------------------------------------------------------


def test_drop_and_paste_start_parsing(webui: tuple[Any, Watch], photo_jpeg: bytes) -> None:
    page, watch = webui
    b64 = base64.b64encode(photo_jpeg).decode()
    make = """([b64, name]) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const transfer = new DataTransfer();
      transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
      return transfer;
    }"""
    transfer = page.evaluate_handle(make, [b64, "dropped.jpg"])
    page.dispatch_event("#drop", "dragenter", {"dataTransfer": transfer})
    assert "over" in page.get_attribute("#drop", "class")
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    wait_parsed(page, "dropped.jpg")
    assert page.locator("#legend button").count() >= 3
    page.evaluate(f"""(args) => {{
      const transfer = ({make})(args);
      document.dispatchEvent(new ClipboardEvent("paste", {{clipboardData: transfer, bubbles: true}}));
    }}""", [b64, "pasted.jpg"])
    wait_parsed(page, "pasted.jpg")
    assert len(watch.api("api/parse")) == 2
    assert "pasted.jpg" in page.inner_text("#drop")


def test_bad_files_get_a_clear_message(webui: tuple[Any, Watch], webui_server: Server, photo_path: Path) -> None:
    page, watch = webui
    # Checked in the browser: the type, and the size against /api/info's limit; nothing is sent.
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello\n" * 50}])
    assert "notes.txt is not a JPEG, PNG, WebP or BMP image (it is text/plain)" in page.inner_text("#error")
    page.set_input_files("#file", files=[{"name": "huge.jpg", "mimeType": "image/jpeg",
                                          "buffer": b"\xff\xd8\xff" + bytes(MAX_UPLOAD)}])
    assert "huge.jpg is 8.0 MB; this server accepts photos up to 8.0 MB" in page.inner_text("#error")
    assert watch.api("api/parse") == []
    # Refused by the server: its own message is shown.
    fake = b"just some text, not a photo\n" * 40
    expected = requests.post(f"{webui_server.url}/api/parse", files={"image": ("fake.jpg", fake, "image/jpeg")},
                             timeout=60)
    assert expected.status_code == 422
    with page.expect_response(lambda r: "/api/parse" in r.url) as response:
        page.set_input_files("#file", files=[{"name": "fake.jpg", "mimeType": "image/jpeg", "buffer": fake}])
    assert response.value.status == 422
    error = page.locator("#error")
    error.filter(has_text=expected.json()["message"]).wait_for()
    assert error.get_attribute("role") == "alert" and page.locator("#results").is_hidden()
    # And a good photo afterwards clears the message.
    upload(page, photo_path)
    assert page.inner_text("#error") == ""


def test_object_urls_are_revoked_when_replaced(webui: tuple[Any, Watch], photo_path: Path, tmp_path: Path) -> None:
    page, _ = webui
    upload(page, photo_path)
    old = page.get_attribute("#photo-img", "src")
    old_download = page.get_attribute("#dl-color", "href")
    second = tmp_path / "second.png"
    Image.open(photo_path).save(second)
    upload(page, second)
    loads = """(url) => new Promise((done) => {
      const img = new Image();
      img.onload = () => done(true);
      img.onerror = () => done(false);
      img.src = url;
    })"""
    assert old.startswith("blob:") and page.get_attribute("#photo-img", "src") != old
    assert page.evaluate(loads, page.get_attribute("#photo-img", "src")) is True
    assert page.evaluate(loads, old) is False, "the replaced photo's object URL is still alive"
    assert page.evaluate(loads, old_download) is False, "the replaced download's object URL is still alive"


# ---- keyboard, phone width, labels --------------------------------------------------------------------------


def tab_to(page: Any, selector: str, limit: int = 80) -> None:
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement?.matches(s) ?? false", selector):
            return
    raise AssertionError(f"Tab never reached {selector}")


INTERACTIVE = {"button", "link", "textbox", "slider", "combobox", "radio", "checkbox", "ColorWell", "spinbutton",
               "PopUpButton"}


def unnamed_controls(page: Any) -> tuple[int, list[str]]:
    """(controls checked, those without an accessible name), from the browser's own accessibility tree."""
    cdp = page.context.new_cdp_session(page)
    nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    cdp.detach()
    missing, checked = [], 0
    for node in nodes:
        role = node.get("role", {}).get("value")
        if node.get("ignored") or role not in INTERACTIVE:
            continue
        checked += 1
        if not str(node.get("name", {}).get("value", "")).strip():
            missing.append(f"{role} (node {node.get('backendDOMNodeId')})")
    return checked, missing


def test_keyboard_only_at_phone_width(browser: Any, webui_server: Server, photo_path: Path) -> None:
    context, page, watch = open_page(browser, webui_server, width=390, height=640)
    try:
        assert page.evaluate("document.documentElement.scrollHeight > innerHeight"), "the page must be able to scroll"
        tab_to(page, "#drop")
        assert page.evaluate("document.activeElement.tagName") == "BUTTON"  # a real button: role and keys
        scroll = page.evaluate("scrollY")
        with page.expect_file_chooser() as chooser:
            page.keyboard.press("Space")
        assert page.evaluate("scrollY") == scroll, "Space scrolled the page"
        with page.expect_response(lambda r: "/api/parse" in r.url):
            chooser.value.set_files(str(photo_path))
        wait_parsed(page, photo_path.name)
        page.focus("#drop")
        with page.expect_file_chooser():
            page.keyboard.press("Enter")

        # Layout and opacity, then classes, in the page's own Tab order.
        tab_to(page, "input[name=layout]")
        page.keyboard.press("ArrowRight")
        assert page.is_checked("input[name=layout][value=overlay]")
        tab_to(page, "#opacity")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        assert page.input_value("#opacity") == "50" and page.inner_text("#opacity-out") == "50%"
        tab_to(page, "#legend button")
        focused = page.locator("#legend button:focus")
        page.keyboard.press("Space")
        assert focused.get_attribute("aria-pressed") == "true"
        assert stats(page)["opaque"] > 0
        # People.
        tab_to(page, "#people-load")
        page.keyboard.press("Enter")
        page.locator("#people button:focus").wait_for()
        page.keyboard.press("Space")
        assert page.locator("#people button:focus").get_attribute("aria-pressed") == "true"
        # Compose: background mode by arrow keys, then the download link by Enter.
        tab_to(page, "input[name=mode]")
        page.keyboard.press("ArrowDown")
        assert page.is_checked("input[name=mode][value=blur]")
        page.locator("#composed[data-request*='blur']").wait_for(timeout=60_000)
        tab_to(page, "#dl-composed")
        with page.expect_download() as dl:
            page.keyboard.press("Enter")
        assert png_array(Path(dl.value.path()).read_bytes()).shape[:2] == (512, 1024)

        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "wider than a phone"
        checked, unnamed = unnamed_controls(page)
        assert checked >= 40 and unnamed == [], (checked, unnamed)
        assert page.locator("#status").get_attribute("role") == "status"
        screenshot(page, "phone")
        assert watch.problems == []
    finally:
        context.close()


# ---- API key ----------------------------------------------------------------------------------------------


def test_api_key_is_asked_for_and_sent(browser: Any, tiny_model_path: Path, tmp_path: Path, photo_path: Path) -> None:
    with serve(tiny_model_path, tmp_path, api_key="s3cret-key") as server:
        context, page, watch = open_page(browser, server, ready=False)
        try:
            # Every /api/* route needs the key, /api/info too: the page asks for it at once.
            page.locator("#model-meta", has_text="requires an API key").wait_for()
            assert page.locator("#api-key").is_visible()
            assert page.evaluate("document.activeElement.id") == "api-key"
            page.keyboard.type("s3cret-key")
            with page.expect_response(lambda r: "/api/info" in r.url) as info:
                page.keyboard.press("Enter")
            assert info.value.status == 200
            page.locator("#model-meta", has_text="status: ready").wait_for()
            with page.expect_response(lambda r: "/api/parse" in r.url) as accepted:
                choose_file(page, photo_path)
            assert accepted.value.status == 200
            assert accepted.value.request.headers.get("x-api-key") == "s3cret-key"
            wait_parsed(page, photo_path.name)
            page.locator("#composed[src]").wait_for(timeout=60_000)
            assert [p for p in watch.problems if "401" not in p] == []  # the refused /api/info is expected
        finally:
            context.close()
