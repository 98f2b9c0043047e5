"""The web chat at ``/`` in headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium): pick the model, type a question, watch the answer stream in, screenshot.

The screenshot goes to the test's tmp folder, or to ``$FOLK_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(
        not (CHROMEDRIVER and CHROMIUM), reason="needs chromium + chromium-driver (see .ci/run)"
    ),
    pytest.mark.slow,  # the real default model and a headless browser
]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1000,800")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_has_no_external_resources(default_server):
    html = httpx.get(default_server.url + "/").text
    assert "http://" not in html and "https://" not in html  # no CDN: all served here
    assert httpx.get(default_server.url + "/web/app.js").status_code == 200
    assert httpx.get(default_server.url + "/web/../app.py").status_code == 404


def test_chat_streams_an_answer(default_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(default_server.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: Select(d.find_element(By.ID, "model")).options)
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == "smollm2"
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("40")
    browser.find_element(By.ID, "input").send_keys("What is the capital of France?")
    browser.find_element(By.ID, "send").click()

    def answer(d):
        items = d.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
        return items[-1].text if items else ""

    # streamed: the answer is seen partly written before it is finished
    partial_seen = []
    deadline = time.time() + 180
    while time.time() < deadline:
        status = browser.find_element(By.ID, "status").text
        text = answer(browser)
        if status.startswith("finished"):
            break
        if text:
            partial_seen.append(text)
        time.sleep(0.02)
    assert browser.find_element(By.ID, "status").text.startswith("finished")
    final = answer(browser)
    assert "Paris" in final
    assert partial_seen and len(partial_seen[0]) < len(final)
    out = Path(os.environ.get("FOLK_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "web-chat.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    # the conversation is kept in the page (the next question sends both turns)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 2
