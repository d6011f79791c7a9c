"""The match explorer page at ``GET /`` in a real headless Chromium against a real ``bentoml serve``.

Nothing is mocked: the page's own script uploads the photo to ``/match``, fetches each thumbnail
from ``/thumbnail`` and draws the answer, under the CSP the service sends with the page.
"""

from __future__ import annotations

import json
import os

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 30  # one match on the tiny model takes well under a second; this is for a loaded CI box


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """A headless Chromium through the system chromedriver (never one Selenium Manager downloads)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        # CI installs them (.ci/run); a skip here would hide an untested page.
        pytest.fail(f"missing {', '.join(missing)}: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The DevTools network log shows the headers the page's own fetch calls sent.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # Closed network, running as root, no GPU: keep Chromium from phoning home or needing a sandbox.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, server):
    """The explorer freshly opened, with nothing remembered from an earlier test."""
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    return browser


def _wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S).until(condition, message=f"timed out waiting for {what}")


def _rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#results .match")


def _sent_requests(driver) -> list[dict]:
    """The requests the page sent since the last call, as DevTools saw them (url, method, headers)."""
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [event["params"]["request"] for event in events if event["method"] == "Network.requestWillBeSent"]


def _thumbnail_loaded(driver, row) -> bool:
    return bool(
        driver.execute_script(
            "const img = arguments[0].querySelector('img.thumb');"
            " return !!img && img.complete && img.naturalWidth > 0;",
            row,
        )
    )


def test_a_catalogue_photo_shows_its_sku_first_with_thumbnails(page, packaged, tmp_path):
    champion = packaged.champion
    sku, paths = next(iter(champion.catalogue.items()))
    top_k = int(page.find_element(By.ID, "top-k").get_attribute("value"))
    assert top_k == 5  # the page's default; the 6-SKU test catalogue can fill it

    _sent_requests(page)  # drop what the page load logged
    page.find_element(By.ID, "photo").send_keys(str(paths[0]))
    _wait(page, lambda d: len(_rows(d)) == top_k, f"{top_k} result rows")
    rows = _rows(page)

    assert [row.find_element(By.CSS_SELECTOR, ".sku").text for row in rows][0] == sku
    assert len({row.find_element(By.CSS_SELECTOR, ".sku").text for row in rows}) == top_k  # distinct SKUs
    scores = [row.find_element(By.CSS_SELECTOR, ".score").text for row in rows]
    assert all(len(text.split(".")[1]) == 4 for text in scores), scores  # four decimals
    assert float(scores[0]) == pytest.approx(1.0, abs=1e-3)  # a catalogue image matches itself
    assert [float(s) for s in scores] == sorted((float(s) for s in scores), reverse=True)
    assert rows[0].find_element(By.CSS_SELECTOR, ".flag").text in ("confident", "below threshold")

    answered_by = page.find_element(By.ID, "answered-by").text
    assert f"v{champion.version}" in answered_by and champion.index_checksum[:12] in answered_by, answered_by
    assert champion.index_checksum[:13] not in answered_by  # only the 12-character prefix is shown

    # Each thumbnail arrives by its own POST /thumbnail and is shown from a blob: URL.
    _wait(page, lambda d: all(_thumbnail_loaded(d, row) for row in _rows(d)), "every thumbnail to load")
    assert page.find_element(By.CSS_SELECTOR, "#results .match img.thumb").get_attribute("src").startswith("blob:")
    assert _thumbnail_loaded(page, _rows(page)[0])
    calls = [r for r in _sent_requests(page) if r["method"] == "POST"]
    assert len(calls) == 1 + top_k  # one match, one thumbnail per row
    assert not any("authorization" in {name.lower() for name in r["headers"]} for r in calls)  # no key typed
    assert page.find_element(By.ID, "preview").is_displayed()
    assert not page.find_element(By.ID, "error").is_displayed()

    page.save_screenshot(str(tmp_path / "explorer.png"))
    assert (tmp_path / "explorer.png").stat().st_size > 0


def test_a_bad_upload_shows_the_servers_error(page, tmp_path):
    fake = tmp_path / "not-a-photo.jpg"
    fake.write_text("a text file with a photo's name\n")

    page.find_element(By.ID, "photo").send_keys(str(fake))
    error = page.find_element(By.ID, "error")
    _wait(page, lambda d: error.is_displayed() and error.text, "the error message")

    assert "not an image" in error.text, error.text  # the server's own words, not a generic failure
    assert _rows(page) == []
    assert page.find_element(By.ID, "answered-by").text == ""


def test_the_api_key_is_remembered_and_sent_on_every_call(page, packaged):
    page.find_element(By.ID, "api-key").send_keys("s3cret-key")
    page.refresh()
    assert page.find_element(By.ID, "api-key").get_attribute("value") == "s3cret-key"  # from localStorage

    page.find_element(By.ID, "top-k").clear()
    page.find_element(By.ID, "top-k").send_keys("2")
    _sent_requests(page)  # drop what the page load logged
    paths = list(packaged.champion.catalogue.values())[1]
    page.find_element(By.ID, "photo").send_keys(str(paths[0]))
    # Keys are off on the test server, so it lets any key through and the match still answers.
    _wait(page, lambda d: len(_rows(d)) == 2, "2 result rows (the top-k typed in)")
    _wait(page, lambda d: all(_thumbnail_loaded(d, row) for row in _rows(d)), "both thumbnails to load")

    calls = [r for r in _sent_requests(page) if r["method"] == "POST"]
    assert sorted(r["url"].removeprefix(page.current_url.rstrip("/")) for r in calls) == [
        "/match",
        "/thumbnail",
        "/thumbnail",
    ]
    for request in calls:
        headers = {name.lower(): value for name, value in request["headers"].items()}
        assert headers.get("authorization") == "Bearer s3cret-key", request
