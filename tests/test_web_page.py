"""The chat page of `llama3v serve` in a real headless Chromium (Debian's package, driven by Selenium).

Skips only when no Chromium/chromedriver is installed (`scripts/setup.sh` installs them where it can).
Saves docs/web-ui.png, the screenshot the README shows.
"""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from llama3v.models.factory import TinySpec

KEY = "page-key"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "web-ui.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium and chromedriver installed (scripts/setup.sh installs them)")


@pytest.fixture(scope="module")
def server(tiny, running_server):
    built = tiny(TinySpec(seed=2), "hf-5", "f32")
    with running_server(built, "--api-key", KEY, "--max-tiles", "4", "--max-body-mb", "2",
                        "--n-ctx", "4096") as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
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


def test_chat_page_end_to_end(server, browser, photo):
    d = browser
    d.get(server)
    # The server wants a key: the page asks once and keeps it for the tab.
    _wait(d, lambda d: d.find_element("id", "key-dialog").get_attribute("open") is not None)
    d.find_element("id", "key").send_keys(KEY + "\n")
    _wait(d, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    assert d.execute_script("return sessionStorage.getItem('llama3v-api-key')") == KEY
    assert d.find_element("id", "model").text == "model-f32"

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
    SCREENSHOT.parent.mkdir(exist_ok=True)
    d.save_screenshot(str(SCREENSHOT))


def test_errors_are_shown_as_the_api_reports_them(server, browser, tmp_path):
    d = browser
    d.get(server)  # the key is still in this tab's sessionStorage: no question this time
    _wait(d, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    assert d.find_element("id", "key-dialog").get_attribute("open") is None
    big = tmp_path / "big.png"  # noise does not compress: about 3.6 MB
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2 << 20
    d.find_element("id", "file").send_keys(str(big))
    problem = _wait(d, lambda d: _css(d, "#tray .problem"))[0]
    assert problem.text == "Error 413: request body over the 2 MiB limit"


def test_phone_width(server, browser):
    d = browser
    d.set_window_size(390, 844)
    d.get(server)
    _wait(d, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    box = d.find_element("id", "prompt")
    assert box.size["width"] > 300, "the message box takes the phone's width"
