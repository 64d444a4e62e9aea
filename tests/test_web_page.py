"""The chat page of `llama3v serve` in a real headless Chromium (Debian's package, driven by Selenium).

Skips only when no Chromium/chromedriver is installed (`scripts/setup.sh` installs them where it can).
The end-to-end test takes a screenshot; with LLAMA3V_UPDATE_SCREENSHOT=1 it replaces docs/web-ui.png, the one
the README shows (a plain test run leaves the tracked file alone).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from llama3v.runtime.image_processing import ImageSpec, TileLayout, load_image, process_image, tile_boxes
from llama3v.runtime.video import Sampling, sample_indices
from llama3v.testing.factory import TinySpec

KEY = "page-key"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "web-ui.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny, running_server):
    built = tiny(TinySpec(seed=2), "hf-5", "f32")
    with running_server(built, "--api-key", KEY, "--max-tiles", "4", "--max-body-mb", "2",
                        "--n-ctx", "4096") as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium and chromedriver installed (scripts/setup.sh installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (llama3v[test])")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1100,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def _css(driver, selector: str) -> list:
    return driver.find_elements("css selector", selector)


def _stat(answer, name: str) -> float:
    text = answer.find_element("css selector", f'[data-stat="{name}"]').text
    return float(re.match(r"[\d,.]+", text).group(0).replace(",", ""))


def _ready(driver) -> bool:
    return driver.find_element("tag name", "body").get_attribute("data-ready") == "true"


def _load(driver, base: str) -> None:
    """Open the page, giving the API key if it asks."""
    driver.get(base)
    _wait(driver, lambda d: _ready(d) or d.find_element("id", "key-dialog").get_attribute("open") is not None)
    if not _ready(driver):
        driver.find_element("id", "key").send_keys(KEY + "\n")
        _wait(driver, _ready)


def _ask(driver, question: str, press_enter: bool):
    from selenium.webdriver.common.keys import Keys

    n = len(_css(driver, "article.assistant"))
    box = driver.find_element("id", "prompt")
    box.send_keys(question)
    if press_enter:
        box.send_keys(Keys.ENTER)
    else:
        driver.find_element("id", "send").click()
    _wait(driver, lambda d: len(_css(d, "article.assistant")) == n + 1)
    answer = _css(driver, "article.assistant")[n]
    _wait(driver, lambda d: answer.find_elements("css selector", '[data-stat="reused"]')
          or "error" in answer.get_attribute("class"))
    assert "error" not in answer.get_attribute("class"), answer.text
    return answer


def test_chat_page_end_to_end(server, browser, photo, tmp_path):
    d = browser
    d.get(server)
    d.execute_script("sessionStorage.clear()")
    d.refresh()
    # The server wants a key: the page asks once and keeps it for the tab.
    _wait(d, lambda d: d.find_element("id", "key-dialog").get_attribute("open") is not None)
    d.find_element("id", "key").send_keys(KEY + "\n")
    _wait(d, _ready)
    assert d.execute_script("return sessionStorage.getItem('llama3v-api-key')") == KEY
    d.refresh()  # asked once: the tab keeps the key
    _wait(d, _ready)
    assert d.find_element("id", "key-dialog").get_attribute("open") is None
    assert d.find_element("id", "model").text == "model-f32"

    d.find_element("css selector", "#settings summary").click()
    d.find_element("id", "temperature").clear()
    d.find_element("id", "temperature").send_keys("0")
    d.find_element("id", "max-tokens").send_keys("16")
    d.find_element("id", "file").send_keys(str(photo))
    # 640x488 with --max-tiles 4: a 2x2 grid of slices plus the base view, drawn over the thumbnail.
    _wait(d, lambda d: len(_css(d, "#tray .tile")) == 5)
    caption = d.find_element("css selector", "#tray figcaption").text
    assert "640×488" in caption and "2×2 tiles" in caption
    tiles = _css(d, "#tray .tile:not(.base)")
    widths = {round(t.size["width"]) for t in tiles}
    assert len(widths) == 1 and widths.pop() > 40, "four equal tiles, each half the thumbnail wide"

    first = _ask(d, "What is in the image?", press_enter=True)
    assert first.find_element("css selector", ".text").text.strip()
    assert _stat(first, "encodes") == 5 and _stat(first, "encode-ms") > 0 and _stat(first, "reused") == 0
    prompt_tokens = _stat(first, "prompt-tokens")
    assert prompt_tokens > 5 * 16 and "tokens/s" in first.find_element("css selector", '[data-stat="decode"]').text

    second = _ask(d, "And what colours?", press_enter=False)
    assert second.find_element("css selector", ".text").text.strip()
    assert _stat(second, "reused") >= prompt_tokens, "the follow-up reuses the whole first turn"
    assert _stat(second, "encodes") == 0, "and does not encode the photo again"
    assert _stat(second, "prompt-tokens") > prompt_tokens

    # The page's first answer is the API's answer to the same request.
    uri = "data:image/jpeg;base64," + base64.b64encode(photo.read_bytes()).decode()
    api = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                     json={"messages": [{"role": "user", "content": [
                         {"type": "image_url", "image_url": {"url": uri}},
                         {"type": "text", "text": "What is in the image?"}]}], "temperature": 0, "max_tokens": 16})
    assert api.json()["choices"][0]["message"]["content"] == first.find_element("css selector", ".text").text
    shot = SCREENSHOT if os.environ.get("LLAMA3V_UPDATE_SCREENSHOT") == "1" else tmp_path / "web-ui.png"
    assert d.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0


def test_errors_are_shown_as_the_api_reports_them(server, browser, tmp_path, photo):
    d = browser
    _load(d, server)
    big = tmp_path / "big.png"  # noise does not compress: about 3.6 MB
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2 << 20
    d.find_element("id", "file").send_keys(str(big))
    problem = _wait(d, lambda d: _css(d, "#tray .problem"))[0]
    assert problem.text == "Error 413: request body over the 2 MiB limit"
    d.find_element("css selector", "#tray .remove").click()
    assert not _css(d, "#tray .attachment")

    # A context the answer cannot fit in: the API's 400, and the question and its photo back to edit.
    d.find_element("id", "file").send_keys(str(photo))
    _wait(d, lambda d: len(_css(d, "#tray .tile")) == 5)
    d.find_element("css selector", "#settings summary").click()
    d.find_element("id", "max-tokens").send_keys("5000")
    d.find_element("id", "prompt").send_keys("Tell me everything.\n")
    error = _wait(d, lambda d: _css(d, "article.assistant.error"))[0]
    assert error.get_attribute("role") == "alert"
    assert error.text.startswith("Error 400: max_tokens 5000 does not fit: the context holds 4096 positions")
    assert d.find_element("id", "prompt").get_attribute("value") == "Tell me everything."
    assert len(_css(d, "#tray .tile")) == 5 and d.find_element("css selector", "#tray .remove").is_displayed()


def test_stop_button(server, browser, photo):
    d = browser
    _load(d, server)
    d.find_element("css selector", "#settings summary").click()
    d.find_element("id", "temperature").clear()
    d.find_element("id", "temperature").send_keys("0")
    d.find_element("id", "max-tokens").send_keys("3000")  # greedy runs ~800 tokens (~2 s here) on this question
    d.find_element("id", "file").send_keys(str(photo))
    _wait(d, lambda d: len(_css(d, "#tray .tile")) == 5)
    cancelled = httpx.get(f"{server}/health").json()["cancelled"]
    d.find_element("id", "prompt").send_keys("What is in the image?\n")
    answer = _wait(d, lambda d: [a for a in _css(d, "article.assistant")
                                 if a.find_element("css selector", ".text").text])[0]
    d.find_element("id", "stop").click()
    _wait(d, lambda d: answer.find_elements("css selector", ".note"))
    assert answer.find_element("css selector", ".note").text == "stopped"
    assert not answer.find_elements("css selector", ".stats"), "stopped before the end: no final chunk"
    health = _wait(d, lambda d: (h := httpx.get(f"{server}/health").json())["cancelled"] > cancelled and h)
    assert health["cancelled"] == cancelled + 1 and not health["busy"], "the server stopped generating"
    assert d.find_element("id", "send").is_enabled() and not d.find_element("id", "stop").is_displayed()


def test_phone_width(server, browser, motion_video):
    d = browser
    d.set_window_size(390, 844)
    _load(d, server)
    d.find_element("id", "file").send_keys(str(motion_video))
    # A video: the frames the runtime samples, with their times.
    _wait(d, lambda d: len(_css(d, "#tray .frames figure")) == 16)
    assert d.find_element("css selector", "#tray .frames figcaption").text == "0.0 s"
    assert "16 frames sampled over 3.0 s" in d.find_element("css selector", "#tray .attachment > figcaption").text
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    box = d.find_element("id", "prompt")
    assert box.size["width"] > 300, "the message box takes the phone's width"


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def test_image_preview_is_what_the_runtime_encodes(server, photo):
    uri = _data_uri(photo, "image/jpeg")
    plan = httpx.post(f"{server}/v1/llama3v/media", headers=AUTH, json={"type": "image", "url": uri}).json()
    assert (plan["layout"], plan["grid"], plan["n_tiles"], plan["width"], plan["height"]) == \
        ("slices", [2, 2], 5, 640, 488)
    answer = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}],
        "max_tokens": 1}).json()
    (media,) = answer["llama3v"]["media"]
    assert (media["rows"], media["n_tiles"], media["grid"]) == (plan["rows"], plan["n_tiles"], plan["grid"])
    # Each box, cut from the photo and scaled to the tower's size, is the tile the runtime encodes.
    image = load_image(photo)
    tiles = process_image(image, ImageSpec(size=plan["tower_size"], max_tiles=4)).tiles
    for (x, y, w, h), tile in zip(plan["tiles"], tiles[1:], strict=True):
        cut = image.crop((round(x), round(y), round(x + w), round(y + h))).resize(tile.shape[:2][::-1],
                                                                                 Image.Resampling.BICUBIC)
        assert np.abs(np.asarray(cut, np.int16) - tile).mean() < 6
    shifted = image.crop((0, 0, 320, 244)).resize(tiles[1].shape[:2][::-1], Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(shifted, np.int16) - tiles[2]).mean() > 20, "a wrong box would show"


def test_anyres_boxes_cover_the_image_once():
    spec = ImageSpec(size=32, grid_pinpoints=((64, 32), (32, 64), (64, 64), (32, 96)))
    for size in [(97, 61), (61, 97), (200, 60), (40, 40)]:
        layout = process_image(Image.new("RGB", size), spec).layout
        base, boxes = tile_boxes(layout, spec)
        assert base == (0.0, 0.0, *map(float, size)) and len(boxes) == layout.grid[0] * layout.grid[1] > 1
        covered = np.zeros(size[::-1], np.int32)
        for x, y, w, h in boxes:
            assert x >= 0 and y >= 0 and x + w <= size[0] + 1e-9 and y + h <= size[1] + 1e-9
            covered[round(y):round(y + h), round(x):round(x + w)] += 1
        assert (covered == 1).all(), (size, layout)
    assert tile_boxes(TileLayout("single", (0, 0), (640, 488)), ImageSpec(size=32)) == ((76.0, 0.0, 488.0, 488.0), [])


def test_video_preview_is_the_runtime_sampling(server, motion_video):
    plan = httpx.post(f"{server}/v1/llama3v/media", headers=AUTH,
                      json={"type": "video", "url": _data_uri(motion_video, "video/mp4")}).json()
    indices = sample_indices(30, 10.0, Sampling())
    assert [f["index"] for f in plan["frames"]] == indices and len(indices) == 16
    assert [f["time"] for f in plan["frames"]] == pytest.approx([i / 10 for i in indices])
    assert plan["duration"] == pytest.approx(3.0) and plan["rows_per_frame"] == 16
    head, data = plan["frames"][0]["image"].split(",")
    assert head == "data:image/jpeg;base64" and Image.open(io.BytesIO(base64.b64decode(data))).size == (56, 56)


@pytest.mark.parametrize("body,status", [
    ({"type": "image", "url": "data:image/png;base64,!!"}, 400),
    ({"type": "image", "url": "/etc/hostname"}, 403),
    ({"type": "image", "url": "http://127.0.0.1:1/x.png"}, 403),
    ({"type": "audio", "url": "data:audio/wav;base64,AAAA"}, 400),
])
def test_preview_has_the_api_checks(server, body, status):
    r = httpx.post(f"{server}/v1/llama3v/media", headers=AUTH, json=body)
    assert r.status_code == status and r.json()["error"]["message"]
    assert httpx.post(f"{server}/v1/llama3v/media", json=body).status_code == 401
